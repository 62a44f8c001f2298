"""What the step log says about one engine step: one `StepRow` per model that ran a forward in it.

Owns: counting a step's tokens per model and head, prefill against decode, and the pool's state after the step
(pages in use and free, the queued requests' token slots and how many hold a token). Knows nothing of running
the forward or of retention: the engine hands the rows to the recorder, which keeps or drops them.
"""

from __future__ import annotations

from .forward import ModelSlot, StepOutput
from .plan import StepPlan
from .recorder import StepRow
from .scheduler import Scheduler


def step_rows(step: int, plan: StepPlan, out: StepOutput, scheduler: Scheduler, models: dict[str, ModelSlot],
              t0: float, t1: float, t2: float, t3: float) -> list[StepRow]:
    """The rows of step `step`, whose schedule ran from t0 to t1, forward to t2 and postprocess to t3."""
    pages_free = scheduler.pool.num_free
    in_use = scheduler.pool.num_pages - pages_free
    slots = held = 0
    for r in scheduler.requests():
        if r.block_table and r.model in models:
            slots += len(r.block_table) * models[r.model].runner.layout.tokens_per_page
            held += r.num_computed
    rows = []
    for model, chunks in plan.by_model().items():
        by_head: dict[str, int] = {}
        for c in chunks:
            by_head[c.request.head] = by_head.get(c.request.head, 0) + c.num_tokens
        decode = out.decode_tokens.get(model, 0)
        n = sum(c.num_tokens for c in chunks)
        rows.append(StepRow(step, model, t0, t3, t3 - t0, len(chunks), n, n - decode, decode, by_head, in_use,
                            pages_free, slots, held, t1 - t0, t2 - t1, t3 - t2))
    return rows
