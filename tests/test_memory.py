"""Tests of the memory layer: `Arena`, `KVLayout` (a model's view of pages), `PagePool` (page ids) and `host_bytes`."""

from __future__ import annotations

import mmap
import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from multihead_nb.errors import ConfigError, OutOfPagesError, QuotaExceededError
from multihead_nb.memory import Arena, KVLayout, PagePool, PageState, prefix_hashes
from multihead_nb.memory.host_bytes import (HUGE_PAGE, copying_file_pages_pays, host_bytes, release_file_pages,
                                            return_freed_memory)


# ---- KVLayout ----------------------------------------------------------------------------------------------------
def test_tokens_per_page_arithmetic():
    lay = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32, page_bytes=4096)
    assert lay.itemsize == 4
    assert lay.bytes_per_token == 2 * 2 * 2 * 16 * 4 == 512
    assert lay.tokens_per_page == 8 and lay.used_bytes == 4096
    assert [lay.pages_for(n) for n in (0, 1, 8, 9, 16, 17)] == [0, 1, 1, 2, 2, 3]
    odd = KVLayout(num_layers=3, num_kv_heads=1, head_dim=8, dtype=torch.bfloat16, page_bytes=4096)
    assert odd.bytes_per_token == 2 * 3 * 1 * 8 * 2 == 96
    assert odd.tokens_per_page == 4096 // 96 == 42 and odd.used_bytes == 42 * 96 < 4096
    # SmolLM2-135M in bf16: 30 layers x 3 KV heads x 64 = 23040 bytes a token
    smol = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16, page_bytes=1 << 20)
    assert smol.bytes_per_token == 23040 and smol.tokens_per_page == (1 << 20) // 23040


def test_int8_layout_arithmetic():
    """The int8 K/V cache: a byte a value and a float32 scale per 32; the scales after every token's values; no
    tensor view (the kernel alone reads it); head sizes that are multiples of 32."""
    smol = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.int8, page_bytes=256 * 1024)
    assert smol.int8 and smol.bytes_per_token == 2 * 30 * 3 * 64 * 9 // 8 == 12960
    assert smol.tokens_per_page == 256 * 1024 // 12960 == 20  # bfloat16: 11
    assert smol.scales_offset == 20 * 11520 and smol.used_bytes == 20 * 12960
    with pytest.raises(ConfigError, match="fused CPU kernel only"):
        smol.view(Arena(1, 256 * 1024))
    with pytest.raises(ConfigError, match="head_dim.*multiple of 32.*48"):
        KVLayout(num_layers=2, num_kv_heads=1, head_dim=48, dtype=torch.int8, page_bytes=4096)
    with pytest.raises(ConfigError, match="12960 bytes.*1 byte, and a float32 scale per 32"):
        KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.int8, page_bytes=8192)


def test_page_too_small_for_one_token():
    with pytest.raises(ConfigError, match="cannot hold one token") as e:
        KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype=torch.bfloat16, page_bytes=4096)
    assert "23040 bytes" in str(e.value) and "4096" in str(e.value)
    with pytest.raises(ConfigError, match="num_layers"):
        KVLayout(num_layers=0, num_kv_heads=1, head_dim=8, dtype=torch.float32, page_bytes=256)


def test_layout_rejects_arena_of_another_page_size():
    lay = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype=torch.float32, page_bytes=512)
    with pytest.raises(ConfigError, match="512"):
        lay.view(Arena(2, 1024))


def _span(lay: KVLayout, arena: Arena, page: int, kv: int, layer: int) -> tuple[int, int]:
    """Byte range [start, stop) of the arena holding `kv` (0 keys, 1 values) of `layer` in `page`."""
    block = lay.tokens_per_page * lay.num_kv_heads * lay.head_dim * lay.itemsize
    start = page * arena.page_bytes + (kv * lay.num_layers + layer) * block
    return start, start + block


def test_layer_views_are_views_and_touch_only_their_bytes():
    arena = Arena(num_pages=4, page_bytes=4096)
    lay = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float32, page_bytes=4096)
    views = lay.layer_views(arena)
    assert len(views) == 3
    lo, hi = arena.data.data_ptr(), arena.data.data_ptr() + arena.nbytes
    for k, v in views:
        assert k.shape == v.shape == (4, lay.tokens_per_page, 2, 8)
        for t in (k, v):
            assert t.dtype == torch.float32
            assert lo <= t.data_ptr() < hi
            assert t.untyped_storage().data_ptr() == arena.data.untyped_storage().data_ptr()
    for page in range(4):
        for layer in range(3):
            for kv in (0, 1):
                before = arena.data.clone()
                views[layer][kv][page] = float(1 + page * 10 + layer * 2 + kv)
                start, stop = _span(lay, arena, page, kv, layer)
                changed = (arena.data != before).nonzero().flatten()
                assert len(changed) > 0
                assert changed.min() >= start and changed.max() < stop
                got = arena.data[start:stop].view(torch.float32)
                assert torch.all(got == float(1 + page * 10 + layer * 2 + kv))
    # the full view reads back what the layer views wrote
    full = lay.view(arena)
    assert full.shape == (4, 2, 3, lay.tokens_per_page, 2, 8)
    assert full[2, 1, 1, 0, 0, 0].item() == 1 + 20 + 2 + 1


def _fill(views, pages: list[int], gen: torch.Generator) -> None:
    idx = torch.tensor(pages)
    for k, v in views:
        for t in (k, v):
            t[idx] = torch.randn((len(pages),) + tuple(t.shape[1:]), generator=gen).to(t.dtype)


def test_two_models_share_one_arena_without_touching_each_other():
    page_bytes = 8192
    arena = Arena(num_pages=10, page_bytes=page_bytes)
    a = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32, page_bytes=page_bytes)
    b = KVLayout(num_layers=3, num_kv_heads=1, head_dim=8, dtype=torch.bfloat16, page_bytes=page_bytes)
    assert a.tokens_per_page != b.tokens_per_page
    pool = PagePool(arena.num_pages)
    pages_a, pages_b = [], []
    for i in range(4):  # interleaved allocation from one pool
        pages_a += pool.allocate(1, owner="ha", model="A")
        pages_b += pool.allocate(1, owner="hb", model="B")
    assert pages_a == [0, 2, 4, 6] and pages_b == [1, 3, 5, 7]
    va, vb = a.layer_views(arena), b.layer_views(arena)
    gen = torch.Generator().manual_seed(0)
    pages = arena.pages()

    _fill(vb, pages_b, gen)
    b_bytes = pages[pages_b].clone()
    untouched = pages[[8, 9]].clone()
    _fill(va, pages_a, gen)
    assert torch.equal(pages[pages_b], b_bytes), "writing model A's pages changed model B's pages"
    a_bytes = pages[pages_a].clone()
    _fill(vb, pages_b, gen)
    assert torch.equal(pages[pages_a], a_bytes), "writing model B's pages changed model A's pages"
    assert not torch.equal(pages[pages_b], b_bytes)
    assert torch.equal(pages[[8, 9]], untouched)
    # each model reads back its own values through its own dtype
    ka = va[1][0][torch.tensor(pages_a)]
    assert ka.dtype == torch.float32 and torch.isfinite(ka).all()
    kb = vb[2][1][torch.tensor(pages_b)]
    assert kb.dtype == torch.bfloat16 and torch.isfinite(kb).all()


def test_arena_validation():
    with pytest.raises(ConfigError, match="multiple of 256"):
        Arena(2, 1000)
    with pytest.raises(ConfigError, match="at least one page"):
        Arena(0, 256)
    assert Arena(3, 512).pages().shape == (3, 512)


def _smaps_entry(address: int) -> dict[str, str] | None:
    """The fields of the mapping holding `address` in Linux's /proc/self/smaps (`Rss`, `VmFlags`, ...), or None
    where there is none."""
    try:
        with open("/proc/self/smaps") as f:
            text = f.read()
    except OSError:
        return None
    entry = None
    for line in text.splitlines():
        head = line.split()[0] if line else ""
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            if entry is not None:
                return entry
            lo, hi = (int(x, 16) for x in head.split("-"))
            entry = {} if lo <= address < hi else None
        elif entry is not None and ":" in line:
            key, value = line.split(":", 1)
            entry[key] = value.strip()
    return entry


def _vm_flags(address: int) -> list[str] | None:
    """The VmFlags of the mapping holding `address`, or None where smaps shows none."""
    entry = _smaps_entry(address)
    return entry["VmFlags"].split() if entry and "VmFlags" in entry else None


def test_host_bytes_zeroed_aligned_and_kept_alive():
    """The fused kernel's weight buffer: zeroed, 2 MiB-aligned, writable, the mapping alive as long as
    a view of it is, huge pages asked for (Linux records the advice as the mapping's `hg` flag)."""
    import gc

    n = 3 * HUGE_PAGE + 12345
    t = host_bytes(n)
    assert t.dtype == torch.uint8 and t.numel() == n and t.is_contiguous() and t.device.type == "cpu"
    assert t.data_ptr() % HUGE_PAGE == 0
    assert int(t.count_nonzero()) == 0
    view = t[HUGE_PAGE:]
    del t
    gc.collect()
    view.fill_(7)  # the mapping outlives the tensor it was cut from
    assert int(view.sum()) == 7 * (n - HUGE_PAGE)
    flags = _vm_flags(view.data_ptr())  # None where /proc/self/smaps has no VmFlags (not Linux, some sandboxes)
    if flags is not None and hasattr(mmap, "MADV_HUGEPAGE") and os.path.exists("/sys/kernel/mm/transparent_hugepage"):
        assert "hg" in flags, f"no huge-page advice on the mapping: {flags}"
    small = host_bytes(1000)  # less than one huge page: a plain tensor
    assert small.numel() == 1000 and int(small.count_nonzero()) == 0
    assert host_bytes(0).numel() == 0
    with pytest.raises(ValueError, match="at least 0"):
        host_bytes(-1)


def test_return_freed_memory_where_the_c_library_can():
    """glibc's malloc_trim gives the heap's free memory back (the weights' originals, once copied); elsewhere False."""
    import platform

    big = torch.ones(64 << 20, dtype=torch.uint8)
    del big
    assert return_freed_memory() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_release_file_pages_leaves_the_bytes_and_drops_their_pages(tmp_path):
    """A read-only file mapping's pages, once read, are dropped from the resident set (Linux: the mapping's Rss in
    /proc/self/smaps falls to the partial pages at either end); the bytes read the same afterwards (faulted back in
    from the file). `copying_file_pages_pays` is True exactly where both huge pages and the release exist."""
    import warnings

    page = mmap.PAGESIZE
    n = 1024 * page + 100
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    (tmp_path / "f.bin").write_bytes(data)
    with open(tmp_path / "f.bin", "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only buffer: only read here
        whole = torch.frombuffer(mm, dtype=torch.uint8)
    total = int(whole.sum(dtype=torch.int64))  # every page read: resident
    part = whole[50:]  # starts inside the first page: that page stays
    before = _smaps_entry(part.data_ptr())
    released = release_file_pages(part)
    assert released is (sys.platform != "win32")  # libc's madvise: every Unix
    after = _smaps_entry(part.data_ptr())
    if released and before and after and "Rss" in before:
        kib = lambda e: int(e["Rss"].split()[0])  # noqa: E731
        assert kib(before) >= 1000 * page // 1024 and kib(after) <= 2 * page // 1024, (before["Rss"], after["Rss"])
    assert int(whole.sum(dtype=torch.int64)) == total and bytes(whole[:300].numpy()) == data[:300]
    assert copying_file_pages_pays() is (hasattr(mmap, "MADV_HUGEPAGE") and released)
    del whole, part
    mm.close()


# ---- prefix hashes -----------------------------------------------------------------------------------------------
tokens_st = st.lists(st.integers(0, 50_000), max_size=40)


@settings(max_examples=100, deadline=None)
@given(tokens=tokens_st, more=tokens_st, tpp=st.integers(1, 8))
def test_prefix_hashes_chain(tokens, more, tpp):
    h = prefix_hashes(tokens, tpp, key="m")
    assert len(h) == len(tokens) // tpp  # only full pages
    assert len(set(h)) == len(h)
    # the same prefix gives the same first hashes, whatever follows
    h2 = prefix_hashes(tokens + more, tpp, key="m")
    assert h2[: len(h)] == h
    # a change in page 0 changes every hash
    if h:
        changed = [tokens[0] + 1] + tokens[1:]
        assert all(x != y for x, y in zip(h, prefix_hashes(changed, tpp, key="m")))
    # a change in the last full page changes only that hash
    if len(h) >= 2:
        changed = list(tokens)
        changed[len(h) * tpp - 1] += 1
        hc = prefix_hashes(changed, tpp, key="m")
        assert hc[:-1] == h[:-1] and hc[-1] != h[-1]


@given(tokens=st.lists(st.integers(0, 1000), min_size=4, max_size=40))
def test_prefix_hashes_key_separates_models(tokens):
    a = prefix_hashes(tokens, 4, key=("llama", None))
    b = prefix_hashes(tokens, 4, key=("qwen2", None))
    c = prefix_hashes(tokens, 4, key=("llama", "adapter1"))
    assert not set(a) & set(b) and not set(a) & set(c)
    assert a == prefix_hashes(tokens, 4, key=("llama", None))


def test_prefix_hashes_only_full_pages():
    assert prefix_hashes([1, 2, 3], 4, key="m") == []
    assert len(prefix_hashes([1, 2, 3, 4, 5, 6, 7], 4, key="m")) == 1
    assert len(prefix_hashes(list(range(8)), 4, key="m")) == 2
    # page boundaries matter: the same tokens in other page sizes hash differently
    assert prefix_hashes(list(range(8)), 4, key="m")[1] != prefix_hashes(list(range(8)), 8, key="m")[0]


# ---- eviction order ----------------------------------------------------------------------------------------------
def test_uncached_free_pages_are_taken_before_cached_ones():
    pool = PagePool(6)
    s1 = pool.allocate(3, "a", "m")
    s2 = pool.allocate(3, "a", "m")
    hashes = prefix_hashes(list(range(12)), 4, key="m")
    for p, h in zip(s1, hashes):
        pool.register(p, h)
    pool.release(s1, "a")
    pool.release(s2, "a")
    assert [pool.state(p) for p in s1] == [PageState.CACHED] * 3
    assert [pool.state(p) for p in s2] == [PageState.FREE] * 3
    assert pool.num_free == 6
    got = pool.allocate(3, "b", "m")
    assert sorted(got) == sorted(s2)  # the uncached pages go first
    assert [pool.lookup(h) for h in hashes] == s1  # every prefix still matchable
    pool.check()


def test_cached_pages_are_taken_lru_and_prefix_pages_last():
    pool = PagePool(6)
    s1 = pool.allocate(3, "a", "m")
    s2 = pool.allocate(3, "a", "m")
    h1 = prefix_hashes([1] * 12, 4, key="m")
    h2 = prefix_hashes([2] * 12, 4, key="m")
    for p, h in zip(s1 + s2, h1 + h2):
        pool.register(p, h)
    pool.release(s1, "a")  # s1 freed first: least recently used
    pool.release(s2, "a")
    # a hit on s1's first page, released again, makes it most recently used
    pool.acquire(s1[0], "b")
    assert pool.state(s1[0]) == PageState.KV and pool.num_free == 5
    pool.release([s1[0]], "b")
    order = []
    for _ in range(6):
        (p,) = pool.allocate(1, "c", "m")
        order.append(p)
    # within a sequence the last page goes first (released last-first); s1 before s2; the hit page last
    assert order == [s1[2], s1[1], s2[2], s2[1], s2[0], s1[0]]
    assert all(pool.lookup(h) is None for h in h1 + h2)
    pool.check()


def test_weights_pages_come_back_first():
    pool = PagePool(4)
    w = pool.reserve_weights("m", 2)
    assert [pool.state(p) for p in w] == [PageState.WEIGHTS] * 2
    with pytest.raises(ValueError, match="already charged"):
        pool.reserve_weights("m", 1)
    with pytest.raises(OutOfPagesError):
        pool.reserve_weights("n", 3)
    pool.release_weights("m")
    assert pool.num_free == 4 and sorted(pool.allocate(2, "a", "x")) == sorted(w)


def test_release_of_unheld_page_changes_nothing():
    pool = PagePool(4)
    s = pool.allocate(2, "a", "m")
    other = pool.allocate(1, "b", "m")
    before = pool.usage(), [pool.holders(p) for p in range(4)]
    with pytest.raises(ValueError, match="does not hold"):
        pool.release(other + s, "a")  # released last-first: s would go before the bad page is seen
    with pytest.raises(ValueError, match="does not hold"):
        pool.release(s + s, "a")  # a double free inside one call
    assert (pool.usage(), [pool.holders(p) for p in range(4)]) == before
    pool.check()


def test_quota_errors():
    pool = PagePool(8)
    pool.set_quota("a", 3)
    assert pool.headroom("a") == 3
    pool.allocate(2, "a", "m")
    with pytest.raises(QuotaExceededError, match="quota is 3"):
        pool.allocate(2, "a", "m")
    assert pool.held_by("a") == 2 and pool.num_free == 6
    with pytest.raises(ConfigError):
        pool.set_quota("a", 0)
    with pytest.raises(OutOfPagesError):
        pool.allocate(9, "b", "m")


# ---- the pool against a model: hypothesis stateful test ---------------------------------------------------------
OWNERS = ("a", "b", "c")
NUM_PAGES = 12


class PoolMachine(RuleBasedStateMachine):
    """Every operation on a `PagePool`, checked against a plain model of block tables and the free queue."""

    def __init__(self):
        super().__init__()
        self.pool = PagePool(NUM_PAGES)
        self.tables: dict[str, list[list[int]]] = {o: [] for o in OWNERS}  # owner -> block tables
        self.free: list[int] = list(range(NUM_PAGES))  # the free queue, front first
        self.hash_of: dict[int, bytes] = {}
        self.quota: dict[str, int] = {}
        self.weights: dict[str, list[int]] = {}
        self.next_hash = 0

    # ---- helpers -------------------------------------------------------------------------------------------
    def refs(self, page: int, owner: str | None = None) -> int:
        owners = OWNERS if owner is None else (owner,)
        return sum(t.count(page) for o in owners for t in self.tables[o])

    def held(self, owner: str) -> int:
        return len({p for t in self.tables[owner] for p in t})

    def snapshot(self):
        pool = self.pool
        return (
            pool.usage(),
            [(pool.refcount(p), pool.holders(p), pool.state(p), pool.model_of(p)) for p in range(NUM_PAGES)],
            {h: pool.lookup(h) for h in self.hash_of.values()},
        )

    def take_front(self, n: int) -> list[int]:
        pages, self.free = self.free[:n], self.free[n:]
        for p in pages:
            self.hash_of.pop(p, None)
        return pages

    def cached_free(self) -> list[int]:
        return [p for p in self.free if p in self.hash_of]

    # ---- rules ---------------------------------------------------------------------------------------------
    @rule(owner=st.sampled_from(OWNERS), n=st.integers(0, 5))
    def allocate(self, owner, n):
        q = self.quota.get(owner)
        before = self.snapshot()
        if q is not None and self.held(owner) + n > q:
            with pytest.raises(QuotaExceededError):
                self.pool.allocate(n, owner, "m")
            assert self.snapshot() == before
            return
        if n > len(self.free):
            with pytest.raises(OutOfPagesError):
                self.pool.allocate(n, owner, "m")
            assert self.snapshot() == before
            return
        got = self.pool.allocate(n, owner, "m")
        assert got == self.take_front(n)
        if n:
            self.tables[owner].append(got)

    @precondition(lambda self: any(p in self.hash_of for p in self.free))
    @rule(owner=st.sampled_from(OWNERS))
    def evict_by_allocation(self, owner):
        """Allocate just enough to take the first cached page: all uncached free pages go before it."""
        n = self.free.index(self.cached_free()[0]) + 1
        q = self.quota.get(owner)
        if q is not None and self.held(owner) + n > q:
            return
        victim_hash = self.hash_of[self.cached_free()[0]]
        got = self.pool.allocate(n, owner, "m")
        assert got == self.take_front(n)
        assert self.pool.lookup(victim_hash) is None
        self.tables[owner].append(got)

    @precondition(lambda self: self.hash_of)
    @rule(owner=st.sampled_from(OWNERS), data=st.data())
    def acquire_shared(self, owner, data):
        h = data.draw(st.sampled_from(sorted(self.hash_of.values())))
        page = self.pool.lookup(h)
        assert page is not None and self.hash_of[page] == h
        q = self.quota.get(owner)
        before = self.snapshot()
        if self.refs(page, owner) == 0 and q is not None and self.held(owner) + 1 > q:
            with pytest.raises(QuotaExceededError):
                self.pool.acquire(page, owner)
            assert self.snapshot() == before
            return
        self.pool.acquire(page, owner)
        if page in self.free:
            self.free.remove(page)
        self.tables[owner].append([page])

    @precondition(lambda self: any(self.tables.values()))
    @rule(data=st.data())
    def release(self, data):
        owner = data.draw(st.sampled_from([o for o in OWNERS if self.tables[o]]))
        i = data.draw(st.integers(0, len(self.tables[owner]) - 1))
        table = self.tables[owner].pop(i)
        self.pool.release(table, owner)
        for p in reversed(table):
            if self.refs(p) == 0:
                if p in self.hash_of:
                    self.free.append(p)
                else:
                    self.free.insert(0, p)

    @rule(owner=st.sampled_from(OWNERS), page=st.integers(0, NUM_PAGES - 1), data=st.data())
    def release_not_held(self, owner, page, data):
        if self.refs(page, owner):
            return
        held = [t for t in self.tables[owner]]
        prefix = data.draw(st.sampled_from(held)) if held else []
        before = self.snapshot()
        with pytest.raises(ValueError):
            self.pool.release([page] + prefix, owner)  # the held pages are seen first (last-first release)
        assert self.snapshot() == before

    @precondition(lambda self: any(self.tables.values()))
    @rule(data=st.data())
    def register(self, data):
        in_use = sorted({p for o in OWNERS for t in self.tables[o] for p in t})
        page = data.draw(st.sampled_from(in_use))
        if data.draw(st.booleans()) or not self.hash_of:
            h = self.next_hash.to_bytes(16, "big")
            self.next_hash += 1
        else:  # a hash that another page already serves: a no-op
            h = data.draw(st.sampled_from(sorted(self.hash_of.values())))
        self.pool.register(page, h)
        if page not in self.hash_of and h not in self.hash_of.values():
            self.hash_of[page] = h

    @rule(owner=st.sampled_from(OWNERS), data=st.data())
    def set_quota(self, owner, data):
        q = data.draw(st.none() | st.integers(max(1, self.held(owner)), NUM_PAGES))
        self.pool.set_quota(owner, q)
        if q is None:
            self.quota.pop(owner, None)
        else:
            self.quota[owner] = q

    @rule(model=st.sampled_from(("w1", "w2")), n=st.integers(0, 4))
    def reserve_weights(self, model, n):
        before = self.snapshot()
        if model in self.weights:
            with pytest.raises(ValueError):
                self.pool.reserve_weights(model, n)
            assert self.snapshot() == before
            return
        if n > len(self.free):
            with pytest.raises(OutOfPagesError):
                self.pool.reserve_weights(model, n)
            assert self.snapshot() == before
            return
        got = self.pool.reserve_weights(model, n)
        assert got == self.take_front(n)
        self.weights[model] = got

    @precondition(lambda self: self.weights)
    @rule(data=st.data())
    def release_weights(self, data):
        model = data.draw(st.sampled_from(sorted(self.weights)))
        self.pool.release_weights(model)
        for p in self.weights.pop(model):
            self.free.insert(0, p)

    # ---- invariants ----------------------------------------------------------------------------------------
    @invariant()
    def matches_model(self):
        pool = self.pool
        pool.check()
        weights = {p for ps in self.weights.values() for p in ps}
        states = {s: set() for s in PageState}
        for p in range(NUM_PAGES):
            assert pool.refcount(p) == self.refs(p), f"page {p}"
            assert pool.holders(p) == {o: self.refs(p, o) for o in OWNERS if self.refs(p, o)}
            states[pool.state(p)].add(p)
        assert states[PageState.KV] == {p for p in range(NUM_PAGES) if self.refs(p)}
        assert states[PageState.WEIGHTS] == weights
        assert states[PageState.CACHED] == {p for p in self.free if p in self.hash_of}
        assert states[PageState.FREE] == {p for p in self.free if p not in self.hash_of}
        assert sum(len(s) for s in states.values()) == NUM_PAGES  # no page in two states
        assert pool.num_free == len(self.free)
        assert pool.num_free + len(states[PageState.KV]) + len(weights) == NUM_PAGES
        for o in OWNERS:
            assert pool.held_by(o) == self.held(o)
            assert pool.quota(o) == self.quota.get(o)
            if o in self.quota:
                assert pool.held_by(o) <= self.quota[o]
        for p, h in self.hash_of.items():
            assert pool.lookup(h) == p
        assert pool.weights() == self.weights


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestPagePool = PoolMachine.TestCase


def test_reserve_run_takes_exactly_the_run_and_keeps_other_cached_prefixes():
    pool = PagePool(10)
    pages = pool.allocate(10, "h", "m")
    pool.register(pages[0], b"prefix-0")  # page 0 holds a reusable prefix
    pool.release(pages, "h")
    assert pool.state(0) == PageState.CACHED
    run = pool.reserve_run(4, "region", "big")
    assert run == [1, 2, 3, 4]  # the run without cached pages
    assert pool.lookup(b"prefix-0") == 0 and pool.state(0) == PageState.CACHED  # not evicted on the way
    assert all(pool.holders(p) == {"region": 1} and pool.model_of(p) == "big" for p in run)
    pool.check()
    pool.set_quota("q", 2)
    with pytest.raises(QuotaExceededError):
        pool.reserve_run(3, "q", "big")
    with pytest.raises(OutOfPagesError, match="no run of 6 consecutive"):
        pool.reserve_run(6, "other", "big")
    pool.release(run, "region")
    assert pool.num_free == 10
    pool.check()


def test_evict_cached_forgets_unheld_prefixes_only():
    pool = PagePool(6)
    a = pool.allocate(2, "h", "m")
    b = pool.allocate(2, "h", "m")
    for i, p in enumerate(a + b):
        pool.register(p, bytes([i]))
    pool.release(a, "h")  # a's pages: cached; b's still held
    assert [pool.state(p) for p in a] == [PageState.CACHED] * 2
    assert pool.evict_cached() == 2
    assert all(pool.state(p) == PageState.FREE and pool.lookup(bytes([i])) is None for i, p in enumerate(a))
    assert pool.lookup(bytes([2])) == b[0]  # held pages keep their prefix
    pool.check()
