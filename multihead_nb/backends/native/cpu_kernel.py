"""Build and load the fused CPU forward (`csrc/cpu_decode.c`) at run time, with the C compiler the machine has.

Owns: compiling the C source into a shared library cached on disk (keyed by the source, the flags and the
compiler), loading it with ctypes, and the ctypes mirrors of its structs. Knows nothing of models or batches
(`fused_forward.py` fills the structs).

Nothing here is required: without a C compiler, or where the build or load fails, `load_kernel` returns None and
says why in `KernelUnavailable.reason`; callers then use the PyTorch path. The OpenMP runtime the library needs
(`libgomp.so.1`) is the one torch has already loaded, so the kernel and torch share one thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "cpu_decode.c"  # includes the headers beside it
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")

_u16p = ctypes.POINTER(ctypes.c_uint16)


class LayerStruct(ctypes.Structure):
    _fields_ = [(name, _u16p) for name in
                ("ln1", "ln2", "wqkv", "bqkv", "q_norm", "k_norm", "wo", "bo", "wgu", "wdown")]


class ModelStruct(ctypes.Structure):
    _fields_ = [
        *[(n, ctypes.c_int32) for n in ("num_layers", "hidden", "heads", "kv_heads", "head_dim", "inter")],
        ("eps", ctypes.c_float),
        ("tokens_per_page", ctypes.c_int32), ("sliding_window", ctypes.c_int32),
        ("layers", ctypes.POINTER(LayerStruct)),
        ("embed", _u16p), ("final_norm", _u16p), ("cache", _u16p),
        ("page_stride", ctypes.c_int64), ("kv_stride", ctypes.c_int64), ("layer_stride", ctypes.c_int64),
    ]


class StepStruct(ctypes.Structure):
    _fields_ = [
        *[(n, ctypes.c_int32) for n in ("T", "max_pages", "max_ctx", "num_threads")],
        ("input_ids", ctypes.POINTER(ctypes.c_int64)),
        ("seq_of", ctypes.POINTER(ctypes.c_int32)), ("pos", ctypes.POINTER(ctypes.c_int32)),
        ("block_tables", ctypes.POINTER(ctypes.c_int32)),
        ("cos", ctypes.POINTER(ctypes.c_float)), ("sin", ctypes.POINTER(ctypes.c_float)),
        *[(n, ctypes.POINTER(ctypes.c_float)) for n in ("x", "qkv", "gu", "scores")],
        *[(n, _u16p) for n in ("xn", "attn", "act", "out")],
    ]


@dataclass
class CpuKernel:
    """The loaded library: `forward(model, step) -> int` (0 = ok) and which SIMD path it was built with."""

    path: Path
    lib: ctypes.CDLL

    def __post_init__(self):
        self.lib.mh_forward.argtypes = [ctypes.POINTER(ModelStruct), ctypes.POINTER(StepStruct)]
        self.lib.mh_forward.restype = ctypes.c_int
        self.lib.mh_simd_path.restype = ctypes.c_int

    @property
    def simd(self) -> str:
        return "avx512-bf16" if self.lib.mh_simd_path() == 1 else "portable"

    def forward(self, model: ModelStruct, step: StepStruct) -> int:
        return self.lib.mh_forward(ctypes.byref(model), ctypes.byref(step))


class KernelUnavailable(RuntimeError):
    """Why the fused CPU kernel cannot be used here (no compiler, a failed build or load)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _cache_dir() -> Path:
    root = os.environ.get("MULTIHEAD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "multihead_nb")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_identity() -> str:
    """What `-march=native` compiles for: a library built on one CPU must not be loaded on another (a cache
    directory shared between machines would otherwise hand out code with instructions this CPU lacks)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def build(extra_flags: tuple[str, ...] = (), cache_dir: Path | None = None) -> Path:
    """Compile `csrc/cpu_decode.c` (once per source, flags and compiler) and return the library's path."""
    cc = _compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler found (set CC, or install gcc) for the fused CPU kernel")
    flags = FLAGS + tuple(extra_flags)
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"C compiler {cc!r} does not run: {e}") from e
    sources = b"".join(p.read_bytes() for p in sorted(CSRC.iterdir()) if p.suffix in (".c", ".h"))
    key = hashlib.sha256(sources + repr((flags, version, _cpu_identity())).encode()).hexdigest()[:16]
    out_dir = cache_dir or _cache_dir()
    lib = out_dir / f"cpu_decode-{key}.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_lib = Path(tmp) / lib.name
        try:
            done = subprocess.run([cc, *flags, str(SOURCE), "-o", str(tmp_lib), "-lm"],
                                  capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelUnavailable(f"building the fused CPU kernel with {cc!r} failed: {e}") from e
        if done.returncode != 0:
            raise KernelUnavailable(f"building the fused CPU kernel with {cc!r} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp_lib, lib)  # atomic: concurrent builders each write their own temporary file
    return lib


def load_kernel(extra_flags: tuple[str, ...] = (), cache_dir: Path | None = None) -> CpuKernel:
    """Build (if needed) and load the kernel; raises `KernelUnavailable` naming the reason when it cannot."""
    import torch  # noqa: F401  (torch first: its libgomp is the one the library binds to)

    path = build(extra_flags, cache_dir)
    try:
        return CpuKernel(path, ctypes.CDLL(str(path)))
    except OSError as e:
        raise KernelUnavailable(f"loading the fused CPU kernel {path} failed: {e}") from e
