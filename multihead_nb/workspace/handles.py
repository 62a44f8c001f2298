"""What a caller holds for a request: `RequestHandle` (live: stream, result, cancel) and `Completion` (finished).

Owns: waiting on a request from the caller's thread, turning KeyboardInterrupt into a clean cancel, and the
finished result's fields. Knows nothing of scheduling or tensors; it asks the workspace's engine to step (inline
mode) or waits for its thread (background mode).
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from ..engine.request import Request, Status
from ..errors import RequestError

if TYPE_CHECKING:
    from .workspace import Workspace


@dataclass
class Completion:
    """A finished request: its text, ids, why it ended, and its per-token timing frame."""

    head: str
    request_id: int
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    tokens: pd.DataFrame
    ttft_s: float | None  # time from arrival to the first token
    duration_s: float  # time from arrival to the end
    num_cached_tokens: int  # prompt tokens found in the prefix cache
    num_preemptions: int

    def __str__(self) -> str:
        return self.text


class RequestHandle:
    """A submitted request: stream its text, wait for its result, or cancel it."""

    def __init__(self, ws: "Workspace", req: Request):
        self._ws = ws
        self.request = req

    @property
    def id(self) -> int:
        return self.request.id

    @property
    def done(self) -> bool:
        return self.request.done_event.is_set()

    def stream(self):
        """Yield text deltas as they are generated; ends when the request does."""
        engine = self._ws.engine
        try:
            while True:
                try:
                    delta = self.request.deltas.get(timeout=0.05) if engine.background else self.request.deltas.get_nowait()
                except queue.Empty:
                    if not engine.background:
                        engine.step()
                    continue
                if delta is None:
                    break
                yield delta
        except KeyboardInterrupt:
            self.cancel()
            raise
        self._raise_if_failed()

    def result(self, timeout: float | None = None) -> Completion:
        try:
            self._ws.engine.run_until(self.request.done_event.is_set, timeout)
        except KeyboardInterrupt:
            self.cancel()
            raise
        self._raise_if_failed()
        return self._ws._completion(self.request)

    def cancel(self) -> None:
        """Stop the request and free its pages; returns once they are free."""
        engine = self._ws.engine
        engine.cancel(self.request)
        if engine.background:
            self.request.done_event.wait(timeout=30)
        else:
            engine.process_inbox()

    def _raise_if_failed(self) -> None:
        if self.request.status == Status.FAILED:
            err = self.request.error
            raise err if isinstance(err, Exception) else RequestError(str(err))

    def __repr__(self) -> str:
        return f"RequestHandle({self.request!r})"
