"""Region models driven by the scheduler, on the CPU: the path an EXL2 head takes, minus exllamav2.

A region backend (`Workspace.backends`) gets a contiguous region of the pool, cut into ExLlamaV2-sized pages (the
bytes of 256 fp16 tokens); the scheduler allocates its requests' pages from the region's own `PagePool`. Here the
backend is `NativeInRegion`: the native runner of a tiny float32 checkpoint reading its K/V from the region's own
pages (128 float32 tokens each), so every forward is a real computation through the real loading, scheduling,
accounting and unloading code. The exllamav2 runner itself is tested on CUDA in test_exl2.py.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from helpers import make_ws
from multihead_nb.errors import ConfigError, OutOfPagesError, RequestError
from multihead_nb.backends.native import ModelRunner, read_spec
from multihead_nb.backends.exl2.backend import Exl2Backend
from multihead_nb.backends.exl2.region import Exl2Region
from multihead_nb.memory.region_pool import region_owner
from multihead_nb.backends.exl2.runner import Exl2Layout

OWN_PAGE = 2 * 2 * 256 * 2 * 16 * 2  # bytes of one region page of the tiny llama (2 layers, 2 KV heads, dim 16)
TPP = OWN_PAGE // (2 * 2 * 2 * 16 * 4)  # 128 float32 tokens per region page


class _RegionBytes:
    """A region's bytes as an arena of the model's own pages: what the native runner views (no copy)."""

    def __init__(self, arena, region: Exl2Region):
        self.num_pages, self.page_bytes, self.device = region.num_exl2_pages, region.bytes_per_exl2_page, arena.device
        start = region.first_page * arena.page_bytes
        self.data = arena.data[start : start + self.num_pages * self.page_bytes]

    def pages(self) -> torch.Tensor:
        return self.data.view(self.num_pages, self.page_bytes)


class _RegionRunner:
    """The native runner over a region: block tables hold the region's own page ids 0..N-1."""

    def __init__(self, inner: ModelRunner, region: Exl2Region):
        self.inner, self.region, self.device = inner, region, inner.device
        self.layout = Exl2Layout(region.num_layers, region.num_kv_heads, region.head_dim, region.num_exl2_pages,
                                 tokens_per_page=inner.layout.tokens_per_page, dtype=inner.dtype)
        self.pages_seen: set[int] = set()

    def forward(self, batch):
        for table in batch.block_tables:
            assert all(0 <= p < self.layout.num_pages for p in table), table
            self.pages_seen.update(table)
        return self.inner.forward(batch)


class NativeInRegion(Exl2Backend):
    """A region backend for tests: the EXL2 backend's planning and regions, with the native runner over the region
    (no exllamav2, no CUDA)."""

    name = "region-native"

    def __init__(self):
        self.runners: list[_RegionRunner] = []

    def detects(self, model: str) -> bool:
        return False

    def check(self, device) -> None:
        pass

    def runner(self, spec, arena, region_pages, device):
        region = Exl2Region.from_pages(region_pages, arena.page_bytes, spec.num_layers, spec.num_kv_heads,
                                       spec.head_dim)
        inner = ModelRunner(read_spec(spec.path), _RegionBytes(arena, region), dtype=torch.float32, device=device)
        self.runners.append(_RegionRunner(inner, region))
        return self.runners[-1]


@pytest.fixture(scope="module")
def models(tiny_ckpt):
    return {"r": str(tiny_ckpt("llama")), "n": str(tiny_ckpt("qwen2"))}


def region_ws(**kw):
    ws = make_ws(**kw)
    ws.backends["region-native"] = NativeInRegion()
    return ws


def ids(seed: int, n: int) -> list[int]:
    return [(seed * 31 + 7 * i) % 370 + 5 for i in range(n)]


def owners_in(ws, model_key) -> tuple[set[int], dict[str, set[int]]]:
    """(the region's arena pages, head -> arena pages it owns per `pages()`)."""
    region = ws.models[model_key].region
    df = ws.pages()
    owned: dict[str, set[int]] = {}
    for row in df[df.state == "kv"].itertuples():
        for h in row.holders.split(","):
            owned.setdefault(h, set()).add(row.page)
    return set(region.arena_pages), owned


# ---- a region model and a native model in one pool -----------------------------------------------------------
def test_region_and_native_heads_generate_together_as_alone(models):
    prompts = {"r1": ids(1, 150), "r2": ids(2, 20), "n1": ids(3, 40), "r3": ids(4, 300)}
    heads = {"r1": "r", "r2": "r", "r3": "r", "n1": "n"}

    def add(ws):
        for h, m in heads.items():
            ws.add_head(h, models[m], **({"backend": "region-native"} if m == "r" else {}))

    ws = region_ws()
    add(ws)
    alone = {h: ws.generate(h, p, max_tokens=20, ignore_eos=True).token_ids for h, p in prompts.items()}
    ws.close()
    # the region runner computes what the native runner of the same checkpoint does on the main pool
    plain = make_ws()
    plain.add_head("x", models["r"])
    for h in ("r1", "r3"):
        assert plain.generate("x", prompts[h], max_tokens=20, ignore_eos=True).token_ids == alone[h], h
    plain.close()

    ws = region_ws(max_batched_tokens=96)
    add(ws)
    key = ws.heads["r1"].model
    region = ws.models[key].region
    assert ws.scheduler.layouts[key].tokens_per_page == TPP and region.num_pages == 256 * 8192 // OWN_PAGE
    snaps = []

    def snapshot(event, req, _):
        if event == "token" and len(snaps) < 200:
            in_region, owned = owners_in(ws, key)
            snaps.append((in_region, owned, {h: list(r.block_table) for h, r in
                                            ((r.head, r) for r in ws.scheduler.requests()) if r.block_table}))

    ws.engine.listeners.append(snapshot)
    handles = {h: ws.submit(h, p, max_tokens=20, ignore_eos=True) for h, p in prompts.items()}
    together = {h: handles[h].result().token_ids for h in prompts}
    assert together == alone
    steps = ws.steps()
    assert (steps.groupby("step").model.nunique() == 2).any(), "the two models never ran in one step"
    both = [s for s in snaps if {"r1", "r3", "n1"} <= set(s[1])]
    assert both, "a region head and the native head never held pages at the same time"
    for in_region, owned, tables in both:
        for h, pages in owned.items():
            assert (pages <= in_region) if heads[h] == "r" else not (pages & in_region), h
        for h, table in tables.items():  # a region head owns exactly the arena pages its own pages are charged to
            if heads[h] == "r":
                assert owned[h] == {p for j in table for p in region.charge[j]}, h
    assert max(len(t) for s in snaps for h, t in s[2].items() if h == "r3") == -(-320 // TPP)
    runner = ws.backends["region-native"].runners[-1]
    assert runner.pages_seen and max(runner.pages_seen) < region.num_pages
    stats = ws.stats()
    assert not any(o.startswith("region:") for o in stats["pool"]["by_owner"])
    assert stats["models"][key]["backend"] == "region-native" and stats["models"][key]["region_pages"] == 256
    ws.pool.check()
    region.pool.check()
    assert region.pool.usage()["kv"] == 0 and ws.pool.usage()["by_owner"] == {region_owner(key): 256}
    ws.close()


def test_pages_and_stats_while_running(models):
    ws = region_ws(max_batched_tokens=64)
    ws.add_head("r1", models["r"], backend="region-native", region="1MiB")
    ws.add_head("n1", models["n"])
    key = ws.heads["r1"].model
    region = ws.models[key].region
    assert len(region.arena_pages) == 128 and region.num_pages == 16
    h = ws.submit("r1", ids(5, 200), max_tokens=200, ignore_eos=True)
    n = ws.submit("n1", ids(6, 50), max_tokens=200, ignore_eos=True)
    for _ in range(6):
        ws.engine.step()
    df = ws.pages()
    mine = df[df.page.isin(region.arena_pages)]
    table = h.request.block_table
    charged = {p for j in table for p in region.charge[j]}
    assert set(mine[mine.state == "kv"].page) == charged and set(mine[mine.state == "kv"].owner) == {"r1"}
    assert set(mine.state) == {"kv", "free"} and set(mine.model) == {key}
    assert mine.tokens.sum() == pytest.approx(h.request.num_computed, abs=len(charged))
    outside = df[~df.page.isin(region.arena_pages)]
    assert set(outside[outside.state == "kv"].owner) == {"n1"}
    usage = ws.stats()["pool"]
    assert usage["by_owner"] == {"r1": len(charged), "n1": ws.pool.held_by("n1")}
    assert sum(usage[s] for s in ("free", "cached", "kv", "weights")) == ws.pool.num_pages
    assert usage["kv"] == len(charged) + ws.pool.held_by("n1")
    h.cancel()
    n.cancel()
    ws.engine.process_inbox()
    assert region.pool.usage()["kv"] == 0 and ws.pool.held_by("n1") == 0
    assert set(ws.pages().query("state == 'kv'").owner) == set()
    ws.close()


# ---- preemption, cancel, quotas -----------------------------------------------------------------------------
def test_region_pressure_preempts_region_heads_only_and_leaks_nothing(models):
    prompts = {f"r{i}": ids(10 + i, 100) for i in range(4)}
    alone_ws = region_ws()
    for h in prompts:
        alone_ws.add_head(h, models["r"], backend="region-native")
    alone = {h: alone_ws.generate(h, p, max_tokens=60, ignore_eos=True).token_ids for h, p in prompts.items()}
    alone_ws.close()

    ws = region_ws(max_batched_tokens=256)
    for h in prompts:  # 4 own pages of 128 tokens; four requests of 160 tokens need 8
        ws.add_head(h, models["r"], backend="region-native", region=4 * OWN_PAGE)
    ws.add_head("n1", models["n"], weight=0.25)  # served most per token: the first victim, were it eligible
    key = ws.heads["r0"].model
    region = ws.models[key].region
    assert region.num_pages == 4
    native = ws.submit("n1", ids(9, 30), max_tokens=120, ignore_eos=True)
    handles = {h: ws.submit(h, p, max_tokens=60, ignore_eos=True) for h, p in prompts.items()}
    got = {h: handles[h].result().token_ids for h in prompts}
    assert got == alone
    assert sum(handles[h].request.num_preemptions for h in prompts) > 0
    assert native.result().finish_reason == "length" and native.request.num_preemptions == 0
    region.pool.check()
    ws.pool.check()
    assert region.pool.usage()["kv"] == 0 and ws.pool.held_by("n1") == 0
    # cancel mid-generation frees the region's pages, and the head goes on
    h = ws.submit("r0", ids(20, 200), max_tokens=200, ignore_eos=True)
    for _ in range(5):
        ws.engine.step()
    assert region.pool.held_by("r0") == 2
    h.cancel()
    ws.engine.process_inbox()
    assert h.request.finish_reason == "cancelled" and region.pool.usage()["kv"] == 0
    assert ws.generate("r0", ids(1, 10), max_tokens=3).token_ids
    ws.close()


def test_quota_of_a_region_head_counts_its_own_pages(models):
    ws = region_ws()
    ws.add_head("r1", models["r"], backend="region-native", region=8 * OWN_PAGE, quota=OWN_PAGE)
    ws.add_head("r2", models["r"], quota="50%")
    ws.add_head("n1", models["n"], quota="50%")
    region = ws.models[ws.heads["r1"].model].region
    assert ws.scheduler.heads["r1"].quota_pages == 1 and region.pool.quota("r1") == 1
    assert ws.scheduler.heads["r2"].quota_pages == 4 and region.pool.quota("r2") == 4
    assert ws.pool.quota("r1") is None and region.pool.quota("n1") is None
    assert ws.pool.quota("n1") == ws.pool.num_kv_pages // 2
    assert ws.scheduler.capacity("r1") == 1 and ws.scheduler.capacity("r2") == 4
    with pytest.raises(RequestError, match=f"needs 2 pages \\({TPP} tokens per page\\).*at most 1 pages"):
        ws.submit("r1", ids(1, TPP + 5))
    hs = [ws.submit("r2", ids(i, 200), max_tokens=20, ignore_eos=True) for i in range(3)]
    peak = 0
    while not all(h.request.status.done for h in hs):
        ws.engine.step()
        peak = max(peak, region.pool.held_by("r2"))
    assert 0 < peak <= 4 and all(h.result().finish_reason == "length" for h in hs)
    ws.remove_head("r1")
    assert region.pool.quota("r1") is None
    ws.close()


def test_prefix_cache_inside_the_region(models):
    ws = region_ws()
    ws.add_head("r1", models["r"], backend="region-native")
    ws.add_head("r2", models["r"])
    prompt = ids(7, 2 * TPP + 30)
    first = ws.generate("r1", prompt, max_tokens=5, ignore_eos=True)
    df = ws.pages()
    assert (df.state == "cached").sum() > 0
    second = ws.generate("r2", prompt, max_tokens=5, ignore_eos=True)
    assert second.num_cached_tokens == 2 * TPP and second.token_ids == first.token_ids
    ws.close()


# ---- loading and unloading ----------------------------------------------------------------------------------
def test_region_is_reserved_and_released_with_its_model(models):
    ws = region_ws()
    start = ws.pool.num_free
    ws.add_head("r1", models["r"], backend="region-native")
    key = ws.heads["r1"].model
    loaded = ws.models[key]
    pages = loaded.region.arena_pages
    assert len(pages) == ws.pool.num_pages // 4 and pages == list(range(pages[0], pages[0] + len(pages)))
    assert ws.pool.num_free == start - len(pages) - loaded.weight_pages
    assert all(ws.pool.holders(p) == {region_owner(key): 1} for p in pages)
    ws.add_head("r2", models["r"])  # the same model: same runner, same region
    ws.add_head("r3", models["r"], backend="region-native", region="25%")
    assert ws.models[key] is loaded and ws.pool.num_free == start - len(pages) - loaded.weight_pages
    assert ws.generate("r2", ids(3, 20), max_tokens=4).token_ids
    ws.remove_head("r1")
    ws.remove_head("r2")
    assert key in ws.models
    ws.remove_head("r3")
    assert key not in ws.models and ws.pool.num_free == start
    assert key not in ws.scheduler.layouts and ws.scheduler.kv.pool_of(key) is ws.pool
    ws.pool.check()
    ws.add_head("r1", models["r"], backend="region-native")
    ws.close()
    assert ws.pool.num_free == start
    ws.pool.check()


def test_a_region_that_does_not_fit_is_a_clear_error(models):
    ws = region_ws(pool="2MiB")
    ws.add_head("n1", models["n"])
    start = ws.pool.num_free
    with pytest.raises(OutOfPagesError, match="region of 243 pages.*smaller region= or use a larger pool"):
        ws.add_head("r1", models["r"], backend="region-native", region="95%")
    with pytest.raises(ConfigError, match="cannot hold one 256-token EXL2 page.*at least 8 pages"):
        ws.add_head("r1", models["r"], backend="region-native", region="32KiB")
    assert ws.pool.num_free == start and set(ws.heads) == {"n1"} and len(ws.models) == 1
    # a run of free pages long enough, but not contiguous: the native head holds pages in the middle
    hold = ws.submit("n1", ids(1, 60), max_tokens=400, ignore_eos=True)
    ws.engine.step()
    ws.pool.release(ws.pool.allocate(ws.pool.num_free, "filler", "x")[::2], "filler")  # free every other page
    with pytest.raises(OutOfPagesError, match="no run of .* consecutive"):
        ws.add_head("r1", models["r"], backend="region-native", region=4 * OWN_PAGE)
    ws.pool.release([p for p in range(ws.pool.num_pages) if "filler" in ws.pool.holders(p)], "filler")
    assert len(ws.models) == 1 and not ws.pool.weights().keys() - {ws.heads["n1"].model}
    # a runner that fails to build, or a bad quota after the model loaded: the region and weights go back
    broken = NativeInRegion()
    broken.runner = lambda *a: (_ for _ in ()).throw(RuntimeError("no such device"))
    ws.backends["broken"] = broken
    with pytest.raises(RuntimeError, match="no such device"):
        ws.add_head("r1", models["r"], backend="broken", region=4 * OWN_PAGE)
    with pytest.raises(ConfigError, match="quota"):
        ws.add_head("r1", models["r"], backend="region-native", region=4 * OWN_PAGE, quota="lots")
    assert len(ws.models) == 1 and not ws.pool.weights().keys() - {ws.heads["n1"].model}
    assert not any(o.startswith("region:") for o in ws.pool.usage()["by_owner"])
    hold.cancel()
    assert ws.generate("n1", ids(2, 5), max_tokens=3).token_ids
    ws.pool.check()
    ws.close()


def test_backend_and_region_options(models):
    ws = region_ws()
    with pytest.raises(ConfigError, match="unknown backend 'nope'; known: auto, remote, exl2, native, region-native"):
        ws.add_head("a", models["r"], backend="nope")
    with pytest.raises(ConfigError, match="region= is not an option of the 'native' backend.*it takes quantize"):
        ws.add_head("a", models["n"], region="10%")
    with pytest.raises(ConfigError, match="unknown head option"):
        ws.add_head("a", models["r"], regoin="10%")
    with pytest.raises(ConfigError, match="backend must be a name"):
        ws.add_head("a", models["r"], backend=3)
    with pytest.raises(ConfigError, match="region percentage"):
        ws.add_head("a", models["r"], backend="region-native", region="150%")
    ws.add_head("a", models["r"], backend="region-native", region="10%")
    with pytest.raises(ConfigError, match="loaded on the 'region-native' backend.*not 'native'"):
        ws.add_head("b", models["r"], backend="native")
    with pytest.raises(ConfigError, match="loaded with a region of 102 pages; the options .*'20%'.* ask for 204"):
        ws.add_head("b", models["r"], region="20%")
    assert set(ws.heads) == {"a"} and len(ws.models) == 1
    ws.add_head("b", models["r"], region=0.1)  # the same region: fine
    ws.add_head("c", models["n"], backend="native")
    assert ws.stats()["models"][ws.heads["c"].model]["backend"] == "native"
    ws.close()


# ---- a real EXL2 checkpoint where exllamav2 cannot run -----------------------------------------------------
def _exl2_folder(path):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 512, "vocab_size": 384,
        "max_position_embeddings": 1024, "quantization_config": {"quant_method": "exl2", "bits": 4.0}}))
    save_file({"model.layers.0.self_attn.q_proj.q_weight": torch.zeros(4, 4, dtype=torch.int32)},
              str(path / "output.safetensors"))
    return path


@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("exllamav2") is not None
                    or importlib.util.find_spec("flash_attn") is not None,
                    reason="checks the message on a machine without CUDA, exllamav2 and flash-attn")
def test_exl2_heads_where_exllamav2_cannot_run_say_what_is_missing(models, tmp_path):
    ws = make_ws()
    ws.add_head("n1", models["n"])
    start = ws.pool.num_free
    for model, opts in ((_exl2_folder(tmp_path / "q"), {}), (models["r"], {"backend": "exl2"})):
        with pytest.raises(ConfigError) as e:
            ws.add_head("q", str(model), **opts)
        msg = str(e.value)
        assert "EXL2 models cannot run here" in msg and "CUDA build of PyTorch" in msg
        assert "pip install 'multihead-nb[exl2]'" in msg and "flash-attn >= 2.5.7" in msg
    assert ws.pool.num_free == start and set(ws.heads) == {"n1"} and len(ws.models) == 1
    assert ws.generate("n1", "still fine", max_tokens=2).token_ids
    ws.pool.check()
    ws.close()
