"""The Llama family (Llama, Qwen2, Qwen3, Mistral) in plain PyTorch, reading and writing K/V in arena pages.

Owns: the model's math — embedding, RMSNorm, RoPE tables (plain and llama3-scaled), fused q/k/v and gate/up
projections, optional q/k/v bias (qwen2) and per-head q/k RMSNorm (qwen3), SwiGLU, tied or untied lm_head.
Knows nothing of checkpoints on disk (`loader.py` hands it named tensors) nor of page ownership (the batch says
where each token's K/V goes); attention over pages is `attention.py`.

The weights are plain tensors, not `nn.Module`s: one forward is a short loop of functional calls per layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .attention import AttentionMetadata, paged_attention
from .loader import ModelSpec


def rope_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """`[head_dim / 2]` float32 inverse frequencies, llama3-scaled when the spec says so (as Hugging Face), or
    divided by a GGUF file's per-frequency factors (llama.cpp's `rope_freqs`, its form of the llama3 scaling)."""
    d = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # [d/2]
    rs = spec.rope_scaling
    if rs is None:
        return inv
    if rs["rope_type"] == "freq_factors":
        factors = torch.tensor(rs["factors"], dtype=torch.float32)  # [d/2]
        assert factors.shape == inv.shape, (factors.shape, inv.shape)
        return inv / factors
    assert rs["rope_type"] == "llama3"
    factor, low, high, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryTable:
    """cos and signed sin per position, `[n, head_dim]` in the model dtype, grown by doubling when needed.

    `rope(x) = x * cos + roll(x, head_dim / 2) * sin_signed`, which equals Hugging Face's
    `x * cos + rotate_half(x) * sin` (sin_signed = [-sin first half, sin second half]).
    """

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device, initial: int = 4096):
        self.inv_freq = rope_inv_freq(spec).to(device)  # [d/2] float32
        self.dtype, self.device = dtype, device
        self.size = 0
        self.cos = self.sin = torch.empty(0)
        self.ensure(min(initial, spec.max_position_embeddings))

    def ensure(self, n: int) -> None:
        if n <= self.size:
            return
        size = max(n, 2 * self.size)
        pos = torch.arange(size, dtype=torch.float32, device=self.device)  # [n]
        freqs = pos[:, None] * self.inv_freq[None, :]  # [n, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [n, d]
        half = freqs.shape[1]
        sin = emb.sin()
        sin[:, :half] = -sin[:, :half]
        self.cos = emb.cos().to(self.dtype)
        self.sin = sin.to(self.dtype)
        self.size = size

    def lookup(self, positions: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin_signed for `positions` [T] → each `[T, 1, d]` (broadcast over heads)."""
        self.ensure(max_position + 1)
        return self.cos.index_select(0, positions)[:, None], self.sin.index_select(0, positions)[:, None]


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """In place: x: [T, heads, d] (may be a strided view); cos, sin: [T, 1, d] → x, rotated."""
    rolled = x.roll(x.shape[-1] // 2, -1)  # [T, heads, d]
    return x.mul_(cos).addcmul_(rolled, sin)


def _packed_linear_ok(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether oneDNN's prepacked linear (what inductor uses on CPU) runs here for `dtype`, checked on a sample."""
    if device.type != "cpu" or dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return False
    try:
        ops = torch.ops.mkldnn
        if not ops._is_mkldnn_bf16_supported():
            return False
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 32, generator=g).to(dtype)
        b = torch.randn(48, generator=g).to(dtype)
        x = torch.randn(3, 32, generator=g).to(dtype)
        other = torch.randn(3, 48, generator=g).to(dtype)
        pw = ops._reorder_linear_weight(w, 1)
        ref = F.linear(x.float(), w.float(), b.float())
        got = ops._linear_pointwise(x, pw, b, "none", [], "").float()
        got_add = ops._linear_pointwise.binary(x, other, pw, b, "add").float()
        return bool(torch.allclose(got, ref, rtol=0.02, atol=0.05)
                    and torch.allclose(got_add, ref + other.float(), rtol=0.02, atol=0.1))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


class Linear:
    """`y = x W^T + b` (optionally `+ residual`): plain `F.linear`, or oneDNN's prepacked bfloat16 linear on CPU.

    Decode reads every weight once per step, so its speed is the matmul's memory bandwidth: prepacked oneDNN
    weights stream about 1.5-2.5x faster than `F.linear` on a bfloat16 CPU (measured in bench/decode_speed.py).
    """

    __slots__ = ("weight", "bias", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: bool):
        self.bias = bias
        self.packed = packed
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight) if packed else weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`residual + linear(x)`, fused when packed."""
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.weight, self.bias, "add")
        return residual + F.linear(x, self.weight, self.bias)


class Layer:
    __slots__ = ("ln1", "qkv", "q_norm", "k_norm", "o", "ln2", "gate_up", "down")


class LlamaModel:
    """The weights of one model and its forward over a flattened batch.

    `packed`: None picks oneDNN prepacked linears when they work here (CPU, bfloat16), False never uses them.
    `plain_layers`: keep the layers' weights plain row-major (the fused CPU kernel reads them); only the lm_head
    may then be prepacked.
    """

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device,
                 packed: bool | None = None, plain_layers: bool = False):
        self.spec, self.dtype, self.device = spec, dtype, device
        self.packed = _packed_linear_ok(dtype, device) if packed is None else bool(packed)
        layer_packed = self.packed and not plain_layers
        self.eps = spec.rms_norm_eps
        self.embed = weights["model.embed_tokens.weight"]  # [V, h]
        self.norm = weights["model.norm.weight"]  # [h]
        lm_head = self.embed if spec.tie_word_embeddings else weights["lm_head.weight"]  # [V, h]
        self.lm_head = Linear(lm_head, None, self.packed)
        self.layers: list[Layer] = []
        for i in range(spec.num_layers):
            w = lambda name: weights.pop(f"model.layers.{i}.{name}", None)  # noqa: E731
            L = Layer()
            L.ln1, L.ln2 = w("input_layernorm.weight"), w("post_attention_layernorm.weight")
            qkv = torch.cat([w(f"self_attn.{p}_proj.weight") for p in "qkv"])  # [(H + 2KV) d, h]
            biases = [w(f"self_attn.{p}_proj.bias") for p in "qkv"]
            L.qkv = Linear(qkv, torch.cat(biases) if all(b is not None for b in biases) else None, layer_packed)
            L.q_norm, L.k_norm = w("self_attn.q_norm.weight"), w("self_attn.k_norm.weight")
            L.o = Linear(w("self_attn.o_proj.weight"), w("self_attn.o_proj.bias"), layer_packed)  # [h, H d]
            # one matmul for both (one longer weight stream beats two with silu and the product fused in)
            gate_up = torch.cat([w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")])  # [2I, h]
            L.gate_up = Linear(gate_up, None, layer_packed)
            L.down = Linear(w("mlp.down_proj.weight"), None, layer_packed)  # [h, I]
            self.layers.append(L)
        weights.clear()  # the unfused q/k/v and gate/up tensors are no longer referenced
        self.rope = RotaryTable(spec, dtype, device)

    def weight_nbytes(self) -> int:
        """Bytes of every weight tensor held (a tied, prepacked lm_head is a second copy of the embedding)."""
        tensors = [self.embed, self.norm, self.lm_head.weight, self.lm_head.bias]
        for L in self.layers:
            for name in ("ln1", "ln2", "q_norm", "k_norm"):
                tensors.append(getattr(L, name, None))
            for name in ("qkv", "o", "gate_up", "down"):
                lin = getattr(L, name, None)
                if lin is not None:
                    tensors += [lin.weight, lin.bias]
        seen, total = set(), 0
        for t in tensors:
            if t is None:
                continue
            try:
                key, n = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):  # opaque layouts
                key, n = id(t), t.numel() * t.element_size()
            if key not in seen:
                seen.add(key)
                total += n
        return total

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        max_position: int,
        caches: list[torch.Tensor],
        meta: AttentionMetadata,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids, positions: [T]; caches: per layer [P, tpp, 2, KV, d]; → logits `[L, vocab]` float32."""
        spec = self.spec
        T = input_ids.shape[0]
        H, KV, d, I = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.intermediate_size
        hq, hk = H * d, (H + KV) * d
        eps, hidden = self.eps, (spec.hidden_size,)
        cos, sin = self.rope.lookup(positions, max_position)  # [T, 1, d] each
        x = F.embedding(input_ids, self.embed)  # [T, h]
        last = len(self.layers) - 1
        for i, L in enumerate(self.layers):
            qkv = L.qkv(F.rms_norm(x, hidden, L.ln1, eps))  # [T, (H + 2KV) d], rotated and normed in place below
            qk = qkv[:, :hk].view(T, H + KV, d)  # [T, H + KV, d]
            if L.q_norm is not None:  # qwen3: RMSNorm over each head of q and k, before RoPE
                qk[:, :H] = F.rms_norm(qk[:, :H], (d,), L.q_norm, eps)
                qk[:, H:] = F.rms_norm(qk[:, H:], (d,), L.k_norm, eps)
            apply_rope_(qk, cos, sin)
            # [T, H, d] queries; [T, 2, KV, d] keys and values
            attn = paged_attention(qkv[:, :hq].view(T, H, d), qkv[:, hq:].view(T, 2, KV, d), caches[i], meta)
            if i == last:  # only the rows whose logits are wanted go on
                attn, x = attn.index_select(0, logits_indices), x.index_select(0, logits_indices)
            x = L.o.add(attn, x)  # [T, h] residual + o_proj(attn)
            gu = L.gate_up(F.rms_norm(x, hidden, L.ln2, eps))  # [T, 2I]
            x = L.down.add(F.silu(gu[:, :I]) * gu[:, I:], x)  # [T, h] residual + down(silu(gate) * up)
        x = F.rms_norm(x, hidden, self.norm, eps)  # [L, h]
        logits = self.lm_head(x).float()  # [L, V]
        assert logits.shape == (logits_indices.shape[0], spec.vocab_size)
        return logits
