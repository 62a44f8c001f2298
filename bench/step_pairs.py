"""Two or more variants of the fused kernel, their decode steps taken in turn: differences of a few percent.

    python -m bench.step_pairs --variant= --variant=-DMH_PF_AHEAD=8192 [--format q4_0] [--gguf]
                               [--context 128] [--steps 300] [--batches 1 3] [--isa avx2] [--threads 2]

A variant is a space-separated list of C macros (`-DNAME` or `-DNAME=VALUE`, added to its kernel's build through
$MULTIHEAD_KERNEL_DEFINES) and environment variables (`NAME=VALUE`, set while its runner is built, e.g.
`MULTIHEAD_CPU_FLAGS_OFF=avx512f`; a kernel macro's name there is refused) or the runner's `kv_cache=int8`, given
as `--variant=...` (a value starting with `-` needs the `=`; quote one with spaces); an empty one is the code as it
is. One process: each variant its own runner (its own arena, its sequences prefilled with the same prompts), then
`--steps` rounds of one step of every variant at every batch size, the order reversed each round, after 3 warm-up
rounds. Per variant and batch: the median step, and in how many rounds its step was faster than the first
variant's (a 2% difference shows as 60-65% of 300 rounds where the medians of blocks of steps spread by 5%;
bench/README.md, "Zen 4 again"). Weights:
SmolLM2-135M's shape with random values in `--format` (quantized at load), or with `--gguf` the real
SmolLM2-135M-Instruct in that format (bench.llama_gguf: llama.cpp's tools make the files once).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from unittest import mock

import torch

from multihead_nb.backends.native.cpu_kernel import DEFINES_ENV, kernel_source_paths

from .decode_speed import make_runner, prefilled_groups


RUNNER_OPTIONS = ("kv_cache",)  # variant items passed to the runner, not set in the environment


def kernel_macros() -> frozenset[str]:
    """The MH_* names the kernel's C sources use (macros: a variant sets them with -D, never as NAME=VALUE)."""
    return frozenset(name for path in kernel_source_paths()
                     for name in re.findall(r"\bMH_[A-Z0-9_]+\b", path.read_text()))


def parse_variant(text: str) -> dict[str, str]:
    """A variant's environment: its `-D` macros joined into $MULTIHEAD_KERNEL_DEFINES, its NAME=VALUE settings
    (RUNNER_OPTIONS among them: `runner_options` takes those out). A NAME=VALUE naming one of the kernel's macros is
    refused: as an environment variable the build would ignore it, and the variant would be the code as it is."""
    env, defines = {}, []
    macros = kernel_macros()
    for item in text.split():
        if item.startswith("-D") and len(item) > 2:
            defines.append(item[2:])
        elif "=" in item and item.split("=", 1)[0].replace("_", "").isalnum():
            name, value = item.split("=", 1)
            if name in macros:
                raise ValueError(f"variant item {item!r} names the kernel's macro {name}: write -D{item} (as "
                                 "NAME=VALUE it would only set an environment variable, which the build ignores)")
            env[name] = value
        else:
            raise ValueError(f"variant item {item!r} is neither -DNAME[=VALUE] nor NAME=VALUE")
    if defines:
        if DEFINES_ENV in env:
            raise ValueError(f"variant {text!r} sets {DEFINES_ENV} and -D macros: use one of the two")
        env[DEFINES_ENV] = " ".join(defines)
    return env


def runner_options(env: dict[str, str]) -> dict[str, str]:
    """The RUNNER_OPTIONS of a parsed variant, removed from it."""
    return {name: env.pop(name) for name in RUNNER_OPTIONS if name in env}


def environment(env: dict[str, str]):
    """`env` set in os.environ for a `with` block, the previous values back after it."""
    return mock.patch.dict(os.environ, env)


def pair_steps(spec, runners: list, batches: tuple[int, ...], context: int, steps: int,
               page_bytes: int) -> list[list[list[float]]]:
    """Seconds of each timed step: [variant][batch][round], the variants' and batches' steps in turn each round."""
    state = [prefilled_groups(spec, r, batches, context, context + steps + 3 + 8, page_bytes) for r in runners]
    times = [[[] for _ in batches] for _ in runners]
    for rnd in range(steps + 3):
        order = [(v, b) for v in range(len(runners)) for b in range(len(batches))]
        for v, b in order if rnd % 2 == 0 else order[::-1]:
            groups, nxt = state[v]
            t = time.perf_counter()
            nxt[b] = groups[b].forward([[x] for x in nxt[b]])
            if rnd >= 3:
                times[v][b].append(time.perf_counter() - t)
    return times


def summary(times: list[list[list[float]]]) -> list[list[tuple[float, int]]]:
    """Per variant and batch: (median seconds, rounds in which it was faster than variant 0)."""
    return [[(statistics.median(ts), sum(x < y for x, y in zip(ts, times[0][b]))) for b, ts in enumerate(per_batch)]
            for per_batch in times]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", action="append", required=True,
                    help="C macros and settings (see above); --variant= for the code as it is")
    ap.add_argument("--format", default="q4_0", help="bf16 or a quantize= format (q8_0, q4_0, q4_k, ...)")
    ap.add_argument("--gguf", action="store_true", help="the real model's GGUF file in --format")
    ap.add_argument("--context", type=int, default=128, help="prompt tokens per sequence before the steps")
    ap.add_argument("--steps", type=int, default=300, help="rounds timed")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--isa", help="the kernel build (default: the best this CPU runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--page-bytes", type=int, default=256 * 1024)
    args = ap.parse_args(argv)
    if len(args.variant) < 2:
        ap.error("give at least two --variant (the first is the one the others are set against)")
    if min(args.context, args.steps, args.threads, *args.batches) < 1:
        ap.error("--context, --steps, --threads and --batches must be positive")
    try:
        envs = [parse_variant(v) for v in args.variant]
    except ValueError as e:
        ap.error(str(e))
    options = [runner_options(env) for env in envs]

    from multihead_nb.backends.native import read_spec
    from multihead_nb.testing import shape_checkpoint

    torch.set_num_threads(args.threads)
    if args.gguf:
        from .llama_gguf import gguf_files

        spec, quantize = read_spec(str(gguf_files([args.format])[args.format])), "bf16"  # the file's own format
    else:
        spec, quantize = read_spec(shape_checkpoint("smollm2-135m")), args.format
    layout = spec.kv_layout(torch.bfloat16, args.page_bytes)
    pages = sum(args.batches) * layout.pages_for(args.context + args.steps + 11) + 2
    runners = []
    for text, env, opts in zip(args.variant, envs, options):
        with environment(env):
            runner = make_runner(spec, torch.bfloat16, args.page_bytes, pages, "kernel", quantize, args.isa, **opts)
        if runner.fused is None:
            raise SystemExit(f"variant {text!r}: no fused kernel ({runner.kernel_note})")
        runners.append(runner)
    weights = f"SmolLM2-135M-Instruct GGUF {args.format}" if args.gguf else f"SmolLM2-135M shape, {args.format}"
    print(f"{weights}; {args.threads} threads; {args.steps} rounds after {args.context}-token prompts")
    stats = summary(pair_steps(spec, runners, tuple(args.batches), args.context, args.steps, args.page_bytes))
    head = " | ".join(f"batch {b}: ms (rounds faster than the first)" for b in args.batches)
    print(f"\n| variant | kernel | {head} |\n|---|---|" + "---|" * len(args.batches))
    for text, runner, per_batch in zip(args.variant, runners, stats):
        cells = " | ".join(f"{m * 1e3:.3f} ({n}/{args.steps})" for m, n in per_batch)
        print(f"| {text or '(as is)'} | {runner.kernel_note.removeprefix('fused CPU kernel ')} | {cells} |")


if __name__ == "__main__":
    main()
