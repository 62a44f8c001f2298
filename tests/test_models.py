"""The native runner against transformers: logits, greedy continuations, paged/mixed/chunked batches, prefix
reuse, checkpoint errors, bfloat16."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from multihead_nb.errors import CheckpointError, ConfigError
from multihead_nb.memory import Arena, KVLayout, PagePool, prefix_hashes
from multihead_nb.backends.native import ForwardBatch, ModelRunner, read_spec
from multihead_nb.testing import tiny_checkpoint

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 48
PAGE_BYTES = 4096

# (family, overrides): every family, tied and untied, GQA, qwen3 with biases, mistral with a small window,
# llama3 RoPE scaling
CASES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "llama-llama3-rope-bias": ("llama", dict(
        attention_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )),
    "qwen2": ("qwen2", {}),
    "qwen2-untied": ("qwen2", dict(tie_word_embeddings=False, num_attention_heads=8, num_key_value_heads=2)),
    "qwen3": ("qwen3", dict(head_dim=32)),
    "qwen3-untied-bias": ("qwen3", dict(tie_word_embeddings=False, attention_bias=True)),
    "mistral": ("mistral", {}),
    "mistral-window": ("mistral", dict(sliding_window=12)),
}


# ---- a tiny engine for tests: sequences with pages from a pool, batches built from (sequence, n) chunks --------
class Seq:
    def __init__(self, runner: ModelRunner, pool: PagePool, owner: str, prompt: list[int], key: str = "m"):
        self.runner, self.pool, self.owner, self.key = runner, pool, owner, key
        self.tpp = runner.layout.tokens_per_page
        self.ids = list(prompt)
        self.n_prompt = len(prompt)
        self.done = 0  # tokens whose K/V are in pages
        self.pages: list[int] = []
        self.out: list[int] = []
        self.last_logits: torch.Tensor | None = None

    def ensure_pages(self, total: int) -> None:
        while len(self.pages) * self.tpp < total:  # one page at a time, so sequences' pages interleave
            self.pages += self.pool.allocate(1, self.owner, self.key)

    @property
    def pending(self) -> int:
        return len(self.ids) - self.done


def step(runner: ModelRunner, work: list[tuple[Seq, int]], all_logits: bool = False) -> list[torch.Tensor]:
    """One forward of `runner` over chunks (seq, n tokens); greedy-appends a token to each finished seq."""
    tpp = runner.layout.tokens_per_page
    ids, pos, slots, ql, cl, tables, li, owners = [], [], [], [], [], [], [], []
    for seq, n in work:
        start = seq.done
        assert 0 < n <= seq.pending
        seq.ensure_pages(start + n)
        first = len(ids)
        ids += seq.ids[start:start + n]
        pos += range(start, start + n)
        slots += [seq.pages[p // tpp] * tpp + p % tpp for p in range(start, start + n)]
        ql.append(n)
        cl.append(start + n)
        tables.append(seq.pages[: -(-(start + n) // tpp)])
        if all_logits:
            li += range(first, first + n)
        if start + n == len(seq.ids):  # the chunk reaches the end: its last token's logits give the next token
            if not all_logits:
                li.append(len(ids) - 1)
            owners.append(seq)
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    batch = ForwardBatch(t(ids), t(pos), t(slots), ql, cl, tables, t(li))
    logits = runner.forward(batch)
    assert logits.dtype == torch.float32 and logits.shape == (len(li), runner.spec.vocab_size)
    for seq, n in work:
        seq.done += n
    if all_logits:
        return [logits]
    for row, seq in zip(logits, owners):
        seq.last_logits = row
        tok = int(row.argmax())
        seq.ids.append(tok)
        seq.out.append(tok)
    return [logits]


def greedy(runner: ModelRunner, pool: PagePool, prompt: list[int], n: int = NEW_TOKENS, owner: str = "a") -> Seq:
    seq = Seq(runner, pool, owner, prompt)
    step(runner, [(seq, len(prompt))])
    while len(seq.out) < n:
        step(runner, [(seq, 1)])
    return seq


def hf_generate(path, prompt: list[int], n: int = NEW_TOKENS, dtype=torch.float32) -> list[int]:
    model = hf_model(path, dtype)
    model.generation_config.eos_token_id = None  # fixed length: never stop early
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n, pad_token_id=0,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    toks = out[0, len(prompt):].tolist()
    assert len(toks) == n
    return toks


_HF: dict = {}


def hf_model(path, dtype=torch.float32):
    key = (str(path), dtype)
    if key not in _HF:
        transformers.logging.set_verbosity_error()
        _HF[key] = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    return _HF[key]


def make_runner(path, dtype=torch.float32, num_pages=96, page_bytes=PAGE_BYTES, arena=None):
    arena = arena or Arena(num_pages, page_bytes)
    return ModelRunner(read_spec(path), arena, dtype=dtype, device="cpu")


def prompt_of(spec, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, spec.vocab_size, (n,), generator=g).tolist()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---- every family against transformers ------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_match_transformers(case):
    family, kw = CASES[case]
    path = tiny_checkpoint(family, **kw)
    runner = make_runner(path)
    spec = runner.spec
    assert spec.family == family
    pool = PagePool(runner.arena.num_pages)
    prompt = prompt_of(spec, 21)

    seq = Seq(runner, pool, "a", prompt)
    ours = step(runner, [(seq, len(prompt))], all_logits=True)[0]  # [T, V], one prefill
    with torch.no_grad():
        ref = hf_model(path)(torch.tensor([prompt])).logits[0].float()
    assert rel_err(ours, ref) < 1e-4

    seq = greedy(runner, pool, prompt)
    assert seq.out == hf_generate(path, prompt)
    pool.release(seq.pages, "a")


# ---- two models in one arena and one pool, mixed prefill/decode batches ----------------------------------------
def test_two_models_interleaved_in_one_arena_mixed_batches():
    p_llama = tiny_checkpoint("llama")  # 2 layers, head_dim 16, 2 KV heads
    p_qwen = tiny_checkpoint("qwen2", num_hidden_layers=3, head_dim=32, num_key_value_heads=1)
    arena = Arena(160, PAGE_BYTES)
    pool = PagePool(arena.num_pages)
    runners = {"llama": make_runner(p_llama, arena=arena), "qwen": make_runner(p_qwen, arena=arena)}
    assert runners["llama"].layout.tokens_per_page != runners["qwen"].layout.tokens_per_page
    seqs = {}
    for name, r in runners.items():
        seqs[name] = [
            Seq(r, pool, f"{name}-short", prompt_of(r.spec, 6, seed=1), key=name),
            Seq(r, pool, f"{name}-long", prompt_of(r.spec, 40, seed=2), key=name),
        ]
    # step by step: both models run each step; the long prompt is prefilled in chunks of 7 while the short decodes
    while any(len(s.out) < NEW_TOKENS for ss in seqs.values() for s in ss):
        for name, r in runners.items():
            work = []
            for s in seqs[name]:
                if len(s.out) >= NEW_TOKENS:
                    continue
                work.append((s, min(7, s.pending)))
            if work:
                step(r, work)
    pool.check()
    ll = set(p for s in seqs["llama"] for p in s.pages)
    qq = set(p for s in seqs["qwen"] for p in s.pages)
    assert not ll & qq and min(qq) < max(ll) and min(ll) < max(qq)  # interleaved in the arena
    for name, path in (("llama", p_llama), ("qwen", p_qwen)):
        for s in seqs[name]:
            assert s.out == hf_generate(path, s.ids[: s.n_prompt]), f"{name} {s.owner}"


# ---- chunked prefill ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["llama", "qwen3", "mistral-window"])
def test_chunked_prefill_matches_one_shot(case):
    family, kw = CASES[case]
    runner = make_runner(tiny_checkpoint(family, **kw))
    pool = PagePool(runner.arena.num_pages)
    prompt = prompt_of(runner.spec, 33)
    one = Seq(runner, pool, "one", prompt)
    whole = step(runner, [(one, len(prompt))], all_logits=True)[0]
    chunked = Seq(runner, pool, "chunks", prompt)
    parts = []
    while chunked.pending:
        parts += step(runner, [(chunked, min(5, chunked.pending))], all_logits=True)
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-5, atol=1e-5)


# ---- prefix reuse ---------------------------------------------------------------------------------------------
def test_prefix_pages_are_reused():
    path = tiny_checkpoint("qwen2")
    runner = make_runner(path)
    spec, tpp = runner.spec, runner.layout.tokens_per_page
    pool = PagePool(runner.arena.num_pages)
    shared = prompt_of(spec, 3 * tpp, seed=5)
    p1 = shared + prompt_of(spec, 4, seed=6)
    p2 = shared + prompt_of(spec, 5, seed=7)

    first = greedy(runner, pool, p1, n=8, owner="first")
    for page, h in zip(first.pages, prefix_hashes(first.ids[: first.n_prompt], tpp, "m")):
        pool.register(page, h)

    second = Seq(runner, pool, "second", p2)
    hashes = prefix_hashes(p2, tpp, "m")[: (len(p2) - 1) // tpp]  # never the page holding the last token
    for h in hashes:
        page = pool.lookup(h)
        if page is None:
            break
        pool.acquire(page, "second")
        second.pages.append(page)
    assert second.pages == first.pages[:3]
    second.done = len(second.pages) * tpp
    step(runner, [(second, second.pending)])  # only the 5 tokens past the shared pages
    reused_logits = second.last_logits
    while len(second.out) < NEW_TOKENS:
        step(runner, [(second, 1)])

    fresh = Seq(runner, pool, "fresh", p2)
    step(runner, [(fresh, len(p2))])
    assert rel_err(reused_logits, fresh.last_logits) < 1e-5
    assert second.out == hf_generate(path, p2)
    assert pool.refcount(first.pages[0]) == 2
    pool.release(second.pages, "second")
    pool.release(first.pages, "first")
    pool.release(fresh.pages, "fresh")
    pool.check()


# ---- errors ---------------------------------------------------------------------------------------------------
@pytest.fixture
def ckpt_copy(tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("llama"), dst)
    return dst


def test_error_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_spec(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_spec(str(tmp_path / "nope"))


def test_error_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="no-such-org/no-such-model"):
        read_spec("no-such-org/no-such-model")


def test_error_missing_config(ckpt_copy):
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        read_spec(ckpt_copy)


def test_error_corrupt_config(ckpt_copy):
    (ckpt_copy / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_spec(ckpt_copy)


def test_error_unknown_architecture(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        read_spec(ckpt_copy)


def test_error_unsupported_rope_scaling(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="yarn"):
        read_spec(ckpt_copy)


def test_error_missing_weights(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        read_spec(ckpt_copy)


def test_error_truncated_weights(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_spec(ckpt_copy)
    f.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_spec(ckpt_copy)


def test_error_missing_tensor(ckpt_copy):
    from safetensors.torch import load_file, save_file

    f = ckpt_copy / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match="lacks tensors model.layers.1.mlp.up_proj.weight"):
        read_spec(ckpt_copy)


def test_error_page_too_small_for_one_token():
    spec = read_spec(tiny_checkpoint("llama"))
    with pytest.raises(ConfigError, match="cannot hold one token"):
        spec.kv_layout(torch.float32, 256)
    with pytest.raises(ConfigError, match="cannot hold one token"):
        KVLayout(2, 2, 16, torch.float32, 256)


def test_spec_fields():
    path = tiny_checkpoint("qwen3", head_dim=32)
    spec = read_spec(path)
    assert (spec.family, spec.qk_norm, spec.head_dim, spec.num_kv_heads, spec.tie_word_embeddings) == (
        "qwen3", True, 32, 2, True)
    assert spec.eos_token_ids == (2, 0) and spec.bos_token_id == 0 and spec.sliding_window is None
    model = hf_model(path)
    assert spec.num_params() == sum(p.numel() for p in model.parameters())
    assert spec.weight_bytes(torch.bfloat16) == 2 * spec.num_params()
    assert read_spec(tiny_checkpoint("mistral", sliding_window=12)).sliding_window == 12


# ---- bfloat16 ---------------------------------------------------------------------------------------------------
def test_bfloat16_smoke():
    path = tiny_checkpoint("llama")
    r32 = make_runner(path)
    r16 = make_runner(path, dtype=torch.bfloat16)
    assert r16.layout.tokens_per_page == 2 * r32.layout.tokens_per_page
    prompt = prompt_of(r32.spec, 21)
    a = greedy(r32, PagePool(r32.arena.num_pages), prompt).out
    b = greedy(r16, PagePool(r16.arena.num_pages), prompt).out
    agree = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    assert agree >= 8, f"bfloat16 and float32 greedy tokens diverge at token {agree}"
