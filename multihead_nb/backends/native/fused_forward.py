"""The fused CPU forward: one `LlamaModel` forward for a small batch as one call into `cpu_decode.c`.

Owns: describing a model's weights and its arena pages to the kernel (built once per model), and turning a
`ForwardBatch` into the kernel's per-step arguments (built once per forward), then the lm_head in PyTorch.
Knows nothing of requests or scheduling; which batches take this path is the runner's choice (`supports`).

Used for bfloat16 on the CPU, for batches of at most `max_tokens` tokens (decode steps, short prefill chunks):
there a step is bound by reading the weights, and the PyTorch path's ~25 calls per layer cost more than the bytes.
Longer batches are compute-bound and stay on the PyTorch path (oneDNN matmuls).
"""

from __future__ import annotations

import ctypes

import torch

from ...memory import KVLayout
from ..batch import ForwardBatch
from .cpu_kernel import CpuKernel, LayerStruct, ModelStruct, StepStruct
from .llama import LlamaModel

_U16 = ctypes.POINTER(ctypes.c_uint16)


def _ptr(t: torch.Tensor | None, ctype=ctypes.c_uint16):
    if t is None:
        return None
    assert t.is_contiguous() and t.device.type == "cpu"
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctype))


def unsupported(spec) -> str | None:
    """Why the kernel cannot run this model's shape (None: it can)."""
    if spec.head_dim % 2 or spec.head_dim > 512:
        return f"head_dim {spec.head_dim} (the kernel needs an even head_dim of at most 512)"
    if spec.num_heads % spec.num_kv_heads:
        return f"{spec.num_heads} query heads over {spec.num_kv_heads} KV heads"
    return None


class FusedForward:
    """`forward(batch) -> logits` of `model` through the kernel, reading and writing K/V in `arena_data`."""

    def __init__(self, kernel: CpuKernel, model: LlamaModel, arena_data: torch.Tensor, layout: KVLayout,
                 page_bytes: int, max_tokens: int = 16):
        spec = model.spec
        assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
        assert arena_data.dtype == torch.uint8 and arena_data.is_contiguous() and page_bytes % 2 == 0
        self.kernel, self.model, self.max_tokens = kernel, model, max_tokens
        self._keep: list[torch.Tensor] = []  # every tensor whose address the structs hold

        def p(t):
            if t is None:
                return None
            t = t.contiguous()
            assert t.dtype == torch.bfloat16
            self._keep.append(t)
            return _ptr(t)

        self.layers = (LayerStruct * spec.num_layers)()
        for i, L in enumerate(model.layers):
            assert not L.qkv.packed, "the fused kernel reads plain row-major weights"
            s = self.layers[i]
            s.ln1, s.ln2, s.q_norm, s.k_norm = p(L.ln1), p(L.ln2), p(L.q_norm), p(L.k_norm)
            s.wqkv, s.bqkv, s.wo, s.bo = p(L.qkv.weight), p(L.qkv.bias), p(L.o.weight), p(L.o.bias)
            s.wgu, s.wdown = p(L.gate_up.weight), p(L.down.weight)
        tpp, KV, d = layout.tokens_per_page, spec.num_kv_heads, spec.head_dim
        self.struct = ModelStruct(
            num_layers=spec.num_layers, hidden=spec.hidden_size, heads=spec.num_heads, kv_heads=KV, head_dim=d,
            inter=spec.intermediate_size, eps=spec.rms_norm_eps, tokens_per_page=tpp,
            sliding_window=spec.sliding_window or 0, layers=self.layers,
            embed=p(model.embed), final_norm=p(model.norm), cache=_ptr(arena_data),
            page_stride=page_bytes // 2, kv_stride=spec.num_layers * tpp * KV * d, layer_stride=tpp * KV * d,
        )
        self._arena = arena_data

    def supports(self, batch: ForwardBatch) -> bool:
        return batch.num_tokens <= self.max_tokens

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits `[L, vocab]` float32 at `batch.logits_indices`; writes the batch's K/V into its pages."""
        spec, model = self.model.spec, self.model
        T, S = batch.num_tokens, batch.num_seqs
        h, H, KV, d, I = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.intermediate_size
        max_ctx = max(batch.context_lens)
        tpp = self.struct.tokens_per_page
        max_pages = -(-max_ctx // tpp)
        tables = torch.zeros(S, max_pages, dtype=torch.int32)  # [S, max_pages]
        for i, table in enumerate(batch.block_tables):
            n = -(-batch.context_lens[i] // tpp)
            assert len(table) >= n, f"sequence {i}: block table of {len(table)} pages for {batch.context_lens[i]} tokens"
            tables[i, :n] = torch.tensor(table[:n], dtype=torch.int32)
        seq_of = torch.repeat_interleave(torch.arange(S, dtype=torch.int32),
                                         torch.tensor(batch.query_lens))  # [T]
        positions = batch.positions
        pos32 = positions.to(torch.int32)  # [T]
        cos, sin = model.rope.lookup(positions, max_ctx - 1)  # [T, 1, d] each, model dtype
        cos, sin = cos.reshape(T, d).float(), sin.reshape(T, d).float()  # [T, d]
        ids = batch.input_ids.contiguous()
        if T and (int(ids.min()) < 0 or int(ids.max()) >= spec.vocab_size):  # C reads embed rows unchecked
            raise IndexError(f"token ids outside the vocabulary of {spec.vocab_size}: {ids.tolist()}")
        ctx_of = torch.tensor(batch.context_lens, dtype=torch.int32)[seq_of.long()]  # [T]
        if bool(((pos32 < 0) | (pos32 >= ctx_of)).any()):  # positions index the block tables unchecked in C
            raise IndexError(f"positions {pos32.tolist()} outside their sequences' contexts {batch.context_lens}")
        if int(tables.max()) * (self.struct.page_stride * 2) >= self._arena.numel():
            raise IndexError(f"a page id in the block tables is past the arena's pages: {batch.block_tables}")
        f32, bf = dict(dtype=torch.float32), dict(dtype=torch.bfloat16)
        x, qkv = torch.empty(T, h, **f32), torch.empty(T, (H + 2 * KV) * d, **f32)
        gu, scores = torch.empty(T, 2 * I, **f32), torch.empty(T * H, max_ctx, **f32)
        xn, attn, act, out = (torch.empty(T, h, **bf), torch.empty(T, H * d, **bf), torch.empty(T, I, **bf),
                              torch.empty(T, h, **bf))
        step = StepStruct(
            T=T, max_pages=max_pages, max_ctx=max_ctx, num_threads=torch.get_num_threads(),
            input_ids=_ptr(ids, ctypes.c_int64), seq_of=_ptr(seq_of, ctypes.c_int32),
            pos=_ptr(pos32, ctypes.c_int32), block_tables=_ptr(tables, ctypes.c_int32),
            cos=_ptr(cos, ctypes.c_float), sin=_ptr(sin, ctypes.c_float),
            x=_ptr(x, ctypes.c_float), qkv=_ptr(qkv, ctypes.c_float), gu=_ptr(gu, ctypes.c_float),
            scores=_ptr(scores, ctypes.c_float), xn=_ptr(xn), attn=_ptr(attn), act=_ptr(act), out=_ptr(out),
        )
        rc = self.kernel.forward(self.struct, step)
        if rc != 0:
            raise RuntimeError(f"the fused CPU kernel rejected the batch (code {rc})")
        hidden = out.index_select(0, batch.logits_indices)  # [L, h]
        logits = model.lm_head(hidden).float()  # [L, V]
        assert logits.shape == (batch.logits_indices.shape[0], spec.vocab_size)
        return logits
