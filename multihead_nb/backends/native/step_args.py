"""The fused kernel's per-step arguments: a `StepStruct` and the arrays it points at, kept between steps.

Owns: the arrays of a step's token ids, sequence of each token, positions, block tables, context lengths and logits
rows (the kernel reads the rotary tables by position, in place), grown when a step needs more (doubled, never
shrunk), and filling them from a `ForwardBatch`. Filling kept arrays and a kept struct costs a fraction of making
new ones per step, which matters in a decode step: the kernel has just streamed the weights through the caches, and
every Python object touched after it is a cache miss (the runner's Python took 0.14-0.15 ms of a 2.0 ms batch-1 step
this way, bench/README.md).
Knows nothing of weights; what the arrays must hold is checked by the kernel (`check_step` in cpu_decode.c), except
that each block table covers its sequence's context, which is checked here while it is copied.
"""

from __future__ import annotations

import ctypes

import numpy as np

from ..batch import ForwardBatch
from .cpu_kernel import StepStruct


def _ptr(a: np.ndarray, ctype) -> ctypes._Pointer:
    return a.ctypes.data_as(ctypes.POINTER(ctype))


class StepArgs:
    """`fill(batch, ...) -> StepStruct`; the struct and its arrays stay valid until the next `fill`."""

    def __init__(self, head_dim: int, tokens_per_page: int):
        self.head_dim, self.tokens_per_page = head_dim, tokens_per_page
        self.capacity = (0, 0, 0, 0)  # tokens, sequences, pages per sequence, logits rows
        self.struct = StepStruct()
        self._rope: tuple[np.ndarray, np.ndarray] | None = None  # the rotary tables the struct points at

    def _grow(self, need: tuple[int, int, int, int]) -> None:
        T, S, P, L = (n if n <= c else max(n, 2 * c) for n, c in zip(need, self.capacity))
        self.ids = np.zeros(T, np.int64)  # [T]
        self.seq_of, self.pos = np.zeros(T, np.int32), np.zeros(T, np.int32)  # [T] each
        self.tables = np.zeros((S, P), np.int32)  # [S, P]: row i's first pages_of(context_lens[i]) used
        self.ctx = np.zeros(S, np.int32)  # [S]
        self.idx = np.zeros(L, np.int32)  # [L]
        self.seq_index = np.arange(S, dtype=np.int32)  # [S] 0 .. S - 1, for seq_of
        st = self.struct
        st.max_pages = P  # the tables' row stride
        st.input_ids = _ptr(self.ids, ctypes.c_int64)
        st.seq_of, st.pos = _ptr(self.seq_of, ctypes.c_int32), _ptr(self.pos, ctypes.c_int32)
        st.block_tables, st.ctx_lens = _ptr(self.tables, ctypes.c_int32), _ptr(self.ctx, ctypes.c_int32)
        st.logits_idx = _ptr(self.idx, ctypes.c_int32)
        self.capacity = (T, S, P, L)

    def fill(self, batch: ForwardBatch, cos: np.ndarray, sin: np.ndarray, num_threads: int) -> StepStruct:
        """The step's struct for `batch` (its `logits` pointer left to the caller); cos / sin: the rotary tables
        `[positions, head_dim]` float32, contiguous (the kernel refuses positions past them)."""
        T, S, L = batch.num_tokens, batch.num_seqs, batch.logits_indices.shape[0]
        ctx, tpp = batch.context_lens, self.tokens_per_page
        max_ctx = max(ctx)
        need = (T, S, -(-max_ctx // tpp), L)
        if any(n > c for n, c in zip(need, self.capacity)):
            self._grow(need)
        for i, table in enumerate(batch.block_tables):
            n = -(-ctx[i] // tpp)
            if len(table) < n:
                raise IndexError(f"sequence {i}: a block table of {len(table)} pages for {ctx[i]} tokens "
                                 f"({n} pages of {tpp})")
            self.tables[i, :n] = table[:n]
        self.ctx[:S] = ctx
        self.ids[:T] = batch.input_ids.numpy()
        self.pos[:T] = batch.positions.numpy()
        seq = self.seq_index[:S]
        self.seq_of[:T] = seq if T == S else np.repeat(seq, batch.query_lens)  # T == S: one token each (decode)
        self.idx[:L] = batch.logits_indices.numpy()
        st = self.struct
        if self._rope is None or self._rope[0] is not cos:  # the tables grew (or first use)
            assert cos.shape == sin.shape and cos.shape[1] == self.head_dim and cos.dtype == np.float32
            assert cos.flags.c_contiguous and sin.flags.c_contiguous
            st.cos, st.sin, st.rope_rows = _ptr(cos, ctypes.c_float), _ptr(sin, ctypes.c_float), cos.shape[0]
            self._rope = (cos, sin)  # kept alive while the struct points at them
        st.T, st.S, st.max_ctx, st.num_threads, st.num_logits = T, S, max_ctx, num_threads, L
        return st
