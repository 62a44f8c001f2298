"""What the scheduler hands the engine, and what it keeps per head.

Owns: `Chunk` (one request's tokens computed in a step, and whether it samples), `Failure` (a request planning
found can never run, already out of the scheduler, and why), `StepPlan` (a step's chunks and failures) and
`HeadQueue` (a head's fairness counter, limits, running and waiting requests). Plain data: the policy is
`scheduler.py`, running a plan and finalizing its failures is `engine.py`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..errors import ConfigError
from .request import Request


@dataclass
class Chunk:
    request: Request
    num_tokens: int  # tokens of the request computed this step, from request.num_computed on
    sample: bool  # the chunk reaches the last known token of a closed prompt: sample the next token


@dataclass(frozen=True)
class Failure:
    """A request the scheduler found can never run (it is out of the queues, its pages freed); the engine ends it."""

    request: Request  # removed from the scheduler, its pages freed; its status is still the engine's to set
    message: str  # what a `RequestError` for it says


@dataclass
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)

    def by_model(self) -> dict[str, list[Chunk]]:
        out: dict[str, list[Chunk]] = {}
        for c in self.chunks:
            out.setdefault(c.request.model, []).append(c)
        return out


@dataclass
class HeadQueue:
    name: str
    model: str
    weight: float = 1.0
    quota_pages: int | None = None
    max_concurrent: int | None = None
    counter: float = 0.0  # virtual tokens: tokens served / weight, lifted when the head becomes backlogged
    served: int = 0  # tokens computed for this head, all time
    running: list[Request] = field(default_factory=list)
    waiting: deque = field(default_factory=deque)

    def __post_init__(self):
        if not self.weight > 0:
            raise ConfigError(f"head {self.name!r}: weight must be positive, got {self.weight!r}")
        for what in ("quota_pages", "max_concurrent"):
            value = getattr(self, what)
            if value is not None and value < 1:
                raise ConfigError(f"head {self.name!r}: {what} must be at least 1, got {value!r}")

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(r.num_uncomputed > 0 for r in self.running)
