"""The scheduler: who runs this step, how many tokens each, and which pages they get.

Owns: per-head queues (running, waiting), weighted virtual token counters (VTC) for fairness, admission on free
pages and quotas, chunked prefill under one token budget per step, preemption by recompute, and the page
bookkeeping that follows a step (advance progress, register full pages in the prefix cache, free pages). A request's
pages come from its model's pool (`PageSpaces`: the main pool, or a region model's own pool) in its model's tokens
per page. Knows nothing of tensors, tokenizers or timing: the engine runs the plan and tells it what was sampled.
"""

from __future__ import annotations

import heapq
from collections import deque

from ..errors import OutOfPagesError, RequestError
from ..memory import KVLayout, PagePool, hash_page
from ..memory.page_spaces import PageSpaces
from .plan import Chunk, Failure, HeadQueue, StepPlan
from .request import Request, Status

__all__ = ["Chunk", "Failure", "HeadQueue", "Scheduler", "StepPlan"]


class Scheduler:
    def __init__(self, pool: PagePool, *, max_batched_tokens: int = 512, max_seqs: int = 128):
        self.pool = pool  # the main pool; a region model's requests take pages from its own (`self.spaces`)
        self.spaces = PageSpaces(pool)
        self.max_batched_tokens = max_batched_tokens
        self.max_seqs = max_seqs
        self.heads: dict[str, HeadQueue] = {}
        self.layouts: dict[str, KVLayout] = {}
        self.prefix_keys: dict[str, object] = {}
        self.max_context: dict[str, int] = {}
        self._page_hashes: dict[int, list[bytes]] = {}  # request id -> hashes of its registered full pages

    # ---- registration --------------------------------------------------------------------------------------
    def add_model(self, model: str, layout: KVLayout, prefix_key: object = None, max_context: int = 1 << 30,
                  pool: PagePool | None = None) -> None:  # pool: its requests' pages (default: the main pool)
        self.layouts[model] = layout
        self.spaces.add(model, pool)
        self.max_context[model] = max_context
        self.prefix_keys[model] = prefix_key if prefix_key is not None else model

    def remove_model(self, model: str) -> None:
        self.layouts.pop(model, None)
        self.spaces.remove(model)
        self.prefix_keys.pop(model, None)
        self.max_context.pop(model, None)

    def add_head(self, name: str, model: str, *, weight=1.0, quota_pages=None, max_concurrent=None) -> None:
        old = self.heads.get(name)
        q = HeadQueue(name, model, weight, quota_pages, max_concurrent)
        if old is not None:  # redefinition keeps its queues only if the model is the same
            assert not old.running and not old.waiting, "cancel a head's requests before redefining it"
            q.counter, q.served = old.counter, old.served
        self.heads[name] = q
        self.spaces.set_quota(name, model, quota_pages)

    def remove_head(self, name: str) -> list[Request]:
        """Forget a head; returns its requests still queued (taken out, pages freed) for the caller to end."""
        q = self.heads.get(name)
        if q is None:
            return []
        left = [*q.running, *q.waiting]
        for r in left:
            self.remove(r)
        del self.heads[name]
        self.spaces.set_quota(name, q.model, None)
        return left

    # ---- queues --------------------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        q = self.heads.get(req.head)
        if q is None:
            raise RequestError(f"head {req.head!r} of request {req.id} is not defined (removed before it started)")
        if not q.has_work:  # VTC: a head that comes back does not bring credit from its idle time
            active = [h.counter for h in self.heads.values() if h.has_work]
            if active:
                q.counter = max(q.counter, min(active))
        q.waiting.append(req)

    def requests(self) -> list[Request]:
        return [r for q in self.heads.values() for r in (*q.running, *q.waiting)]

    @property
    def has_work(self) -> bool:
        return any(q.has_work for q in self.heads.values())

    def remove(self, req: Request) -> None:
        """Take a request out of its queue and free its pages (finished, failed or cancelled); idempotent."""
        q = self.heads.get(req.head)
        if q is not None:
            if req in q.running:
                q.running.remove(req)
            if req in q.waiting:
                q.waiting.remove(req)
        self._free_pages(req)

    def _free_pages(self, req: Request) -> None:
        if req.block_table:
            self.spaces.of(req.model).release(req.block_table, req.head)
        req.block_table = []
        req.num_computed = 0
        self._page_hashes.pop(req.id, None)

    def _preempt(self, req: Request, plan: StepPlan, pending: dict) -> None:
        q = self.heads[req.head]
        q.running.remove(req)
        self._free_pages(req)
        req.status = Status.WAITING
        req.num_preemptions += 1
        q.waiting.appendleft(req)
        if req in pending.get(req.head, ()):
            pending[req.head].remove(req)
        plan.preempted.append(req)

    def rollback(self, req: Request, num_tokens: int) -> None:
        """Forget computed K/V past `num_tokens` (a streamed prompt was re-tokenized differently)."""
        layout = self.layouts[req.model]
        tpp = layout.tokens_per_page
        keep = min(num_tokens, req.num_computed)
        hashes = self._page_hashes.get(req.id, [])
        if keep < len(hashes) * tpp:  # never rewrite a registered (possibly shared) page: recompute it
            keep = (keep // tpp) * tpp
            del hashes[keep // tpp :]
        n_pages = layout.pages_for(keep)
        if len(req.block_table) > n_pages:
            self.spaces.of(req.model).release(req.block_table[n_pages:], req.head)
            del req.block_table[n_pages:]
        req.num_computed = keep

    # ---- the plan ------------------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget, seqs = self.max_batched_tokens, 0
        pending: dict[str, deque] = {}
        heap = []
        for order, q in enumerate(self.heads.values()):
            cands = deque(r for r in q.running if r.num_uncomputed > 0)
            cands.extend(q.waiting)
            if cands:
                pending[q.name] = cands
                heap.append((q.counter, order, q.name))
        heapq.heapify(heap)
        planned: set[int] = set()
        while heap and budget > 0 and seqs < self.max_seqs:
            _, order, name = heapq.heappop(heap)
            q, cands = self.heads[name], pending[name]
            if not cands:
                continue
            req = cands.popleft()
            if req.num_tokens + (0 if req.prompt_open else 1) > self.max_context[req.model]:
                self._fail(req, q, plan, (
                    f"request {req.id} of head {req.head!r} has {req.num_tokens} tokens, more than the "
                    f"{self.max_context[req.model]}-token context of its model; shorten its prompt or inputs"))
                n = 0
            elif req.status == Status.WAITING:
                n = self._admit(req, q, budget, plan)
                if n == 0:
                    cands.clear()  # this head admits nothing more this step (concurrency, quota or pages)
            else:
                n = self._grow(req, q, budget, plan, pending, planned)
            if n > 0:
                planned.add(req.id)
                plan.chunks.append(Chunk(req, n, req.ready_to_sample and n == req.num_uncomputed))
                budget -= n
                seqs += 1
                q.counter += n / q.weight
            if cands:
                heapq.heappush(heap, (q.counter, order, name))
        return plan

    def _admit(self, req: Request, q: HeadQueue, budget: int, plan: StepPlan) -> int:
        if q.max_concurrent is not None and len(q.running) >= q.max_concurrent:
            return 0
        layout = self.layouts[req.model]
        tpp = layout.tokens_per_page
        if self._cannot_fit_alone(req, q, layout, req.num_tokens + (0 if req.prompt_open else 1)):
            self._fail(req, q, plan, self._too_big_message(req, q, layout, req.num_tokens + 1))
            return 0
        # prefix cache: full pages strictly before the page of the last known token
        ids = req.all_ids
        key, pool = self.prefix_keys[req.model], self.spaces.of(req.model)
        hashes, pages, prev = [], [], None
        for i in range((len(ids) - 1) // tpp):
            prev = hash_page(prev, ids[i * tpp : (i + 1) * tpp], key)
            page = pool.lookup(prev)
            if page is None or pool.model_of(page) != req.model:
                break
            try:
                pool.acquire(page, req.head)
            except OutOfPagesError:  # quota
                break
            hashes.append(prev)
            pages.append(page)
        req.block_table = pages
        req.num_computed = req.num_cached = len(pages) * tpp
        n = self._fit_chunk(req, q, layout, min(req.num_uncomputed, budget))
        if n == 0:
            self._free_pages(req)
            req.num_cached = 0
            return 0
        self._page_hashes[req.id] = hashes
        q.waiting.remove(req)
        q.running.append(req)
        req.status = Status.RUNNING
        return n

    def _grow(self, req, q, budget, plan, pending, planned) -> int:
        layout = self.layouts[req.model]
        want = min(req.num_uncomputed, budget)
        if self._cannot_fit_alone(req, q, layout, req.num_computed + 1):
            self._fail(req, q, plan, self._too_big_message(req, q, layout, req.num_computed + 1))
            return 0
        while True:
            n = self._fit_chunk(req, q, layout, want)
            if n > 0:
                return n
            victim = self._pick_victim(req, q, planned)
            if victim is None:
                self._preempt(req, plan, pending)  # others hold the pages this step; retry later
                return 0
            self._preempt(victim, plan, pending)

    def _fit_chunk(self, req: Request, q: HeadQueue, layout: KVLayout, want: int) -> int:
        """Allocate pages for up to `want` more tokens; shrink the chunk to what fits; return its size."""
        have = len(req.block_table) * layout.tokens_per_page - req.num_computed
        pool = self.spaces.of(req.model)
        n = min(want, have + pool.headroom(req.head) * layout.tokens_per_page)
        if n <= 0:
            return 0
        need = layout.pages_for(req.num_computed + n) - len(req.block_table)
        if need > 0:
            req.block_table.extend(pool.allocate(need, req.head, req.model))
        return n

    def _pick_victim(self, req: Request, q: HeadQueue, planned: set[int]) -> Request | None:
        """A running request to preempt: same head when the quota binds, else the most-served head's newest (of the
        heads whose pages come from the same pool: preempting others frees nothing this request can use)."""
        quota_bound = q.quota_pages is not None and self.spaces.of(q.model).held_by(q.name) >= q.quota_pages
        if quota_bound:
            heads = [q]
        else:  # only heads served at least as much as this one give way (VTC); else this request waits
            heads = [h for h in self.heads.values() if h.counter >= q.counter and self.spaces.same(h.model, q.model)]
            heads.sort(key=lambda h: -h.counter)
        for h in heads:
            for victim in reversed(h.running):
                if victim is not req and victim.id not in planned and victim.block_table:
                    return victim
        return None

    def capacity(self, head: str) -> int:
        """The most pages of K/V one request of `head` can ever hold: its model's pool's K/V pages, or its quota."""
        q = self.heads[head]
        kv_pages = self.spaces.of(q.model).num_kv_pages
        return kv_pages if q.quota_pages is None else min(kv_pages, q.quota_pages)

    def _cannot_fit_alone(self, req, q, layout, num_tokens) -> bool:
        return layout.pages_for(num_tokens) > self.capacity(q.name)

    def _too_big_message(self, req, q, layout, num_tokens) -> str:
        quota_binds = q.quota_pages is not None and q.quota_pages == self.capacity(q.name)
        limit = "its quota" if quota_binds else "the pool"
        return (
            f"request {req.id} of head {req.head!r} needs {layout.pages_for(num_tokens)} pages for {num_tokens} tokens "
            f"({layout.tokens_per_page} tokens per page), but {limit} holds only {self.capacity(q.name)} pages of K/V; "
            "use a shorter prompt or max_tokens, or a larger pool or quota"
        )

    def _fail(self, req: Request, q: HeadQueue, plan: StepPlan, message: str) -> None:
        if req in q.running:
            q.running.remove(req)
        if req in q.waiting:
            q.waiting.remove(req)
        self._free_pages(req)
        plan.failed.append(Failure(req, message))

    # ---- after the step ------------------------------------------------------------------------------------
    def advance(self, plan: StepPlan) -> None:
        """Record that each chunk's tokens now have K/V: progress, tokens per page, prefix-cache entries."""
        for c in plan.chunks:
            req = c.request
            if req.status != Status.RUNNING:
                continue
            layout, pool, key = self.layouts[req.model], self.spaces.of(req.model), self.prefix_keys[req.model]
            tpp = layout.tokens_per_page
            start = req.num_computed
            req.num_computed += c.num_tokens
            self.heads[req.head].served += c.num_tokens
            for i in range(start // tpp, layout.pages_for(req.num_computed)):
                pool.set_tokens(req.block_table[i], min(tpp, req.num_computed - i * tpp))
            hashes = self._page_hashes.setdefault(req.id, [])
            while (len(hashes) + 1) * tpp <= req.num_computed:  # a page just filled: register it
                i = len(hashes)
                h = hash_page(hashes[-1] if hashes else None, req.token_slice(i * tpp, (i + 1) * tpp), key)
                hashes.append(h)
                pool.register(req.block_table[i], h)

    def queue_lengths(self) -> dict[str, dict[str, int]]:
        return {
            name: {
                "running": len(q.running),
                "waiting": sum(1 for r in q.waiting if r.num_preemptions == 0),
                "preempted": sum(1 for r in q.waiting if r.num_preemptions > 0),
                "served_tokens": q.served,
                "counter": q.counter,
            }
            for name, q in self.heads.items()
        }
