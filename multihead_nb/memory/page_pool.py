"""The page pool: which page of the arena is free, cached, holding K/V or charged to weights, and for whom.

Owns: page ids, reference counts, the free queue in eviction order, the prefix cache's index (hash of a full page's
tokens → page; the KV manager computes the hashes), the holders of each page (head names), per-owner quotas and
usage numbers. Knows nothing of tensors, models or requests: callers pass page ids, owner names and model keys.

Eviction order: a freed page that holds no reusable prefix goes to the front of the free queue (taken first); a
freed page with a prefix hash goes to the back (kept longest, LRU), and stays matchable until it is taken.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from enum import Enum
from typing import Iterable

from ..errors import ConfigError, OutOfPagesError, QuotaExceededError


class PageState(str, Enum):
    FREE = "free"  # in the free queue, holds nothing reusable
    CACHED = "cached"  # in the free queue, still holds a matchable full page of K/V
    KV = "kv"  # referenced by at least one request
    WEIGHTS = "weights"  # charged to a model's weights


class PagePool:
    """Page ids 0..num_pages-1 of one arena, handed to owners (head names) for one model at a time each."""

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ConfigError(f"a pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._ref = [0] * num_pages
        self._holders: list[Counter] = [Counter() for _ in range(num_pages)]
        self._model: list[str | None] = [None] * num_pages
        self._tokens = [0] * num_pages
        self._free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(num_pages))
        self._hash_of: dict[int, bytes] = {}
        self._page_of: dict[bytes, int] = {}
        self._weights: dict[str, list[int]] = {}
        self._weight_set: set[int] = set()  # the same pages, for O(1) state lookups
        self._quota: dict[str, int] = {}
        self._held: Counter = Counter()  # owner -> distinct pages held

    # ---- queries -------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Pages that can be allocated now (free and cached alike)."""
        return len(self._free)

    @property
    def num_kv_pages(self) -> int:
        """Pages that can ever hold K/V: all but those charged to weights."""
        return self.num_pages - len(self._weight_set)

    def state(self, page: int) -> PageState:
        if self._ref[page] > 0:
            return PageState.KV
        if page in self._weight_set:
            return PageState.WEIGHTS
        return PageState.CACHED if page in self._hash_of else PageState.FREE

    def refcount(self, page: int) -> int:
        return self._ref[page]

    def holders(self, page: int) -> dict[str, int]:
        return dict(self._holders[page])

    def model_of(self, page: int) -> str | None:
        return self._model[page]

    def tokens_in(self, page: int) -> int:
        return self._tokens[page]

    def held_by(self, owner: str) -> int:
        return self._held[owner]

    def quota(self, owner: str) -> int | None:
        return self._quota.get(owner)

    def headroom(self, owner: str) -> int:
        """Pages `owner` may still take: the smaller of the free count and what its quota leaves."""
        q = self._quota.get(owner)
        return self.num_free if q is None else max(0, min(self.num_free, q - self._held[owner]))

    def lookup(self, h: bytes) -> int | None:
        """The page holding the full page of K/V with prefix hash `h`, if still cached or in use."""
        return self._page_of.get(h)

    def usage(self) -> dict:
        states = Counter(self.state(p).value for p in range(self.num_pages))
        return {
            "pages": self.num_pages,
            "free": states["free"],
            "cached": states["cached"],
            "kv": states["kv"],
            "weights": states["weights"],
            "shared": sum(1 for r in self._ref if r > 1),
            "tokens": sum(self._tokens[p] for p in range(self.num_pages) if self._ref[p] > 0),
            "by_owner": {o: n for o, n in self._held.items() if n},
        }

    # ---- quotas --------------------------------------------------------------------------------------------
    def set_quota(self, owner: str, pages: int | None) -> None:
        if pages is None:
            self._quota.pop(owner, None)
            return
        if pages < 1:
            raise ConfigError(f"a quota must be at least one page, got {pages} for {owner!r}")
        self._quota[owner] = pages

    def _check_quota(self, owner: str, extra: int) -> None:
        q = self._quota.get(owner)
        if q is not None and self._held[owner] + extra > q:
            raise QuotaExceededError(
                f"head {owner!r} holds {self._held[owner]} pages and asked for {extra} more; its quota is {q}"
            )

    # ---- allocation ----------------------------------------------------------------------------------------
    def allocate(self, n: int, owner: str, model: str) -> list[int]:
        """`n` fresh pages for `owner`, taken from the front of the free queue (evicting cached prefixes)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        self._check_quota(owner, n)
        if n > len(self._free):
            raise OutOfPagesError(f"asked for {n} pages, {len(self._free)} free of {self.num_pages}")
        pages = []
        for _ in range(n):
            page, _ = self._free.popitem(last=False)
            self._forget_hash(page)
            self._ref[page] = 1
            self._holders[page][owner] = 1
            self._model[page] = model
            self._tokens[page] = 0
            self._held[owner] += 1
            pages.append(page)
        return pages

    def find_run(self, n: int) -> list[int] | None:
        """The best run of `n` consecutive allocatable (free or cached) pages: fewest cached pages (each a reusable
        prefix it would evict), then the lowest first page; None when there is no such run."""
        if n < 1:
            raise ValueError(f"a run needs at least one page, got {n}")
        best: tuple[int, int] | None = None  # (cached pages, start)
        run = cached = 0
        for p in range(self.num_pages):
            if p in self._free:
                run += 1
                cached += p in self._hash_of
                if run > n:
                    cached -= (p - n) in self._hash_of
                    run = n
                if run == n and (best is None or (cached, p - n + 1) < best):
                    best = (cached, p - n + 1)
            else:
                run = cached = 0
        return None if best is None else list(range(best[1], best[1] + n))

    def reserve_run(self, n: int, owner: str, model: str) -> list[int]:
        """Take `n` consecutive pages (`find_run`) for `owner`, as one allocation: held (state `kv`, refcount 1) by
        `owner` for `model` until `release(pages, owner)`. For runners that read one contiguous cache (a region)."""
        run = self.find_run(n)
        if run is None:
            raise OutOfPagesError(
                f"{n} contiguous pages for {model!r} do not fit: the pool has {len(self._free)} free pages of "
                f"{self.num_pages}, but no run of {n} consecutive ones")
        self._check_quota(owner, n)
        for page in run:
            del self._free[page]
            self._forget_hash(page)
            self._ref[page] = 1
            self._holders[page][owner] = 1
            self._model[page] = model
            self._tokens[page] = 0
        self._held[owner] += n
        return run

    def acquire(self, page: int, owner: str) -> None:
        """One more reference to an existing page (a prefix hit), in use or cached."""
        if page in self._weight_set:
            raise ValueError(f"page {page} holds weights")
        if self._ref[page] == 0 and page not in self._hash_of:
            raise ValueError(f"page {page} is free and holds nothing to share")
        new_holder = self._holders[page][owner] == 0
        if new_holder:
            self._check_quota(owner, 1)
        if self._ref[page] == 0:
            del self._free[page]
        self._ref[page] += 1
        self._holders[page][owner] += 1
        if new_holder:
            self._held[owner] += 1

    def release(self, pages: Iterable[int], owner: str) -> None:
        """Drop one reference of `owner` to each page; a page no one holds returns to the free queue.

        Pass a sequence's pages in order: they are released last-first, so its early (most shared) prefix
        pages are evicted last.
        """
        pages = list(pages)
        for page, n in Counter(pages).items():  # check all first: a bad release changes nothing
            if self._holders[page][owner] < n:
                raise ValueError(f"{owner!r} releases page {page}, which it does not hold (double free)")
        for page in reversed(pages):
            self._holders[page][owner] -= 1
            if self._holders[page][owner] == 0:
                del self._holders[page][owner]
                self._held[owner] -= 1
            self._ref[page] -= 1
            if self._ref[page] == 0:
                self._free[page] = None
                if page in self._hash_of:
                    self._free.move_to_end(page, last=True)
                else:
                    self._model[page] = None
                    self._tokens[page] = 0
                    self._free.move_to_end(page, last=False)

    def register(self, page: int, h: bytes) -> None:
        """Record that `page` (in use) holds the full page of K/V whose prefix hash is `h`."""
        if self._ref[page] == 0:
            raise ValueError(f"page {page} is not in use")
        if h in self._page_of or page in self._hash_of:
            return  # another page already serves this prefix, or this page is registered
        self._hash_of[page] = h
        self._page_of[h] = page

    def evict_cached(self) -> int:
        """Forget every cached prefix no one holds (those pages become plain free pages); returns how many."""
        cached = [p for p in self._free if p in self._hash_of]
        for page in cached:
            self._forget_hash(page)
            self._model[page] = None
            self._tokens[page] = 0
            self._free.move_to_end(page, last=False)
        return len(cached)

    def set_tokens(self, page: int, n: int) -> None:
        self._tokens[page] = n

    def _forget_hash(self, page: int) -> None:
        h = self._hash_of.pop(page, None)
        if h is not None:
            del self._page_of[h]

    # ---- weights -------------------------------------------------------------------------------------------
    def _weights_pages(self) -> set[int]:
        return {p for pages in self._weights.values() for p in pages}

    def reserve_weights(self, model: str, n: int) -> list[int]:
        """Charge `n` pages to `model`'s weights (taken out of the free queue until `release_weights`)."""
        if model in self._weights:
            raise ValueError(f"weights of {model!r} are already charged")
        if n > len(self._free):
            raise OutOfPagesError(f"weights need {n} pages, {len(self._free)} free of {self.num_pages}")
        pages = []
        for _ in range(n):
            page, _ = self._free.popitem(last=False)
            self._forget_hash(page)
            self._model[page] = model
            pages.append(page)
        self._weights[model] = pages
        self._weight_set.update(pages)
        return pages

    def release_weights(self, model: str) -> None:
        for page in self._weights.pop(model, []):
            self._weight_set.discard(page)
            self._model[page] = None
            self._free[page] = None
            self._free.move_to_end(page, last=False)

    def weights(self) -> dict[str, list[int]]:
        return {m: list(p) for m, p in self._weights.items()}

    # ---- checking ------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Assert every invariant (used by tests; cheap enough to call after a run)."""
        weights = self._weights_pages()
        assert weights == self._weight_set, "weight page index"
        held = Counter()
        for p in range(self.num_pages):
            assert self._ref[p] == sum(self._holders[p].values()) >= 0, f"page {p}: refcount vs holders"
            for o in self._holders[p]:
                held[o] += 1
            in_free = p in self._free
            assert in_free == (self._ref[p] == 0 and p not in weights), f"page {p}: free queue membership"
            assert not (p in weights and self._ref[p]), f"page {p}: weights and K/V"
        assert +held == +self._held, "distinct pages per owner"
        for h, p in self._page_of.items():
            assert self._hash_of[p] == h, "hash maps are inverse"
        assert len(self._page_of) == len(self._hash_of)
        for o, q in self._quota.items():
            assert self._held[o] <= q, f"{o} over quota"
