"""Which page pool serves each model's K/V pages: the workspace's main pool, or the model's own pool in its region.

Owns: the map model → `PagePool` (a model registered without one uses the main pool; a region model, e.g. an
EXL2 model whose runner reads one contiguous cache, brings the `PagePool` over its region's own pages), and the
rules that follow for heads: a head's quota is set in its model's pool and counts that pool's pages; a head can
preempt only requests whose pages come from the same pool (freeing pages of another pool would not help it).

Does not know: requests, queues, fairness, tokens per page (a model's layout says that), or how a region is laid
out in the arena (`memory.region_pool`).
"""

from __future__ import annotations

from . import PagePool


class PageSpaces:
    def __init__(self, main: PagePool):
        self.main = main
        self._pools: dict[str, PagePool] = {}

    def add(self, model: str, pool: PagePool | None = None) -> None:
        self._pools[model] = self.main if pool is None else pool

    def remove(self, model: str) -> None:
        self._pools.pop(model, None)

    def of(self, model: str) -> PagePool:
        """The pool `model`'s requests take pages from (the main pool for a model never registered)."""
        return self._pools.get(model, self.main)

    def same(self, model_a: str, model_b: str) -> bool:
        """Whether requests of the two models take pages from the same pool."""
        return self.of(model_a) is self.of(model_b)

    def set_quota(self, head: str, model: str, pages: int | None) -> None:
        """Set (or clear, with None) `head`'s quota in its model's pool; clear it everywhere else."""
        target = self.of(model)
        for pool in {id(p): p for p in (self.main, *self._pools.values())}.values():
            if pool is not target:
                pool.set_quota(head, None)
        target.set_quota(head, pages)
