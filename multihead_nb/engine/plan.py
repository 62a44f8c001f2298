"""What the scheduler hands the engine, and what it keeps per head.

Owns: `Chunk` (one request's tokens computed in a step, and whether it samples), `StepPlan` (a step's chunks, and
the requests preempted or failed while planning it) and `HeadQueue` (a head's fairness counter, limits, running and
waiting requests). Plain data: the policy is `scheduler.py`, running a plan is `engine.py`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .request import Request


@dataclass
class Chunk:
    request: Request
    num_tokens: int  # tokens of the request computed this step, from request.num_computed on
    sample: bool  # the chunk reaches the last known token of a closed prompt: sample the next token


@dataclass
class Failure:
    """A request the scheduler found can never run (it is out of the queues, its pages freed); the engine ends it."""

    request: Request
    message: str


@dataclass
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)

    def by_model(self) -> dict[str, list[Chunk]]:
        out: dict[str, list[Chunk]] = {}
        for c in self.chunks:
            out.setdefault(c.request.model, []).append(c)
        return out

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


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

    @property
    def has_work(self) -> bool:
        return bool(self.waiting) or any(r.num_uncomputed > 0 for r in self.running)
