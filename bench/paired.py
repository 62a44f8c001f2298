"""MultiHead's fused kernel against llama.cpp in back-to-back pairs: per format, the median of the pairs' ratios.

    python -m bench.paired [--formats bf16 q8_0 q4_0] [--prompt 1024] [--context 128] [--gen 64] [--pairs 10]
                           [--prefill-reps 1] [--threads 2] [--isa avx2] [--llama-isa avx2] [--no-server]
                           [--kv-cache int8] [--csv PATH]

Why pairs: on a shared VM the same code's speed moves by up to 2x within seconds (a bfloat16 product measured
35, 50 and 70 GMAC/s in three runs a minute apart, bench/README.md), so the best of rounds taken a minute apart
(`bench.llama_cpp compare`) can set one system's lucky moment against the other's unlucky one. Here each pair
measures both systems within seconds of each other, in alternating order, and the ratio is taken within the pair.

Per pair and format, on the GGUF file `bench.llama_cpp` writes (same weights for both):
- `llama-bench -p P -n 0 -r R` and `llama-bench -p 0 -n N -d C -r R` (R = `--prefill-reps`, 1 by default: one timed
  run of each after its warm-up; C = `--context`): prefill tokens/s of its fastest run, decode tokens/s after C
  tokens of context (the runs' average), as MultiHead's decode is timed;
- MultiHead: the fastest of R prefills of one P-token prompt in one forward, and `--gen` decode steps at batch 1 and
  at batch 3 after `--context`-token contexts, a step of each in turn (`bench_interleaved`: their ratio from the same
  moments);
- unless `--no-server`, llama-server's decode step at batch 1 and at batch 3 (`-np 3`, the same contexts).
Reported per format: the median of each side's figures, the median ratio within pairs and its range (min-max),
among them (with llama-server) the batch-3 step's time against llama-server's: what three heads decoding together
cost on each system, which `--context 1024` measures after long contexts, where attention weighs most;
`--csv` also writes every pair's figures, one row per format and pair (for a notebook). `--isa` runs MultiHead's
build for that instruction set (e.g. the AVX2 build on an AVX-512 CPU) instead of the best one the CPU runs;
`--llama-isa avx2` runs llama.cpp's AVX2 build (what GGML_NATIVE gives an AVX2-only CPU) instead of its native one:
both together set the two systems' AVX2-only builds side by side on a CPU that has more. `--kv-cache int8` runs
MultiHead with `kv_cache="int8"` and llama.cpp with its q8_0 K/V cache (`-fa on -ctk q8_0 -ctv q8_0`).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from .llama_cpp import KV_CACHE_ARGS


def measure_pair(tools, path: Path, spec, runner, args, i: int) -> dict:
    """One pair's figures for one format: llama.cpp's and MultiHead's, back to back."""
    import torch

    from .decode_speed import bench_interleaved, bench_prefill
    from .host import wait_quiet
    from .llama_cpp import llama_bench
    from .llama_server import server_steps

    page_bytes = 256 * 1024
    wait_quiet()
    out = {}

    def theirs():  # prefill from an empty context, decode after --context tokens (-d), as MultiHead's
        kv = KV_CACHE_ARGS[args.kv_cache]
        pre = llama_bench(tools, path, args.threads, args.prompt, 0, reps=args.prefill_reps, extra_args=kv)
        dec = llama_bench(tools, path, args.threads, 0, args.gen, reps=args.prefill_reps, depth=args.context,
                          extra_args=kv)
        out["llama prefill"], out["llama decode"] = pre["prefill_best_tps"], dec["decode_tps"]

    def ours():
        out["ours prefill"] = args.prompt / bench_prefill(spec, runner, args.prompt, args.prefill_reps, page_bytes)
        step1, step3 = bench_interleaved(spec, runner, (1, 3), args.context, args.gen, page_bytes)
        out["ours decode"], out["ours b3/b1"] = 1 / step1, step3 / step1
        out["ours b3 ms"] = step3 * 1e3

    for side in (theirs, ours) if i % 2 == 0 else (ours, theirs):
        side()
    if not args.no_server:
        g = torch.Generator().manual_seed(i)
        ids = [torch.randint(3, spec.vocab_size, (args.context,), generator=g).tolist() for _ in range(3)]
        s1, s3 = server_steps(tools, path, args.threads, ids, args.gen, KV_CACHE_ARGS[args.kv_cache])
        out["llama b3/b1"], out["llama b3 ms"] = s3 / s1, s3 * 1e3
    return out


def summary(pairs: list[dict]) -> dict:
    """Medians of every figure, and of the within-pair ratios (with their range): prefill and decode at batch 1
    against llama-bench's, and where llama-server ran, its batch-3 step's time over MultiHead's ("b3 step ratio")."""
    med = {k: statistics.median(p[k] for p in pairs) for k in pairs[0]}
    ratios = {what: [p[f"ours {what}"] / p[f"llama {what}"] for p in pairs] for what in ("prefill", "decode")}
    if "llama b3 ms" in pairs[0]:
        ratios["b3 step"] = [p["llama b3 ms"] / p["ours b3 ms"] for p in pairs]
    for what, r in ratios.items():
        med[f"{what} ratio"] = (statistics.median(r), min(r), max(r))
    b3 = [p["ours b3/b1"] for p in pairs]
    med["b3 range"] = (min(b3), max(b3))
    return med


def main(argv=None) -> None:
    from multihead_nb.backends.native.cpu_isa import ISAS

    from .llama_cpp import LLAMA_BUILDS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", nargs="+", default=["bf16", "q8_0", "q4_0"])
    ap.add_argument("-p", "--prompt", type=int, default=1024, help="prefill prompt length")
    ap.add_argument("--context", type=int, default=128, help="context before the decode steps")
    ap.add_argument("-n", "--gen", type=int, default=64, help="decode steps (each system)")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--prefill-reps", type=int, default=1,
                    help="timed prefills per pair and system, each system's fastest counted (1: one shot each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", choices=ISAS,
                    help="MultiHead's build for this instruction set (default: the best this CPU runs)")
    ap.add_argument("--llama-isa", choices=list(LLAMA_BUILDS), default="native",
                    help="llama.cpp's build: native (this CPU's best) or avx2 (what an AVX2-only CPU builds)")
    ap.add_argument("--no-server", action="store_true", help="skip llama-server's batch-3 / batch-1 steps")
    ap.add_argument("--kv-cache", choices=list(KV_CACHE_ARGS), default="bf16",
                    help="MultiHead's kv_cache (int8: llama.cpp with its q8_0 K/V cache)")
    ap.add_argument("--csv", help="also write every pair's figures to this CSV file")
    args = ap.parse_args(argv)
    if min(args.pairs, args.prompt, args.context, args.gen, args.prefill_reps) < 1:
        ap.error("--pairs, --prompt, --context, --gen and --prefill-reps must be positive")

    import torch

    from multihead_nb.backends.native import read_spec
    from multihead_nb.backends.native.cpu_kernel import load_kernel

    from .decode_speed import make_runner
    from .host import read_bandwidth
    from .llama_cpp import build
    from .llama_gguf import gguf_files

    tools = build(isa=args.llama_isa)
    files = gguf_files(args.formats, tools)
    torch.set_num_threads(args.threads)
    isa = load_kernel(args.isa).isa
    print(f"kernel build {isa}, llama.cpp build {args.llama_isa}, {args.threads} threads, read bandwidth "
          f"{read_bandwidth() / 1e9:.1f} GB/s; {args.pairs} pairs per format, prefill of {args.prompt} tokens "
          f"(fastest of {args.prefill_reps}), decode after {args.context}; K/V cache {args.kv_cache}")
    rows, every = {}, []
    for fmt, path in files.items():
        spec = read_spec(str(path))
        # four sequences (batch 1 and batch 3 in turn) of the longest use: a prompt, or a context, 3 warm-up steps
        # and --gen steps (bench_interleaved)
        longest = max(args.prompt + 1, args.context + args.gen + 11)
        pages = 4 * spec.kv_layout(torch.bfloat16, 256 * 1024, args.kv_cache).pages_for(longest)
        runner = make_runner(spec, torch.bfloat16, 256 * 1024, pages + 2, "kernel", "bf16", args.isa, args.kv_cache)
        pairs = []
        for i in range(args.pairs):
            pairs.append(measure_pair(tools, path, spec, runner, args, i))
            print(f"{fmt} pair {i + 1}: " + ", ".join(f"{k} {v:.4g}" for k, v in pairs[-1].items()), flush=True)
        rows[fmt] = summary(pairs)
        every += [{"format": fmt, "pair": i + 1, "prompt": args.prompt, "prefill reps": args.prefill_reps,
                   "context": args.context, **p}
                  for i, p in enumerate(pairs)]
        del runner
    if args.csv:
        import pandas as pd

        pd.DataFrame(every).to_csv(args.csv, index=False)

    server = "" if args.no_server else " llama-server |"
    steps = "" if args.no_server else (" batch-3 step ms: llama-server | MultiHead | llama-server's over MultiHead's, "
                                       "in pairs (range) |")
    print(f"\n| format | prefill tok/s llama.cpp (pp{args.prompt}) | MultiHead | ratio in pairs: median (range) "
          f"| decode tok/s llama.cpp (tg{args.gen}) | MultiHead (batch 1) | ratio in pairs |"
          f" step batch 3 / batch 1:{server} MultiHead (range) |{steps}")
    print("|---" * (8 + 4 * (not args.no_server)) + "|")
    for fmt, m in rows.items():
        pr, dr, (b3lo, b3hi) = m["prefill ratio"], m["decode ratio"], m["b3 range"]
        srv = "" if args.no_server else f" {m['llama b3/b1']:.2f} |"
        sr = m.get("b3 step ratio")
        step = "" if args.no_server else (f" {m['llama b3 ms']:.2f} | {m['ours b3 ms']:.2f} | {sr[0]:.2f}x "
                                          f"({sr[1]:.2f}-{sr[2]:.2f}) |")
        print(f"| {fmt} | {m['llama prefill']:.1f} | {m['ours prefill']:.1f} | {pr[0]:.2f}x ({pr[1]:.2f}-{pr[2]:.2f}) "
              f"| {m['llama decode']:.1f} | {m['ours decode']:.1f} | {dr[0]:.2f}x ({dr[1]:.2f}-{dr[2]:.2f}) |{srv} "
              f"{m['ours b3/b1']:.2f} ({b3lo:.2f}-{b3hi:.2f}) |{step}")


if __name__ == "__main__":
    main()
