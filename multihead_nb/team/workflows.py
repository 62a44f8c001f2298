"""The three classic workflows (the MultiHead article's benchmark): code, research and creative.

Owns: `Workflow`, a view of a built-in team file (`builtin/*.yaml`: the heads' system prompts, the step templates,
example variables) with `setup(ws, model)`, which adds the heads on one model and returns the team. Knows nothing
of how teams run or of the file format (`files.py`, `load.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .load import BUILTIN, load_team, read_team


@dataclass(frozen=True)
class Workflow:
    name: str
    systems: dict  # head -> system prompt
    steps: dict  # head -> Step
    variables: dict  # example run variables
    path: Path  # its team file

    @classmethod
    def from_file(cls, path: Path) -> "Workflow":
        spec = read_team(path)
        return cls(spec.name, {h: d.system for h, d in spec.heads.items()}, dict(spec.steps), dict(spec.variables),
                   Path(path))

    def setup(self, ws, model: str, *, prefix: str = "", replace: bool = True, **head_options):
        """Add this workflow's heads (named `prefix + head`) on `model` and return the team."""
        return load_team(self.path, ws, model=model, prefix=prefix, replace=replace, **head_options)


CODE = Workflow.from_file(BUILTIN / "code.yaml")
RESEARCH = Workflow.from_file(BUILTIN / "research.yaml")
CREATIVE = Workflow.from_file(BUILTIN / "creative.yaml")

WORKFLOWS = {w.name: w for w in (CODE, RESEARCH, CREATIVE)}
