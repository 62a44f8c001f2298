"""Team files: a team (its heads' definitions, its steps, variable defaults) as a small YAML or JSON file.

Owns: the file format, its validation (every error names the file and the field; an unknown key is an error),
writing a team to a file and reading one into a `TeamSpec` (plain definitions: `Head`s and `Step`s). Knows nothing
of workspaces or runs: `load.py` turns a spec into heads and a `Team`.

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
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.sampling import SAMPLING_OPTIONS, SamplingParams
from ..errors import ConfigError, MultiHeadError
from ..workspace.heads import HEAD_OPTIONS, Head
from .step import TYPES, Step

FORMAT_VERSION = 1
TOP_KEYS = ("multihead_team", "name", "description", "heads", "steps", "variables", "input", "output")
HEAD_KEYS = ("model", "system") + HEAD_OPTIONS
STEP_KEYS = ("template", "rounds", "sees", "schema", "json", "options")
SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".json": "json"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")


class TeamFileError(ConfigError):
    """A team file that cannot be read or is not a valid team; the message names the file and the field."""


@dataclass
class TeamSpec:
    """A team as a file holds it: head definitions (name -> Head), steps (name -> Step) and the rest."""

    name: str
    heads: dict[str, Head]
    steps: dict[str, Step]
    variables: dict[str, str] = field(default_factory=dict)
    description: str = ""
    input: str | None = None
    output: str | None = None
    source: str = "<team>"  # the file it came from, for error messages


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


def parse_team_document(doc, path) -> TeamSpec:
    """A `TeamSpec` from a file's parsed mapping; errors are `TeamFileError`s naming `path` and the field."""
    path = Path(path)

    def fail(where: str, problem: str):
        raise TeamFileError(f"{path}: {where}: {problem}")

    if not isinstance(doc, dict):
        raise TeamFileError(f"{path}: a team file holds a mapping (heads:, steps:, ...), got {_kind(doc)}")
    _no_unknown(doc, TOP_KEYS, "the top level", fail)
    version = doc.get("multihead_team", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        fail("multihead_team", f"this MultiHead reads format version {FORMAT_VERSION}, got {version!r}")
    name = doc.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        fail("name", f"a name of letters, digits and _ . : - (it is served as a model name), got {name!r}")
    description = doc.get("description", "")
    if not isinstance(description, str):
        fail("description", f"a string, got {_kind(description)}")
    for key in ("heads", "steps"):
        if key not in doc:
            fail(key, "missing (a team file needs heads: and steps:)")
        if not isinstance(doc[key], dict) or not doc[key]:
            fail(key, f"a non-empty mapping of head name -> definition, got {_kind(doc[key])}")
    heads = {str(n): _head(n, d, path, fail) for n, d in doc["heads"].items()}
    steps = {}
    for n, d in doc["steps"].items():
        if n not in heads:
            fail(f"steps.{n}", f"no head {n!r} is defined under heads: ({', '.join(heads)})")
        steps[n] = _step(n, d, fail)
    unused = [n for n in heads if n not in steps]
    if unused:
        fail(f"heads.{unused[0]}", "defined but has no step (every head of a team file runs a step)")
    variables = doc.get("variables") or {}
    if not isinstance(variables, dict):
        fail("variables", f"a mapping of variable -> default value, got {_kind(variables)}")
    for k, v in variables.items():
        if not isinstance(v, (str, int, float, bool)):
            fail(f"variables.{k}", f"a string or number, got {_kind(v)}")
    variables = {str(k): v if isinstance(v, str) else str(v) for k, v in variables.items()}
    for key in ("input", "output"):
        if doc.get(key) is not None and not isinstance(doc[key], str):
            fail(key, f"a name, got {_kind(doc[key])}")
    return TeamSpec(name, heads, steps, variables, description, doc.get("input"), doc.get("output"), str(path))


def _head(name, d, path: Path, fail) -> Head:
    where = f"heads.{name}"
    if not isinstance(name, str) or not name.isidentifier():
        fail(where, "a head name must be a Python identifier (letters, digits, _)")
    if isinstance(d, str):
        d = {"model": d}
    if not isinstance(d, dict):
        fail(where, f"a mapping with model: and options, got {_kind(d)}")
    _no_unknown(d, HEAD_KEYS, where, fail)
    model = d.get("model")
    if not isinstance(model, str) or not model.strip():
        fail(f"{where}.model", f"missing or not a model name (a hub id, folder or file), got {model!r}")
    if model.startswith(("./", "../")):
        model = str((path.parent / model).resolve())
    system = d.get("system")
    if system is not None and not isinstance(system, str):
        fail(f"{where}.system", f"a string, got {_kind(system)}")
    options = {k: v for k, v in d.items() if k not in ("model", "system")}
    if isinstance(options.get("stop"), list):
        options["stop"] = tuple(options["stop"])
    for k, v in options.items():  # each option alone first, so the error names it
        try:
            Head.from_options(name, model, **{k: v})
        except MultiHeadError as e:
            fail(f"{where}.{k}", _strip_name(str(e), k))
    try:
        return Head.from_options(name, model, system, **options)
    except MultiHeadError as e:
        fail(where, str(e))


def _step(name: str, d, fail) -> Step:
    where = f"steps.{name}"
    if isinstance(d, str):
        d = {"template": d}
    if not isinstance(d, dict):
        fail(where, f"a template string or a mapping with template:, got {_kind(d)}")
    _no_unknown(d, STEP_KEYS, where, fail)
    if not isinstance(d.get("template"), str):
        fail(f"{where}.template", f"missing or not a string, got {_kind(d.get('template'))}")
    options = d.get("options") or {}
    if not isinstance(options, dict):
        fail(f"{where}.options", f"a mapping of sampling option -> value, got {_kind(options)}")
    for k, v in options.items():
        try:
            SamplingParams().replace(**{k: tuple(v) if k == "stop" and isinstance(v, list) else v})
        except MultiHeadError as e:
            fail(f"{where}.options.{k}", _strip_name(str(e), k))
    schema = d.get("schema")
    if schema is not None:
        if not isinstance(schema, dict):
            fail(f"{where}.schema", f"a mapping of field -> type name, got {_kind(schema)}")
        for k, t in schema.items():
            if t not in TYPES:
                fail(f"{where}.schema.{k}", f"a type name ({', '.join(TYPES)}), got {t!r}")
    try:
        return Step(d["template"], rounds=d.get("rounds", 1), sees=d.get("sees", ()), schema=schema,
                    json=bool(d.get("json", False)), options=dict(options))
    except MultiHeadError as e:
        fail(where, str(e))


def _no_unknown(d: dict, known: tuple, where: str, fail) -> None:
    unknown = [k for k in d if k not in known]
    if unknown:
        prefix = "" if where == "the top level" else f"{where}."
        fail(f"{prefix}{unknown[0]}", f"unknown key; known {'at ' if not prefix else 'under ' + where + ': '}"
             f"{'the top level: ' if not prefix else ''}{', '.join(known)}")


def _strip_name(message: str, option: str) -> str:
    """'temperature must be a number, got x' -> 'must be a number, got x' (the field is named already)."""
    return message[len(option) + 1:] if message.startswith(option + " ") else message


def _kind(value) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"[:80]
