"""Offline Hugging Face checkpoints with random weights, for tests, demos and benchmarks.

Owns: writing a real checkpoint folder (`config.json`, `model.safetensors`, a byte-level BPE `tokenizer.json`
trained on a fixed built-in corpus (`tiny_tokenizer.py`), `tokenizer_config.json` with a ChatML chat template,
`generation_config.json`) for the Llama family (`llama`, `qwen2`, `qwen3`, `mistral`), deterministically from a
seed, and caching such folders on disk (`$MULTIHEAD_CACHE`, else `~/.cache/multihead_nb/tiny`). Also the shapes of
a few real models (`SHAPES`) so benchmarks can run at real sizes without a download.

Does not know: how a checkpoint is loaded or run (`models/`), what the weights mean (they are random: the text a
model writes is noise, but greedy decoding has clear winners), nor anything of the hub or the network.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .tiny_tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer

FORMAT_VERSION = 1  # part of the cache key: bump it whenever the files this module writes change

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")

# Tiny defaults shared by every family; the family adds its own below.
_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)

_FAMILY = {
    "llama": dict(arch="LlamaForCausalLM", tie_word_embeddings=False),
    "qwen2": dict(arch="Qwen2ForCausalLM", tie_word_embeddings=True),
    "qwen3": dict(arch="Qwen3ForCausalLM", tie_word_embeddings=True),
    "mistral": dict(arch="MistralForCausalLM", tie_word_embeddings=False, sliding_window=None),
}
# Tokenizers: `llama`, `qwen3`, `mistral` get GPT-2-style byte-level BPE (any text round-trips exactly); `qwen2`
# gets Qwen2's NFC + split regex (see `build_tokenizer`), so the same `tokenizer_vocab` is another tokenizer there.

SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        family="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
    ),
    "qwen2.5-0.5b": dict(
        family="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        head_dim=64,
        vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
    ),
}

# ---- public API ------------------------------------------------------------------------------------------------
def tiny_checkpoint(family: str = "llama", path: str | os.PathLike | None = None, seed: int = 0, **overrides) -> Path:
    """A Hugging Face checkpoint folder with random weights for `family`; the same arguments give the same bytes.

    `overrides` may set any config field (`hidden_size=576`, `num_hidden_layers=3`, `tie_word_embeddings=True`,
    `rope_theta=1e6`, ...) and two that are not config fields: `dtype` ("float32", "bfloat16", "float16": the
    dtype the weights are saved in) and `tokenizer_vocab` (size of the trained BPE vocabulary, default 384; another
    size is another tokenizer). `vocab_size` defaults to the tokenizer's size and may only be larger; the
    embedding and LM-head rows past the tokenizer are zero (their logit is 0, below greedy's pick).

    With `path=None` the folder is cached under `$MULTIHEAD_CACHE` (else `~/.cache/multihead_nb/tiny`) by a key of
    the arguments, built in a temporary folder and renamed into place, so concurrent processes never see half of it.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; supported families: {', '.join(FAMILIES)}")
    overrides = _normalize(overrides)
    if path is not None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        _write(path, family, seed, overrides)
        return path

    root = Path(os.environ.get("MULTIHEAD_CACHE") or Path.home() / ".cache" / "multihead_nb" / "tiny")
    final = root / f"{family}-{_key(family, seed, overrides)}"
    if _complete(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        _write(tmp, family, seed, overrides)
        if final.exists() and not _complete(final):  # a broken folder left by hand: replace it
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _complete(final):  # nobody else won the race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def shape_checkpoint(name: str, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """A random checkpoint with the shapes of a real model (`SHAPES`), cached like `tiny_checkpoint`."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}")
    kw = dict(SHAPES[name])
    family = kw.pop("family")
    return tiny_checkpoint(family, seed=seed, dtype=dtype, **kw)


# ---- internals -------------------------------------------------------------------------------------------------
def _normalize(overrides: dict) -> dict:
    out = dict(overrides)
    dtype = out.get("dtype", "float32")
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    out["dtype"] = dtype
    out.pop("torch_dtype", None)
    out.setdefault("tokenizer_vocab", 384)
    return out


def _key(family: str, seed: int, overrides: dict) -> str:
    blob = json.dumps([FORMAT_VERSION, family, seed, sorted(overrides.items())], sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in _FILES)


def _config(family: str, overrides: dict, tok_size: int) -> dict:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config, "mistral": MistralConfig}[family]
    fam = dict(_FAMILY[family])
    arch = fam.pop("arch")
    kw: dict[str, Any] = {**_TINY, **fam, **overrides}
    kw.pop("tokenizer_vocab")
    dtype = kw.pop("dtype")
    kw.setdefault("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
    vocab = kw.setdefault("vocab_size", tok_size)
    if vocab < tok_size:
        raise ValueError(f"vocab_size={vocab} is smaller than the tokenizer's {tok_size} tokens")
    if kw["num_attention_heads"] % kw["num_key_value_heads"]:
        raise ValueError(
            f"num_attention_heads={kw['num_attention_heads']} is not a multiple of "
            f"num_key_value_heads={kw['num_key_value_heads']}"
        )
    rope_theta = float(kw.pop("rope_theta"))
    kw.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": rope_theta})
    kw.update(bos_token_id=0, eos_token_id=2, pad_token_id=0, dtype=dtype, architectures=[arch])
    cfg = cls(**kw).to_dict()
    for k in ("_name_or_path", "transformers_version", "id2label", "label2id"):
        cfg.pop(k, None)
    # Also the pre-5.0 spellings, so older transformers (and readers of hub-style configs) see the same model.
    cfg["rope_theta"] = cfg["rope_parameters"].get("rope_theta", rope_theta)
    cfg["torch_dtype"] = dtype
    return cfg


def _param_specs(family: str, cfg: dict) -> list[tuple[str, tuple[int, ...], str, float]]:
    """(name, shape, kind, std) of every tensor, in the order they are drawn from the generator."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    qkv_bias = family == "qwen2" or cfg.get("attention_bias", False)
    o_bias = family != "qwen2" and cfg.get("attention_bias", False)
    mlp_bias = cfg.get("mlp_bias", False)
    out_std = 2.0 / math.sqrt(h)  # logits have std ~2: greedy decoding has clear winners
    specs = [("model.embed_tokens.weight", (v, h), "normal", out_std)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        specs.append((f"{p}.input_layernorm.weight", (h,), "norm", 0.1))
        for name, rows in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
            specs.append((f"{p}.self_attn.{name}_proj.weight", (rows, h), "normal", 1 / math.sqrt(h)))
            if qkv_bias:
                specs.append((f"{p}.self_attn.{name}_proj.bias", (rows,), "normal", 0.3))
        specs.append((f"{p}.self_attn.o_proj.weight", (h, nh * hd), "normal", 1 / math.sqrt(nh * hd)))
        if o_bias:
            specs.append((f"{p}.self_attn.o_proj.bias", (h,), "normal", 0.1))
        if family == "qwen3":
            specs.append((f"{p}.self_attn.q_norm.weight", (hd,), "norm", 0.1))
            specs.append((f"{p}.self_attn.k_norm.weight", (hd,), "norm", 0.1))
        specs.append((f"{p}.post_attention_layernorm.weight", (h,), "norm", 0.1))
        for name, shape in (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter))):
            specs.append((f"{p}.mlp.{name}_proj.weight", shape, "normal", 1 / math.sqrt(shape[1])))
            if mlp_bias:
                specs.append((f"{p}.mlp.{name}_proj.bias", (shape[0],), "normal", 0.1))
    specs.append(("model.norm.weight", (h,), "norm", 0.1))
    if not cfg["tie_word_embeddings"]:
        specs.append(("lm_head.weight", (v, h), "normal", out_std))
    return specs


def _weights(family: str, cfg: dict, seed: int, dtype: torch.dtype, tok_size: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape, kind, std in _param_specs(family, cfg):
        t = torch.randn(shape, generator=g, dtype=torch.float32).mul_(std)
        if kind == "norm":
            t.add_(1.0)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            t[tok_size:] = 0.0  # rows past the tokenizer (a padded vocab): logit 0, so greedy never picks them
        out[name] = t.to(dtype).contiguous()
    return out


def _write(folder: Path, family: str, seed: int, overrides: dict) -> None:
    from safetensors.torch import save_file

    style = "qwen2" if family == "qwen2" else "gpt2"
    tok = build_tokenizer(overrides["tokenizer_vocab"], style)
    cfg = _config(family, overrides, tok.get_vocab_size())
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert list(ids.values()) == [0, 1, 2], ids

    _dump(folder / "config.json", cfg)
    weights = _weights(family, cfg, seed, _DTYPES[overrides["dtype"]], tok.get_vocab_size())
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    _dump(folder / "tokenizer_config.json", {
        "tokenizer_class": "Qwen2Tokenizer" if style == "qwen2" else "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
            for t, i in ids.items()
        },
    })
    _dump(folder / "generation_config.json", {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    })


def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = ["FAMILIES", "SHAPES", "SPECIAL_TOKENS", "build_tokenizer", "shape_checkpoint", "tiny_checkpoint"]
