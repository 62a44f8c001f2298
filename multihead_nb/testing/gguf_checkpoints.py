"""GGUF files written from the offline Hugging Face checkpoints, the way llama.cpp's converter writes them.

Owns: `write_gguf(folder, file, weight_type)` — a checkpoint folder of `checkpoints.py` (config.json,
model.safetensors, tokenizer.json) as one GGUF file written with the `gguf` package: llama.cpp's metadata keys, its
tensor names (from the `gguf` package's own name map), llama-arch Q/K rows permuted as llama.cpp permutes them,
matrices in F32, F16, BF16 or a type `gguf.quants` can quantize (Q8_0, Q4_0, Q4_1, Q5_0, ...), norms in F32, and
the byte-level BPE tokenizer with its chat template as `tokenizer.ggml.*` metadata. Test hooks change a written
file (`architecture`, `extra_metadata`, `extra_tensors`, `drop`).

Does not know how GGUF files are read or run (`backends/native/gguf_*.py`): the tests check those against this.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ARCHES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's row order for Q/K of llama-arch files: each head's two rotary halves interleaved."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_metadata(folder: Path) -> dict:
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict(tok["model"]["vocab"])
    special = {}
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special[added["id"]] = added["content"]
    tokens = [None] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        tokens[i] = text
    assert None not in tokens, "the tokenizer's ids are not contiguous"
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    chat = cfg.get("chat_template")
    if chat is None and (folder / "chat_template.jinja").is_file():
        chat = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    gen = folder / "generation_config.json"
    eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id") if gen.is_file() else None
    eos = eos[0] if isinstance(eos, list) else eos
    return dict(tokens=tokens, types=[3 if i in special else 1 for i in range(len(tokens))], merges=merges,
                chat=chat, eos=eos if eos is not None else 2, bos=1, pre="qwen2" if "Split" in json.dumps(
                    tok.get("pre_tokenizer")) else "gpt-2")


def write_gguf(folder: str | Path, file: str | Path, weight_type: str = "F32", *, architecture: str | None = None,
               tokenizer: bool = True, extra_metadata: dict | None = None, extra_tensors: dict | None = None,
               drop: tuple[str, ...] = ()) -> Path:
    """Write checkpoint `folder` as the GGUF `file`; matrices (and the embedding) in `weight_type`."""
    import gguf
    from safetensors.numpy import load_file

    folder, file = Path(folder), Path(file)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    family = cfg["model_type"]
    arch = architecture or ARCHES[family]
    n_layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    n_heads = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg.get("head_dim") or hidden // n_heads
    rope = cfg.get("rope_parameters") or {}
    qtype = gguf.GGMLQuantizationType[weight_type]

    w = gguf.GGUFWriter(str(file), arch)
    w.add_name(folder.name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if weight_type == "F32"
                    else getattr(gguf.LlamaFileType, f"MOSTLY_{weight_type}", gguf.LlamaFileType.GUESSED))
    w.add_block_count(n_layers)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    if tokenizer:
        t = _tokenizer_metadata(folder)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(t["pre"])
        w.add_token_list(t["tokens"])
        w.add_token_types(t["types"])
        w.add_token_merges(t["merges"])
        w.add_bos_token_id(t["bos"])
        w.add_eos_token_id(t["eos"])
        w.add_add_bos_token(False)
        if t["chat"]:
            w.add_chat_template(t["chat"])
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, int(value))

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[ARCHES[family].upper()], n_layers)
    for hf, value in sorted(load_file(str(folder / "model.safetensors")).items()):
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf
        if name in drop:
            continue
        x = value.astype(np.float32)
        if ARCHES[family] == "llama" and ".attn_q." in name:
            x = llama_cpp_permute(x, n_heads)
        elif ARCHES[family] == "llama" and ".attn_k." in name:
            x = llama_cpp_permute(x, n_kv)
        if x.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, x)
    for name, x in (extra_tensors or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return file
