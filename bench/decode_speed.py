"""Decode and prefill speed of the native runner (PyTorch path and fused kernel per weight format) against
transformers, and against the machine's memory bandwidth.

    python -m bench.decode_speed [--batch 1 3 8] [--dtype bfloat16] [--threads 2] [--steps 32]
                                 [--paths torch kernel] [--formats bf16 q8_0 q4_0] [--prefill 128] [--shape S|DIR]

In one process: the copy bandwidth (a large tensor copy, bytes read + written per second), the bytes a decode
step reads (the weights held, plus the K/V of every sequence), and the time per decode step at each batch size
for (a) `ModelRunner` on the PyTorch path, (b) `ModelRunner` with the fused CPU kernel, once per weight format
(`quantize=` at load), and (c) transformers (`model(...)` with `past_key_values`, one token per step), all on the
same checkpoint (random weights with SmolLM2-135M's shape by default). Each step feeds the argmax of the previous
logits, as greedy decoding does. Then the time to prefill one prompt of `--prefill` tokens in one forward. Prints
markdown; "% of limit" is the bandwidth limit's time per step (bytes read / copy bandwidth) over the measured
time per step.

The machine may be shared: each configuration runs `--trials` times and the fastest trial is reported.
"""

from __future__ import annotations

import argparse
import time

import torch

from .host import copy_bandwidth, read_bandwidth, wait_quiet

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


class Seqs:
    """`batch` sequences on pages interleaved in one arena, fed through `runner.forward` as the engine batches."""

    def __init__(self, runner, layout, batch: int, total: int):
        from multihead_nb.memory import PagePool

        self.runner, self.layout, self.batch = runner, layout, batch
        pages_per_seq = layout.pages_for(total)
        pool = PagePool(runner.arena.num_pages)
        self.tables = [[] for _ in range(batch)]
        for _ in range(pages_per_seq):  # pages allocated one at a time, alternating between sequences
            for s in self.tables:
                s += pool.allocate(1, "bench", "m")
        self.lens = [0] * batch

    def forward(self, tokens: list[list[int]]) -> list[int]:
        from multihead_nb.backends.native import ForwardBatch
        from multihead_nb.engine.sampler import greedy

        tpp = self.layout.tokens_per_page
        ids, pos, slots, ql, cl, li = [], [], [], [], [], []
        for i, toks in enumerate(tokens):
            start = self.lens[i]
            ids += toks
            pos += range(start, start + len(toks))
            slots += [self.tables[i][p // tpp] * tpp + p % tpp for p in range(start, start + len(toks))]
            ql.append(len(toks))
            self.lens[i] = start + len(toks)
            cl.append(self.lens[i])
            li.append(len(ids) - 1)
        t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        tables = [self.tables[i][: self.layout.pages_for(self.lens[i])] for i in range(self.batch)]
        logits = self.runner.forward(ForwardBatch(t(ids), t(pos), t(slots), ql, cl, tables, t(li)))
        return greedy(logits)  # the engine's pick (torch's argmax took 27 us at batch 1, 67 at batch 3)

    def reset(self) -> None:
        self.lens = [0] * self.batch

    def split(self, sizes: list[int]) -> list["Seqs"]:
        """These sequences as consecutive groups of `sizes` sequences, each fed on its own (this one is not used
        after: the groups take its pages and lengths)."""
        assert sum(sizes) == self.batch
        groups, i = [], 0
        for n in sizes:
            g = Seqs.__new__(Seqs)
            g.runner, g.layout, g.batch = self.runner, self.layout, n
            g.tables, g.lens = self.tables[i : i + n], self.lens[i : i + n]
            groups.append(g)
            i += n
        return groups


def make_runner(spec, dtype, page_bytes: int, num_pages: int, path: str, fmt: str, isa: str | None = None,
                kv_cache: str | None = None):
    """`path` "torch" (the PyTorch path) or "kernel" (the fused kernel, weights in `fmt`; `isa`: that instruction
    set's build, else the best this CPU runs; `kv_cache`: the runner's option)."""
    from multihead_nb.memory import Arena
    from multihead_nb.backends.native import ModelRunner

    arena = Arena(num_pages, page_bytes)
    quantize = None if fmt == "bf16" else fmt
    kernel = (isa or True) if path == "kernel" else False
    return ModelRunner(spec, arena, dtype=dtype, device="cpu", kernel=kernel, quantize=quantize, kv_cache=kv_cache)


def bench_ours(spec, runner, batch: int, context: int, steps: int, trials: int, page_bytes: int) -> float:
    """Seconds per decode step at `batch` (fastest of `trials` runs of `steps`, each started when quiet)."""
    seqs = Seqs(runner, runner.layout, batch, context + (trials + 1) * steps + 8)
    g = torch.Generator().manual_seed(0)
    state = {"next": seqs.forward([torch.randint(3, spec.vocab_size, (context,), generator=g).tolist()
                                   for _ in range(batch)])}

    def step():
        state["next"] = seqs.forward([[t] for t in state["next"]])

    return _trials(step, steps, trials)


def prefilled_groups(spec, runner, batches: tuple[int, ...], context: int, total: int,
                     page_bytes: int) -> tuple[list[Seqs], list[list[int]]]:
    """Groups of `batches` sequences (room for `total` tokens each, pages interleaved on one arena), every sequence
    prefilled with its own random `context`-token prompt in one forward: the groups and each group's next tokens."""
    seqs = Seqs(runner, runner.layout, sum(batches), total)
    g = torch.Generator().manual_seed(0)
    first = seqs.forward([torch.randint(3, spec.vocab_size, (context,), generator=g).tolist()
                          for _ in range(sum(batches))])
    nxt, at = [], 0
    for b in batches:
        nxt.append(first[at : at + b])
        at += b
    return seqs.split(list(batches)), nxt


def bench_interleaved(spec, runner, batches: tuple[int, ...], context: int, steps: int,
                      page_bytes: int) -> list[float]:
    """Seconds per decode step at each of `batches` (groups of sequences on one arena, after `context`-token
    prompts), their steps taken in turn: one step of each group per round, the first group alternating, `steps`
    rounds after 3 warm-up ones. On a VM whose speed moves by up to 2x within seconds, blocks of steps taken one
    after the other (`bench_ours` per batch) set one batch's fast moment against another's slow one; steps in turn
    see the same moments, so their ratio is what the code does (bench/README.md, "Batch 3 against batch 1")."""
    groups, nxt = prefilled_groups(spec, runner, batches, context, context + steps + 3 + 8, page_bytes)
    total = [0.0] * len(batches)
    wait_quiet()
    for r in range(steps + 3):
        for k in range(len(batches)) if r % 2 == 0 else reversed(range(len(batches))):
            t = time.perf_counter()
            nxt[k] = groups[k].forward([[x] for x in nxt[k]])
            if r >= 3:
                total[k] += time.perf_counter() - t
    return [x / steps for x in total]


def bench_prefill(spec, runner, tokens: int, trials: int, page_bytes: int) -> float:
    """Seconds to prefill one prompt of `tokens` tokens in one forward (fastest of `trials`, each when quiet)."""
    seqs = Seqs(runner, runner.layout, 1, tokens + 1)
    prompt = torch.randint(3, spec.vocab_size, (tokens,), generator=torch.Generator().manual_seed(1)).tolist()
    seqs.forward([prompt[:16]])  # warm-up
    best = float("inf")
    for _ in range(trials):
        seqs.reset()
        wait_quiet()
        t = time.perf_counter()
        seqs.forward([prompt])
        best = min(best, time.perf_counter() - t)
    return best


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
    ap.add_argument("--prefill", type=int, default=128, help="prompt tokens of the prefill measurement (0: none)")
    ap.add_argument("--page-bytes", type=int, default=256 * 1024)
    ap.add_argument("--shape", default="smollm2-135m",
                    help="a SHAPES name (random weights), a checkpoint folder or a GGUF file")
    ap.add_argument("--paths", nargs="+", default=["torch", "kernel"], choices=["torch", "kernel"])
    ap.add_argument("--formats", nargs="+", default=["bf16"],
                    help="weight formats of the kernel path: bf16 and/or quantize= formats (q8_0, q4_0, q4_1)")
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args(argv)

    from pathlib import Path

    from multihead_nb.config import parse_dtype
    from multihead_nb.backends.native import read_spec
    from multihead_nb.backends.native.cpu_isa import cpu_features, cpu_isas
    from multihead_nb.backends.native.cpu_kernel import load_kernel
    from multihead_nb.testing import shape_checkpoint

    torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype)
    path = Path(args.shape) if Path(args.shape).exists() else shape_checkpoint(
        args.shape, dtype=str(dtype).removeprefix("torch."))
    spec = read_spec(path)
    bw = copy_bandwidth()
    rbw = read_bandwidth()
    kv_per_token = spec.kv_layout(dtype, args.page_bytes).bytes_per_token
    mid_ctx = args.context + (args.trials + 2) * args.steps // 2  # average context over the timed steps
    machine, feats = cpu_features()
    isa = load_kernel().isa if "kernel" in args.paths else "-"
    print(f"shape {args.shape} ({spec.num_params() / 1e6:.1f}M params), {dtype}, {args.threads} threads, "
          f"context {args.context} + {args.trials} x {args.steps} steps")
    print(f"CPU {machine}, ISAs {', '.join(cpu_isas())}; kernel build {isa}")
    print(f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write), read bandwidth {rbw / 1e9:.1f} GB/s; "
          f"K/V {kv_per_token} bytes per token")
    configs = [(p, f) for p in args.paths for f in (args.formats if p == "kernel" else ["bf16"])]
    max_b = max(args.batch)
    num_pages = max_b * spec.kv_layout(dtype, args.page_bytes).pages_for(
        max(args.context + (args.trials + 1) * args.steps + 8, args.prefill + 1)) + 2
    runners = {c: make_runner(spec, dtype, args.page_bytes, num_pages, *c) for c in configs}
    names = [f"{p} {f}" if p == "kernel" else "PyTorch" for p, f in configs]
    wbytes = {c: r.weight_nbytes() for c, r in runners.items()}
    print("weights held: " + ", ".join(f"{n} {wbytes[c] / 1e6:.0f} MB" for n, c in zip(names, configs)))
    print()
    cols = names + ([] if args.no_transformers else ["transformers"])
    print("| batch | " + " | ".join(f"ms/step {n}" for n in cols) + " | % of limit (each) | speed-up over PyTorch |")
    print("|---|" + "---|" * (len(cols) + 2))
    fmt = lambda s: "-" if s is None else f"{s * 1e3:.1f}"  # noqa: E731
    for b in args.batch:
        times = {c: bench_ours(spec, runners[c], b, args.context, args.steps, args.trials, args.page_bytes)
                 for c in configs}
        hf = None if args.no_transformers else bench_transformers(path, b, args.context, args.steps, args.trials, dtype)
        pct = [f"{100 * (wbytes[c] + b * mid_ctx * kv_per_token) / bw / times[c]:.0f}%" for c in configs]
        base = times.get(("torch", "bf16"))
        speed = ["-" if base is None else f"{base / times[c]:.2f}x" for c in configs if c[0] == "kernel"]
        vals = [fmt(times[c]) for c in configs] + ([] if args.no_transformers else [fmt(hf)])
        print(f"| {b} | " + " | ".join(vals) + f" | {' / '.join(pct)} | {' / '.join(speed) or '-'} |", flush=True)
    if args.prefill:
        pre = {c: bench_prefill(spec, runners[c], args.prefill, args.trials, args.page_bytes) for c in configs}
        print()
        print(f"Prefill of one {args.prefill}-token prompt (one forward): " + ", ".join(
            f"{n} {pre[c] * 1e3:.0f} ms ({args.prefill / pre[c]:.0f} tokens/s)" for n, c in zip(names, configs)))


if __name__ == "__main__":
    main()
