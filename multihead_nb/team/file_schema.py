"""The schema of a team file: `TeamSpec` (plain definitions: `Head`s and `Step`s) and the validation of a parsed
file into one, every error a `TeamFileError` naming the file and the field (an unknown key is an error).

Owns which keys exist at each level and what their values may be. Knows nothing of YAML, JSON or writing
(`files.py`), nor of workspaces (`load.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..engine.sampling import SamplingParams
from ..errors import ConfigError, MultiHeadError
from ..workspace.heads import HEAD_OPTIONS, Head
from .step import TYPES, Step

FORMAT_VERSION = 1
TOP_KEYS = ("multihead_team", "name", "description", "heads", "steps", "variables", "input", "output")
HEAD_KEYS = ("model", "system") + HEAD_OPTIONS
STEP_KEYS = ("template", "rounds", "sees", "schema", "json", "options")
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
