"""Decode speed of the native runner against transformers, and against the machine's memory bandwidth.

    python -m bench.decode_speed [--batch 1 3 8] [--dtype bfloat16] [--threads 2] [--steps 32]

In one process: the copy bandwidth (a large tensor copy, bytes read + written per second), the bytes a decode
step reads (all weights once, plus the K/V of every sequence), and the time per decode step at each batch size
for (a) `ModelRunner` and (b) transformers (`model(...)` with `past_key_values`, one token per step), both on the
same random-weight checkpoint with SmolLM2-135M's shape. Each step feeds the argmax of the previous logits, as
greedy decoding does. Prints a markdown table; "% of limit" is the bandwidth limit's time per step
(bytes read / copy bandwidth) over the measured time per step.

The machine may be shared: each configuration runs `--trials` times and the fastest trial is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 9) -> float:
    """Bytes per second of `dst.copy_(src)`, counting the bytes read and written (STREAM's convention);
    the median of `repeats` copies after one that faults the pages in."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def read_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 9) -> float:
    """Bytes per second of `x.sum()` over a large bfloat16 tensor (reads only; what decode does to weights)."""
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times)


def _busy_fraction(interval: float = 0.25) -> float | None:
    """The share of all CPUs busy over `interval` seconds (/proc/stat; None where there is none)."""
    try:
        def read():
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            return sum(v), v[3] + v[4]  # total, idle + iowait

        t0, i0 = read()
        time.sleep(interval)
        t1, i1 = read()
        return 1 - (i1 - i0) / max(1, t1 - t0)
    except (OSError, ValueError, IndexError):
        return None


def wait_quiet(max_wait: float = 20.0, busy: float = 0.15) -> None:
    """Wait (at most `max_wait` s) until other processes leave the CPUs idle: on a shared 2-core machine a busy
    neighbour stalls every parallel region of a 2-thread run, and timings would measure the neighbour."""
    end = time.monotonic() + max_wait
    while time.monotonic() < end:
        f = _busy_fraction()
        if f is None or f < busy:
            return


def _trials(step, steps: int, trials: int) -> float:
    """Seconds per step: the fastest of `trials` runs of `steps` steps (after 3 warm-up steps), each trial
    started when the machine is quiet."""
    for _ in range(3):
        step()
    out = []
    for _ in range(trials):
        wait_quiet()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        out.append((time.perf_counter() - t) / steps)
    return min(out)


def bench_ours(path, batch: int, context: int, steps: int, trials: int, dtype, page_bytes: int) -> float:
    from multihead_nb.memory import Arena, PagePool
    from multihead_nb.backends.native import ForwardBatch, ModelRunner, read_spec

    spec = read_spec(path)
    layout = spec.kv_layout(dtype, page_bytes)
    tpp = layout.tokens_per_page
    total = context + (trials + 1) * steps + 8
    pages_per_seq = layout.pages_for(total)
    arena = Arena(batch * pages_per_seq + 1, page_bytes)
    pool = PagePool(arena.num_pages)
    runner = ModelRunner(spec, arena, dtype=dtype, device="cpu")
    g = torch.Generator().manual_seed(0)
    seqs = []
    for i in range(batch):  # pages allocated one at a time, alternating between sequences
        seqs.append([])
    for _ in range(pages_per_seq):
        for s in seqs:
            s += pool.allocate(1, "bench", "m")
    lens = [0] * batch

    def forward(tokens: list[list[int]]):
        ids, pos, slots, ql, cl, li = [], [], [], [], [], []
        for i, toks in enumerate(tokens):
            start = lens[i]
            ids += toks
            pos += range(start, start + len(toks))
            slots += [seqs[i][p // tpp] * tpp + p % tpp for p in range(start, start + len(toks))]
            ql.append(len(toks))
            lens[i] = start + len(toks)
            cl.append(lens[i])
            li.append(len(ids) - 1)
        t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        tables = [seqs[i][: layout.pages_for(lens[i])] for i in range(batch)]
        logits = runner.forward(ForwardBatch(t(ids), t(pos), t(slots), ql, cl, tables, t(li)))
        return logits.argmax(-1).tolist()

    prompts = [torch.randint(3, spec.vocab_size, (context,), generator=g).tolist() for _ in range(batch)]
    nxt = forward(prompts)
    state = {"next": nxt}

    def step():
        state["next"] = forward([[t] for t in state["next"]])

    return _trials(step, steps, trials)


def bench_transformers(path, batch: int, context: int, steps: int, trials: int, dtype) -> float:
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, context), generator=g)
    state = {}
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        state["pkv"], state["next"] = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

        def step():
            out = model(input_ids=state["next"], past_key_values=state["pkv"], use_cache=True)
            state["pkv"], state["next"] = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            state["next"].tolist()  # the host needs the token, as in generation

        return _trials(step, steps, trials)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 3, 8])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per trial")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--context", type=int, default=128, help="prompt tokens per sequence before decoding")
    ap.add_argument("--page-bytes", type=int, default=256 * 1024)
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args(argv)

    from multihead_nb.config import parse_dtype
    from multihead_nb.backends.native import read_spec
    from multihead_nb.testing import shape_checkpoint

    torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    path = shape_checkpoint(args.shape, dtype=str(dtype).removeprefix("torch."))
    spec = read_spec(path)
    bw = copy_bandwidth()
    rbw = read_bandwidth()
    wbytes = spec.weight_bytes(dtype)
    kv_per_token = spec.kv_layout(dtype, args.page_bytes).bytes_per_token
    mid_ctx = args.context + (args.trials + 2) * args.steps // 2  # average context over the timed steps
    print(f"shape {args.shape} ({spec.num_params() / 1e6:.1f}M params), {dtype}, {args.threads} threads, "
          f"context {args.context} + {args.trials} x {args.steps} steps")
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write), read bandwidth {rbw / 1e9:.1f} GB/s; weights {wbytes / 1e6:.0f} MB; "
          f"K/V {kv_per_token} bytes per token")
    print()
    print("| batch | ms/step ours | ms/step transformers | tokens/s ours | tokens/s transformers "
          "| % of limit ours | % of limit transformers | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for b in args.batch:
        step_bytes = wbytes + b * mid_ctx * kv_per_token
        limit_s = step_bytes / bw  # time per step at the bandwidth limit
        ours = bench_ours(path, b, args.context, args.steps, args.trials, dtype, args.page_bytes)
        hf = None if args.no_transformers else bench_transformers(path, b, args.context, args.steps, args.trials, dtype)
        fmt = lambda s: "-" if s is None else f"{s * 1e3:.1f}"  # noqa: E731
        tps = lambda s: "-" if s is None else f"{b / s:.0f}"  # noqa: E731
        pct = lambda s: "-" if s is None else f"{100 * limit_s / s:.0f}%"  # noqa: E731
        speed = "-" if hf is None else f"{hf / ours:.2f}x"
        print(f"| {b} | {fmt(ours)} | {fmt(hf)} | {tps(ours)} | {tps(hf)} | {pct(ours)} | {pct(hf)} | {speed} |",
              flush=True)


if __name__ == "__main__":
    main()
