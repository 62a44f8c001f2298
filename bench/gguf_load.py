"""Loading a GGUF model: where the time goes, for the embedded default (SmolLM2-135M-Instruct, Q4_1) or any reference.

    python -m bench.gguf_load [--model REF] [--threads 2] [--reps 3]

Measures, in one process, the median of `--reps` runs of: opening the file with `gguf.GGUFReader` and with the
native reader (`gguf_file._Reader`); dequantizing every weight with our torch dequantizers (float32 and bfloat16)
and with `gguf.quants.dequantize` (numpy, float32); the tokenizer converted by transformers (a fresh cache, once)
and loaded from the cache. Prints one table; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def _median(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    import gguf
    import torch

    import multihead_nb as mh
    from multihead_nb.backends.native import load_weights, read_spec
    from multihead_nb.backends.native.gguf_file import _Reader
    from multihead_nb.backends.native.tokenizer import gguf_tokenizer

    p = argparse.ArgumentParser(prog="python -m bench.gguf_load", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=mh.DEFAULT_MODEL)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = read_spec(args.model)
    g = spec.gguf
    rows = [
        ("open: gguf.GGUFReader", _median(lambda: gguf.GGUFReader(spec.path), args.reps)),
        ("open: native reader", _median(lambda: _Reader(spec.path), args.reps)),
        ("read_spec (open + config + checks)", _median(lambda: read_spec(args.model), args.reps)),
        ("weights: ours, float32", _median(lambda: load_weights(spec, torch.float32), args.reps)),
        ("weights: ours, bfloat16", _median(lambda: load_weights(spec, torch.bfloat16), args.reps)),
        ("weights: gguf.quants (numpy), float32",
         _median(lambda: [gguf.quants.dequantize(t.raw.reshape(t.shape[0], -1) if len(t.shape) == 2 else t.raw,
                                                 t.ggml_type) for t in g.tensors.values()], args.reps)),
    ]
    old = os.environ.get("MULTIHEAD_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["MULTIHEAD_CACHE"] = cache
        t = time.perf_counter()
        gguf_tokenizer(g)
        rows.append(("tokenizer: converted by transformers (once)", time.perf_counter() - t))
        rows.append(("tokenizer: from the cache", _median(lambda: gguf_tokenizer(g), args.reps)))
    if old is None:
        os.environ.pop("MULTIHEAD_CACHE", None)
    else:
        os.environ["MULTIHEAD_CACHE"] = old
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.model}: {spec.path.name}, {g.quantization}, {spec.num_params() / 1e6:.0f}M parameters, "
          f"{len(g.tensors)} tensors; torch threads {args.threads}, {os.cpu_count()} CPUs, load average {load:.1f}")
    print("| step | seconds |\n|---|---|")
    for name, sec in rows:
        print(f"| {name} | {sec:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
