"""The scheduler: who runs this step, and how many tokens each.

Owns the policy: per-head queues (running, waiting), weighted virtual token counters (VTC) for fairness (a head
that comes back from idle gets no credit for the time it was away), admission under per-head limits (concurrent
requests, page quotas), chunked prefill under one token budget per step, and preemption by recompute (the victim:
the newest request of the most-served head whose pages come from the same pool, or of the head itself when its
quota binds). Asks the `KVManager` for everything about pages: the cached prefix, allocation, commit, free,
rollback, capacity.

A request leaves the scheduler only through `remove` (idempotent: out of its queue, pages freed). The scheduler
moves a request between WAITING and RUNNING but never sets a final status, error or finish reason: a request
that can never run is removed and reported in `StepPlan.failed`, and the engine finalizes it. Knows nothing of
tensors, tokenizers or timing: the engine runs the plan and tells it (`advance`) what was computed.
"""

from __future__ import annotations

import heapq
from collections import deque
from types import MappingProxyType
from typing import Hashable, Mapping

from ..errors import ConfigError, RequestError
from ..memory import KVLayout, KVManager, PagePool
from .plan import Chunk, Failure, HeadQueue, StepPlan
from .request import Request, Status

__all__ = ["Chunk", "Failure", "HeadQueue", "Scheduler", "StepPlan"]


class Scheduler:
    def __init__(self, pool: PagePool, *, max_batched_tokens: int = 512, max_seqs: int = 128):
        if max_batched_tokens < 1 or max_seqs < 1:
            raise ConfigError(f"a step needs a positive token budget and sequence limit, got "
                              f"max_batched_tokens={max_batched_tokens}, max_seqs={max_seqs}")
        self.kv = KVManager(pool)
        self.max_batched_tokens = max_batched_tokens
        self.max_seqs = max_seqs
        self.heads: dict[str, HeadQueue] = {}

    @property
    def pool(self) -> PagePool:
        """The main pool (a region model's requests take pages from its own: `kv.pool_of(model)`)."""
        return self.kv.pool

    @property
    def layouts(self) -> Mapping[str, KVLayout]:
        """Each registered model's K/V layout (read-only)."""
        return MappingProxyType({m: rec.layout for m, rec in self.kv.models.items()})

    # ---- registration --------------------------------------------------------------------------------------
    def add_model(self, model: str, layout: KVLayout, prefix_key: Hashable = None, max_context: int = 1 << 30,
                  pool: PagePool | None = None) -> None:
        """Register `model` with the KV manager (again: replace its record, e.g. a new prefix key); `pool`: where
        its requests' pages come from (default: the main pool)."""
        self.kv.add_model(model, layout, prefix_key, max_context, pool)

    def remove_model(self, model: str) -> None:
        self.kv.remove_model(model)

    def add_head(self, name: str, model: str, *, weight=1.0, quota_pages=None, max_concurrent=None) -> None:
        """Define (or redefine, keeping its fairness counters) a head running `model`, a registered model."""
        if model not in self.kv.models:
            raise ConfigError(f"head {name!r} runs model {model!r}, which is not registered; add the model first")
        q = HeadQueue(name, model, weight, quota_pages, max_concurrent)
        old = self.heads.get(name)
        if old is not None:
            if old.running or old.waiting:
                raise ConfigError(f"head {name!r} still has requests; remove it before redefining it")
            q.counter, q.served = old.counter, old.served
        self.kv.set_quota(name, model, quota_pages)
        self.heads[name] = q

    def remove_head(self, name: str) -> list[Request]:
        """Forget a head; the requests it still had are removed (pages freed) and returned for the engine to
        finalize."""
        q = self.heads.pop(name, None)
        if q is None:
            return []
        left = [*q.running, *q.waiting]
        for req in left:
            self.kv.free(req)
        self.kv.set_quota(name, q.model, None)
        return left

    # ---- requests in and out -------------------------------------------------------------------------------
    def add(self, req: Request) -> None:
        q = self.heads.get(req.head)
        if q is None:
            raise RequestError(f"head {req.head!r} of request {req.id} is not defined (removed before it started?)")
        if req.model != q.model:
            raise RequestError(f"request {req.id} is for model {req.model!r}, but head {req.head!r} now runs "
                               f"{q.model!r}; submit it again")
        if not q.has_work:  # VTC: a head that comes back does not bring credit from its idle time
            active = [h.counter for h in self.heads.values() if h.has_work]
            if active:
                q.counter = max(q.counter, min(active))
        q.waiting.append(req)

    def requests(self) -> list[Request]:
        return [r for q in self.heads.values() for r in (*q.running, *q.waiting)]

    def remove(self, req: Request) -> None:
        """Take a request out of its queue and free its pages, whatever its fate; idempotent. The only way a
        request leaves the scheduler."""
        q = self.heads.get(req.head)
        if q is not None:
            if req in q.running:
                q.running.remove(req)
            elif req in q.waiting:
                q.waiting.remove(req)
        self.kv.free(req)

    def rollback(self, req: Request, num_tokens: int) -> None:
        """Forget computed K/V past `num_tokens` (a streamed prompt was re-tokenized differently)."""
        self.kv.rollback(req, num_tokens)

    def capacity(self, head: str) -> int:
        """The most pages of K/V one request of `head` can ever hold: its model's pool's K/V pages, or its quota."""
        return self.kv.capacity(head, self.heads[head].model)

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
            problem = self._never_runs(req)
            if problem is not None:
                self.remove(req)
                plan.failed.append(Failure(req, problem))
                n = 0
            elif req.status == Status.WAITING:
                n = self._admit(req, q, budget)
                if n == 0:
                    cands.clear()  # this head admits nothing more this step (concurrency, quota or pages)
            else:
                n = self._grow(req, q, budget, pending, planned)
            if n > 0:
                planned.add(req.id)
                plan.chunks.append(Chunk(req, n, req.ready_to_sample and n == req.num_uncomputed))
                budget -= n
                seqs += 1
                q.counter += n / q.weight
            if cands:
                heapq.heappush(heap, (q.counter, order, name))
        return plan

    def _never_runs(self, req: Request) -> str | None:
        """Why `req` can never get through its next chunk, even alone: past its model's context, or more pages than
        its pool or quota holds; None if it can."""
        rec = self.kv.model(req.model)
        if req.num_tokens + (0 if req.prompt_open else 1) > rec.max_context:
            return (f"request {req.id} of head {req.head!r} has {req.num_tokens} tokens, more than the "
                    f"{rec.max_context}-token context of its model; shorten its prompt or inputs")
        if req.status == Status.WAITING:  # its whole known prompt, and the token it samples next
            return self.kv.never_fits(req, req.num_tokens + (0 if req.prompt_open else 1))
        return self.kv.never_fits(req, req.num_computed + 1)

    def _admit(self, req: Request, q: HeadQueue, budget: int) -> int:
        if q.max_concurrent is not None and len(q.running) >= q.max_concurrent:
            return 0
        n = self.kv.admit(req, budget)
        if n > 0:
            q.waiting.remove(req)
            q.running.append(req)
            req.status = Status.RUNNING
        return n

    def _grow(self, req: Request, q: HeadQueue, budget: int, pending: dict, planned: set[int]) -> int:
        want = min(req.num_uncomputed, budget)
        while True:
            n = self.kv.allocate(req, want)
            if n > 0:
                return n
            victim = self._pick_victim(req, q, planned)
            if victim is None:
                self._preempt(req, pending)  # others hold the pages this step; retry later
                return 0
            self._preempt(victim, pending)

    def _pick_victim(self, req: Request, q: HeadQueue, planned: set[int]) -> Request | None:
        """A running request to preempt: same head when the quota binds, else the most-served head's newest (of the
        heads whose pages come from the same pool: preempting others frees nothing this request can use)."""
        if q.quota_pages is not None and self.kv.held(q.name, q.model) >= q.quota_pages:
            heads = [q]
        else:  # only heads served at least as much as this one give way (VTC); else this request waits
            heads = [h for h in self.heads.values() if h.counter >= q.counter and self.kv.same_pool(h.model, q.model)]
            heads.sort(key=lambda h: -h.counter)
        for h in heads:
            for victim in reversed(h.running):
                if victim is not req and victim.id not in planned and victim.block_table:
                    return victim
        return None

    def _preempt(self, req: Request, pending: dict) -> None:
        """RUNNING -> WAITING: free its pages (recomputed when it is admitted again), first in its head's line."""
        q = self.heads[req.head]
        q.running.remove(req)
        self.kv.free(req)
        req.status = Status.WAITING
        req.num_preemptions += 1
        q.waiting.appendleft(req)
        if req in pending.get(req.head, ()):
            pending[req.head].remove(req)

    # ---- after the step ------------------------------------------------------------------------------------
    def advance(self, plan: StepPlan) -> None:
        """Each chunk's tokens now have K/V: the KV manager commits them; the head's service grows."""
        for c in plan.chunks:
            req = c.request
            if req.status != Status.RUNNING or not req.block_table:  # removed since planning
                continue
            self.kv.commit(req, c.num_tokens)
            self.heads[req.head].served += c.num_tokens

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
