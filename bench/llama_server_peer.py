"""The workflow table's llama.cpp column: each workflow's step instances run by one `llama-server -np N` over
loopback HTTP, on a GGUF of the same checkpoint in the same format as MultiHead's heads.

Owns: driving a plan through the server: each instance's prompt ids (as MultiHead built them) sent to `/completion`
with a fixed `n_predict` and `ignore_eos` as soon as all of its inputs have finished (llama-server is not told
about streams between heads: downstream prompts wait for the whole upstream output, as a user of an OpenAI-style
server would), up to N at a time; the wall time from the first request to the last answer. Knows nothing of
MultiHead, of building llama.cpp (`llama_cpp.py`) or of the table's output.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait


def run_plan(server, plan, n_new: int, parallel: int) -> dict:
    """One rep of `plan` on `server` (a `LlamaServer`): {"wall_s", "output_tokens", "instances", "error"}."""
    done: set = set()
    out = 0
    try:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            running = {}
            t0 = time.perf_counter()
            while len(done) < len(plan.order):
                for inst in plan.order:
                    if inst in done or inst in running.values() or len(running) >= parallel:
                        continue
                    if all(s in done for s in plan.sources[inst]):
                        running[pool.submit(server.complete, plan.prompts[inst], n_new)] = inst
                finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in finished:
                    tokens = fut.result()
                    if len(tokens) != n_new:
                        raise RuntimeError(f"llama-server returned {len(tokens)} tokens, not {n_new}")
                    out += len(tokens)
                    done.add(running.pop(fut))
            wall = time.perf_counter() - t0
        return {"wall_s": wall, "output_tokens": out, "instances": len(plan.order), "error": ""}
    except Exception as e:  # noqa: BLE001 - recorded in the table
        return {"wall_s": math.nan, "output_tokens": out, "instances": len(plan.order),
                "error": f"{type(e).__name__}: {e}"[:300]}


def warm_up(server, plans, n: int = 4) -> None:
    for plan in plans:
        run_plan(server, plan, n, 1)
