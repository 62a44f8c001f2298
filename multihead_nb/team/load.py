"""Loading a team file into a workspace: its heads added (or replaced), its steps made a `Team`.

Owns: finding a team file (a path, or the name of a built-in one), the overrides a caller applies on load (one
model for every head, a name prefix, head options), validating the whole team before the workspace changes, and
adding its heads as one change (a head that fails to load takes the ones added before it away and puts back the
ones it replaced). Knows nothing of the file format (`files.py`) or of runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..errors import MultiHeadError
from .files import TeamFileError, TeamSpec, head_options, read_team_file
from .step import Step
from .team import Team

BUILTIN = Path(__file__).resolve().parent / "builtin"  # the built-in workflows' team files


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN.glob("*.yaml"))


def find_team_file(source) -> Path:
    """`source` as a path, or the name of a built-in team ("code", "research", "creative")."""
    path = Path(source).expanduser()
    if not path.exists() and isinstance(source, str) and not path.suffix and (BUILTIN / f"{source}.yaml").exists():
        return BUILTIN / f"{source}.yaml"
    if not path.exists():
        raise TeamFileError(f"{path}: no such team file (nor a built-in team: {', '.join(builtin_names())})")
    return path


def read_team(source, *, model: str | None = None, prefix: str = "", **head_options_) -> TeamSpec:
    """A validated spec from a file or built-in name, with the overrides applied: `model` for every head, `prefix`
    on every head name (and the templates' references to them), `head_options_` on every head."""
    path = find_team_file(source)
    spec = read_team_file(path)
    if model is not None or head_options_:
        heads = {}
        for name, h in spec.heads.items():
            try:
                heads[name] = type(h).from_options(name, str(model or h.model), h.system,
                                                   **{**head_options(h), **head_options_})
            except MultiHeadError as e:
                raise TeamFileError(f"{path}: heads.{name} with the options given: {e}") from None
        spec.heads = heads
    if prefix:
        spec = _prefixed(spec, prefix)
    try:
        Team.check(spec.steps, spec.heads, **_team_options(spec))
    except MultiHeadError as e:
        raise TeamFileError(f"{path}: {e}") from None
    return spec


def load_team(source, ws, *, model: str | None = None, prefix: str = "", replace: bool = True,
              **head_options_) -> Team:
    """Add the team file's heads to `ws` (replacing heads of the same names unless `replace=False`) and return the
    team. Everything is validated first; a head that cannot be added (a missing model, a full pool) undoes the
    heads this call added or replaced, and the error names the file and the head."""
    spec = read_team(source, model=model, prefix=prefix, **head_options_)
    taken = [n for n in spec.heads if n in ws.heads]
    if taken and not replace:
        raise TeamFileError(f"{spec.source}: heads.{taken[0]}: a head of that name exists already (replace=True "
                            "replaces it)")
    old = {n: ws.heads[n] for n in taken}
    added: list[str] = []
    try:
        for name, h in spec.heads.items():
            ws.add_head(name, h.model, h.system, replace=True, **head_options(h))
            added.append(name)
    except MultiHeadError as e:
        for name in added:
            if name not in old:
                ws.remove_head(name)
        for name, h in old.items():
            if name in added or name not in ws.heads or ws.heads[name] is not h:
                ws.add_head(name, h.model, h.system, replace=True, **head_options(h))
        failed = next(n for n in spec.heads if n not in added)
        raise TeamFileError(f"{spec.source}: heads.{failed}: {e}") from None
    return Team(ws, spec.steps, **_team_options(spec))


def _team_options(spec: TeamSpec) -> dict:
    return dict(name=spec.name, defaults=spec.variables, input=spec.input, output=spec.output,
                description=spec.description)


def _prefixed(spec: TeamSpec, prefix: str) -> TeamSpec:
    names = {h: prefix + h for h in spec.heads}
    heads = {names[n]: dataclasses.replace(h, name=names[n]) for n, h in spec.heads.items()}
    steps = {}
    for head, s in spec.steps.items():
        template = s.template
        for h in spec.heads:
            template = template.replace("{" + h + "}", "{" + names[h] + "}")
        steps[names[head]] = Step(template, rounds=s.rounds, sees=tuple(names[x] for x in s.sees),
                                  schema=s.schema, json=s.json, options=dict(s.options))
    output = names.get(spec.output, spec.output) if spec.output else None
    return dataclasses.replace(spec, heads=heads, steps=steps, output=output)
