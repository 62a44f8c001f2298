"""The fused CPU forward: one Llama-family forward over a `ForwardBatch` of any length as one call into
`cpu_decode.c`, logits included.

Owns: describing a model's packed weights (`KernelWeights`, rows interleaved where the build reads them so) and its
arena pages to the kernel (built once per model), the call per `ForwardBatch` (its arguments filled by `StepArgs`,
checked by the kernel: token ids, positions, page ids, logits rows) and the errors that name what a bad batch got
wrong. Knows nothing of requests or scheduling; whether a model runs here is the runner's choice (`unsupported` says
which shapes cannot).
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

from ...memory import KVLayout
from ..batch import ForwardBatch
from .cpu_kernel import (BAD_LOGITS_ROW, BAD_PAGE, BAD_POSITION, BAD_TOKEN_ID, OUT_OF_MEMORY, CpuKernel, LayerStruct,
                         MatrixStruct, ModelStruct)
from .kernel_weights import KernelWeights
from .llama import RotaryTable
from .loader import ModelSpec
from .quant import PackedMatrix
from .step_args import StepArgs

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
        assert layout.dtype in (torch.bfloat16, torch.int8), "the kernel keeps K/V in bfloat16 or int8"
        if kernel.reads_interleaved(int8_activations):
            weights.interleave_rows()  # 8 rows side by side, as this build's integer products read them
        weights.place_in_one_buffer()  # one stream of huge pages, in the order the forward reads the matrices
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
            page_stride=page_bytes // layout.itemsize, kv_stride=spec.num_layers * tpp * KV * d,
            layer_stride=tpp * KV * d, int8_activations=int(int8_activations),
            num_pages=arena_data.numel() // page_bytes,
            kv_int8=int(layout.int8), kv_scales=layout.scales_offset if layout.int8 else 0,
        )
        self._arena = arena_data
        self.args = StepArgs(d, tpp)

    def supports(self, batch: ForwardBatch) -> bool:
        return batch.num_tokens >= 1

    def _rope(self, max_ctx: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin_signed `[n >= max_ctx, d]` float32 (numpy views of the table, grown with it)."""
        self.rope.ensure(max_ctx)
        if self._cos is None or self._cos.shape[0] != self.rope.size:
            self._cos, self._sin = self.rope.cos.numpy(), self.rope.sin.numpy()  # [n, d] float32, shared
        return self._cos, self._sin

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits `[L, vocab]` float32 at `batch.logits_indices`; writes the batch's K/V into its pages. A batch that
        would read past the embedding, its contexts, the arena or its tokens is refused (IndexError), nothing
        written."""
        cos, sin = self._rope(max(batch.context_lens))
        step = self.args.fill(batch, cos, sin, torch.get_num_threads())
        logits = torch.empty(step.num_logits, self.spec.vocab_size, dtype=torch.float32)  # [L, V]
        step.logits = _ptr(logits)
        rc = self.kernel.forward(self.struct, step)
        if rc != 0:
            raise self._refusal(rc, batch)
        return logits

    def _refusal(self, rc: int, batch: ForwardBatch) -> Exception:
        """The error for the kernel's code `rc` (check_step in cpu_decode.c, or out of memory)."""
        T = batch.num_tokens
        if rc == BAD_TOKEN_ID:
            return IndexError(f"token ids outside the vocabulary of {self.spec.vocab_size}: "
                              f"{batch.input_ids.tolist()}")
        if rc == BAD_POSITION:
            return IndexError(f"positions {batch.positions.tolist()} outside their sequences' contexts "
                              f"{batch.context_lens}")
        if rc == BAD_PAGE:
            return IndexError(f"a page id in the block tables is past the arena's {self.struct.num_pages} pages: "
                              f"{batch.block_tables}")
        if rc == BAD_LOGITS_ROW:
            return IndexError(f"logits indices {batch.logits_indices.tolist()} outside the batch's {T} tokens")
        return RuntimeError(f"the fused CPU kernel rejected the batch (code {rc}: "
                            f"{'out of memory' if rc == OUT_OF_MEMORY else 'bad shape'})")
