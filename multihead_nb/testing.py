"""Offline Hugging Face checkpoints with random weights, for tests, demos and benchmarks.

Owns: writing a real checkpoint folder (`config.json`, `model.safetensors`, a byte-level BPE `tokenizer.json`
trained here on a fixed built-in corpus, `tokenizer_config.json` with a ChatML chat template,
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

FORMAT_VERSION = 1  # part of the cache key: bump it whenever the files this module writes change

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 in every tokenizer built here

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The pre-tokenizer regex of Qwen2 tokenizers (transformers' Qwen2Tokenizer rebuilds it for model_type qwen2).
_QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

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

# A fixed corpus: English prose and Python code. Changing it changes every tokenizer (bump FORMAT_VERSION).
_CORPUS = r'''
The team met in the morning to plan the week. Each agent had a name, a model and a short list of duties.
The planner wrote the outline, the writer filled in the details, and the critic read every line twice.
When the work was done, they wrote a summary for the people who would read it later, in plain words.
A good summary says what was found, what is still unknown, and what should happen next.
It was a quiet town by the river. In the spring the water rose and the fields turned green again.
Children walked to school along the old road, past the mill and the bakery, and the smell of bread
followed them all the way to the bridge. The teacher asked them to write about the things they saw.
One wrote about the birds, one about the boats, and one about the clock on the tower that never told
the right time. "Why does it stop?" she asked. "Because nobody winds it," said the baker, "and nobody
remembers who should." The question stayed with her for years, until she learned to fix clocks herself.
Memory is a shared resource. Every request needs pages for its keys and values, and the scheduler decides
who runs next. If there is not enough memory, a request waits, or another one is paused and resumed later.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 3.14 2.718 1e-6 -1 +1 = < > <= >= != == % # @ & * ^ ~ `
Questions and answers: What is the capital of France? Paris. How many legs does a spider have? Eight.
Is the sky blue? Usually, during the day. Explain why the sea is salty in two sentences or less.
Une phrase en français, ein Satz auf Deutsch, una frase en español, 日本語の文, 中文句子, русский текст.

def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    out = [0, 1]
    while len(out) < n:
        out.append(out[-1] + out[-2])
    return out[:n]


class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, step=1):
        self.value += step
        return self.value

    def __repr__(self):
        return f"Counter(value={self.value})"


def read_lines(path):
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            yield line


import json
from dataclasses import dataclass, field


@dataclass
class Config:
    name: str = "default"
    size: int = 64
    tags: list = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "size": self.size, "tags": self.tags}, indent=2)


for i in range(10):
    if i % 2 == 0:
        print(i, "is even")
    else:
        print(i, "is odd")

result = {key: value for key, value in zip(["a", "b", "c"], [1, 2, 3])}
try:
    x = result["d"]
except KeyError as error:
    print("missing key:", error)
finally:
    print("done")
'''


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


def build_tokenizer(vocab_size: int = 384, style: str = "gpt2"):
    """The byte-level BPE `tokenizers.Tokenizer` trained on the built-in corpus.

    `style="gpt2"`: GPT-2's byte-level pre-tokenizer and no normalizer, so any text round-trips exactly.
    `style="qwen2"`: NFC normalizer and Qwen2's split regex, as real Qwen2 tokenizers have (and as transformers 5
    imposes on every `model_type="qwen2"` checkpoint, whatever its tokenizer.json says); NFC text round-trips.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif style == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        raise ValueError(f"unknown tokenizer style {style!r}; use 'gpt2' or 'qwen2'")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS], trainer=trainer)
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(
            f"tokenizer_vocab={vocab_size}: the built-in corpus yields a byte-level BPE vocabulary of "
            f"{tok.get_vocab_size()} tokens; choose a size between {256 + len(SPECIAL_TOKENS)} and that"
        )
    return tok


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
