"""What a GGUF file's metadata and tensor names mean for the native runner: its `ModelSpec` fields and tensor names.

Owns: the architectures the native runner runs from GGUF (llama, which covers Llama, Mistral and SmolLM2; qwen2;
qwen3), `gguf_config` (metadata → the fields of a `ModelSpec`, every unsupported feature a `CheckpointError`
naming the file and the feature), the map from Hugging Face tensor names to GGUF ones, the weight types the runner
loads, and llama.cpp's Q/K row permutation undone (`unpermute_rows`). Knows nothing of reading the file
(`gguf_file.py`) nor of decoding blocks (`gguf_dequant.py`).
"""

from __future__ import annotations

import re

import torch

from ...errors import CheckpointError
from .gguf_dequant import SUPPORTED
from .gguf_file import GGUFFile

# GGUF general.architecture → the native family
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

# Hugging Face name (after `model.layers.N.` for layer tensors) → GGUF name (after `blk.N.`)
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")


def gguf_name(hf_name: str) -> str:
    """The GGUF name of a Hugging Face tensor name (`model.layers.3.mlp.up_proj.weight` → `blk.3.ffn_up.weight`)."""
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    m = _LAYER_NAME.fullmatch(hf_name)
    if m is None or m.group(2) not in _LAYER:
        raise KeyError(hf_name)
    return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}"


def _one(g: GGUFFile, key: str, default=None, kind=int):
    """A scalar of the metadata; a per-layer list whose entries are all equal counts as that value."""
    value = g.metadata(key, default)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise CheckpointError(f"GGUF file {g.path}: {key} differs between layers ({value[:6]}...), which the "
                                  "native runner does not support")
        value = value[0]
    if value is None:
        raise CheckpointError(f"GGUF file {g.path} lacks the metadata {key!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise CheckpointError(f"GGUF file {g.path}: metadata {key!r} = {value!r} is not a {kind.__name__}") from None


def _rope_scaling(g: GGUFFile, arch: str, head_dim: int) -> dict | None:
    """None for plain RoPE; llama.cpp's per-frequency factors (`rope_freqs.weight`, Llama 3.1+) as a spec dict."""
    kind = g.metadata(f"{arch}.rope.scaling.type", "none")
    factor = float(g.metadata(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if kind not in ("none", "") and factor != 1.0:
        raise CheckpointError(f"GGUF file {g.path} uses RoPE scaling {kind!r} (factor {factor}), which the native "
                              "runner does not support")
    t = g.tensors.get("rope_freqs.weight")
    if t is None:
        return None
    from .gguf_dequant import dequantize

    if t.shape != (head_dim // 2,):
        raise CheckpointError(f"GGUF file {g.path}: rope_freqs.weight has shape {t.shape}, expected ({head_dim // 2},)")
    factors = dequantize(t.raw, t.ggml_type, t.shape, torch.float32)  # [head_dim / 2]
    return {"rope_type": "freq_factors", "factors": tuple(float(f) for f in factors)}


def gguf_config(g: GGUFFile) -> dict:
    """The `ModelSpec` fields of a GGUF file (all but name, path and weight files), from its metadata and tensors."""
    arch = g.architecture
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"GGUF file {g.path} is of architecture {arch!r}, which the native runner cannot run; "
                              f"supported: {', '.join(ARCHITECTURES)}")
    family = ARCHITECTURES[arch]
    if int(g.metadata(f"{arch}.expert_count", 0) or 0) > 0:
        raise CheckpointError(f"GGUF file {g.path} is a mixture-of-experts model, which the native runner cannot run")
    if g.metadata("tokenizer.ggml.model", None) is None:
        raise CheckpointError(f"GGUF file {g.path} holds no tokenizer (no tokenizer.ggml.model metadata)")
    embed = g.tensors.get("token_embd.weight")
    if embed is None or len(embed.shape) != 2:
        raise CheckpointError(f"GGUF file {g.path} lacks the tensor token_embd.weight")
    hidden = _one(g, f"{arch}.embedding_length")
    num_heads = _one(g, f"{arch}.attention.head_count")
    num_kv = _one(g, f"{arch}.attention.head_count_kv", num_heads)
    head_dim = _one(g, f"{arch}.attention.key_length", hidden // max(num_heads, 1))
    if _one(g, f"{arch}.attention.value_length", head_dim) != head_dim:
        raise CheckpointError(f"GGUF file {g.path}: keys and values of different lengths are not supported")
    if _one(g, f"{arch}.rope.dimension_count", head_dim) != head_dim:
        raise CheckpointError(f"GGUF file {g.path} rotates only part of each head (partial RoPE), which the native "
                              "runner does not support")
    if num_heads <= 0 or num_kv <= 0 or num_heads % num_kv:
        raise CheckpointError(f"GGUF file {g.path}: {num_heads} attention heads are not a multiple of {num_kv} KV heads")
    eos = [g.metadata(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    bos = g.metadata("tokenizer.ggml.bos_token_id", None)
    window = g.metadata(f"{arch}.attention.sliding_window", None)
    return dict(
        family=family,
        num_layers=_one(g, f"{arch}.block_count"),
        hidden_size=hidden,
        intermediate_size=_one(g, f"{arch}.feed_forward_length"),
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        vocab_size=embed.shape[0],
        max_position_embeddings=_one(g, f"{arch}.context_length", 2048),
        rope_theta=_one(g, f"{arch}.rope.freq_base", 10000.0, float),
        rope_scaling=_rope_scaling(g, arch, head_dim),
        rms_norm_eps=_one(g, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6, float),
        tie_word_embeddings="output.weight" not in g.tensors,
        attention_bias="blk.0.attn_q.bias" in g.tensors,
        qk_norm=family == "qwen3",
        sliding_window=int(window) if isinstance(window, int) and window > 0 else None,
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if isinstance(e, int))),
        bos_token_id=int(bos) if isinstance(bos, int) else None,
    )


def check_gguf_tensors(g: GGUFFile, expected: dict[str, tuple[int, ...]]) -> None:
    """Every tensor a spec needs is in the file, of its shape and of a type the runner loads."""
    missing, wrong, types = [], [], []
    for hf, shape in expected.items():
        t = g.tensors.get(gguf_name(hf))
        if t is None:
            missing.append(gguf_name(hf))
        elif t.shape != shape:
            wrong.append(f"{t.name} {t.shape} (expected {shape})")
        elif t.ggml_type not in SUPPORTED:
            types.append(f"{t.name} is {t.ggml_type.name}")
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"GGUF file {g.path} lacks tensors {shown}")
    if wrong:
        raise CheckpointError(f"GGUF file {g.path} has tensors of the wrong shape: {'; '.join(wrong[:3])}")
    if types:
        raise CheckpointError(
            f"GGUF file {g.path} holds weights of a type the native runner cannot load ({'; '.join(types[:3])}"
            f"{' ...' if len(types) > 3 else ''}); supported: {', '.join(t.name for t in SUPPORTED)}")


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order for llama-arch files: within each head it interleaves the two rotary halves
    (row 2i is the HF row i, row 2i+1 the HF row i + d/2); any row payload (dense, or packed blocks) works."""
    rows = w.shape[0]
    assert rows % (2 * n_heads) == 0, (rows, n_heads)
    # [heads, d/2, 2, ...] → [heads, 2, d/2, ...]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
