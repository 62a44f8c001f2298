"""A model's own pages inside a region of the arena: their allocator, and what they mean for the page map.

Some runners (ExLlamaV2) cannot read K/V scattered over arena pages: they get a *region*, a contiguous run of
the arena's pages held in the main `PagePool` by one owner name, and cut it into pages of their own (256 tokens
each for ExLlamaV2). Owns: `RegionPool` — the `PagePool` over the model's own page ids 0..N-1 (the KV manager takes
the model's requests' pages from it, so refcounts, the prefix cache and quotas work there as in the main pool), the
charge of each own page to arena pages, and the page-map view that follows; `page_rows` / `pool_usage`, the main
pool's page map and usage numbers with every region expanded to the heads holding its pages.

Accounting: own page j is charged to the arena pages `charge[j]` (for EXL2, `Exl2Region.charge_map()`: the region's
bytes split evenly, in order). An arena page of a region is `kv` while an own page charged to it is held, and then
owned by the heads holding those own pages; `cached` while they only hold reusable prefixes; else `free` (free for
the region's model only: its `model` column names it). Its tokens are its charged own pages' tokens, each split
evenly over the arena pages that page is charged to.

Does not know: how a runner lays out the region's bytes (the caller passes the charge), tensors, requests, the
scheduler, or which model runs where.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from ..errors import ConfigError
from .page_pool import PagePool, PageState

ROW_COLUMNS = ["page", "state", "owner", "holders", "model", "tokens", "shared"]


def region_owner(model: str) -> str:
    """The owner name under which the main pool holds the arena pages of `model`'s region."""
    return f"region:{model}"


class RegionPool:
    """Model `model`'s own pages (ids 0..N-1, `page_bytes` bytes each) inside arena pages `arena_pages`, which the
    main pool holds for owner `owner`; `charge[j]` lists the arena pages own page j is accounted to."""

    def __init__(self, model: str, owner: str, arena_pages: Sequence[int], charge: Sequence[Sequence[int]],
                 page_bytes: int):
        arena_pages = [int(p) for p in arena_pages]
        if not charge:
            raise ConfigError(f"the region of {model!r} holds no page of its own")
        inside = set(arena_pages)
        self._on: dict[int, list[int]] = {}  # arena page -> own pages charged to it
        for j, pages in enumerate(charge):
            if not pages or not set(pages) <= inside:
                raise ConfigError(f"own page {j} of {model!r} is charged to {list(pages)}, not to pages of its region")
            for p in pages:
                self._on.setdefault(int(p), []).append(j)
        self.model = model
        self.owner = owner
        self.arena_pages = arena_pages
        self.charge = [list(p) for p in charge]
        self.page_bytes = page_bytes
        self.pool = PagePool(len(self.charge))

    @property
    def num_pages(self) -> int:
        """N: the model's own pages."""
        return self.pool.num_pages

    def view(self, arena_page: int) -> tuple[str, Counter, int, int]:
        """(state, holders, tokens, shared) of one arena page of the region, from the own pages charged to it."""
        pool, holders, kv_tokens, cached_tokens, shared, cached = self.pool, Counter(), 0, 0, 0, False
        for j in self._on.get(arena_page, ()):
            s = pool.state(j)
            share = pool.tokens_in(j) // len(self.charge[j])
            if s == PageState.KV:
                holders.update(pool.holders(j))
                shared = max(shared, pool.refcount(j))
                kv_tokens += share
            elif s == PageState.CACHED:
                cached, cached_tokens = True, cached_tokens + share
        if holders:
            return PageState.KV.value, holders, kv_tokens, shared
        return (PageState.CACHED.value if cached else PageState.FREE.value), holders, cached_tokens, 0


def page_rows(pool: PagePool, regions: Sequence[RegionPool]) -> list[tuple]:
    """One row per arena page (`ROW_COLUMNS`), regions expanded; a page's owner is its first holder."""
    in_region = {p: r for r in regions for p in r.arena_pages}
    rows = []
    for p in range(pool.num_pages):
        region = in_region.get(p)
        if region is not None:
            state, holders, tokens, shared = region.view(p)
            model = region.model
        else:
            state, holders = pool.state(p).value, pool.holders(p)
            model, shared = pool.model_of(p), pool.refcount(p)
            tokens = pool.tokens_in(p) if state in ("kv", "cached") else 0
        owner = next(iter(holders), None) if state == "kv" else ("weights" if state == "weights" else None)
        rows.append((p, state, owner, ",".join(sorted(holders)), model, tokens, shared))
    return rows


def pool_usage(pool: PagePool, regions: Sequence[RegionPool]) -> dict:
    """`pool.usage()` with every region's arena pages counted by the state and holders of its own pages."""
    usage = pool.usage()
    by_owner = Counter(usage["by_owner"])
    for r in regions:
        usage["kv"] -= len(r.arena_pages)  # held by the region's owner in the main pool
        usage["tokens"] -= sum(pool.tokens_in(p) for p in r.arena_pages)
        del by_owner[r.owner]
        for p in r.arena_pages:
            state, holders, tokens, shared = r.view(p)
            usage[state] += 1
            usage["shared"] += shared > 1
            usage["tokens"] += tokens if state == "kv" else 0
            by_owner.update(set(holders))
    usage["by_owner"] = {o: n for o, n in by_owner.items() if n}
    return usage
