"""The workspace and engine: heads batched together produce what they would alone; fairness, quotas,
preemption, cancellation, bad input, and the frames."""

import _thread
import pytest
import torch

import multihead_nb as mh
from helpers import make_ws, tight_pool
from multihead_nb.errors import CheckpointError, ConfigError, RequestError

PROMPTS = [
    "Write a function that adds two numbers.",
    "Tell me about the sea and the sky",
    "def f(x): return x",
    "List three colours",
]


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    return {
        "a": str(tiny_ckpt("llama")),
        "b": str(tiny_ckpt("qwen2", num_hidden_layers=3, head_dim=8, num_attention_heads=8, num_key_value_heads=2)),
    }


def add_team(ws, models):
    ws.add_head("h1", models["a"], system="You are terse.")
    ws.add_head("h2", models["a"], system="You are verbose.")
    ws.add_head("h3", models["a"])
    ws.add_head("h4", models["b"], system="Other model.")


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.9, top_k=50, seed=7)])
def test_heads_together_equal_alone(models, sampling):
    alone = {}
    ws = make_ws()
    add_team(ws, models)
    heads = ["h1", "h2", "h3", "h4"]
    for h, p in zip(heads, PROMPTS):
        alone[h] = ws.generate(h, p, max_tokens=24, ignore_eos=True, **sampling).token_ids
    ws.close()

    ws = make_ws(max_batched_tokens=64)
    add_team(ws, models)
    handles = {h: ws.submit(h, p, max_tokens=24, ignore_eos=True, **sampling) for h, p in zip(heads, PROMPTS)}
    together = {h: handles[h].result().token_ids for h in heads}
    assert together == alone
    steps = ws.steps()
    # heads of one model shared forwards, and both models ran within the same engine steps
    assert steps.num_seqs.max() >= 3
    assert (steps.groupby("step").model.nunique() == 2).any()
    ws.pool.check()
    ws.close()


def test_one_copy_of_weights_per_model(models):
    ws = make_ws()
    add_team(ws, models)
    assert len(ws.models) == 2
    assert ws.pages().state.eq("weights").sum() == sum(m.weight_pages for m in ws.models.values())
    ws.remove_head("h4")
    assert len(ws.models) == 1  # the second model is unloaded with its last head
    ws.close()


def test_fairness_weights_1_to_3(models):
    ws = make_ws(max_batched_tokens=8, max_seqs=8)
    ws.add_head("light", models["a"], weight=1)
    ws.add_head("heavy", models["a"], weight=3)
    handles = []
    for i in range(16):
        for h in ("light", "heavy"):
            handles.append(ws.submit(h, f"request {i} of {h}", max_tokens=16, ignore_eos=True))
    served = {"light": 0, "heavy": 0}
    # measure service while both heads are backlogged (each still has requests waiting for a place)
    sched = ws.scheduler
    ws.engine.process_inbox()
    while all(sched.heads[h].waiting for h in served):
        before = {h: sched.heads[h].served for h in served}
        ws.engine.step()
        for h in served:
            served[h] += sched.heads[h].served - before[h]
    ratio = served["heavy"] / served["light"]
    assert 3 * 0.9 <= ratio <= 3 * 1.1, served
    for h in handles:
        h.result()
    ws.pool.check()
    ws.close()


def test_quota_is_never_exceeded_and_others_proceed(models):
    ws = make_ws(pool="2MiB")
    ws.add_head("small", models["a"], quota="5%")
    ws.add_head("free", models["a"])
    quota = ws.pool.quota("small")
    assert quota is not None and quota >= 1
    peak = {"small": 0}
    ws.engine.listeners.append(lambda ev, req, _: peak.__setitem__("small", max(peak["small"], ws.pool.held_by("small"))))
    tpp = ws.scheduler.layouts[ws.heads["small"].model].tokens_per_page
    n_tokens = (quota * tpp) // 3  # three of these do not fit the quota at once
    hs = [ws.submit("small", "x " * max(1, n_tokens - 20), max_tokens=8, ignore_eos=True) for _ in range(3)]
    other = ws.submit("free", "hello there", max_tokens=8, ignore_eos=True)
    assert other.result().finish_reason == "length"
    for h in hs:
        assert h.result().finish_reason == "length"
    assert 0 < peak["small"] <= quota
    ws.pool.check()
    ws.close()


def test_overload_completes_through_preemption_without_leaks(models):
    ws = make_ws(pool="1MiB", page_bytes="4KiB", max_batched_tokens=256)
    ws.add_head("a", models["a"])
    ws.add_head("b", models["a"], weight=2)
    free_at_start = ws.pool.num_free
    tpp = ws.scheduler.layouts[ws.heads["a"].model].tokens_per_page
    kv_tokens = free_at_start * tpp
    prompt_len = (4 * kv_tokens) // 32  # 32 prompts together need 4x the pool
    prompts = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(prompt_len // 3)) for i in range(32)]
    alone_ws = make_ws(pool="8MiB", page_bytes="4KiB")
    alone_ws.add_head("a", models["a"])
    alone_ws.add_head("b", models["a"])
    expected = [alone_ws.generate("ab"[i % 2], p, max_tokens=6, ignore_eos=True).token_ids for i, p in enumerate(prompts)]
    alone_ws.close()
    total = sum(len(ws.encode_prompt("a", p)) for p in prompts)
    assert total >= 3.5 * kv_tokens
    handles = [ws.submit("ab"[i % 2], p, max_tokens=6, ignore_eos=True) for i, p in enumerate(prompts)]
    got = [h.result().token_ids for h in handles]
    assert got == expected
    assert sum(h.request.num_preemptions for h in handles) > 0 or ws.steps().pages_free.min() == 0
    assert ws.pool.num_free + ws.pool.usage()["cached"] * 0 == free_at_start
    ws.pool.check()
    ws.close()


def test_request_too_big_for_pool_fails_alone(models):
    ws = make_ws(pool=tight_pool(models["a"], 24), page_bytes="4KiB")
    ws.add_head("a", models["a"])
    ws.add_head("b", models["a"])
    free = ws.pool.num_free
    assert free == 24
    tpp = ws.scheduler.layouts[ws.heads["a"].model].tokens_per_page
    big = ws.submit("a", "go", max_tokens=free * tpp + 10, ignore_eos=True)
    small = ws.submit("b", "hi", max_tokens=5, ignore_eos=True)
    assert small.result().finish_reason == "length"
    with pytest.raises(RequestError, match="pages"):
        big.result()
    assert ws.pool.num_free == free
    assert ws.generate("a", "again", max_tokens=3).finish_reason in ("length", "stop")
    ws.close()


def test_cancel_mid_generation_frees_pages(models):
    ws = make_ws()
    ws.add_head("a", models["a"])
    free = ws.pool.num_free
    h = ws.submit("a", "stream me", max_tokens=200, ignore_eos=True)
    pieces = []
    for delta in h.stream():
        pieces.append(delta)
        if len(h.request.output_ids) >= 5:
            break
    h.cancel()
    assert h.request.finish_reason == "cancelled"
    assert ws.pool.num_free == free
    assert ws.generate("a", "next", max_tokens=4, ignore_eos=True).finish_reason == "length"
    ws.close()


def test_keyboard_interrupt_cancels_cleanly(models):
    ws = make_ws()
    ws.add_head("a", models["a"])
    free = ws.pool.num_free
    h = ws.submit("a", "interrupt me", max_tokens=400, ignore_eos=True)
    fired = []

    def ctrl_c_after_5_tokens(event, req, _):  # like Ctrl-C pressed mid-generation
        if event == "token" and len(req.output_ids) == 5 and not fired:
            fired.append(True)
            _thread.interrupt_main()

    ws.engine.listeners.append(ctrl_c_after_5_tokens)
    with pytest.raises(KeyboardInterrupt):
        h.result()
    ws.engine.listeners.remove(ctrl_c_after_5_tokens)
    assert h.request.status.value == "cancelled"
    assert ws.pool.num_free == free
    ws.pool.check()
    assert ws.generate("a", "after", max_tokens=3, ignore_eos=True).finish_reason == "length"
    ws.close()


def test_background_thread_mode(models):
    ws = make_ws(background=True)
    ws.add_head("a", models["a"])
    ws.add_head("b", models["b"])
    h1 = ws.submit("a", "one", max_tokens=10, ignore_eos=True)
    h2 = ws.submit("b", "two", max_tokens=10, ignore_eos=True)
    text = "".join(h1.stream())
    assert text == h1.result().text
    assert len(h2.result().token_ids) == 10
    ws.close()


def test_bad_input_is_clear_and_harmless(models, tmp_path):
    ws = make_ws()
    ws.add_head("a", models["a"])
    with pytest.raises(ConfigError, match="unknown head 'nope'"):
        ws.generate("nope", "hi")
    with pytest.raises(ConfigError, match="already exists"):
        ws.add_head("a", models["a"])
    with pytest.raises(ConfigError, match="unknown head option"):
        ws.add_head("c", models["a"], temprature=0.5)
    with pytest.raises(ConfigError, match="unknown sampling option"):
        ws.generate("a", "hi", max_tokns=3)
    with pytest.raises(CheckpointError, match="does-not-exist"):
        ws.add_head("d", str(tmp_path / "does-not-exist"))
    with pytest.raises(RequestError, match="context"):
        ws.generate("a", "word " * 2000)
    vocab = ws.models[ws.heads["a"].model].spec.vocab_size
    for bad in ([5, vocab], [-1], [5, 2.0], ["7"]):  # would index past the embedding (a crash in the C kernel)
        with pytest.raises(RequestError, match="vocabulary"):
            ws.submit_ids("a", bad, max_tokens=2)
    open_handle = ws.submit_ids("a", [5, 6], max_tokens=2, prompt_open=True)
    with pytest.raises(RequestError, match="vocabulary"):
        ws.extend_prompt(open_handle, [vocab + 3], close=True)
    ws.extend_prompt(open_handle, [7], close=True)
    assert len(open_handle.result().token_ids) == 2
    assert ws.submit_ids("a", __import__("numpy").array([5, 6]), max_tokens=1).result().prompt_token_ids == [5, 6]
    small = make_ws(pool=tight_pool(models["a"], 8), page_bytes="4KiB")
    small.add_head("a", models["a"])
    with pytest.raises(RequestError, match="pages"):
        small.generate("a", "word " * 60)
    small.close()
    assert set(ws.heads) == {"a"}
    assert ws.generate("a", "still fine", max_tokens=3, ignore_eos=True).finish_reason == "length"
    ws.pool.check()
    ws.close()


def test_prefix_cache_reuses_full_pages(models):
    ws = make_ws()
    ws.add_head("a", models["a"], system="A long shared system prompt. " * 12)
    first = ws.generate("a", "first question", max_tokens=8)
    second = ws.generate("a", "first question", max_tokens=8)
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens > 0
    assert second.token_ids == first.token_ids
    # computed tokens of the second request: only the uncached rest of its prompt (plus decode)
    steps = ws.steps()
    assert ws.scheduler.heads["a"].served == len(first.prompt_token_ids) + len(first.token_ids) - 1 + (
        len(second.prompt_token_ids) - second.num_cached_tokens + len(second.token_ids) - 1
    )
    assert not steps.empty
    ws.close()


def test_frames_have_documented_columns(models):
    from multihead_nb.engine.recorder import STEP_COLUMNS, TOKEN_COLUMNS

    ws = make_ws()
    ws.add_head("a", models["a"])
    ws.add_head("b", models["b"])
    ha = ws.submit("a", "alpha", max_tokens=12, ignore_eos=True)
    hb = ws.submit("b", "beta", max_tokens=12, ignore_eos=True)
    ca, cb = ha.result(), hb.result()
    assert list(ws.steps().columns) == STEP_COLUMNS
    assert list(ca.tokens.columns)[: len(TOKEN_COLUMNS)] == TOKEN_COLUMNS
    for c in (ca, cb):
        t = c.tokens
        assert len(t) == 12 and t["index"].tolist() == list(range(12))
        assert t.t.is_monotonic_increasing and (t.dt >= 0).all()
        assert "".join(t.text) == c.text or c.text.startswith("".join(t.text))
    tokens = ws.tokens()
    assert set(tokens["head"]) == {"a", "b"}
    stats = ws.stats()
    assert stats["steps"] == ws.engine.step_count and stats["tokens_generated"] == 24
    assert 0 <= stats["waste"] < 1
    pages = ws.pages()
    assert list(pages.columns) == ["page", "state", "owner", "holders", "model", "tokens", "shared"]
    assert set(pages.state) <= {"free", "cached", "kv", "weights"}
    ws.close()


def test_workspace_options_are_checked_before_anything_is_allocated():
    """Each bad limit is refused by name (bools are not counts); good ones resolve once, frozen."""
    from dataclasses import FrozenInstanceError

    from multihead_nb.workspace.options import WorkspaceOptions

    for bad, match in (({"max_seqs": 0}, "max_seqs must be a positive integer, got 0"),
                       ({"history": True}, "history must be a positive integer, got True"),
                       ({"max_batched_tokens": 2.5}, "max_batched_tokens must be"),
                       ({"cpu_kernel": "yes"}, "cpu_kernel must be None")):
        with pytest.raises(ConfigError, match=match):
            mh.Workspace(device="cpu", pool="1MiB", background=False, **bad)
    o = WorkspaceOptions.parse("cpu", "1MiB", "64KiB", "float32", max_batched_tokens=8, max_seqs=2, cpu_kernel=False,
                               history=10)
    assert (o.num_pages, o.page_bytes, o.dtype, str(o.device)) == (16, 64 * 1024, torch.float32, "cpu")
    with pytest.raises(FrozenInstanceError):
        o.max_seqs = 3
    with pytest.raises(TypeError):
        WorkspaceOptions.parse("cpu", "1MiB", "64KiB", "float32", max_seq=2)  # an unknown option is an error


def test_pool_and_page_size_errors(models):
    from multihead_nb.errors import OutOfPagesError

    with pytest.raises(ConfigError, match="smaller than one page"):
        mh.Workspace(device="cpu", pool="4KiB", page_bytes="8KiB", background=False)
    with pytest.raises(ConfigError, match="size like"):
        mh.Workspace(device="cpu", pool="lots", background=False)
    with pytest.raises(ConfigError, match="dtype"):
        mh.Workspace(device="cpu", dtype="int8", background=False)
    ws = make_ws(pool="256KiB", page_bytes="8KiB")
    with pytest.raises(OutOfPagesError, match=r"needs .* of weights .* larger pool"):
        ws.add_head("a", models["a"])
    assert not ws.heads and ws.pool.num_free == ws.pool.num_pages  # nothing half-loaded
    ws.close()
    ws = make_ws(page_bytes="256")
    with pytest.raises(ConfigError, match="cannot hold one token"):
        ws.add_head("a", models["a"])
    ws.close()


def test_heads_change_while_the_engine_thread_runs(models):
    ws = make_ws(background=True)
    ws.add_head("a", models["a"])
    long = ws.submit("a", "keep going", max_tokens=300, ignore_eos=True)
    ws.add_head("b", models["b"])  # loads a second model while the engine serves "a"
    assert len(ws.generate("b", "hello", max_tokens=5, ignore_eos=True).token_ids) == 5
    ws.add_head("b", models["a"], replace=True, system="now on model a")
    ws.remove_head("b")
    assert len(ws.models) == 1
    assert ws.pages().shape[0] == ws.pool.num_pages and ws.stats()["steps"] > 0
    assert len(long.result().token_ids) == 300
    ws.pool.check()
    ws.close()


def test_exl2_head_on_cpu_names_what_is_missing(models, tmp_path):
    import json

    folder = tmp_path / "model-exl2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "exl2", "bits": 4.0}}))
    ws = make_ws()
    ws.add_head("a", models["a"])
    with pytest.raises(ConfigError, match="CUDA"):
        ws.add_head("q", str(folder))
    assert set(ws.heads) == {"a"} and len(ws.models) == 1
    assert ws.generate("a", "fine", max_tokens=2).token_ids
    ws.close()


def test_detokenizer_waits_only_for_characters_that_can_complete(tiny_ckpt):
    """Streamed text: a valid text's deltas join to exactly its decoded text, each multi-byte character whole (its
    bytes, in separate tokens, wait for it); stray bytes that never complete (each U+FFFD) and special tokens (no
    text) are streamed as they decode, in windows of a bounded number of tokens rather than ever longer ones (which
    made every token's decoding slower as the output grew), and the text after them comes out right."""
    from transformers import AutoTokenizer

    from multihead_nb.engine.output import MAX_PENDING, IncrementalDetokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_ckpt("llama")))
    widths = []

    class Counting:  # the tokenizer, noting how many ids each decode gets
        def decode(self, ids, **kw):
            widths.append(len(ids))
            return tok.decode(ids, **kw)

    text = "Grüße, naïve café — 東京 🙂 done."
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # some characters span several tokens
    d = IncrementalDetokenizer(Counting(), tok.encode("Hi:", add_special_tokens=False))
    deltas = [d.push(t) for t in ids]
    assert "".join(deltas) == text and not any("\ufffd" in x for x in deltas)

    stray, after = tok.convert_tokens_to_ids("â"), tok.encode(" hello world", add_special_tokens=False)
    for noise, shown in ((stray, "\ufffd"), (tok.eos_token_id, "")):
        widths.clear()
        d = IncrementalDetokenizer(Counting(), tok.encode("ok", add_special_tokens=False))
        out = [d.push(t) for t in [noise] * 200 + after]
        assert "".join(out) == shown * 200 + " hello world"
        assert max(widths) <= 2 * MAX_PENDING + 2, max(widths)
