"""Tests of `multihead_nb.testing`: offline tiny checkpoints load in transformers, deterministically."""

from __future__ import annotations

import json
import unicodedata

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from multihead_nb.testing import FAMILIES, SHAPES, tiny_checkpoint

TEXTS = [
    "Hello, world!",
    "  leading spaces\n\n\ttabs   and\r\nCRLF  ",
    "def f(x):\n    return x ** 2  # ok\n",
    "Grüße, 日本語, русский, emoji 🙂👩‍👩‍👧, math ∑∫√",
    "",
    "<|im_start|>user\nhi<|im_end|>\n",
]


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    cache = {}

    def get(family):
        if family not in cache:
            path = tiny_ckpt(family)
            model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
            cache[family] = (path, model.eval(), info, AutoTokenizer.from_pretrained(path))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_without_missing_or_unexpected_keys(loaded, family):
    path, model, info, tok = loaded(family)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.model_type == family
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["hidden_size"] == 64 and cfg["num_hidden_layers"] == 2
    assert cfg["num_attention_heads"] == 4 and cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 16
    assert cfg["vocab_size"] == len(tok) == 384
    assert cfg["eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    # every tensor of the model came from the file (none left at transformers' init)
    sd = load_file(path / "model.safetensors")
    for name, p in model.state_dict().items():
        src = sd.get(name, sd["model.embed_tokens.weight"] if name == "lm_head.weight" else None)
        assert src is not None, name
        torch.testing.assert_close(p, src, rtol=0, atol=0, msg=name)
    gen = json.loads((path / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_have_clear_winners(loaded, family):
    _, model, _, tok = loaded(family)
    ids = torch.tensor([tok.encode("The team met in the morning to plan the week.")])
    with torch.no_grad():
        logits = model(ids).logits[0]  # [T, V]
    top2 = logits.topk(2, dim=-1).values
    assert logits.std() > 0.5
    assert (top2[:, 0] - top2[:, 1]).median() > 1e-2
    # the context matters: the same token at two positions gives different logits
    assert not torch.allclose(logits[0], logits[-1])


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_round_trips_and_matches_tokenizer_json(loaded, family):
    from tokenizers import Tokenizer

    path, _, _, tok = loaded(family)
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == raw.encode(text).ids, text
        assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>") == [tok.convert_tokens_to_ids("<|im_start|>")]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80))
def test_tokenizer_round_trips_any_text(loaded, text):
    tok = loaded("llama")[3]
    assert tok.decode(tok.encode(text)) == text
    # qwen2's tokenizer normalizes to NFC, like real Qwen2 tokenizers (transformers 5 imposes it)
    qtok = loaded("qwen2")[3]
    assert qtok.decode(qtok.encode(text)) == unicodedata.normalize("NFC", text)


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template(loaded, family):
    _, _, _, tok = loaded(family)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs, tokenize=False).endswith("Hi there<|im_end|>\n")
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True) by default
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    assert list(enc) == tok.encode(text)
    assert enc[0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_same_seed_same_bytes_different_seed_different_weights(tmp_path):
    a = tiny_checkpoint("qwen3", path=tmp_path / "a", seed=3)
    b = tiny_checkpoint("qwen3", path=tmp_path / "b", seed=3)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    c = tiny_checkpoint("qwen3", path=tmp_path / "c", seed=4)
    wa, wc = load_file(a / "model.safetensors"), load_file(c / "model.safetensors")
    assert wa.keys() == wc.keys()
    assert all(not torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_cache_reuses_folder(tiny_ckpt):
    a = tiny_ckpt("llama")
    b = tiny_ckpt("llama")
    assert a == b and (a / "model.safetensors").is_file()
    assert tiny_ckpt("llama", seed=1) != a
    assert tiny_ckpt("llama", num_hidden_layers=3) != a
    assert not [p for p in a.parent.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_tokenizer_vocab_gives_a_different_tokenizer(tiny_ckpt):
    t384 = AutoTokenizer.from_pretrained(tiny_ckpt("llama"))
    t300 = AutoTokenizer.from_pretrained(tiny_ckpt("llama", tokenizer_vocab=300))
    assert len(t384) == 384 and len(t300) == 300
    text = "The planner wrote the outline, the writer filled in the details."
    assert t300.encode(text) != t384.encode(text)
    assert len(t300.encode(text)) > len(t384.encode(text))
    assert t300.decode(t300.encode(text)) == text
    cfg = json.loads((tiny_ckpt("llama", tokenizer_vocab=300) / "config.json").read_text())
    assert cfg["vocab_size"] == 300


def test_qwen2_has_nonzero_qkv_bias(loaded):
    _, model, _, _ = loaded("qwen2")
    attn = model.model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.bias is not None and proj.bias.abs().mean() > 0.05
    assert attn.o_proj.bias is None
    assert loaded("llama")[1].model.layers[0].self_attn.q_proj.bias is None


def test_qwen3_qk_norm_weights_are_not_trivial(loaded):
    _, model, _, _ = loaded("qwen3")
    attn = model.model.layers[1].self_attn
    for norm in (attn.q_norm, attn.k_norm):
        assert norm.weight.shape == (16,)
        assert not torch.allclose(norm.weight, torch.ones(16))


def test_tied_and_untied(loaded, tiny_ckpt):
    for family, tied in (("llama", False), ("mistral", False), ("qwen2", True), ("qwen3", True)):
        path, model, _, _ = loaded(family)
        has_head = "lm_head.weight" in load_file(path / "model.safetensors")
        assert has_head == (not tied), family
        same = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
        assert same == tied, family
    path = tiny_ckpt("llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    path = tiny_ckpt("qwen2", tie_word_embeddings=False)
    assert "lm_head.weight" in load_file(path / "model.safetensors")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_and_overrides(tiny_ckpt, dtype):
    path = tiny_ckpt("qwen2", dtype=dtype, num_hidden_layers=3, num_key_value_heads=4, vocab_size=512)
    sd = load_file(path / "model.safetensors")
    assert {t.dtype for t in sd.values()} == {getattr(torch, dtype)}
    assert "model.layers.2.self_attn.k_proj.bias" in sd
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (64, 64)
    assert sd["model.embed_tokens.weight"].shape == (512, 64)
    assert not sd["model.embed_tokens.weight"][384:].any()  # rows past the tokenizer are zero
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == getattr(torch, dtype)
    assert json.loads((path / "config.json").read_text())["dtype"] == dtype


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="llama, qwen2, qwen3, mistral"):
        tiny_checkpoint("gpt2", path=tmp_path / "x")
    with pytest.raises(ValueError, match="dtype"):
        tiny_checkpoint("llama", path=tmp_path / "y", dtype="int8")
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_checkpoint("llama", path=tmp_path / "z", vocab_size=100)


def test_shapes_are_real_model_shapes():
    s = SHAPES["smollm2-135m"]
    assert (s["family"], s["hidden_size"], s["num_hidden_layers"], s["vocab_size"]) == ("llama", 576, 30, 49152)
    assert s["num_attention_heads"] == 9 and s["num_key_value_heads"] == 3 and s["tie_word_embeddings"]
    q = SHAPES["qwen2.5-0.5b"]
    assert (q["family"], q["hidden_size"], q["intermediate_size"], q["num_hidden_layers"]) == ("qwen2", 896, 4864, 24)
    assert (q["num_attention_heads"], q["num_key_value_heads"], q["vocab_size"]) == (14, 2, 151936)
    assert q["rope_theta"] == 1e6 and q["max_position_embeddings"] == 32768


@pytest.mark.slow
def test_shape_checkpoint_smollm2_loads():
    import time

    from multihead_nb.testing import shape_checkpoint

    t0 = time.perf_counter()
    path = shape_checkpoint("smollm2-135m")
    assert time.perf_counter() - t0 < 60
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 136e6
    assert model.dtype == torch.bfloat16
