"""The three classic workflows (the MultiHead article's benchmark): code, research and creative.

Owns: `Workflow`, a view of a built-in team file (`builtin/*.yaml`: the heads' system prompts, the step templates,
example variables) with `setup(ws, model)`, which adds the heads on one model and returns the team. Knows nothing
of how teams run or of the file format (`files.py`, `load.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .files import step_definition
from .load import BUILTIN, load_team, read_team
from .step import Step


@dataclass(frozen=True)
class Workflow:
    name: str
    systems: dict  # head -> system prompt
    steps: dict  # head -> template (a step with only a template) or Step
    variables: dict  # example run variables
    path: Path | None = None  # its team file (None: a workflow written in code)

    @classmethod
    def from_file(cls, path: Path) -> "Workflow":
        spec = read_team(path)
        steps = {h: s.template if isinstance(step_definition(s), str) else s for h, s in spec.steps.items()}
        return cls(spec.name, {h: d.system for h, d in spec.heads.items()}, steps, dict(spec.variables), Path(path))

    def setup(self, ws, model: str, *, prefix: str = "", replace: bool = True, **head_options):
        """Add this workflow's heads (named `prefix + head`) on `model` and return the team."""
        if self.path is not None:
            return load_team(self.path, ws, model=model, prefix=prefix, replace=replace, **head_options)
        names = {h: prefix + h for h in self.systems}
        for head, system in self.systems.items():
            ws.add_head(names[head], model, system=system, replace=replace, **head_options)
        steps = {}
        for head, step in self.steps.items():
            s = step if isinstance(step, Step) else Step(step)
            template = s.template
            for h in self.systems:
                template = template.replace("{" + h + "}", "{" + names[h] + "}")
            steps[names[head]] = Step(template, rounds=s.rounds, sees=tuple(names[x] for x in s.sees),
                                      schema=s.schema, json=s.json, options=dict(s.options))
        return ws.team(steps)


CODE = Workflow.from_file(BUILTIN / "code.yaml")
RESEARCH = Workflow.from_file(BUILTIN / "research.yaml")
CREATIVE = Workflow.from_file(BUILTIN / "creative.yaml")

WORKFLOWS = {w.name: w for w in (CODE, RESEARCH, CREATIVE)}
