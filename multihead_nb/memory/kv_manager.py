"""The KV-cache manager: which pages hold each request's keys and values, and which full pages are cached for reuse.

Owns: per model one registration (`ModelKV`: its K/V layout, its prefix-cache key, the pool its pages come from,
its context length); the prefix cache's hash chain (`hash_page`: one hash per full page, chained from a root that
is the model's key, so models and adapters never share pages); per request its pages, how many of its tokens they
hold and the hashes of its registered full pages. Operations: `admit` (acquire the cached prefix, then pages for
the first chunk), `allocate` (pages for more tokens within the head's headroom), `commit` (after a step: tokens
per page, register the pages that just filled), `free`, `rollback` (a registered page is never rewritten: it is
recomputed), head quotas and `capacity`.

A model's pages come from the workspace's main pool, or from a region model's own pool (an EXL2 model whose runner
reads one contiguous cache brings the `PagePool` over its region's own pages, `memory.region_pool`): quotas,
refcounts and the prefix cache then work in that pool, and freeing pages of one pool does nothing for the other.

Does not know: queues, fairness, who should give way under pressure (the scheduler decides, then calls `free`),
a request's status, tensors, tokenizers or the engine. A request is anything with the `KVSequence` fields; the
manager writes only its `block_table`, `num_computed` and `num_cached`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from types import MappingProxyType
from typing import Hashable, Mapping, Protocol, Sequence

from ..errors import ConfigError, OutOfPagesError
from .kv_layout import KVLayout
from .page_pool import PagePool


def hash_page(prev: bytes | None, chunk: Sequence[int], key: Hashable) -> bytes:
    """The chained hash of one full page of tokens, given the previous page's hash (None for page 0: the chain's
    root is then `key`, which separates models and adapters)."""
    if prev is None:
        prev = hashlib.blake2b(repr(key).encode(), digest_size=16).digest()
    h = hashlib.blake2b(prev, digest_size=16)
    h.update(b",".join(str(int(t)).encode() for t in chunk))
    return h.digest()


def prefix_hashes(token_ids: Sequence[int], tokens_per_page: int, key: Hashable) -> list[bytes]:
    """Chained hashes of the full pages of `token_ids`: hash i covers tokens [0, (i+1) * tokens_per_page)."""
    out: list[bytes] = []
    for i in range(len(token_ids) // tokens_per_page):
        out.append(hash_page(out[-1] if out else None, token_ids[i * tokens_per_page : (i + 1) * tokens_per_page], key))
    return out


class KVSequence(Protocol):
    """What the KV manager reads of a request, and the three fields it writes (the engine's `Request` fits)."""

    id: int  # unique among the sequences a manager serves
    head: str  # the owner its pages are charged to (quotas count per head)
    model: str  # a registered model
    block_table: list[int]  # written here: its pages, in token order
    num_computed: int  # written here: leading tokens whose K/V sit in those pages
    num_cached: int  # written here: of which were found in the prefix cache at admission

    @property
    def num_tokens(self) -> int: ...  # tokens known so far (prompt and output)

    def token_slice(self, start: int, end: int) -> list[int]: ...  # token ids [start, end)


@dataclass(frozen=True)
class ModelKV:
    """One model's registration: how its tokens sit in pages, and where its pages come from."""

    layout: KVLayout
    prefix_key: Hashable  # full pages match only under the same key (model, adapter, ...)
    pool: PagePool
    max_context: int

    def __post_init__(self):
        if self.max_context < 1:
            raise ConfigError(f"a model's context must be at least one token, got {self.max_context}")


class KVManager:
    def __init__(self, pool: PagePool):
        self.pool = pool  # the main pool; a region model brings its own
        self._models: dict[str, ModelKV] = {}
        self._hashes: dict[int, list[bytes]] = {}  # sequence id -> hashes of its leading full pages, registered

    # ---- models --------------------------------------------------------------------------------------------
    def add_model(self, model: str, layout: KVLayout, prefix_key: Hashable = None, max_context: int = 1 << 30,
                  pool: PagePool | None = None) -> ModelKV:
        """Register `model` (again: its record is replaced, e.g. with a new prefix key that forgets the cache)."""
        rec = ModelKV(layout, model if prefix_key is None else prefix_key, self.pool if pool is None else pool,
                      max_context)
        old = self._models.get(model)
        if old is not None and old.pool is not rec.pool:
            raise ConfigError(f"model {model!r} is registered with another pool; remove it before moving it")
        self._models[model] = rec
        return rec

    def remove_model(self, model: str) -> None:
        self._models.pop(model, None)

    @property
    def models(self) -> Mapping[str, ModelKV]:
        """The registered models (read-only)."""
        return MappingProxyType(self._models)

    def model(self, model: str) -> ModelKV:
        rec = self._models.get(model)
        if rec is None:
            raise ConfigError(f"model {model!r} is not registered with the KV manager")
        return rec

    def pool_of(self, model: str) -> PagePool:
        """The pool `model`'s requests take pages from (the main pool for a model not registered)."""
        rec = self._models.get(model)
        return self.pool if rec is None else rec.pool

    def same_pool(self, model_a: str, model_b: str) -> bool:
        """Whether requests of the two models take pages from the same pool (so freeing one helps the other)."""
        return self.pool_of(model_a) is self.pool_of(model_b)

    # ---- heads: quotas and capacity ------------------------------------------------------------------------
    def set_quota(self, head: str, model: str, pages: int | None) -> None:
        """Set (or clear, with None) `head`'s quota in its model's pool; clear it in every other pool."""
        target = self.pool_of(model)
        for pool in {id(p): p for p in (self.pool, *(r.pool for r in self._models.values()))}.values():
            if pool is not target:
                pool.set_quota(head, None)
        target.set_quota(head, pages)

    def held(self, head: str, model: str) -> int:
        """Distinct pages `head` holds in `model`'s pool."""
        return self.pool_of(model).held_by(head)

    def capacity(self, head: str, model: str) -> int:
        """The most pages of K/V one request of `head` can ever hold: its model's pool's K/V pages, or its quota."""
        pool = self.pool_of(model)
        quota = pool.quota(head)
        return pool.num_kv_pages if quota is None else min(pool.num_kv_pages, quota)

    def never_fits(self, seq: KVSequence, num_tokens: int) -> str | None:
        """Why `num_tokens` tokens of `seq` can never be held, even with every other request gone; None if they
        can."""
        layout = self.model(seq.model).layout
        need = layout.pages_for(num_tokens)
        if need <= len(seq.block_table):  # it holds them already
            return None
        cap = self.capacity(seq.head, seq.model)
        if need <= cap:
            return None
        quota = self.pool_of(seq.model).quota(seq.head)
        limit = "its quota" if quota is not None and quota == cap else "the pool"
        return (
            f"request {seq.id} of head {seq.head!r} needs {need} pages for {num_tokens} tokens "
            f"({layout.tokens_per_page} tokens per page), but {limit} holds only {cap} pages of K/V; "
            "use a shorter prompt or max_tokens, or a larger pool or quota"
        )

    # ---- a sequence's pages --------------------------------------------------------------------------------
    def admit(self, seq: KVSequence, budget: int) -> int:
        """Give `seq` (holding no pages) its cached prefix and pages for up to `budget` more tokens; return how many
        tokens it may compute now. On 0 it holds nothing (no pages, or its quota binds).

        The prefix: registered full pages strictly before the page of the last known token (that page is never
        matched, so the last token is always computed and its logits exist to sample from)."""
        assert not seq.block_table, f"sequence {seq.id} is admitted while holding pages"
        rec = self.model(seq.model)
        tpp = rec.layout.tokens_per_page
        hashes: list[bytes] = []
        pages: list[int] = []
        for i in range((seq.num_tokens - 1) // tpp):
            h = hash_page(hashes[-1] if hashes else None, seq.token_slice(i * tpp, (i + 1) * tpp), rec.prefix_key)
            page = rec.pool.lookup(h)
            if page is None or rec.pool.model_of(page) != seq.model:
                break
            try:
                rec.pool.acquire(page, seq.head)
            except OutOfPagesError:  # the head's quota binds
                break
            hashes.append(h)
            pages.append(page)
        seq.block_table = pages
        seq.num_computed = seq.num_cached = len(pages) * tpp
        self._hashes[seq.id] = hashes
        n = self.allocate(seq, min(seq.num_tokens - seq.num_computed, budget))
        if n == 0:
            self.free(seq)
            seq.num_cached = 0
        return n

    def allocate(self, seq: KVSequence, num_tokens: int) -> int:
        """Pages for up to `num_tokens` more tokens past `seq.num_computed`, within the head's headroom (free pages
        and quota); return how many tokens fit (0: none, and nothing was taken)."""
        rec = self.model(seq.model)
        tpp = rec.layout.tokens_per_page
        have = len(seq.block_table) * tpp - seq.num_computed
        n = min(num_tokens, have + rec.pool.headroom(seq.head) * tpp)
        if n <= 0:
            return 0
        need = rec.layout.pages_for(seq.num_computed + n) - len(seq.block_table)
        if need > 0:
            seq.block_table.extend(rec.pool.allocate(need, seq.head, seq.model))
        return n

    def commit(self, seq: KVSequence, num_tokens: int) -> None:
        """`num_tokens` more tokens of `seq` now have K/V in its pages: count them per page, and register each page
        that just filled in the prefix cache."""
        rec = self.model(seq.model)
        tpp, pool = rec.layout.tokens_per_page, rec.pool
        start = seq.num_computed
        seq.num_computed += num_tokens
        assert seq.num_computed <= len(seq.block_table) * tpp, f"sequence {seq.id} computed past its pages"
        for i in range(start // tpp, rec.layout.pages_for(seq.num_computed)):
            pool.set_tokens(seq.block_table[i], min(tpp, seq.num_computed - i * tpp))
        hashes = self._hashes.setdefault(seq.id, [])
        while (len(hashes) + 1) * tpp <= seq.num_computed:
            i = len(hashes)
            h = hash_page(hashes[-1] if hashes else None, seq.token_slice(i * tpp, (i + 1) * tpp), rec.prefix_key)
            hashes.append(h)
            pool.register(seq.block_table[i], h)

    def free(self, seq: KVSequence) -> None:
        """Release all of `seq`'s pages (its registered full pages stay cached for others); idempotent."""
        if seq.block_table:
            self.pool_of(seq.model).release(seq.block_table, seq.head)
        seq.block_table = []
        seq.num_computed = 0
        self._hashes.pop(seq.id, None)

    def rollback(self, seq: KVSequence, num_tokens: int) -> None:
        """Forget computed K/V past `num_tokens` (a streamed prompt was re-tokenized differently). A registered
        page may be shared and is never rewritten: the cut moves back to its start and it is recomputed."""
        rec = self.model(seq.model)
        tpp = rec.layout.tokens_per_page
        keep = max(0, min(num_tokens, seq.num_computed))
        hashes = self._hashes.get(seq.id, [])
        if keep < len(hashes) * tpp:
            keep = (keep // tpp) * tpp
            del hashes[keep // tpp :]
        n_pages = rec.layout.pages_for(keep)
        if len(seq.block_table) > n_pages:
            rec.pool.release(seq.block_table[n_pages:], seq.head)
            del seq.block_table[n_pages:]
        if keep % tpp:  # the last kept page is partly filled (and unregistered): count what it still holds
            rec.pool.set_tokens(seq.block_table[-1], keep % tpp)
        seq.num_computed = keep
        seq.num_cached = min(seq.num_cached, keep)
