"""Recording every step and every token, answered as pandas frames, with bounded history.

Owns: the typed rows (`StepRow`, `TokenRow`), the workspace-wide step and token logs and their retention. Knows
nothing of scheduling or tensors; the engine calls `step()` and `token()` as things happen. A request keeps its own
token rows too (`Request.token_rows`), so a result never scans the workspace's log, and trimming the log never
changes a result.

Retention: the logs keep the newest `max_steps` step rows and `max_tokens` token rows (older rows are dropped,
oldest first; `dropped_steps` / `dropped_tokens` count them); `clear()` empties both. A long-lived kernel's memory
stays bounded whatever it runs.

Step frame, one row per (engine step, model forward):
    step, model, t_start, t_end, duration_s (seconds since the workspace started), num_seqs, num_tokens,
    prefill_tokens, decode_tokens, tokens_by_head (dict head -> tokens computed), pages_in_use (not free: K/V and
    weights), pages_free, kv_slots (token slots in the pages the queued requests hold), kv_tokens (of which hold a
    token's K/V; 1 - kv_tokens / kv_slots is the step's waste), schedule_s, forward_s, postprocess_s (the whole step's phases; the same on each row of a
    step)
Token frame, one row per generated token:
    head, request, index (0-based in the output), token_id, text (the text this token completed; may be ""),
    t (seconds since the workspace started), dt (since the previous token of the request; for the first token,
    since the request arrived), step, batch_size (sequences in that forward), plus the request's tag columns
    (e.g. team_run, team_step).
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Iterable, NamedTuple

import pandas as pd

from ..errors import ConfigError


class StepRow(NamedTuple):
    step: int
    model: str
    t_start: float
    t_end: float
    duration_s: float
    num_seqs: int
    num_tokens: int
    prefill_tokens: int
    decode_tokens: int
    tokens_by_head: dict
    pages_in_use: int
    pages_free: int
    kv_slots: int
    kv_tokens: int
    schedule_s: float
    forward_s: float
    postprocess_s: float


class TokenRow(NamedTuple):
    head: str
    request: int
    index: int
    token_id: int
    text: str
    t: float
    dt: float
    step: int
    batch_size: int


STEP_COLUMNS = list(StepRow._fields)
TOKEN_COLUMNS = list(TokenRow._fields)

DEFAULT_MAX_STEPS = 50_000
DEFAULT_MAX_TOKENS = 200_000


def token_frame(rows: Iterable[tuple[TokenRow, dict]]) -> pd.DataFrame:
    """A token frame from (row, tag) pairs: the documented columns, then one column per tag key."""
    pairs = list(rows)
    df = pd.DataFrame([r for r, _ in pairs], columns=TOKEN_COLUMNS)
    for k in sorted({k for _, tag in pairs for k in tag}):
        df[k] = [tag.get(k) for _, tag in pairs]
    return df


class Recorder:
    def __init__(self, max_steps: int = DEFAULT_MAX_STEPS, max_tokens: int = DEFAULT_MAX_TOKENS):
        for name, v in (("max_steps", max_steps), ("max_tokens", max_tokens)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"history {name} must be a positive integer, got {v!r}")
        self._steps: deque[StepRow] = deque(maxlen=max_steps)
        self._tokens: deque[tuple[TokenRow, dict]] = deque(maxlen=max_tokens)
        self.dropped_steps = 0
        self.dropped_tokens = 0
        self._lock = threading.Lock()

    def step(self, row: StepRow) -> None:
        with self._lock:
            if len(self._steps) == self._steps.maxlen:
                self.dropped_steps += 1
            self._steps.append(row)

    def token(self, row: TokenRow, tag: dict) -> None:
        with self._lock:
            if len(self._tokens) == self._tokens.maxlen:
                self.dropped_tokens += 1
            self._tokens.append((row, tag))

    def steps(self) -> pd.DataFrame:
        with self._lock:
            rows = list(self._steps)
        return pd.DataFrame(rows, columns=STEP_COLUMNS)

    def tokens(self) -> pd.DataFrame:
        with self._lock:
            pairs = list(self._tokens)
        return token_frame(pairs)

    def clear(self) -> None:
        with self._lock:
            self._steps.clear()
            self._tokens.clear()
