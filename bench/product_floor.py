"""Whether a matrix product at a few token rows is bound by memory or by the CPU's arithmetic, per weight format.

    python -m bench.product_floor [--formats bf16 q8_0 q4_0 q5_0 q4_k q6_k] [--threads 2] [--tokens 1 2 3 4]
                                  [--streamed-mib 64] [--cols 1536] [--rounds 5]
                                  [--ratio-at 3] [--isa avx2]

One process, the fused kernel's build for this CPU, or `--isa`'s (`mh_matmul_test`: activations prepared as in the
forward, the threads' split of the rows, the tiles; the same code a decode step runs). Per format, two matrices of
`--cols` columns (the MLP's down projection of SmolLM2-135M has 1536):
- *resident*: 256 KiB of weights per thread (they stay in L2 between calls): the time per call is arithmetic only;
- *streamed*: `--streamed-mib` of weights (past the last-level cache): read from memory on every call, as a
  decode step reads its weights.
Each at every count of `--tokens` token rows, the fastest of many calls over `--rounds` interleaved rounds; the
resident time less that of the same call on an 8-row matrix (the threads' start, the activations' preparation),
scaled from the rows that differ to the streamed matrix's rows: the *arithmetic* of the streamed product. Reported
per format: both at each token count, the streamed product's time at `--ratio-at` (3) tokens over the first count
(1), and the lowest that ratio could be if memory and arithmetic overlapped perfectly: max(streamed at 1,
arithmetic at 3) / streamed at 1.
Where the arithmetic at 3 tokens alone exceeds the streamed time at 1, no prefetching brings these products at
batch 3 within that ratio of batch 1.
"""

from __future__ import annotations

import argparse
import ctypes
import time

import numpy as np
import torch

from multihead_nb.backends.native.cpu_kernel import KernelUnavailable, MatrixStruct, load_kernel
from multihead_nb.backends.native.quant import FORMATS, INTERLEAVED, PackedMatrix, interleave, quantize

RANDOM_BLOCK_FORMATS = ("q4_k", "q5_k", "q6_k")  # no quantizer at load: random blocks with small scales


def seed_matrix(fmt: str, rows: int, cols: int) -> PackedMatrix:
    """A `[rows, cols]` matrix in `fmt` (quantized from random values, or random K-quant blocks)."""
    g = torch.Generator().manual_seed(0)
    if fmt not in RANDOM_BLOCK_FORMATS:
        return quantize(torch.randn(rows, cols, generator=g), fmt)
    nb, bb = rows * cols // 256, FORMATS[fmt][2]
    raw = torch.randint(0, 256, (nb, bb), generator=g, dtype=torch.uint8)
    scale = (torch.rand(nb, generator=g) * 0.02 + 0.001).half().view(torch.uint8).reshape(nb, 2)
    if fmt == "q6_k":
        raw[:, 208:210] = scale
    else:
        raw[:, 0:2], raw[:, 2:4] = scale, scale
    return PackedMatrix(fmt, rows, cols, raw.reshape(rows, -1).contiguous())


def matrix_of(fmt: str, total_bytes: int, cols: int, interleaved: bool) -> PackedMatrix:
    """About `total_bytes` of `fmt` weights (rows a multiple of 64): a 64-row seed matrix's bytes repeated."""
    seed = seed_matrix(fmt, 64, cols)
    if interleaved and fmt in INTERLEAVED:
        seed = interleave(seed)
    copies = max(1, total_bytes // seed.data.numel())
    data = seed.data.repeat(copies, 1).contiguous()
    return PackedMatrix(seed.format, 64 * copies, cols, data)


def time_product(kernel, pm: PackedMatrix, T: int, threads: int, calls: int) -> float:
    """Seconds per product of `T` token rows against `pm`: the fastest of `calls` calls."""
    X = np.random.default_rng(T).standard_normal((T, pm.cols)).astype(np.float32)
    out = np.empty((T, pm.rows), dtype=np.float32)
    f32p = ctypes.POINTER(ctypes.c_float)
    W = MatrixStruct(pm.data.data_ptr(), pm.fmt_id, pm.rows, pm.cols, pm.row_bytes)
    args = (ctypes.byref(W), X.ctypes.data_as(f32p), T, out.ctypes.data_as(f32p), threads, 1)
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        rc = kernel.lib.mh_matmul_test(*args)
        best = min(best, time.perf_counter() - t)
        assert rc == 0
    return best


def measure(kernel, fmt: str, tokens: list[int], threads: int, streamed_bytes: int, cols: int, rounds: int) -> dict:
    interleaved = kernel.reads_interleaved(True)
    seed = matrix_of(fmt, 1, cols, interleaved)
    # 8 rows (one interleaved group): the call's own cost (threads' start, activations' preparation)
    tiny = PackedMatrix(seed.format, 8, cols, seed.data[:8].contiguous())
    resident = matrix_of(fmt, 256 * 1024 * threads, cols, interleaved)
    streamed = matrix_of(fmt, streamed_bytes, cols, interleaved)
    # resident less tiny is the arithmetic of the rows they differ by: scaled from those rows
    scale = streamed.data.numel() / (resident.data.numel() - tiny.data.numel())
    res, big = {}, {}
    for _ in range(rounds):  # interleaved rounds: a busy moment spoils one round, not one column
        for T in tokens:
            call = time_product(kernel, tiny, T, threads, 200)
            net = max(0.0, time_product(kernel, resident, T, threads, 200) - call) * scale
            res[T] = min(res.get(T, net), net)
            st = time_product(kernel, streamed, T, threads, 8)
            big[T] = min(big.get(T, st), st)
    return {"format": streamed.format, "streamed": big, "resident": res}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", nargs="+", default=["bf16", "q8_0", "q4_0", "q5_0", "q4_k", "q6_k"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", nargs="+", type=int, default=[1, 2, 3, 4])
    ap.add_argument("--streamed-mib", type=int, default=64)
    ap.add_argument("--cols", type=int, default=1536)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ratio-at", type=int, default=3, help="the token count whose ratio to the first is shown")
    ap.add_argument("--isa", help="the kernel build by name, e.g. avx2 (default: the best this CPU runs)")
    args = ap.parse_args(argv)
    unknown = [f for f in args.formats if f not in FORMATS or f in INTERLEAVED.values()]
    if unknown:
        known = ", ".join(k for k in FORMATS if k not in INTERLEAVED.values())
        ap.error(f"unknown format(s) {', '.join(unknown)}; formats: {known}")
    if args.tokens != sorted(set(args.tokens)) or args.tokens[0] < 1:
        ap.error(f"--tokens must be increasing positive counts, not {args.tokens}")
    torch.set_num_threads(args.threads)
    try:
        kernel = load_kernel(args.isa)
    except KernelUnavailable as e:
        ap.error(f"no kernel build {args.isa}: {e.reason}" if args.isa else f"no kernel build: {e.reason}")
    print(f"kernel build {kernel.isa}, {args.threads} threads, {args.cols} columns, "
          f"streamed matrices ~{args.streamed_mib} MiB, resident {256 * args.threads} KiB")
    at = args.ratio_at if args.ratio_at in args.tokens else args.tokens[-1]
    first = args.tokens[0]
    streamed = " | ".join(f"streamed T={T}" for T in args.tokens)
    arith = " | ".join(f"arithmetic T={T}" for T in args.tokens)
    ratios = f"streamed T={at} / T={first} | lowest T={at} / T={first}"
    print(f"\n| format (ms per product) | {streamed} | {arith} | {ratios} |")
    print("|---" * (2 * len(args.tokens) + 3) + "|")
    for fmt in args.formats:
        r = measure(kernel, fmt, args.tokens, args.threads, args.streamed_mib * 2**20, args.cols, args.rounds)
        s, a = r["streamed"], r["resident"]
        lowest = max(s[first], a[at]) / s[first]  # memory and arithmetic overlapped perfectly
        cells = " | ".join(f"{s[T] * 1e3:.3f}" for T in args.tokens) + " | "
        cells += " | ".join(f"{a[T] * 1e3:.3f}" for T in args.tokens)
        print(f"| {r['format']} | {cells} | {s[at] / s[first]:.2f} | {lowest:.2f} |", flush=True)


if __name__ == "__main__":
    main()
