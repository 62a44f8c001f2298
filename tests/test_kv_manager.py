"""The KV manager alone, on a real `PagePool` and plain sequences (no engine, no model): prefix hits and misses, the
last page never matched, keys that isolate caches, commit, free, rollback, quotas and headroom, region pools."""

from dataclasses import dataclass, field

import pytest
import torch

from multihead_nb.config import ceil_div
from multihead_nb.errors import ConfigError
from multihead_nb.memory import KVLayout, KVManager, PagePool, PageState, prefix_hashes

TPP = 4
LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.float32, page_bytes=8 * TPP)  # 8 B/token


@dataclass(eq=False)
class Seq:
    """The `KVSequence` fields, nothing else."""

    id: int
    head: str
    model: str
    ids: list[int]
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.ids)

    def token_slice(self, start: int, end: int) -> list[int]:
        return self.ids[start:end]


def manager(pages=16, **models):
    kv = KVManager(PagePool(pages))
    for name, kw in (models or {"m": {}}).items():
        kv.add_model(name, LAYOUT, **kw)
    return kv


def run(kv, seq, budget=1 << 20):
    """Admit `seq` and compute all its known tokens in one chunk (what a step does); return the chunk."""
    n = kv.admit(seq, budget)
    kv.commit(seq, n)
    return n


def test_ceil_div():
    assert [ceil_div(a, 4) for a in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    assert LAYOUT.pages_for(9) == 3 and LAYOUT.tokens_per_page == TPP


def test_prefix_hit_shares_full_pages_and_miss_shares_none():
    kv = manager()
    a = Seq(1, "h", "m", list(range(10)))
    assert run(kv, a) == 10 and a.num_cached == 0 and len(a.block_table) == 3
    b = Seq(2, "h2", "m", list(range(8)) + [50, 51, 52])  # the same two full pages, then its own
    assert run(kv, b) == 3  # only the tokens past the shared pages are computed
    assert b.num_cached == 8 and b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [kv.pool.refcount(p) for p in a.block_table] == [2, 2, 1]
    c = Seq(3, "h", "m", [99] + list(range(1, 10)))  # differs in the first token: no page matches
    assert run(kv, c) == 10 and c.num_cached == 0 and not set(c.block_table) & set(a.block_table)
    kv.pool.check()


def test_the_page_of_the_last_token_is_never_matched():
    kv = manager()
    a = Seq(1, "h", "m", list(range(8)))
    run(kv, a)
    assert all(kv.pool.lookup(h) is not None for h in prefix_hashes(a.ids, TPP, "m"))  # both pages registered
    b = Seq(2, "h", "m", list(range(8)))  # the very same tokens
    assert kv.admit(b, 100) == 4  # page 1 holds b's last token: recomputed, so there are logits to sample from
    assert b.num_cached == b.num_computed == 4 and b.block_table[0] == a.block_table[0]
    assert b.block_table[1] != a.block_table[1]
    c = Seq(3, "h", "m", list(range(9)))  # one token past the pages: both match
    assert kv.admit(c, 100) == 1 and c.block_table == a.block_table[:2] + c.block_table[2:]


def test_prefix_keys_isolate_models_and_adapters():
    kv = manager(m={}, other={"prefix_key": ("m", "adapter-1")})
    ids = list(range(13))
    run(kv, Seq(1, "h", "m", ids))
    assert run(kv, Seq(2, "h", "other", ids)) == 13  # same tokens, same pool, another key: no hit
    s = Seq(3, "h", "m", ids)
    assert kv.admit(s, 100) == 1  # under its own key the cache is there
    kv.free(s)
    kv.add_model("m", LAYOUT, prefix_key=("m", "rep", 2))  # registered again under a new key: the cache is forgotten
    assert kv.admit(Seq(4, "h", "m", ids), 100) == 13
    assert kv.models["m"].prefix_key == ("m", "rep", 2)


def test_commit_registers_only_pages_that_filled():
    kv = manager()
    s = Seq(1, "h", "m", list(range(11)))
    assert kv.admit(s, 3) == 3  # a chunk of 3: one page, not full
    kv.commit(s, 3)
    assert kv.pool.tokens_in(s.block_table[0]) == 3
    hashes = prefix_hashes(s.ids, TPP, "m")
    assert kv.pool.lookup(hashes[0]) is None
    assert kv.allocate(s, 6) == 6 and len(s.block_table) == 3
    kv.commit(s, 6)  # tokens 3..8: page 0 and page 1 fill, page 2 holds one token
    assert s.num_computed == 9
    assert [kv.pool.tokens_in(p) for p in s.block_table] == [4, 4, 1]
    assert [kv.pool.lookup(h) for h in hashes] == s.block_table[:2]
    assert kv.pool.state(s.block_table[2]) == PageState.KV
    kv.free(s)
    assert [kv.pool.state(kv.pool.lookup(h)) for h in hashes] == [PageState.CACHED] * 2


def test_free_returns_every_page_and_cached_pages_stay_reusable():
    kv = manager(pages=8)
    a = Seq(1, "h", "m", list(range(10)))
    run(kv, a)
    pages = list(a.block_table)
    assert kv.pool.num_free == 5
    kv.free(a)
    kv.free(a)  # idempotent
    assert a.block_table == [] and a.num_computed == 0 and kv.pool.num_free == 8
    assert kv.pool.state(pages[2]) == PageState.FREE and kv.pool.held_by("h") == 0
    b = Seq(2, "h", "m", list(range(10)))
    assert run(kv, b) == 2 and b.block_table[:2] == pages[:2]  # the freed full pages served the next request
    kv.pool.check()


def test_admit_that_cannot_take_a_page_holds_nothing():
    kv = manager(pages=3)
    run(kv, Seq(1, "h", "m", list(range(9))))  # all 3 pages, two registered
    s = Seq(2, "h2", "m", list(range(8)) + [7, 7])  # its prefix is cached, but no page is free for the rest
    assert kv.admit(s, 100) == 0
    assert s.block_table == [] and s.num_computed == s.num_cached == 0 and kv.pool.held_by("h2") == 0
    assert [kv.pool.refcount(p) for p in range(3)] == [1, 1, 1]
    kv.pool.check()


def test_rollback_recomputes_a_registered_page_instead_of_rewriting_it():
    kv = manager()
    s = Seq(1, "h", "m", list(range(10)))
    run(kv, s)
    page1, h1 = s.block_table[1], prefix_hashes(s.ids, TPP, "m")[1]
    kv.rollback(s, 6)  # inside registered page 1: the cut moves back to its start
    assert s.num_computed == 4 and len(s.block_table) == 1
    assert kv.pool.lookup(h1) == page1 and kv.pool.state(page1) == PageState.CACHED  # kept intact for others
    del s.ids[6:]
    s.ids += [70, 71, 72]  # re-tokenized differently
    assert kv.allocate(s, 5) == 5 and s.block_table[1] != page1
    kv.commit(s, 5)
    assert kv.pool.tokens_in(page1) == TPP and kv.pool.lookup(prefix_hashes(s.ids, TPP, "m")[1]) == s.block_table[1]
    kv.pool.check()


def test_rollback_inside_the_unregistered_last_page_keeps_its_tokens():
    kv = manager()
    s = Seq(1, "h", "m", list(range(11)))
    run(kv, s)
    pages = list(s.block_table)
    kv.rollback(s, 100)  # past what is computed: nothing changes
    assert s.num_computed == 11 and s.block_table == pages
    kv.rollback(s, 9)
    assert s.num_computed == 9 and s.block_table == pages and kv.pool.tokens_in(pages[2]) == 1
    kv.rollback(s, 8)  # the partial page goes back, the registered ones stay
    assert s.num_computed == 8 and s.block_table == pages[:2] and kv.pool.state(pages[2]) == PageState.FREE
    kv.pool.check()


def test_quota_bounds_allocation_capacity_and_the_cached_prefix():
    kv = manager(pages=16)
    kv.set_quota("q", "m", 2)
    assert kv.capacity("q", "m") == 2 and kv.capacity("free", "m") == 16
    s = Seq(1, "q", "m", list(range(40)))
    assert kv.admit(s, 100) == 2 * TPP and kv.held("q", "m") == 2  # the chunk shrinks to the headroom
    kv.commit(s, 2 * TPP)
    assert kv.allocate(s, 1) == 0 and len(s.block_table) == 2
    assert "its quota holds only 2 pages" in kv.never_fits(s, 9)
    assert kv.never_fits(s, 8) is None
    kv.free(s)
    kv.set_quota("q", "m", 3)
    run(kv, Seq(2, "free", "m", list(range(13))))  # 3 registered pages
    u = Seq(3, "q", "m", [5, 5])
    run(kv, u)  # q holds one page
    t = Seq(4, "q", "m", list(range(12)))  # 2 cached pages + 1 fresh: the whole quota
    assert kv.admit(t, 100) == 0 and t.block_table == [] and t.num_cached == 0 and kv.held("q", "m") == 1
    kv.free(u)
    assert kv.admit(t, 100) == TPP and t.num_cached == 2 * TPP and kv.held("q", "m") == 3
    kv.pool.reserve_weights("weights", 10)
    assert kv.capacity("free", "m") == 6 and "the pool holds only 6" in kv.never_fits(Seq(5, "free", "m", []), 30)
    kv.pool.check()


def test_a_region_models_pages_and_quotas_live_in_its_own_pool():
    region = PagePool(4)
    kv = manager(pages=16, m={}, r={"pool": region})
    assert kv.pool_of("r") is region and kv.pool_of("m") is kv.pool and not kv.same_pool("r", "m")
    kv.set_quota("h", "m", 3)
    kv.set_quota("h", "r", 2)  # the head moved to the region model: its quota moves with it
    assert region.quota("h") == 2 and kv.pool.quota("h") is None and kv.capacity("h", "r") == 2
    s = Seq(1, "h", "r", list(range(7)))
    run(kv, s)
    assert region.held_by("h") == 2 and kv.pool.num_free == 16
    assert kv.admit(Seq(2, "h2", "r", list(range(4)) + [9]), 100) == 1  # the region's prefix cache
    assert kv.capacity("x", "r") == 4
    with pytest.raises(ConfigError, match="another pool"):
        kv.add_model("r", LAYOUT, pool=PagePool(4))
    with pytest.raises(ConfigError, match="not registered"):
        kv.model("nope")
    region.check()
