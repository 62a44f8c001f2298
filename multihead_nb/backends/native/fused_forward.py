"""The fused CPU forward: one Llama-family forward over a `ForwardBatch` of any length as one call into
`cpu_decode.c`, logits included.

Owns: describing a model's packed weights (`KernelWeights`, rows interleaved where the build reads them so) and its
arena pages to the kernel (built once per model), and turning a `ForwardBatch` into the kernel's per-step arguments
(built once per forward), with the checks the C code relies on (token ids, positions, page ids). Knows nothing of
requests or scheduling; whether a model runs here is the runner's choice (`unsupported` says which shapes cannot).
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from ...memory import KVLayout
from ..batch import ForwardBatch
from .cpu_kernel import CpuKernel, LayerStruct, MatrixStruct, ModelStruct, StepStruct
from .kernel_weights import KernelWeights
from .llama import RotaryTable
from .loader import ModelSpec
from .quant import PackedMatrix

_F32 = ctypes.POINTER(ctypes.c_float)


def _ptr(t: torch.Tensor | None, ctype=ctypes.c_float):
    if t is None:
        return None
    assert t.is_contiguous() and t.device.type == "cpu"
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctype))


def _matrix(m: PackedMatrix) -> MatrixStruct:
    return MatrixStruct(m.data.data_ptr(), m.fmt_id, m.rows, m.cols, m.row_bytes)


def unsupported(spec: ModelSpec) -> str | None:
    """Why the kernel cannot run this model's shape (None: it can)."""
    if spec.head_dim % 2 or spec.head_dim > 512:
        return f"head_dim {spec.head_dim} (the kernel needs an even head_dim of at most 512)"
    if spec.num_heads % spec.num_kv_heads:
        return f"{spec.num_heads} query heads over {spec.num_kv_heads} KV heads"
    return None


class FusedForward:
    """`forward(batch) -> logits` of a model through the kernel, reading and writing K/V in `arena_data`."""

    def __init__(self, kernel: CpuKernel, spec: ModelSpec, weights: KernelWeights, arena_data: torch.Tensor,
                 layout: KVLayout, page_bytes: int, int8_activations: bool = True):
        assert arena_data.dtype == torch.uint8 and arena_data.is_contiguous() and page_bytes % 2 == 0
        assert layout.dtype == torch.bfloat16, "the kernel keeps K/V in bfloat16"
        if kernel.reads_interleaved(int8_activations):
            weights.interleave_rows()  # 8 rows side by side, as this build's integer products read them
        self.kernel, self.spec, self.weights = kernel, spec, weights
        self.rope = RotaryTable(spec, torch.float32, torch.device("cpu"))
        self._cos = self._sin = None
        self.layers = (LayerStruct * spec.num_layers)()
        for i, L in enumerate(weights.layers):
            s = self.layers[i]
            s.ln1, s.ln2, s.q_norm, s.k_norm = _ptr(L.ln1), _ptr(L.ln2), _ptr(L.q_norm), _ptr(L.k_norm)
            s.bqkv, s.bo = _ptr(L.bqkv), _ptr(L.bo)
            for name in ("q", "k", "v", "o", "gate", "up", "down"):
                setattr(s, name, _matrix(L.mats[name]))
        tpp, KV, d = layout.tokens_per_page, spec.num_kv_heads, spec.head_dim
        self.struct = ModelStruct(
            num_layers=spec.num_layers, hidden=spec.hidden_size, heads=spec.num_heads, kv_heads=KV, head_dim=d,
            inter=spec.intermediate_size, vocab=spec.vocab_size, eps=spec.rms_norm_eps, tokens_per_page=tpp,
            sliding_window=spec.sliding_window or 0, layers=self.layers,
            embed=_matrix(weights.embed), lm_head=_matrix(weights.lm_head), final_norm=_ptr(weights.norm),
            cache=_ptr(arena_data, ctypes.c_uint16),
            page_stride=page_bytes // 2, kv_stride=spec.num_layers * tpp * KV * d, layer_stride=tpp * KV * d,
            int8_activations=int(int8_activations),
        )
        self._arena = arena_data

    def supports(self, batch: ForwardBatch) -> bool:
        return batch.num_tokens >= 1

    def _rope(self, positions: np.ndarray, max_ctx: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin_signed `[T, d]` float32 for `positions` (numpy copies of the table, grown with it)."""
        self.rope.ensure(max_ctx)
        if self._cos is None or self._cos.shape[0] != self.rope.size:
            self._cos, self._sin = self.rope.cos.numpy(), self.rope.sin.numpy()  # [n, d] float32, shared
        return np.ascontiguousarray(self._cos[positions]), np.ascontiguousarray(self._sin[positions])

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits `[L, vocab]` float32 at `batch.logits_indices`; writes the batch's K/V into its pages. The
        arguments are checked here (the C code indexes the embedding, block tables and arena unchecked)."""
        spec = self.spec
        T, S = batch.num_tokens, batch.num_seqs
        max_ctx = max(batch.context_lens)
        tpp = self.struct.tokens_per_page
        max_pages = -(-max_ctx // tpp)
        tables = np.zeros((S, max_pages), dtype=np.int32)  # [S, max_pages]
        for i, table in enumerate(batch.block_tables):
            n = -(-batch.context_lens[i] // tpp)
            assert len(table) >= n, f"sequence {i}: block table of {len(table)} pages for {batch.context_lens[i]} tokens"
            tables[i, :n] = table[:n]
        qlens = np.asarray(batch.query_lens)
        seq_of = np.repeat(np.arange(S, dtype=np.int32), qlens)  # [T]
        pos = batch.positions.numpy()  # [T] int64
        ids = np.ascontiguousarray(batch.input_ids.numpy(), dtype=np.int64)  # [T]
        if T and (ids.min() < 0 or ids.max() >= spec.vocab_size):
            raise IndexError(f"token ids outside the vocabulary of {spec.vocab_size}: {ids.tolist()}")
        ctx_of = np.asarray(batch.context_lens)[seq_of]  # [T]
        if T and ((pos < 0) | (pos >= ctx_of)).any():
            raise IndexError(f"positions {pos.tolist()} outside their sequences' contexts {batch.context_lens}")
        if int(tables.max()) * (self.struct.page_stride * 2) >= self._arena.numel():
            raise IndexError(f"a page id in the block tables is past the arena's pages: {batch.block_tables}")
        idx = np.ascontiguousarray(batch.logits_indices.numpy(), dtype=np.int32)  # [L]
        L = idx.shape[0]
        if L and (idx.min() < 0 or idx.max() >= T):
            raise IndexError(f"logits indices {idx.tolist()} outside the batch's {T} tokens")
        pos32 = pos.astype(np.int32)
        cos, sin = self._rope(pos, max_ctx)  # [T, d] each
        logits = torch.empty(L, spec.vocab_size, dtype=torch.float32)  # [L, V]
        a = lambda arr, ctype: arr.ctypes.data_as(ctypes.POINTER(ctype))  # noqa: E731
        step = StepStruct(
            T=T, S=S, max_pages=max_pages, max_ctx=max_ctx, num_threads=torch.get_num_threads(), num_logits=L,
            input_ids=a(ids, ctypes.c_int64), seq_of=a(seq_of, ctypes.c_int32), pos=a(pos32, ctypes.c_int32),
            block_tables=a(tables, ctypes.c_int32), cos=a(cos, ctypes.c_float), sin=a(sin, ctypes.c_float),
            logits_idx=a(idx, ctypes.c_int32), logits=_ptr(logits),
        )
        rc = self.kernel.forward(self.struct, step)
        if rc != 0:
            raise RuntimeError(f"the fused CPU kernel rejected the batch (code {rc}: "
                               f"{'out of memory' if rc == -2 else 'bad shape'})")
        return logits
