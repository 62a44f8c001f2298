"""What a caller holds for a request: `RequestHandle` (live: stream, result, cancel) and `Completion` (finished).

Owns: waiting on a request from the caller's thread, turning KeyboardInterrupt into a clean cancel of that request,
and the finished result's fields, built from the request alone (its own token rows: no scan of the workspace's
log). Knows nothing of scheduling or tensors; it asks the engine to step (inline mode) or waits for its thread.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from ..engine.recorder import token_frame
from ..engine.request import Request, Status
from ..errors import RequestError

if TYPE_CHECKING:
    from ..engine.engine import Engine


@dataclass
class Completion:
    """A finished request: its text, ids, why it ended, and its per-token timing frame."""

    head: str
    request_id: int
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop", "length", "cancelled" (an error raises instead)
    tokens: pd.DataFrame
    ttft_s: float | None  # time from arrival to the first token
    duration_s: float  # time from arrival to the end
    num_cached_tokens: int  # prompt tokens found in the prefix cache
    num_preemptions: int

    def __str__(self) -> str:
        return self.text


class RequestHandle:
    """A submitted request: stream its text, wait for its result, or cancel it. Every handle ends: finished,
    cancelled, or failed (then `result()` and `stream()` raise the request's `MultiHeadError`)."""

    def __init__(self, engine: "Engine", req: Request):
        self._engine = engine
        self.request = req

    @property
    def id(self) -> int:
        return self.request.id

    @property
    def done(self) -> bool:
        return self.request.done_event.is_set()

    def stream(self):
        """Yield text deltas as they are generated; ends when the request does. Ctrl-C cancels the request."""
        engine = self._engine
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
        self.request.done_event.wait(30)
        self._raise_if_failed()

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the end; the `Completion`, or the request's error. Ctrl-C cancels the request."""
        try:
            self._engine.run_until(self.request.done_event.is_set, timeout)
        except KeyboardInterrupt:
            self.cancel()
            raise
        self._raise_if_failed()
        return self.completion()

    def completion(self) -> Completion:
        """The request as it stands (partial while it runs)."""
        req = self.request
        end = req.finish_time if req.finish_time is not None else self._engine.now()
        return Completion(
            head=req.head, request_id=req.id, text=req.text, token_ids=list(req.output_ids),
            prompt_token_ids=list(req.prompt_ids), finish_reason=req.finish_reason or "", tokens=self.tokens(),
            ttft_s=None if req.first_token_time is None else req.first_token_time - req.arrival,
            duration_s=end - req.arrival, num_cached_tokens=req.num_cached, num_preemptions=req.num_preemptions,
        )

    def tokens(self) -> pd.DataFrame:
        """One row per generated token of this request (the token frame's columns and the request's tags)."""
        req = self.request
        return token_frame((row, req.tag) for row in list(req.token_rows))

    def cancel(self, wait: bool = True) -> None:
        """Stop the request and free its pages; with `wait`, return once they are free."""
        engine = self._engine
        engine.cancel(self.request)
        if not wait:
            return
        if engine.on_engine_thread:
            return  # a listener on the engine thread: the end is delivered after it returns
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
