"""A team's step: the prompt template a head runs with, its rounds, the heads that see it, its JSON schema and
sampling overrides; and the placeholders of a template.

Owns: `Step` (validated at construction) and `placeholders`. Knows nothing of workspaces, graphs or runs.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

from ..errors import TeamError

TYPES = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}  # schema type names
MAX_ROUNDS = 100  # a refine loop of more rounds is a mistake, and planning it would take seconds


@dataclass
class Step:
    """A head's part in a team.

    template: the user prompt, with `{head}` and `{variable}` placeholders.
    rounds: run this step N times; between rounds the heads in `sees` run on its latest output, and in round r a
        placeholder naming this head or a head in `sees` reads that head's output of round r-1 ("" in round 1).
    schema: the output must be a JSON object with these fields (field -> type or type name); `json=True` asks only
        for valid JSON.
    options: sampling overrides for this step (max_tokens, temperature, ...).
    """

    template: str
    rounds: int = 1
    sees: tuple[str, ...] = ()
    schema: dict | None = None
    json: bool = False
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.template, str):
            raise TeamError(f"a step's template must be a string, got {type(self.template).__name__}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or not 1 <= self.rounds <= MAX_ROUNDS:
            raise TeamError(f"rounds must be an integer from 1 to {MAX_ROUNDS}, got {self.rounds!r}")
        self.sees = (self.sees,) if isinstance(self.sees, str) else tuple(self.sees)
        if self.sees and self.rounds == 1:
            raise TeamError("`sees` only makes sense with rounds > 1")
        if self.schema is not None:
            if not isinstance(self.schema, dict):
                raise TeamError(f"a schema is a dict of field -> type, got {self.schema!r}")
            self.schema = {k: TYPES.get(v, v) if isinstance(v, str) else v for k, v in self.schema.items()}
            for k, v in self.schema.items():
                if not isinstance(v, type):
                    raise TeamError(f"schema field {k!r} must map to a type (or str, int, ...), got {v!r}")
            self.json = True


def placeholders(template: str) -> list[str]:
    """Field names in a template, in order (`{{` and `}}` are literal braces)."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise TeamError(f"malformed template {template!r}: {e}") from None
    for n in names:
        if not n.isidentifier():
            raise TeamError(f"placeholder {{{n}}} in {template!r} must be a plain name like {{task}}")
    return names
