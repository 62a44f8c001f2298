"""Recording every step and every token, answered as pandas frames.

Owns: the step and token logs and their documented columns. Knows nothing of scheduling or tensors; the engine
calls `step()` and `token()` as things happen. Appends are cheap tuples; frames are built on demand.

Step frame, one row per (engine step, model forward):
    step, model, t_start, t_end, duration_s (seconds since the workspace started), num_seqs, num_tokens,
    prefill_tokens, decode_tokens, tokens_by_head (dict head -> tokens computed), pages_in_use (not free: K/V and weights),
    pages_free,
    schedule_s, forward_s, postprocess_s (the whole step's phases; the same on each row of a step)
Token frame, one row per generated token:
    head, request, index (0-based in the output), token_id, text (the text this token completed; may be ""),
    t (seconds since the workspace started), dt (since the previous token of the request; for the first token,
    since the request arrived), step, batch_size (sequences in that forward), plus the request's tag columns
    (e.g. team, team_step).
"""

from __future__ import annotations

import threading

import pandas as pd

STEP_COLUMNS = [
    "step", "model", "t_start", "t_end", "duration_s", "num_seqs", "num_tokens", "prefill_tokens",
    "decode_tokens", "tokens_by_head", "pages_in_use", "pages_free", "schedule_s", "forward_s", "postprocess_s",
]
TOKEN_COLUMNS = ["head", "request", "index", "token_id", "text", "t", "dt", "step", "batch_size"]


class Recorder:
    def __init__(self):
        self._steps: list[tuple] = []
        self._tokens: list[tuple] = []
        self._tags: list[dict] = []
        self._lock = threading.Lock()

    def step(self, row: tuple) -> None:
        assert len(row) == len(STEP_COLUMNS)
        with self._lock:
            self._steps.append(row)

    def token(self, row: tuple, tag: dict) -> None:
        assert len(row) == len(TOKEN_COLUMNS)
        with self._lock:
            self._tokens.append(row)
            self._tags.append(tag)

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    def steps(self) -> pd.DataFrame:
        with self._lock:
            rows = list(self._steps)
        return pd.DataFrame(rows, columns=STEP_COLUMNS)

    def tokens(self, requests: set[int] | None = None) -> pd.DataFrame:
        with self._lock:
            pairs = list(zip(self._tokens, self._tags))
        if requests is not None:
            pairs = [(r, t) for r, t in pairs if r[1] in requests]
        df = pd.DataFrame([r for r, _ in pairs], columns=TOKEN_COLUMNS)
        tag_keys = sorted({k for _, t in pairs for k in t})
        for k in tag_keys:
            df[k] = [t.get(k) for _, t in pairs]
        return df

    def clear(self) -> None:
        with self._lock:
            self._steps.clear()
            self._tokens.clear()
            self._tags.clear()
