"""Soak: a kernel-resident workspace serving thousands of requests stays as fast and as small as it started.

    python -m bench.soak [--generations 2000] [--max-tokens 16] [--threads 2] [--out bench/results/soak]

One process, one workspace (engine on its background thread, as in Jupyter), three heads on a tiny random-weight
checkpoint (the engine's own costs dominate, which is what a soak should see). The loop submits `--generations`
requests round-robin over the heads and waits for each; mixed in, deterministically from a seed: every 7th request
is cancelled right after its submit, every 50th a head is removed right after a submit to it and added again.
Recorded per window of 100 calls: the median latency of a `generate` (submit to result) and the process's RSS.
The claim to check: latency and RSS at the end are flat against the start, within noise (history is bounded:
`Workspace(history=...)`; results never scan the workspace's log). At the end every page is free and the pool
checks out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path


def rss_mib() -> float:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--generations", type=int, default=2000)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--history", type=int, default=5000, help="Workspace(history=...): token rows the logs keep")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    import multihead_nb as mh
    from multihead_nb.testing import tiny_checkpoint

    torch.set_num_threads(args.threads)
    model = str(tiny_checkpoint("llama"))
    ws = mh.Workspace(device="cpu", dtype="float32", pool="16MiB", page_bytes="8KiB", background=True,
                      history=args.history)
    heads = ["a", "b", "c"]
    for h in heads:
        ws.add_head(h, model, max_tokens=args.max_tokens, ignore_eos=True)
    rng = random.Random(0)
    windows, lat, cancelled, removed = [], [], 0, 0
    t_start = time.perf_counter()
    for i in range(args.generations):
        head = heads[i % 3]
        prompt = [rng.randrange(5, 300) for _ in range(rng.randint(4, 40))]
        t = time.perf_counter()
        handle = ws.submit(head, prompt)
        if i % 50 == 49:
            ws.remove_head(head)
            assert handle.done and handle.request.finish_reason == "cancelled"
            ws.add_head(head, model, max_tokens=args.max_tokens, ignore_eos=True)
            removed += 1
            continue
        if i % 7 == 6:
            handle.cancel()
            cancelled += 1
            continue
        c = handle.result(timeout=60)
        assert len(c.token_ids) == args.max_tokens and len(c.tokens) == args.max_tokens
        lat.append(time.perf_counter() - t)
        if len(lat) == args.window:
            windows.append({"calls": i + 1, "median_ms": 1000 * statistics.median(lat), "rss_mib": rss_mib()})
            print(f"after {i + 1:5d} calls: median generate {windows[-1]['median_ms']:.1f} ms, "
                  f"RSS {windows[-1]['rss_mib']:.0f} MiB", flush=True)
            lat = []
    ws.sync()
    usage = ws.pool.usage()
    ws.pool.check()
    first, last = windows[0], windows[-1]
    summary = {
        "date": time.strftime("%Y-%m-%d"), "generations": args.generations, "cancelled": cancelled,
        "removed": removed, "wall_s": time.perf_counter() - t_start, "kv_pages_held_at_end": usage["kv"],
        "latency_ms_first_window": first["median_ms"], "latency_ms_last_window": last["median_ms"],
        "latency_ratio_last_over_first": last["median_ms"] / first["median_ms"],
        "rss_mib_first_window": first["rss_mib"], "rss_mib_last_window": last["rss_mib"],
        "rss_growth_mib": last["rss_mib"] - first["rss_mib"], "log_rows": len(ws.tokens()),
        "dropped_token_rows": ws.stats()["history"]["dropped_tokens"], "engine_errors": ws.stats()["errors"],
    }
    ws.close()
    print(json.dumps(summary, indent=2))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "soak.json").write_text(json.dumps({"summary": summary, "windows": windows}, indent=2) + "\n")
    return 0 if usage["kv"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
