"""A head's JSON answer: parsed (a ```json fence is allowed) and checked against a step's schema (field → type).

Owns only that check; a failure is a `ValueError` naming the problem, which the team run turns into the run's
error for that head. Knows nothing of heads, runs or the bus.
"""

from __future__ import annotations

import json
import re


def parse_json_output(text: str, schema: dict | None) -> object:
    """Parse a head's JSON answer (a ```json fence is allowed) and check `schema` field types."""
    m = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    src = (m.group(1) if m else text).strip()
    try:
        value = json.loads(src)
    except json.JSONDecodeError as e:
        raise ValueError(f"{e.msg} at line {e.lineno} column {e.colno} of {src[:60]!r}") from None
    if schema:
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object with fields {sorted(schema)}, got {type(value).__name__}")
        for key, typ in schema.items():
            if key not in value:
                raise ValueError(f"missing field {key!r}")
            ok = isinstance(value[key], typ) and not (typ in (int, float) and isinstance(value[key], bool))
            if typ is float and isinstance(value[key], int) and not isinstance(value[key], bool):
                ok = True
            if not ok:
                raise ValueError(f"field {key!r} should be {typ.__name__}, got {type(value[key]).__name__}")
    return value
