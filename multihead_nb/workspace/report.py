"""What a workspace reports about itself: the page map (`ws.pages()`) and the usage numbers (`ws.stats()`).

Owns turning the pool, the region models' own pages, the scheduler's requests and the engine's counters into a
frame and a dict. Knows nothing of how any of them change; callers hold the engine lock.
"""

from __future__ import annotations

import pandas as pd

from ..memory.region_pool import ROW_COLUMNS, page_rows, pool_usage


def regions(ws) -> list:
    """The region models' own pages: the page map and usage show their arena pages as held by those heads."""
    return [m.region for m in ws.models.values() if m.region is not None]


def page_frame(ws) -> pd.DataFrame:
    """One row per arena page (columns `ROW_COLUMNS`)."""
    return pd.DataFrame(page_rows(ws.pool, regions(ws)), columns=ROW_COLUMNS)


def workspace_stats(ws) -> dict:
    """Device, pool usage, waste (allocated token slots not holding a token), queues, steps, tokens/s, models."""
    usage = pool_usage(ws.pool, regions(ws))
    slots = held = 0
    for r in ws.scheduler.requests():
        if r.block_table:
            slots += len(r.block_table) * ws.scheduler.layouts[r.model].tokens_per_page
            held += r.num_computed
    busy = ws.engine.busy_s
    return {
        "device": str(ws.device),
        "dtype": str(ws.dtype).replace("torch.", ""),
        "page_bytes": ws.page_bytes,
        "pool": usage,
        "waste": 0.0 if slots == 0 else 1 - held / slots,
        "queues": ws.scheduler.queue_lengths(),
        "steps": ws.engine.step_count,
        "tokens_generated": ws.engine.tokens_generated,
        "tokens_per_s": ws.engine.tokens_generated / busy if busy else 0.0,
        "models": {k: {"heads": sorted(m.heads), "weight_pages": m.weight_pages, "backend": m.backend,
                       "region_pages": 0 if m.region is None else len(m.region.arena_pages),
                       "cpu_kernel": getattr(m.runner, "fused", None) is not None}
                   for k, m in ws.models.items()},
    }
