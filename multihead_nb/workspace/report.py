"""What a workspace reports about itself: the page map (`ws.pages()`) and the usage numbers (`ws.stats()`).

Owns turning the pool, the region models' own pages, the scheduler's queues, the loaded models and the engine's
counters into a frame and a dict. Knows nothing of how any of them change; callers hold the engine lock.
"""

from __future__ import annotations

import pandas as pd

from ..engine.engine import Engine
from ..engine.recorder import Recorder
from ..memory import PagePool
from ..memory.region_pool import ROW_COLUMNS, page_rows, pool_usage


def regions(models) -> list:
    """The region models' own pages: the page map and usage show their arena pages as held by those heads."""
    return [m.region for m in models.values() if m.region is not None]


def page_frame(pool: PagePool, models) -> pd.DataFrame:
    """One row per arena page (columns `ROW_COLUMNS`)."""
    return pd.DataFrame(page_rows(pool, regions(models)), columns=ROW_COLUMNS)


def workspace_stats(pool: PagePool, models, engine: Engine, recorder: Recorder, dropped_messages: int) -> dict:
    """Pool usage, waste (allocated token slots not holding a token), queues, steps, tokens/s, models, errors."""
    usage = pool_usage(pool, regions(models))
    slots = held = 0
    for r in engine.scheduler.requests():
        if r.block_table and r.model in models:
            slots += len(r.block_table) * models[r.model].built.layout.tokens_per_page
            held += r.num_computed
    busy = engine.busy_s
    queues = engine.scheduler.queue_lengths()
    for r in engine.live_requests():  # a stream source's (remote) requests run outside the scheduler
        if r.head in queues and r.model in models and models[r.model].built.layout.pages_for(1) == 0:
            queues[r.head]["running"] += 1
    return {
        "pool": usage,
        "waste": 0.0 if slots == 0 else 1 - held / slots,
        "queues": queues,
        "steps": engine.step_count,
        "tokens_generated": engine.tokens_generated,
        "tokens_per_s": engine.tokens_generated / busy if busy else 0.0,
        "models": {k: {"heads": sorted(h for h in m.heads if not h.startswith("\0")), "weight_pages": m.weight_pages,
                       "backend": m.backend, "region_pages": len(m.region_pages),
                       "cpu_kernel": getattr(m.runner, "fused", None) is not None, "runs_on": m.built.note}
                   for k, m in models.items()},
        "errors": [f"{t:.3f}s: {what}" for t, what in engine.errors],
        "history": {"dropped_tokens": recorder.dropped_tokens, "dropped_steps": recorder.dropped_steps,
                    "dropped_messages": dropped_messages},
    }
