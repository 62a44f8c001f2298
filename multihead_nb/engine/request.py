"""One generation request as the engine sees it: token ids, progress, pages, status, timing.

Owns: a request's state and the arithmetic of what is left to compute. Its final status is set in one place, the
engine's `finalize`; the scheduler moves it between waiting and running. Knows nothing of scheduling policy,
tensors or the bus. A request's prompt may be *open*: more prompt tokens may still arrive (a streamed handoff
from an upstream head); the known part is prefilled, and sampling starts only once the prompt is closed.
"""

from __future__ import annotations

import enum
import itertools
import numbers
import queue
import threading
from dataclasses import dataclass, field

import torch

from ..errors import RequestError
from .sampling import SamplingParams


class Status(str, enum.Enum):
    WAITING = "waiting"  # no pages yet (new, or preempted and waiting to recompute)
    RUNNING = "running"  # holds pages
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def done(self) -> bool:
        return self in (Status.FINISHED, Status.FAILED, Status.CANCELLED)


@dataclass(eq=False)
class Request:
    id: int
    head: str
    model: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float  # seconds since the workspace's epoch
    prompt_open: bool = False
    tag: dict = field(default_factory=dict)  # free-form labels (team, team step) carried into the frames

    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens of `all_ids` whose K/V sit in `block_table`'s pages
    num_cached: int = 0  # of which were found in the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    error: BaseException | None = None
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    last_token_time: float | None = None
    done_event: threading.Event = field(default_factory=threading.Event)
    text: str = ""  # detokenized output so far (stop strings cut off)
    emitted: int = 0  # characters of `text` already streamed out (a possible stop-string prefix is held back)
    deltas: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # streamed text pieces, then None
    detokenizer: object = None
    token_rows: list = field(default_factory=list)  # its `TokenRow`s (the recorder's log may have dropped them)

    def extend_prompt(self, ids: list[int], close: bool) -> None:
        """The one way an open prompt grows (engine side, between steps): append `ids`; `close` lets it sample."""
        assert self.prompt_open, "only an open prompt grows"
        self.prompt_ids.extend(ids)
        if close:
            self.prompt_open = False

    def truncate_prompt(self, num_tokens: int) -> None:
        """Drop an open prompt's ids past `num_tokens` (the scheduler first forgets their K/V: `rollback`)."""
        assert self.prompt_open and num_tokens >= self.num_computed, (num_tokens, self.num_computed)
        del self.prompt_ids[num_tokens:]

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """`all_ids[start:end]` without building the whole list (the engine step asks for a few tokens)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p : end - p]
        if end <= p:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[: end - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_uncomputed(self) -> int:
        """Tokens known but not yet in the K/V pages (the prompt's rest, or the last sampled token)."""
        return self.num_tokens - self.num_computed

    @property
    def ready_to_sample(self) -> bool:
        """Whether computing all known tokens ends in sampling the next one."""
        return not self.prompt_open

    def __repr__(self) -> str:
        return (
            f"Request(id={self.id}, head={self.head!r}, status={self.status.value}, prompt={len(self.prompt_ids)}, "
            f"output={len(self.output_ids)}, computed={self.num_computed}, pages={len(self.block_table)})"
        )


class RequestIds:
    """Per-workspace id counter (no module-global state)."""

    def __init__(self):
        self._it = itertools.count(1)

    def next(self) -> int:
        return next(self._it)


def check_token_ids(ids, vocab_size: int | None, whose: str) -> list[int]:
    """`ids` as a list of ints, each in [0, vocab_size); anything else is a `RequestError` naming the first bad id,
    raised before the ids can reach a forward (where they would index the embedding)."""
    out = []
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0 or (
                vocab_size is not None and t >= vocab_size):
            raise RequestError(f"token id {t!r} at position {i} is not in {whose} vocabulary of {vocab_size} ids")
        out.append(int(t))
    return out
