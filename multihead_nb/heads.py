"""Heads: a model plus a system prompt, sampling defaults and limits.

Owns: `SamplingParams` (validated sampling options) and `Head` (a named agent's definition, with how its model is
run: `backend` and, for region backends such as EXL2, the `region` of the pool its model's K/V lives in). Knows
nothing of pages, tensors or the engine; the workspace turns a head's `quota` and `region` into pages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import ConfigError

SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "ignore_eos")
LIMIT_OPTIONS = ("quota", "weight", "max_concurrent")
MODEL_OPTIONS = ("backend", "region")
HEAD_OPTIONS = SAMPLING_OPTIONS + LIMIT_OPTIONS + MODEL_OPTIONS


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; `seed` makes sampling reproducible per request."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop must be non-empty strings, got {self.stop!r}")
        _check_number("temperature", self.temperature, lo=0.0)
        _check_number("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        _check_int("top_k", self.top_k, lo=0)
        _check_int("max_tokens", self.max_tokens, lo=1)
        if self.seed is not None:
            _check_int("seed", self.seed, lo=0)
        if not isinstance(self.ignore_eos, bool):
            raise ConfigError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def replace(self, **overrides) -> "SamplingParams":
        unknown = set(overrides) - set(SAMPLING_OPTIONS)
        if unknown:
            raise ConfigError(f"unknown sampling option(s) {sorted(unknown)}; known: {', '.join(SAMPLING_OPTIONS)}")
        return dataclasses.replace(self, **overrides)


@dataclass
class Head:
    """A named agent: which model it runs, its system prompt, sampling defaults and limits."""

    name: str
    model: str
    system: str | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    quota: str | int | float | None = None  # a share of the pool ("25%", 0.25) or a size ("256MiB")
    weight: float = 1.0  # fair share relative to other heads
    max_concurrent: int | None = None
    # "auto": EXL2 checkpoints run on the "exl2" backend, others natively; or "native", or a workspace backend name
    backend: str = "auto"
    region: str | int | float | None = None  # region backends: the model's share of the pool ("25%") or a size

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ConfigError(
                f"a head name must be a Python identifier (letters, digits, _), got {self.name!r}; "
                "team templates refer to heads as {name}"
            )
        _check_number("weight", self.weight, lo=0.0, lo_open=True)
        if self.max_concurrent is not None:
            _check_int("max_concurrent", self.max_concurrent, lo=1)
        if not isinstance(self.backend, str) or not self.backend:
            raise ConfigError(f"backend must be a name like 'auto', 'native' or 'exl2', got {self.backend!r}")

    @classmethod
    def from_options(cls, name: str, model: str, system: str | None = None, **options) -> "Head":
        unknown = set(options) - set(HEAD_OPTIONS)
        if unknown:
            raise ConfigError(f"unknown head option(s) {sorted(unknown)}; known: {', '.join(HEAD_OPTIONS)}")
        sampling = SamplingParams(**{k: v for k, v in options.items() if k in SAMPLING_OPTIONS})
        limits = {k: v for k, v in options.items() if k in LIMIT_OPTIONS + MODEL_OPTIONS and v is not None}
        return cls(name=name, model=model, system=system, sampling=sampling, **limits)


def _check_number(name, value, *, lo=None, hi=None, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name} must be <= {hi}, got {value}")


def _check_int(name, value, *, lo):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise ConfigError(f"{name} must be >= {lo}, got {value}")
