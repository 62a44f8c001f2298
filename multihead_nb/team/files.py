"""Team files: a team (its heads' definitions, its steps, variable defaults) as a small YAML or JSON file.

Owns: the file format (YAML or JSON by the suffix), writing a team to a file and reading one into a `TeamSpec`
(its validation, every error naming the file and the field, is `file_schema.py`). Knows nothing of workspaces or
runs: `load.py` turns a spec into heads and a `Team`.

    multihead_team: 1                 # the format's version
    name: code                        # the team's name (served over HTTP as a model); default: the file's stem
    description: write, review, document
    heads:                            # one per step: model, system and any `add_head` option
      coder: {model: HuggingFaceTB/SmolLM2-135M-Instruct, system: You write Python., max_tokens: 128}
    steps:                            # head: template, or head: {template, rounds, sees, schema, json, options}
      coder: Write a Python function that {task}
    variables: {task: reverses a list}  # defaults of the templates' variables
    input: task                       # the variable a chat message fills (default: the first)
    output: coder                     # the step whose answer is the team's answer (default: the last unread one)

A model starting with `./` or `../` is a folder relative to the file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..engine.sampling import SAMPLING_OPTIONS, SamplingParams
from ..workspace.heads import HEAD_OPTIONS, Head
from .file_schema import FORMAT_VERSION, TeamFileError, TeamSpec, parse_team_document
from .step import Step

SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}

# ---- heads and steps as plain data ----------------------------------------------------------------------
SECRETS = ("api_key",)  # never written to a file (a remote head's key comes from MULTIHEAD_REMOTE_API_KEY there)


def head_definition(head: Head, *, with_secrets: bool = False) -> dict:
    """A head as `{model, system, option: value}`, with only the options that differ from the defaults (and
    without its API key unless `with_secrets`)."""
    out: dict = {"model": head.model}
    if head.system:
        out["system"] = head.system
    base = SamplingParams()
    for name in SAMPLING_OPTIONS:
        value = getattr(head.sampling, name)
        if value != getattr(base, name):
            out[name] = list(value) if name == "stop" else value
    defaults = {f.name: f.default for f in dataclasses.fields(Head) if f.default is not dataclasses.MISSING}
    for name in HEAD_OPTIONS:
        if name in SAMPLING_OPTIONS or not hasattr(head, name) or (name in SECRETS and not with_secrets):
            continue
        value = getattr(head, name)
        if value != defaults.get(name):
            out[name] = value
    return out


def head_options(head: Head) -> dict:
    """The `add_head` keyword options that rebuild `head` (its definition without model and system)."""
    return {k: v for k, v in head_definition(head, with_secrets=True).items() if k not in ("model", "system")}


def step_definition(step: Step) -> str | dict:
    """A step as a template string, or a mapping when it has more than a template."""
    out: dict = {"template": step.template}
    if step.rounds != 1:
        out["rounds"] = step.rounds
    if step.sees:
        out["sees"] = list(step.sees)
    if step.schema:
        out["schema"] = {k: t.__name__ for k, t in step.schema.items()}
    elif step.json:
        out["json"] = True
    if step.options:
        out["options"] = dict(step.options)
    return step.template if len(out) == 1 else out


def team_document(spec: TeamSpec) -> dict:
    """The mapping a team file holds."""
    doc: dict = {"multihead_team": FORMAT_VERSION, "name": spec.name}
    if spec.description:
        doc["description"] = spec.description
    doc["heads"] = {name: head_definition(h) for name, h in spec.heads.items()}
    doc["steps"] = {name: step_definition(s) for name, s in spec.steps.items()}
    if spec.variables:
        doc["variables"] = dict(spec.variables)
    if spec.input is not None:
        doc["input"] = spec.input
    if spec.output is not None:
        doc["output"] = spec.output
    return doc


# ---- writing ----------------------------------------------------------------------------------------------
def file_format(path: Path) -> str:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise TeamFileError(f"{path}: a team file ends in .yaml, .yml or .json, got {path.suffix or 'no suffix'!r}")
    return kind


def write_team_file(spec: TeamSpec, path) -> Path:
    """Write `spec` as YAML or JSON (by the suffix); local model folders inside the file's folder become relative."""
    path = Path(path)
    kind = file_format(path)
    doc = team_document(spec)
    for d in doc["heads"].values():
        d["model"] = _relative_model(d["model"], path.parent)
    if kind == "json":
        text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    else:
        import yaml

        class Dumper(yaml.SafeDumper):  # multi-line strings (prompts) as readable | blocks
            pass

        def text_block(dumper, value):
            style = "|" if "\n" in value else None
            return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

        Dumper.add_representer(str, text_block)
        text = yaml.dump(doc, Dumper=Dumper, sort_keys=False, allow_unicode=True, width=4096)
    path.write_text(text, encoding="utf-8")
    return path


def save_team(team, path, *, variables: dict | None = None) -> Path:
    """Write a `Team` (of a workspace) with its heads' current definitions; `variables` add to its defaults."""
    path = Path(path)
    values = {**team.defaults, **(variables or {})}
    unknown = sorted(set(values) - set(team.variables))
    if unknown:
        raise TeamFileError(f"{path}: variable {unknown[0]!r} is not a placeholder of this team "
                            f"(placeholders: {', '.join(team.variables) or 'none'})")
    spec = TeamSpec(
        name=team.name or path.stem, heads={h: team.ws.heads[h] for h in team.steps}, steps=dict(team.steps),
        variables={k: values[k] for k in team.variables if k in values}, description=team.description,
        input=team.input, output=team.output, source=str(path),
    )
    return write_team_file(spec, path)


def _relative_model(model: str, folder: Path) -> str:
    p = Path(model)
    if p.is_absolute() and p.exists():
        try:
            return "./" + p.resolve().relative_to(folder.resolve()).as_posix()
        except ValueError:
            return model
    return model


# ---- reading ----------------------------------------------------------------------------------------------
def read_team_file(path) -> TeamSpec:
    """Read and validate a team file (the graph itself is checked by `Team.check`, in `load.py`)."""
    path = Path(path)
    kind = file_format(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TeamFileError(f"{path}: cannot read the team file: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise TeamFileError(f"{path}: not a UTF-8 text file") from None
    doc = _parse(text, kind, path)
    return parse_team_document(doc, path)


def _parse(text: str, kind: str, path: Path):
    if kind == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise TeamFileError(f"{path}: line {e.lineno} column {e.colno}: not valid JSON: {e.msg}") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise TeamFileError(f"{path}: {where}not valid YAML: {problem}") from None
