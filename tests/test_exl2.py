"""EXL2 heads: the region of the arena, the ForwardBatch → PagedParams translation, the lazy import, checkpoint
sniffing (all on the CPU), and the exllamav2 runner itself, alone and as workspace heads beside native ones (CUDA,
skipped unless exllamav2 and flash-attn import). The scheduler's side of region models runs on the CPU in
test_exl2_scheduler.py."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import sys
import types

import pytest
import torch

from multihead_nb.errors import CheckpointError, ConfigError, OutOfPagesError
from multihead_nb.memory import Arena, PagePool, PageState
from multihead_nb.backends.native import ForwardBatch
from multihead_nb.backends.exl2 import runner as er
from multihead_nb.memory.region_pool import region_owner
from multihead_nb.backends.exl2.region import (
    EXL2_PAGE_TOKENS,
    Exl2Region,
    bytes_per_exl2_page,
    exl2_pages_in,
    region_pages_for,
)
from multihead_nb.backends.exl2.batch import paged_params_fields
from multihead_nb.backends.exl2.checkpoint import is_exl2_checkpoint, read_exl2_spec, require_exllamav2
from multihead_nb.backends.exl2.runner import Exl2Layout

P = EXL2_PAGE_TOKENS


# ---- byte math and views -----------------------------------------------------------------------------------
def test_byte_math():
    b = bytes_per_exl2_page(2, 2, 8)
    assert b == 2 * 2 * 256 * 2 * 8 * 2 == 32768
    assert region_pages_for(2, 2, 8, 3, 4096) == 24
    assert region_pages_for(2, 2, 8, 3, 3072) == math.ceil(3 * 32768 / 3072) == 32
    assert exl2_pages_in(2, 2, 8, 32, 3072) == 3
    assert exl2_pages_in(2, 2, 8, 31, 3072) == 2
    for n in range(1, 9):
        for pb in (256, 3072, 4096, 65536):
            assert exl2_pages_in(2, 2, 8, region_pages_for(2, 2, 8, n, pb), pb) >= n
    with pytest.raises(ConfigError):
        region_pages_for(2, 2, 8, 0, 4096)
    with pytest.raises(ConfigError):
        bytes_per_exl2_page(0, 2, 8)


def test_layer_views_are_contiguous_fp16_views_into_the_arena():
    arena = Arena(80, 3072)
    first, n_arena = 5, region_pages_for(2, 2, 8, 3, 3072)
    region = Exl2Region(first, n_arena, 3072, num_layers=2, num_kv_heads=2, head_dim=8)
    assert region.num_exl2_pages == 3 and region.max_seq_len == 768
    keys, values = region.layer_views(arena)
    assert len(keys) == len(values) == 2
    lo = arena.data.data_ptr() + first * 3072
    hi = arena.data.data_ptr() + (first + n_arena) * 3072
    spans = []
    for t in keys + values:
        assert t.shape == (1, 768, 2, 8) and t.dtype == torch.float16 and t.is_contiguous()
        assert lo <= t.data_ptr() and t.data_ptr() + t.numel() * 2 <= hi
        spans.append((t.data_ptr(), t.data_ptr() + t.numel() * 2))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "K and V tensors overlap"
    # layout: [layers, 2, N*256, KV, d]; a write through a view lands in the arena's bytes, nowhere else
    keys[1][0, 300, 1, 3] = 7.0
    off = first * 3072 + ((1 * 2 + 0) * 768 * 2 * 8 + (300 * 2 + 1) * 8 + 3) * 2
    assert arena.data[off : off + 2].view(torch.float16).item() == 7.0
    values[0].fill_(1.0)
    halfs = arena.data.view(torch.float16)
    assert int((halfs != 0).sum()) == 768 * 2 * 8 + 1  # all of V of layer 0, and the one key
    assert halfs[(first * 3072 + 768 * 2 * 8 * 2) // 2 :][: 768 * 2 * 8].eq(1.0).all()  # V_0 follows K_0
    assert not arena.data[: first * 3072].any() and not arena.data[(first + n_arena) * 3072 :].any()


def test_region_errors():
    with pytest.raises(ConfigError, match="cannot hold one 256-token"):
        Exl2Region(0, 10, 3072, 2, 2, 8)
    with pytest.raises(ConfigError, match="contiguous"):
        Exl2Region.from_pages([0, 1, 3], 32768, 2, 2, 8)
    r = Exl2Region.from_pages(list(range(4, 8)), 32768, 2, 2, 8)
    assert (r.first_page, r.num_arena_pages, r.num_exl2_pages) == (4, 4, 4)
    with pytest.raises(ConfigError, match="past the arena"):
        r.layer_views(Arena(6, 32768))
    with pytest.raises(ConfigError, match="pages of"):
        r.layer_views(Arena(8, 4096))


def test_accounting_map_splits_the_region_evenly():
    region = Exl2Region(10, region_pages_for(2, 2, 8, 3, 3072) + 2, 3072, 2, 2, 8)  # 34 pages: 3 EXL2 pages
    assert region.num_exl2_pages == 3
    cm = region.charge_map()
    assert cm[0][0] == 10 and cm[0][-1] == 10 + 32768 // 3072  # page 10 covers bytes [32768, 33792)
    assert cm[1][0] == cm[0][-1], "a boundary arena page is charged to both EXL2 pages"
    covered = sorted({p for ps in cm for p in ps})
    assert covered == list(range(10, 10 + 32))  # the last 2 arena pages are the unused tail
    for p in range(8, 46):
        on = region.exl2_pages_on(p)
        assert on == [j for j in range(3) if p in cm[j]]
    # bytes: each EXL2 page's arena pages hold at least its share
    for j, ps in enumerate(cm):
        assert len(ps) * 3072 >= region.bytes_per_exl2_page
    # with a PagePool over the EXL2 pages as the page-id allocator, arena pages get the heads as owners
    sub = PagePool(region.num_exl2_pages)
    a = sub.allocate(1, "alice", "m")
    b = sub.allocate(1, "bob", "m")
    owners = region.arena_holders(sub.holders)
    assert set(owners) == set(cm[a[0]]) | set(cm[b[0]])
    assert (a, b) == ([0], [1])
    assert owners[cm[0][-1]] == ["alice", "bob"]  # the boundary page
    assert all(owners[p] == ["alice"] for p in cm[0][:-1]) and all(owners[p] == ["bob"] for p in cm[1][1:])
    with pytest.raises(IndexError):
        region.arena_pages_of(3)


# ---- reserving a contiguous run ----------------------------------------------------------------------------
def test_reserve_region_on_a_fresh_pool():
    pool = PagePool(16)
    pages = pool.reserve_run(5, region_owner("m"), "m")
    assert pages == [0, 1, 2, 3, 4]
    assert all(pool.state(p) == PageState.KV and pool.holders(p) == {region_owner("m"): 1} for p in pages)
    assert all(pool.model_of(p) == "m" for p in pages)
    assert pool.num_free == 11
    pool.check()
    assert pool.allocate(1, "h", "x") == [5]  # the free queue's order is kept
    pool.release(pages, region_owner("m"))
    assert pool.num_free == 15
    pool.check()


def test_reserve_region_finds_a_run_between_used_pages_and_keeps_the_queue_order():
    pool = PagePool(20)
    held = pool.allocate(20, "h", "x")
    pool.release([held[i] for i in (0, 2, 4, 9, 10, 11, 12, 15, 16, 17, 18, 19)], "h")  # runs: 9..12, 15..19
    before = PagePool(20)  # replay the same history to see which page a plain allocate would take next
    hb = before.allocate(20, "h", "x")
    before.release([hb[i] for i in (0, 2, 4, 9, 10, 11, 12, 15, 16, 17, 18, 19)], "h")
    pages = pool.reserve_run(4, region_owner("m"), "m")
    assert pages == [9, 10, 11, 12]
    pool.check()
    expect = [p for p in before.allocate(before.num_free, "z", "y") if p not in pages]
    assert pool.allocate(pool.num_free, "z", "y") == expect
    with pytest.raises(OutOfPagesError, match="no run of 5"):
        PagePool(4).reserve_run(5, region_owner("m"), "m")


def test_find_run_prefers_runs_without_cached_pages():
    pool = PagePool(12)
    pages = pool.allocate(12, "h", "x")
    pool.register(pages[1], b"h1")  # page 1 will be cached (a reusable prefix)
    pool.release(pages, "h")
    assert pool.state(1) == PageState.CACHED
    assert pool.find_run(3) == [2, 3, 4]
    assert pool.find_run(12) == list(range(12))
    pool2 = PagePool(6)
    pool2.allocate(1, "h", "x")  # page 0 used
    assert pool2.find_run(6) is None and pool2.find_run(5) == [1, 2, 3, 4, 5]


# ---- ForwardBatch -> PagedParams ---------------------------------------------------------------------------
def _batch(seqs: list[tuple[list[int], int, int, list[int]]], logits_rows: list[int]) -> ForwardBatch:
    """seqs: (token ids of the chunk, tokens before it, _, block table); logits_rows index the flattened tokens."""
    ids, pos, slots, ql, cl, tables = [], [], [], [], [], []
    for toks, past, _, table in seqs:
        ids += toks
        pos += list(range(past, past + len(toks)))
        slots += [table[p // P] * P + p % P if p // P < len(table) else -1 for p in range(past, past + len(toks))]
        ql.append(len(toks))
        cl.append(past + len(toks))
        tables.append(table)
    L = torch.tensor
    return ForwardBatch(L(ids), L(pos), L(slots), ql, cl, tables, L(logits_rows, dtype=torch.long))


def test_translation_of_a_mixed_batch():
    # seq0 decode at position 700 (3 pages); seq1 prefill 300 tokens from 0; seq2 decode at 5; seq3 prefill
    # 20 tokens after 250 (crosses a page boundary); seq4 decode at 255 (its second page starts)
    seqs = [
        ([11], 700, 0, [4, 9, 2]),
        (list(range(100, 400)), 0, 0, [7, 3]),
        ([12], 5, 0, [5]),
        (list(range(500, 520)), 250, 0, [1, 6]),
        ([13], 255, 0, [8, 0]),
    ]
    # logits: seq4's token, seq1's last, seq0's token, seq2's token; seq3 wants none (chunk mid-prompt)
    starts = [0, 1, 301, 302, 322]
    batch = _batch(seqs, [starts[4], starts[1] + 299, starts[0], starts[2]])
    calls = paged_params_fields(batch)
    assert len(calls) == 3
    dec, pre1, pre3 = calls
    assert dec["seqs"] == [0, 2, 4] and dec["batch_size"] == 3 and dec["q_len"] == 1
    assert dec["input_ids"].tolist() == [[11], [12], [13]] and dec["input_ids"].dtype == torch.int64
    assert dec["cache_seqlens"].tolist() == [700, 5, 255] and dec["cache_seqlens"].dtype == torch.int32
    assert dec["max_cache_seqlen"] == 700 and dec["page_size"] == 256
    assert dec["block_index"].dtype == torch.int32
    assert dec["block_index"].tolist() == [[4, 9, 2], [5, 0, 0], [8, 0, 0]]  # padded with page 0
    assert dec["token_rows"].tolist() == [0, 301, 322]
    assert not dec["preprocess_only"] and not dec["last_id_only"]
    pairs = sorted(zip(dec["logits_rows"].tolist(), dec["logits_src"].tolist()))
    assert pairs == [(0, 2), (2, 0), (3, 1)]  # logits position <- row of the call's [b * 1, vocab] output
    assert pre1["seqs"] == [1] and pre1["input_ids"].shape == (1, 300) and pre1["cache_seqlens"].tolist() == [0]
    assert pre1["block_index"].tolist() == [[7, 3]] and pre1["last_id_only"] and not pre1["preprocess_only"]
    assert pre1["logits_rows"].tolist() == [1] and pre1["logits_src"].tolist() == [0]
    assert pre3["cache_seqlens"].tolist() == [250] and pre3["block_index"].tolist() == [[1, 6]]
    assert pre3["preprocess_only"] and pre3["logits_rows"].numel() == 0
    assert pre3["input_ids"].tolist() == [list(range(500, 520))]
    # every token computed exactly once
    rows = torch.cat([c["token_rows"] for c in calls]).sort().values
    assert rows.tolist() == list(range(batch.num_tokens))


def test_translation_logits_mapping_reassembles_the_batch():
    """Whatever rows are asked for (any order, repeats, mid-chunk rows), filling `[L, vocab]` through the calls'
    logits_rows / logits_src gives the logits of exactly those rows."""
    seqs = [
        (list(range(40, 90)), 0, 0, [2]),
        ([7], 30, 0, [0]),
        (list(range(9, 19)), 512, 0, [3, 4, 5]),
        ([8], 1, 0, [1]),
    ]
    T = 50 + 1 + 10 + 1
    want = [60, 3, 49, 51, 61, 50, 49, 55]
    batch = _batch(seqs, want)
    V = 5

    def fake_forward(c):  # logits row of token row t = [t, t, ...]: [b, q or 1, V]
        lg = c["token_rows"].view(c["batch_size"], c["q_len"]).float()[..., None].expand(-1, -1, V)
        return lg[:, -1:] if c["last_id_only"] else lg

    for cap in (None, 4, 1):
        out = torch.full((len(want), V), -1.0)
        for c in paged_params_fields(batch, max_tokens_per_call=cap):
            assert c["batch_size"] * c["q_len"] <= (cap or T)
            if c["preprocess_only"]:
                assert c["logits_rows"].numel() == 0
                continue
            out[c["logits_rows"]] = fake_forward(c).reshape(-1, V)[c["logits_src"]]
        assert out[:, 0].tolist() == [float(w) for w in want], cap


def test_translation_splits_long_prefill_chunks():
    batch = _batch([(list(range(600)), 100, 0, [5, 6, 7])], [599])
    calls = paged_params_fields(batch, max_tokens_per_call=256)
    assert [c["q_len"] for c in calls] == [256, 256, 88]
    assert [c["cache_seqlens"].tolist() for c in calls] == [[100], [356], [612]]
    assert [c["block_index"].tolist() for c in calls] == [[[5, 6]], [[5, 6, 7]], [[5, 6, 7]]]
    assert [c["preprocess_only"] for c in calls] == [True, True, False]
    assert calls[-1]["last_id_only"] and calls[-1]["logits_src"].tolist() == [0]


def test_translation_rejects_a_short_block_table():
    batch = _batch([([1], 256, 0, [3])], [0])  # 257 tokens need 2 pages
    with pytest.raises(ValueError, match="1 pages cannot hold its 257 tokens"):
        paged_params_fields(batch)


def _ref_flash_attn_with_kvcache(q, k, v, k_cache, v_cache, cache_seqlens, block_table):
    """flash_attn_with_kvcache's semantics (causal, paged): append k/v at cache_seqlens, attend over the cache."""
    b, ql, H, d = q.shape
    KV, ps = k.shape[2], k_cache.shape[1]
    out = torch.empty_like(q, dtype=torch.float32)
    for r in range(b):
        s = int(cache_seqlens[r])
        for t in range(ql):
            pos = s + t
            page = int(block_table[r, pos // ps])
            k_cache[page, pos % ps] = k[r, t]
            v_cache[page, pos % ps] = v[r, t]
        n = s + ql
        idx = [int(block_table[r, p // ps]) * ps + p % ps for p in range(n)]
        kk = k_cache.reshape(-1, KV, d)[idx].float().repeat_interleave(H // KV, 1)  # [n, H, d]
        vv = v_cache.reshape(-1, KV, d)[idx].float().repeat_interleave(H // KV, 1)
        att = torch.einsum("thd,nhd->htn", q[r].float(), kk) / math.sqrt(d)
        mask = torch.arange(n)[None, :] > (s + torch.arange(ql))[:, None]  # [ql, n]
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        out[r] = torch.einsum("htn,nhd->thd", att, vv)
    return out


def _qkv(token: int, pos: int, layer: int, H: int, KV: int, d: int):
    g = torch.Generator().manual_seed(token * 100_003 + pos * 17 + layer)
    return (torch.randn(H, d, generator=g), torch.randn(KV, d, generator=g).half(),
            torch.randn(KV, d, generator=g).half())


def test_translation_with_paged_attention_over_the_region_matches_dense_attention():
    """Steps of a mixed batch run through the calls with flash-attn's paged semantics over the region's views
    (the cache tensors exllamav2 would get) give dense causal attention of each whole sequence."""
    L_, H, KV, d = 2, 4, 2, 8
    arena = Arena(64, 4096)
    pool = PagePool(64)
    pool.allocate(3, "native-head", "other")  # something else lives in the arena too
    n_arena = region_pages_for(L_, KV, d, 6, 4096)
    region = Exl2Region.from_pages(pool.reserve_run(n_arena, region_owner("exl2"), "exl2"), 4096, L_, KV, d)
    assert region.num_exl2_pages == 6
    keys, values = region.layer_views(arena)
    kc = [k.view(-1, P, KV, d) for k in keys]  # as in ExLlamaV2Attention.forward_paged
    vc = [v.view(-1, P, KV, d) for v in values]
    sub = PagePool(region.num_exl2_pages)  # EXL2 page ids 0..N-1

    prompts = {"a": list(range(3, 305)), "b": list(range(50, 61)), "c": list(range(7, 531))}
    done = {h: 0 for h in prompts}
    tables: dict[str, list[int]] = {h: [] for h in prompts}
    outputs: dict[str, dict[int, torch.Tensor]] = {h: {} for h in prompts}
    plan = [{"a": 300, "b": 6}, {"b": 4, "c": 200}, {"a": 1, "b": 1, "c": 323}, {"a": 1, "c": 1}]
    for heads in plan:
        seqs = []
        for h, n in heads.items():
            past = done[h]
            need = -(-(past + n) // P) - len(tables[h])
            if need > 0:
                tables[h] += sub.allocate(need, h, "exl2")
            seqs.append((prompts[h][past : past + n], past, 0, list(tables[h])))
        batch = _batch(seqs, [])
        order = list(heads)
        for c in paged_params_fields(batch, max_tokens_per_call=128):
            b, ql = c["batch_size"], c["q_len"]
            for layer in range(L_):
                q = torch.empty(b, ql, H, d)
                k = torch.empty(b, ql, KV, d, dtype=torch.float16)
                v = torch.empty_like(k)
                for r, s in enumerate(c["seqs"]):
                    for t in range(ql):
                        pos = int(c["cache_seqlens"][r]) + t
                        q[r, t], k[r, t], v[r, t] = _qkv(int(c["input_ids"][r, t]), pos, layer, H, KV, d)
                o = _ref_flash_attn_with_kvcache(q, k, v, kc[layer], vc[layer], c["cache_seqlens"],
                                                 c["block_index"])
                for r, s in enumerate(c["seqs"]):
                    for t in range(ql):
                        outputs[order[s]][(int(c["cache_seqlens"][r]) + t) * L_ + layer] = o[r, t]
        for h, n in heads.items():
            done[h] += n
    assert all(pool.state(p) == PageState.KV for p in region.arena_pages)
    for h, ids in prompts.items():
        n = done[h]
        for layer in range(L_):
            qkv = [_qkv(ids[p], p, layer, H, KV, d) for p in range(n)]
            q = torch.stack([x[0] for x in qkv])  # [n, H, d]
            k = torch.stack([x[1] for x in qkv]).float().repeat_interleave(H // KV, 1)
            v = torch.stack([x[2] for x in qkv]).float().repeat_interleave(H // KV, 1)
            att = torch.einsum("thd,nhd->htn", q, k) / math.sqrt(d)
            att = att.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
            dense = torch.einsum("htn,nhd->thd", att, v)
            ours = torch.stack([outputs[h][p * L_ + layer] for p in range(n)])
            torch.testing.assert_close(ours, dense, atol=1e-4, rtol=1e-4)
    pool.check()
    sub.check()


def test_exl2_layout():
    lay = Exl2Layout(2, 2, 8, num_pages=6)
    assert lay.tokens_per_page == 256 and lay.pages_for(257) == 2 and lay.bytes_per_page == 32768
    assert lay.dtype == torch.float16


# ---- the lazy import ---------------------------------------------------------------------------------------
@pytest.fixture
def fake_env(monkeypatch):
    """A CUDA torch with a device, exllamav2 and flash-attn 2.6.3 'installed' (find_spec / metadata faked)."""
    state = {"cuda": "12.4", "available": True, "specs": {"exllamav2", "flash_attn"}, "fa": "2.6.3"}
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *a, **kw):
        if name in ("exllamav2", "flash_attn"):
            return types.SimpleNamespace(name=name) if name in state["specs"] else None
        return real_find_spec(name, *a, **kw)

    def version(dist):
        if dist in ("flash-attn", "flash_attn") and state["fa"] is not None:
            return state["fa"]
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: state["available"])

    def apply():
        monkeypatch.setattr(torch.version, "cuda", state["cuda"], raising=False)
        monkeypatch.setattr(torch.version, "hip", None, raising=False)

    state["apply"] = apply
    apply()
    return state


def _message(fn) -> str:
    with pytest.raises(ConfigError) as e:
        fn()
    return str(e.value)


def test_require_exllamav2_names_a_cpu_only_torch(fake_env):
    fake_env["cuda"] = None
    fake_env["apply"]()
    msg = _message(require_exllamav2)
    assert "CUDA build of PyTorch" in msg and "CPU-only" in msg
    assert "exllamav2 package" not in msg and "flash-attn" not in msg


def test_require_exllamav2_names_a_missing_device(fake_env):
    fake_env["available"] = False
    msg = _message(require_exllamav2)
    assert "a CUDA device" in msg and "is_available() is False" in msg and "CPU-only" not in msg


def test_require_exllamav2_names_the_missing_package(fake_env):
    fake_env["specs"].discard("exllamav2")
    msg = _message(require_exllamav2)
    assert "the exllamav2 package" in msg and "pip install 'multihead-nb[exl2]'" in msg
    assert "CUDA" not in msg and "flash-attn" not in msg


def test_require_exllamav2_names_flash_attn(fake_env):
    fake_env["specs"].discard("flash_attn")
    fake_env["fa"] = None
    assert "flash-attn >= 2.5.7 (not installed" in _message(require_exllamav2)
    fake_env["specs"].add("flash_attn")
    fake_env["fa"] = "2.5.6"
    assert "flash-attn >= 2.5.7 (found 2.5.6" in _message(require_exllamav2)
    fake_env["fa"] = "2.5.7.post1"
    with _fake_exllamav2(paged=True):
        assert require_exllamav2().version == "0.3.2-fake"


def test_require_exllamav2_names_everything_missing_at_once(fake_env):
    fake_env["cuda"] = None
    fake_env["apply"]()
    fake_env["specs"].clear()
    msg = _message(require_exllamav2)
    assert "CPU-only" in msg and "exllamav2 package" in msg and "flash-attn" in msg


class _fake_exllamav2:
    """sys.modules fakes of `exllamav2` and `exllamav2.attn` (or a failing import)."""

    def __init__(self, paged: bool = True, fail: bool = False):
        self.paged, self.fail = paged, fail

    def __enter__(self):
        self.saved = {k: sys.modules.get(k) for k in ("exllamav2", "exllamav2.attn")}
        pkg = types.ModuleType("exllamav2")
        attn = types.ModuleType("exllamav2.attn")
        if self.fail:
            pkg = None  # a None entry in sys.modules makes `import` raise ImportError
        else:
            for n in ("ExLlamaV2", "ExLlamaV2Config", "ExLlamaV2Cache", "ExLlamaV2Tokenizer"):
                setattr(pkg, n, type(n, (), {}))
            pkg.__version__ = "0.3.2-fake"
            attn.ExLlamaV2Attention = type("ExLlamaV2Attention", (), {"PagedParams": type("PagedParams", (), {})})
            attn.has_flash_attn_with_paged = self.paged
        sys.modules["exllamav2"] = pkg
        sys.modules["exllamav2.attn"] = attn if pkg is not None else None
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def test_require_exllamav2_imports_and_checks_paged_attention(fake_env):
    with _fake_exllamav2(paged=True):
        ns = require_exllamav2()
        assert ns.PagedParams is ns.ExLlamaV2Attention.PagedParams and ns.ExLlamaV2Cache.__name__ == "ExLlamaV2Cache"
    with _fake_exllamav2(paged=False):
        assert "no usable paged attention" in _message(require_exllamav2)
    with _fake_exllamav2(fail=True):
        msg = _message(require_exllamav2)
        assert "failed to import" in msg and "nvcc" in msg


def test_importing_the_module_does_not_import_exllamav2():
    import subprocess

    code = ("import sys, multihead_nb.backends.exl2.runner, multihead_nb.backends.exl2.checkpoint, multihead_nb.backends.exl2.region; "
            "print('exllamav2' in sys.modules, 'flash_attn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_runner_on_the_cpu_says_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="EXL2 models cannot run here"):
        er.Exl2Runner(tmp_path, Arena(4, 4096), [0, 1], device="cpu")


# ---- checkpoints -------------------------------------------------------------------------------------------
def _exl2_folder(tmp_path, *, config_mark=True, tensors=True, extra=None):
    from safetensors.torch import save_file

    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "num_attention_heads": 4,
           "num_key_value_heads": 2, "num_hidden_layers": 3, "intermediate_size": 512, "vocab_size": 384,
           "max_position_embeddings": 1024, "bos_token_id": 0, "eos_token_id": [2, 0]}
    if config_mark:
        cfg["quantization_config"] = {"quant_method": "exl2", "version": "0.3.2", "bits": 4.0, "head_bits": 6}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    names = {"model.embed_tokens.weight": torch.zeros(4, 4, dtype=torch.float16)}
    if tensors:
        names.update({
            "model.layers.0.self_attn.q_proj.q_weight": torch.zeros(4, 4, dtype=torch.int32),
            "model.layers.0.self_attn.q_proj.q_scale": torch.zeros(4, dtype=torch.int32),
            "model.layers.0.self_attn.q_proj.q_invperm": torch.zeros(4, dtype=torch.int16),
        })
    names.update(extra or {})
    save_file(names, str(tmp_path / "output.safetensors"))
    return tmp_path


def test_is_exl2_checkpoint(tmp_path, tiny_ckpt):
    assert is_exl2_checkpoint(_exl2_folder(tmp_path / "full"))
    assert is_exl2_checkpoint(_exl2_folder(tmp_path / "cfg", tensors=False))
    assert is_exl2_checkpoint(_exl2_folder(tmp_path / "tensors", config_mark=False))
    plain = _exl2_folder(tmp_path / "plain", config_mark=False, tensors=False)
    assert not is_exl2_checkpoint(plain)
    (plain / "measurement.json").write_text("{}")
    assert is_exl2_checkpoint(plain)
    gptq = _exl2_folder(tmp_path / "gptq", config_mark=False, tensors=False,
                        extra={"model.layers.0.self_attn.q_proj.qweight": torch.zeros(4, 4, dtype=torch.int32)})
    assert not is_exl2_checkpoint(gptq)
    job = _exl2_folder(tmp_path / "job", config_mark=False, tensors=False)
    (job / "job_new.json").write_text("{}")
    assert is_exl2_checkpoint(job)
    assert not is_exl2_checkpoint(tiny_ckpt("llama"))
    assert not is_exl2_checkpoint(tmp_path / "nope")
    assert not is_exl2_checkpoint("org/some-hub-id")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    (bad / "x.safetensors").write_bytes(b"\x01")
    assert not is_exl2_checkpoint(bad)


def test_read_exl2_spec(tmp_path):
    spec = read_exl2_spec(_exl2_folder(tmp_path / "m"))
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.vocab_size) == (3, 2, 64, 384)
    assert spec.bits == 4.0 and spec.eos_token_ids == (2, 0) and spec.bos_token_id == 0
    assert spec.weight_bytes == (tmp_path / "m" / "output.safetensors").stat().st_size
    assert spec.bytes_per_page == bytes_per_exl2_page(3, 2, 64)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    del cfg["vocab_size"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="vocab_size"):
        read_exl2_spec(tmp_path / "m")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_exl2_spec(tmp_path / "missing")


# ---- CUDA: the real thing ----------------------------------------------------------------------------------
def _exl2_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        require_exllamav2()
    except ConfigError:
        return False
    return True


needs_exl2 = pytest.mark.skipif(not _exl2_available(), reason="needs CUDA, exllamav2 and flash-attn >= 2.5.7")

EXL2_TINY = dict(dtype="float16", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, num_hidden_layers=2, max_position_embeddings=2048)


class _Seq:
    def __init__(self, ids: list[int], table_alloc, tpp: int):
        self.ids, self.done, self.table, self.alloc, self.tpp, self.out = list(ids), 0, [], table_alloc, tpp, []

    def chunk(self):
        n = len(self.ids) - self.done
        need = -(-(self.done + n) // self.tpp) - len(self.table)
        if need > 0:
            self.table += self.alloc(need)
        return self.ids[self.done :], self.done, self.table


def _step(runner, seqs: list[_Seq], device) -> None:
    """One forward of `seqs` (each computes all its uncomputed tokens) and a greedy token for each."""
    tpp = runner.layout.tokens_per_page
    ids, pos, slots, ql, cl, tables, li = [], [], [], [], [], [], []
    for s in seqs:
        toks, past, table = s.chunk()
        ids += toks
        pos += range(past, past + len(toks))
        slots += [table[p // tpp] * tpp + p % tpp for p in range(past, past + len(toks))]
        ql.append(len(toks))
        cl.append(past + len(toks))
        tables.append(table[: -(-(past + len(toks)) // tpp)])
        li.append(len(ids) - 1)
    t = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    logits = runner.forward(ForwardBatch(t(ids), t(pos), t(slots), ql, cl, tables, t(li)))
    for s, row in zip(seqs, logits.argmax(-1).tolist()):
        s.done = len(s.ids)
        s.ids.append(row)
        s.out.append(row)


def _exl2_runner(path, arena, pool, n_pages, model="exl2"):
    spec = read_exl2_spec(path)
    n_arena = region_pages_for(spec.num_layers, spec.num_kv_heads, spec.head_dim, n_pages, arena.page_bytes)
    pages = pool.reserve_run(n_arena, region_owner(model), model)
    return er.Exl2Runner(spec, arena, pages, device="cuda")


@pytest.mark.cuda
@needs_exl2
@pytest.mark.parametrize("prompt_len", [5, 300])
def test_exl2_greedy_equals_exllamav2_generator(tiny_ckpt, prompt_len):
    exl = require_exllamav2()
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    path = tiny_ckpt("llama", **EXL2_TINY)
    arena = Arena(256, 65536, "cuda")
    pool = PagePool(256)
    runner = _exl2_runner(path, arena, pool, 8)
    sub = PagePool(runner.layout.num_pages)
    prompt = [(7 * i + 3) % 380 + 3 for i in range(prompt_len)]
    seq = _Seq(prompt, lambda n: sub.allocate(n, "h", "exl2"), 256)
    for _ in range(12):
        _step(runner, [seq], runner.device)

    cache = exl.ExLlamaV2Cache(runner.model, max_seq_len=2048)  # its own, dense cache
    gen = ExLlamaV2DynamicGenerator(model=runner.model, cache=cache, tokenizer=runner.tokenizer)
    job = ExLlamaV2DynamicJob(input_ids=torch.tensor([prompt]), max_new_tokens=12, stop_conditions=[],
                              gen_settings=ExLlamaV2Sampler.Settings.greedy())
    gen.enqueue(job)
    theirs = []
    while gen.num_remaining_jobs():
        for r in gen.iterate():
            if r.get("stage") == "streaming" and "token_ids" in r:
                theirs += r["token_ids"][0].tolist()
    assert seq.out == theirs


@pytest.mark.cuda
@needs_exl2
def test_exl2_head_and_native_head_generate_together(tiny_ckpt):
    from multihead_nb.backends.native import ModelRunner, read_spec

    exl2_path = tiny_ckpt("llama", **EXL2_TINY)
    native_path = tiny_ckpt("qwen2")
    prompts = {"e1": list(range(3, 40)), "e2": list(range(100, 370)), "n1": list(range(5, 30))}

    def run(which: set[str]) -> dict[str, list[int]]:
        arena = Arena(512, 16384, "cuda")
        pool = PagePool(512)
        native = ModelRunner(read_spec(native_path), arena, dtype=torch.float32, device="cuda")
        pool.reserve_weights("native", 4)
        exl2 = _exl2_runner(exl2_path, arena, pool, 6)
        sub = PagePool(exl2.layout.num_pages)
        ntpp = native.layout.tokens_per_page
        def alloc(h):
            return lambda n: (sub if h[0] == "e" else pool).allocate(n, h, h[0])

        seqs = {h: _Seq(p, alloc(h), 256 if h[0] == "e" else ntpp) for h, p in prompts.items() if h in which}
        for _ in range(10):
            e = [s for h, s in seqs.items() if h[0] == "e"]
            n = [s for h, s in seqs.items() if h[0] == "n"]
            if e:
                _step(exl2, e, exl2.device)
            if n:
                _step(native, n, native.device)
        # the region's arena pages are held by the region; the native head's pages lie outside it
        region = set(exl2.region.arena_pages)
        for p in range(pool.num_pages):
            if "n1" in pool.holders(p):
                assert p not in region
        pool.check()
        sub.check()
        return {h: s.out for h, s in seqs.items()}

    together = run(set(prompts))
    for h in prompts:
        assert run({h})[h] == together[h], h


# ---- CUDA: EXL2 heads driven by the workspace's scheduler ---------------------------------------------------
def _cuda_ws(**kw):
    import multihead_nb as mh

    return mh.Workspace(device="cuda", dtype="float16", pool="256MiB", page_bytes="64KiB", background=False, **kw)


def _generator_tokens(runner, prompt: list[int], n: int) -> list[int]:
    """Greedy tokens of exllamav2's own dynamic generator, with its own dense cache."""
    exl = require_exllamav2()
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    cache = exl.ExLlamaV2Cache(runner.model, max_seq_len=2048)
    gen = ExLlamaV2DynamicGenerator(model=runner.model, cache=cache, tokenizer=runner.tokenizer)
    gen.enqueue(ExLlamaV2DynamicJob(input_ids=torch.tensor([prompt]), max_new_tokens=n, stop_conditions=[],
                                    gen_settings=ExLlamaV2Sampler.Settings.greedy()))
    out: list[int] = []
    while gen.num_remaining_jobs():
        for r in gen.iterate():
            if r.get("stage") == "streaming" and "token_ids" in r:
                out += r["token_ids"][0].tolist()
    return out


@pytest.mark.cuda
@needs_exl2
def test_exl2_head_in_a_workspace_equals_exllamav2_generator(tiny_ckpt):
    path = str(tiny_ckpt("llama", **EXL2_TINY))
    ws = _cuda_ws()
    ws.add_head("e", path, backend="exl2", region="32MiB")
    loaded = ws.models[ws.heads["e"].model]
    assert loaded.backend == "exl2" and isinstance(loaded.runner, er.Exl2Runner)
    assert ws.scheduler.layouts[loaded.key].tokens_per_page == 256 and loaded.region.num_pages == 128
    for n in (5, 300, 700):
        prompt = [(7 * i + 3) % 380 + 3 for i in range(n)]
        ours = ws.generate("e", prompt, max_tokens=12, ignore_eos=True).token_ids
        assert ours == _generator_tokens(loaded.runner, prompt, 12), n
    ws.pool.check()
    loaded.region.pool.check()
    ws.close()


@pytest.mark.cuda
@needs_exl2
def test_exl2_head_and_native_head_in_one_workspace(tiny_ckpt):
    exl2_path, native_path = str(tiny_ckpt("llama", **EXL2_TINY)), str(tiny_ckpt("qwen2"))
    prompts = {"e1": list(range(3, 40)), "e2": list(range(100, 370)), "n1": list(range(5, 30))}

    def add(ws):
        ws.add_head("e1", exl2_path, backend="exl2", region="32MiB")
        ws.add_head("e2", exl2_path)
        ws.add_head("n1", native_path)

    ws = _cuda_ws()
    add(ws)
    alone = {h: ws.generate(h, p, max_tokens=16, ignore_eos=True).token_ids for h, p in prompts.items()}
    ws.close()

    ws = _cuda_ws(max_batched_tokens=128)
    add(ws)
    key = ws.heads["e1"].model
    region = ws.models[key].region
    seen = []

    def look(event, req, _):
        if event == "token":
            df = ws.pages()
            kv = df[df.state == "kv"]
            seen.append(({h for hs in kv[kv.page.isin(region.arena_pages)].holders for h in hs.split(",")},
                         {h for hs in kv[~kv.page.isin(region.arena_pages)].holders for h in hs.split(",")}))

    ws.engine.listeners.append(look)
    handles = {h: ws.submit(h, p, max_tokens=16, ignore_eos=True) for h, p in prompts.items()}
    assert {h: handles[h].result().token_ids for h in prompts} == alone
    assert (ws.steps().groupby("step").model.nunique() == 2).any()
    assert any(inside == {"e1", "e2"} and outside == {"n1"} for inside, outside in seen)
    assert all(inside <= {"e1", "e2"} and outside <= {"n1"} for inside, outside in seen)
    ws.pool.check()
    region.pool.check()
    free, weight_pages = ws.pool.num_free, ws.models[key].weight_pages
    ws.remove_head("e1")
    ws.remove_head("e2")  # the region goes back with the model's last head
    assert key not in ws.models and ws.pool.num_free == free + len(region.arena_pages) + weight_pages
    ws.close()
