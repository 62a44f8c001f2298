"""Checkpoints of the Llama family, Hugging Face folders and GGUF files: reading a model's shape before its weights.

Owns: `ModelSpec` (the model's shape, read from config.json or from a GGUF file's metadata before any weight is
loaded) and `read_spec`, which resolves a reference (`model_ref.py`: folders, hub ids, GGUF files, Ollama names,
the embedded default) and checks the spec against the tensors there. The weight files themselves are
`weight_files.py`, GGUF's metadata `gguf_config.py`. Knows nothing of how the model computes (`llama.py`) nor of
pages beyond `ModelSpec.kv_layout`.

Every problem a user can cause is a `CheckpointError` that names the cause and the path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import CheckpointError
from ...memory import KVLayout
from .model_ref import looks_like_hub_id, resolve_checkpoint, resolve_model  # noqa: F401 (resolve_checkpoint: re-exported)
from .weight_files import check_tensors, read_json, weight_files

# architecture name (config.json "architectures") → family; model_type → family
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}
MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral"}
ROPE_TYPES = ("default", "llama3")


# ---- the spec ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A Llama-family model's shape and options, read from its config.json (no weights loaded)."""

    name: str
    path: Path
    family: str  # llama | qwen2 | qwen3 | mistral
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict | None  # None: plain RoPE; {"rope_type": "llama3", "factor": ..., ...}; or per-frequency
    # divisors of the inverse frequencies, {"rope_type": "freq_factors", "factors": (...)} (GGUF's rope_freqs)
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v (and for llama/qwen3 also o) projections have a bias
    qk_norm: bool  # qwen3: RMSNorm over each head of q and k before RoPE
    sliding_window: int | None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    weight_files: tuple[Path, ...] = field(default=(), compare=False, repr=False)
    gguf: object | None = field(default=None, compare=False, repr=False)  # the open GGUFFile of a GGUF checkpoint

    # ---- sizes ---------------------------------------------------------------------------------------------
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor this model needs, by its Hugging Face name, with its shape."""
        h, hd, i = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, h), "model.norm.weight": (h,)}
        for layer in range(self.num_layers):
            pre = f"model.layers.{layer}."
            out[pre + "input_layernorm.weight"] = (h,)
            out[pre + "post_attention_layernorm.weight"] = (h,)
            out[pre + "self_attn.q_proj.weight"] = (q, h)
            out[pre + "self_attn.k_proj.weight"] = (kv, h)
            out[pre + "self_attn.v_proj.weight"] = (kv, h)
            out[pre + "self_attn.o_proj.weight"] = (h, q)
            if self.attention_bias:
                out[pre + "self_attn.q_proj.bias"] = (q,)
                out[pre + "self_attn.k_proj.bias"] = (kv,)
                out[pre + "self_attn.v_proj.bias"] = (kv,)
                if self.family in ("llama", "qwen3"):
                    out[pre + "self_attn.o_proj.bias"] = (h,)
            if self.qk_norm:
                out[pre + "self_attn.q_norm.weight"] = (hd,)
                out[pre + "self_attn.k_norm.weight"] = (hd,)
            out[pre + "mlp.gate_proj.weight"] = (i, h)
            out[pre + "mlp.up_proj.weight"] = (i, h)
            out[pre + "mlp.down_proj.weight"] = (h, i)
        if not self.tie_word_embeddings:
            out["lm_head.weight"] = (self.vocab_size, h)
        return out

    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.tensor_shapes().values())

    def weight_bytes(self, dtype: torch.dtype) -> int:
        return self.num_params() * torch.empty((), dtype=dtype).element_size()

    def kv_layout(self, dtype: torch.dtype, page_bytes: int, kv_cache: str | None = None) -> KVLayout:
        """This model's view of pages of `page_bytes`: K/V in `dtype`, or int8 with scales where `kv_cache` is
        "int8" (raises ConfigError when a page cannot hold one token)."""
        kv_dtype = torch.int8 if kv_cache == "int8" else dtype
        return KVLayout(self.num_layers, self.num_kv_heads, self.head_dim, kv_dtype, page_bytes)


# ---- reading config.json -----------------------------------------------------------------------------------
def _family(cfg: dict, path: Path) -> str:
    archs = cfg.get("architectures") or []
    for a in archs:
        if a in ARCHITECTURES:
            return ARCHITECTURES[a]
    if not archs and cfg.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[cfg["model_type"]]
    named = ", ".join(archs) if archs else f"model_type {cfg.get('model_type')!r}"
    raise CheckpointError(
        f"checkpoint {path} is of architecture {named}, which the native runner cannot run; "
        f"supported: {', '.join(ARCHITECTURES)}"
    )


def _rope(cfg: dict, path: Path) -> tuple[float, dict | None]:
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "sliding_attention" in params:  # per-layer-type parameters
        raise CheckpointError(f"checkpoint {path}: per-layer RoPE parameters are not supported")
    scaling = dict(params) if isinstance(params, dict) else (dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else None)
    theta = cfg.get("rope_theta")
    if theta is None and scaling is not None:
        theta = scaling.get("rope_theta")
    theta = float(theta if theta is not None else 10000.0)
    if scaling is None:
        return theta, None
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    if rtype not in ROPE_TYPES:
        raise CheckpointError(
            f"checkpoint {path} uses RoPE scaling {rtype!r}, which the native runner does not support "
            f"(supported: none, {', '.join(ROPE_TYPES)})"
        )
    if rtype == "default":
        return theta, None
    needed = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in needed if k not in scaling]
    if missing:
        raise CheckpointError(f"checkpoint {path}: llama3 RoPE scaling lacks {', '.join(missing)}")
    return theta, {"rope_type": "llama3", **{k: float(scaling[k]) for k in needed}}


def _sliding_window(cfg: dict, family: str, num_layers: int, path: Path) -> int | None:
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if family in ("qwen2", "qwen3"):
        if not cfg.get("use_sliding_window"):
            return None
        types = types or [
            "sliding_attention" if i >= cfg.get("max_window_layers", num_layers) else "full_attention"
            for i in range(num_layers)
        ]
    if window is None:
        return None
    if types is not None:
        sliding = {t == "sliding_attention" for t in types}
        if sliding == {False}:
            return None
        if sliding != {True}:
            raise CheckpointError(
                f"checkpoint {path} mixes sliding-window and full-attention layers, which is not supported"
            )
    return int(window)


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def read_spec(name_or_path: str | Path) -> ModelSpec:
    """The spec of a checkpoint, with its weight files checked (present, readable headers, every tensor named)."""
    ref = resolve_model(name_or_path)
    if ref.kind == "gguf":
        return _gguf_spec(str(name_or_path), ref.path)
    path = ref.path
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        hint = (f"; for a repo of GGUF files name the file: {name_or_path}/FILE.gguf"
                if ref.source == "hub" and looks_like_hub_id(str(name_or_path)) else "")
        raise CheckpointError(f"checkpoint folder {path} has no config.json (nor a GGUF file){hint}")
    cfg = read_json(cfg_path, "config file")
    if (cfg.get("quantization_config") or {}).get("quant_method") == "exl2":
        raise CheckpointError(
            f"{path} is an EXL2-quantized checkpoint: the native runner reads unquantized weights only; EXL2 "
            "models need the ExLlamaV2 backend (CUDA, `pip install 'multihead-nb[exl2]'`)"
        )
    family = _family(cfg, path)
    try:
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // num_heads
        theta, scaling = _rope(cfg, path)
        num_layers = int(cfg["num_hidden_layers"])
        gen = path / "generation_config.json"
        gen_cfg = read_json(gen, "generation config") if gen.is_file() else {}
        eos = _ids(gen_cfg.get("eos_token_id", cfg.get("eos_token_id")))
        bos = gen_cfg.get("bos_token_id", cfg.get("bos_token_id"))
        if family == "qwen2":
            bias = True
        elif family == "mistral":
            bias = False
        else:
            bias = bool(cfg.get("attention_bias", False))
        spec = ModelSpec(
            name=str(name_or_path),
            path=path,
            family=family,
            num_layers=num_layers,
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bias,
            qk_norm=family == "qwen3",
            sliding_window=_sliding_window(cfg, family, num_layers, path),
            eos_token_ids=eos,
            bos_token_id=int(bos) if isinstance(bos, int) else None,
            weight_files=weight_files(path),
        )
    except KeyError as e:
        raise CheckpointError(f"config file {cfg_path} lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config file {cfg_path} has a malformed value ({e})") from None
    if spec.num_heads % spec.num_kv_heads:
        raise CheckpointError(
            f"config file {cfg_path}: {spec.num_heads} attention heads are not a multiple of {spec.num_kv_heads} KV heads"
        )
    if cfg.get("mlp_bias"):
        raise CheckpointError(f"checkpoint {path} has MLP biases (mlp_bias), which are not supported")
    check_tensors(spec)
    return spec


def _gguf_spec(name: str, file: Path) -> ModelSpec:
    """The spec of a GGUF file, which stays open (memory-mapped) in `spec.gguf` for `load_weights`."""
    from .gguf_config import check_gguf_tensors, gguf_config
    from .gguf_file import GGUFFile

    g = GGUFFile(file)
    spec = ModelSpec(name=name, path=file, weight_files=(file,), gguf=g, **gguf_config(g))
    check_gguf_tensors(g, spec.tensor_shapes())
    return spec
