"""Decode attention alone, on one thread (or several side by side), beside plain reads of the same bytes.

    python -m bench.attention_alone [--shape smollm2-135m] [--context 2048] [--seqs N] [--reps 5] [--isa avx2]
                                    [--page-bytes 262144] [--kv-cache int8] [--threads 2]

Builds `bench/c/attention_alone.c` against the kernel's sources with the flags of the chosen build (the best this
CPU runs by default; x86 builds only: the others have no such tasks; plus the macros of $MULTIHEAD_KERNEL_DEFINES,
as the kernel's own build takes them) and runs one token's attention over a `--context`-key context in every layer
of `--shape`, chunk by chunk by the kernel's own task functions, its pages shuffled in an arena. Reported in ns per
key (one key's K and V rows for every KV head) and the bytes' rate:
- attention, cold: `--seqs` sequences in turn, more K/V than the caches hold (a decode step finds its K/V so, the
  weights streamed since having pushed them out); by default as many as make their K/V at least 4 times the
  last-level cache (and at least 4): 4 sequences of 192 keys of SmolLM2-135M are 17.7 MB, which a 32 MiB L3 holds;
- plain reads of the same rows in the same order, cold: what the access pattern alone reads at on one thread;
- attention, hot: one layer's keys again and again (in L2 or L3): the arithmetic's own time;
- plain reads, hot.
Attention cold near reads cold: bound by the memory; near attention hot: by the arithmetic; above both: the two do
not overlap. A decode step runs such tasks on every thread at once: `--threads N` runs N threads side by side, each
on its own sequences (cold: every N-th; hot: its own), the time a key being the wall time over one thread's keys, so
that it compares with one thread's; what it adds is the threads' contention for the memory and the shared cache
(bench.decode_speed measures whole steps).
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

DRIVER = Path(__file__).with_name("c") / "attention_alone.c"
CASES = ("attention-cold", "reads-cold", "attention-hot", "reads-hot")


def build_driver(isa: str | None = None) -> tuple[Path, str]:
    """(executable, build name): the driver compiled with `isa`'s flags (default: the best this CPU runs)."""
    from multihead_nb.backends.native.cpu_isa import cpu_features, cpu_isas, isa_flags
    from multihead_nb.backends.native.cpu_kernel import COMMON_FLAGS, CSRC, OPENMP_FLAG, compile_c, kernel_defines

    machine, feats = cpu_features()
    isa = isa or cpu_isas()[0]
    flags = isa_flags(isa, machine, feats)
    if flags is None:
        raise SystemExit(f"this CPU cannot run the {isa} build (it runs: {', '.join(cpu_isas())})")
    if isa not in ("avx512", "avx2"):
        raise SystemExit(f"the {isa} build has no x86 attention tasks to time; use avx2 or avx512")
    return compile_c(COMMON_FLAGS + kernel_defines() + flags + (OPENMP_FLAG, f"-I{CSRC}"), f"attention_alone-{isa}",
                     sources=(DRIVER,)), isa


def last_level_cache_bytes(sysfs: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """The size of cpu0's highest cache level (Linux's sysfs), or None where it is not told."""
    units, best = {"K": 2**10, "M": 2**20, "G": 2**30}, None
    for index in sysfs.glob("index*"):
        try:
            level, size = int((index / "level").read_text()), (index / "size").read_text().strip()
            nbytes = int(size[:-1]) * units[size[-1]] if size[-1:] in units else int(size)
        except (OSError, ValueError):
            continue
        if nbytes > 0 and (best is None or (level, nbytes) > best):
            best = (level, nbytes)
    return best[1] if best else None


def cold_seqs(seq_bytes: int, llc_bytes: int | None) -> int:
    """Sequences whose K/V (`seq_bytes` each) are at least 4 times the last-level cache (32 MiB where it is not
    known), and at least 4."""
    target = 4 * (llc_bytes or 32 * 2**20)
    return max(4, -(-target // seq_bytes))


def run(exe: Path, shape: dict, context: int, seqs: int, reps: int, page_bytes: int,
        kv_cache: str = "bf16", threads: int = 1) -> dict[str, float]:
    """ns per key of each case (`CASES`), as the driver prints them."""
    args = [shape["num_hidden_layers"], shape["num_attention_heads"], shape["num_key_value_heads"],
            shape["head_dim"], page_bytes, context, seqs, reps, int(kv_cache == "int8"), threads]
    done = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"attention_alone failed ({done.returncode}): {done.stderr.strip()}")
    out = {}
    for line in done.stdout.splitlines():
        name, ns = line.split()
        out[name] = float(ns)
    if set(out) != set(CASES):
        raise RuntimeError(f"attention_alone printed {sorted(out)}, expected {list(CASES)}")
    return out


def main(argv=None) -> None:
    from multihead_nb.backends.native.cpu_isa import ISAS
    from multihead_nb.testing.checkpoints import SHAPES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    ap.add_argument("--context", type=int, default=2048, help="keys of the token's context")
    ap.add_argument("--seqs", type=int, help="sequences visited in turn for the cold cases (default: enough for 4 "
                    "times the last-level cache, at least 4)")
    ap.add_argument("--reps", type=int, default=5, help="passes of each case (the fastest counts)")
    ap.add_argument("--isa", choices=ISAS, help="the kernel build (default: the best this CPU runs)")
    ap.add_argument("--page-bytes", type=int, default=256 * 1024, help="the arena's page size")
    ap.add_argument("--kv-cache", choices=("bf16", "int8"), default="bf16", help="how K/V are stored (kv_cache=)")
    ap.add_argument("--threads", type=int, default=1, help="threads attending side by side, each on its own "
                    "sequences (at most 64)")
    args = ap.parse_args(argv)
    if min(args.context, args.reps, args.page_bytes) < 1 or (args.seqs is not None and args.seqs < 1):
        ap.error("--context, --seqs, --reps and --page-bytes must be positive")
    if not 1 <= args.threads <= 64 or (args.seqs is not None and args.seqs < args.threads):
        ap.error("--threads must be 1-64 and at most --seqs")
    shape = SHAPES[args.shape]
    values = 2 * shape["num_key_value_heads"] * shape["head_dim"]  # K and V rows
    key_bytes = values * 2 if args.kv_cache == "bf16" else values + values // 32 * 4  # int8: and a scale per 32
    llc = last_level_cache_bytes()
    seq_bytes = shape["num_hidden_layers"] * args.context * key_bytes
    seqs = args.seqs or -(-cold_seqs(seq_bytes, llc) // args.threads) * args.threads  # (each thread as many)
    exe, isa = build_driver(args.isa)
    ns = run(exe, shape, args.context, seqs, args.reps, args.page_bytes, args.kv_cache, args.threads)
    cache = f"{llc / 2**20:.0f} MiB last-level cache" if llc else "last-level cache not told"
    who = "one thread" if args.threads == 1 else f"{args.threads} threads side by side (ns per key of one thread)"
    print(f"{args.shape}, build {isa}, {args.kv_cache} K/V, {who}, {args.context}-key context, {seqs} "
          f"sequences cold ({seqs * seq_bytes / 2**20:.0f} MiB of K/V; {cache}); a key is {key_bytes} bytes of K "
          "and V")
    print("| case | ns per key | GB/s (all threads) |\n|---|---|---|")
    for name in CASES:
        print(f"| {name} | {ns[name]:.1f} | {args.threads * key_bytes / ns[name]:.2f} |")


if __name__ == "__main__":
    main()
