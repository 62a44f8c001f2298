"""Sampling options of one request: `SamplingParams`, validated at construction.

Owns which options exist (`SAMPLING_OPTIONS`) and their ranges. Knows nothing of heads, models or tensors; the
sampler reads these, a head keeps its defaults in one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import ConfigError

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (as vLLM does)
MAX_TEMPERATURE = 100.0
SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "max_tokens", "stop", "seed", "ignore_eos")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy, and so is any temperature below `GREEDY_BELOW` (dividing logits
    by it would overflow); at most `MAX_TEMPERATURE`. `seed` makes sampling reproducible per request."""

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
        elif isinstance(self.stop, (list, tuple)):
            object.__setattr__(self, "stop", tuple(self.stop))
        else:
            raise ConfigError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop must be non-empty strings, got {self.stop!r}")
        check_number("temperature", self.temperature, lo=0.0, hi=MAX_TEMPERATURE)
        check_number("top_p", self.top_p, lo=0.0, hi=1.0, lo_open=True)
        check_int("top_k", self.top_k, lo=0)
        check_int("max_tokens", self.max_tokens, lo=1)
        if self.seed is not None:
            check_int("seed", self.seed, lo=0)
        if not isinstance(self.ignore_eos, bool):
            raise ConfigError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def replace(self, **overrides) -> "SamplingParams":
        unknown = set(overrides) - set(SAMPLING_OPTIONS)
        if unknown:
            raise ConfigError(f"unknown sampling option(s) {sorted(unknown)}; known: {', '.join(SAMPLING_OPTIONS)}")
        return dataclasses.replace(self, **overrides)


def check_number(name, value, *, lo=None, hi=None, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ConfigError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name} must be <= {hi}, got {value}")


def check_int(name, value, *, lo):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if value < lo:
        raise ConfigError(f"{name} must be >= {lo}, got {value}")
