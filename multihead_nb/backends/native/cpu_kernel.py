"""Build and load the fused CPU forward (`csrc/cpu_decode.c`) at run time, once per instruction set, with the C
compiler the machine has.

Owns: compiling the C source with the flags of an instruction set this CPU runs (`cpu_isa.py` says which, best
first, and their flags) into a shared library cached on disk (keyed by the source, the flags, the compiler and the
CPU), trying the next set where one fails, loading it with ctypes, and the ctypes mirrors of its structs. Knows
nothing of models or batches (`fused_forward.py` fills the structs).

For measuring the kernel's tunables (`#ifndef` constants such as `MH_PF_AHEAD`), $MULTIHEAD_KERNEL_DEFINES adds
macros to every build (`NAME` or `NAME=VALUE`, space-separated; part of the cache key); `bench.step_pairs` sets it per
variant.

Nothing here is required: without a C compiler, or where the build or load fails, `load_kernel` raises
`KernelUnavailable` naming the reason; callers then use the PyTorch path. The OpenMP runtime the library needs
(`libgomp.so.1`) is the one torch has already loaded, so the kernel and torch share one thread pool; a compiler
without OpenMP (Apple's clang) builds it for one thread, as a last resort that says so (`CpuKernel.threaded`).
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

from .cpu_isa import ISAS, cpu_features, cpu_isas, isa_flags

CSRC = Path(__file__).with_name("csrc")
SOURCE = CSRC / "cpu_decode.c"  # includes the headers beside it
COMMON_FLAGS = ("-O3", "-std=gnu11", "-ffp-contract=off", "-Werror=implicit-function-declaration")  # no implicit FMA: one rounding order in every tile shape
OPENMP_FLAG = "-fopenmp"  # left out, as a last resort, where the compiler has no OpenMP (Apple's clang): one thread
LIB_FLAGS = (OPENMP_FLAG, "-shared", "-fPIC")
VNNI_FLAGS = ("-mavxvnni", "-mavx512vnni")  # integer products in one instruction where the CPU has it

_f32p = ctypes.POINTER(ctypes.c_float)
_i32p = ctypes.POINTER(ctypes.c_int32)


class MatrixStruct(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("format", ctypes.c_int32), ("rows", ctypes.c_int32),
                ("cols", ctypes.c_int32), ("row_bytes", ctypes.c_int64)]


class LayerStruct(ctypes.Structure):
    _fields_ = [("ln1", _f32p), ("ln2", _f32p), ("q", MatrixStruct), ("k", MatrixStruct), ("v", MatrixStruct),
                ("bqkv", _f32p), ("q_norm", _f32p), ("k_norm", _f32p), ("o", MatrixStruct), ("bo", _f32p),
                ("gate", MatrixStruct), ("up", MatrixStruct), ("down", MatrixStruct)]


class ModelStruct(ctypes.Structure):
    _fields_ = [
        *[(n, ctypes.c_int32) for n in ("num_layers", "hidden", "heads", "kv_heads", "head_dim", "inter", "vocab")],
        ("eps", ctypes.c_float),
        ("tokens_per_page", ctypes.c_int32), ("sliding_window", ctypes.c_int32),
        ("layers", ctypes.POINTER(LayerStruct)),
        ("embed", MatrixStruct), ("lm_head", MatrixStruct), ("final_norm", _f32p),
        ("cache", ctypes.POINTER(ctypes.c_uint16)),
        ("page_stride", ctypes.c_int64), ("kv_stride", ctypes.c_int64), ("layer_stride", ctypes.c_int64),
        ("int8_activations", ctypes.c_int32), ("num_pages", ctypes.c_int32),
        ("kv_int8", ctypes.c_int32), ("kv_scales", ctypes.c_int64),
    ]


class StepStruct(ctypes.Structure):
    _fields_ = [
        *[(n, ctypes.c_int32) for n in ("T", "S", "max_pages", "max_ctx", "num_threads", "num_logits")],
        ("input_ids", ctypes.POINTER(ctypes.c_int64)),
        ("seq_of", _i32p), ("pos", _i32p), ("block_tables", _i32p),
        ("cos", _f32p), ("sin", _f32p), ("logits_idx", _i32p), ("logits", _f32p), ("ctx_lens", _i32p),
        ("rope_rows", ctypes.c_int32),
    ]


# mh_forward's refusals (check_step in cpu_decode.c): nothing was read or written
BAD_SHAPE, OUT_OF_MEMORY, BAD_TOKEN_ID, BAD_POSITION, BAD_PAGE, BAD_LOGITS_ROW = -1, -2, -3, -4, -5, -6


class KernelUnavailable(RuntimeError):
    """Why the fused CPU kernel cannot be used here (no compiler, a failed build or load, an unknown ISA)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class CpuKernel:
    """The loaded library of one instruction set: `forward(model, step) -> int` (0 = ok), `isa` (what it runs)."""

    path: Path
    lib: ctypes.CDLL
    why_one_thread: str = ""  # built without OpenMP: why the build with it failed

    def __post_init__(self):
        self.lib.mh_forward.argtypes = [ctypes.POINTER(ModelStruct), ctypes.POINTER(StepStruct)]
        self.lib.mh_forward.restype = ctypes.c_int
        self.lib.mh_matmul_test.argtypes = [ctypes.POINTER(MatrixStruct), _f32p, ctypes.c_int, _f32p, ctypes.c_int,
                                            ctypes.c_int]
        self.lib.mh_matmul_test.restype = ctypes.c_int
        self.lib.mh_dequant_row.argtypes = [ctypes.POINTER(MatrixStruct), ctypes.c_int, _f32p]
        self.lib.mh_to_bf16.argtypes = [_f32p, ctypes.c_int, ctypes.POINTER(ctypes.c_uint16)]
        self.lib.mh_to_bf16.restype = None
        self.lib.mh_isa.restype = ctypes.c_char_p
        self.lib.mh_reads_interleaved.argtypes = [ctypes.c_int]
        self.lib.mh_reads_interleaved.restype = ctypes.c_int
        self.lib.mh_threaded.restype = ctypes.c_int

    @property
    def isa(self) -> str:
        """e.g. "avx2+fma", "avx2+fma+vnni", "avx512+bf16+vnni", "neon+dotprod", "scalar"."""
        return self.lib.mh_isa().decode()

    @property
    def threaded(self) -> bool:
        """Whether the forward runs on several threads (built with OpenMP); False: one thread."""
        return bool(self.lib.mh_threaded())

    def reads_interleaved(self, int8_activations: bool) -> bool:
        """Whether this build multiplies rows interleaved 8 at a time (`quant.interleave`) with these activations."""
        return bool(self.lib.mh_reads_interleaved(int(int8_activations)))

    def forward(self, model: ModelStruct, step: StepStruct) -> int:
        return self.lib.mh_forward(ctypes.byref(model), ctypes.byref(step))


# ---- the build's macros ----------------------------------------------------------------------------------------
DEFINES_ENV = "MULTIHEAD_KERNEL_DEFINES"


def kernel_defines() -> tuple[str, ...]:
    """The `-D` flags $MULTIHEAD_KERNEL_DEFINES asks for (raises `KernelUnavailable` naming a malformed one)."""
    out = []
    for item in os.environ.get(DEFINES_ENV, "").split():
        name, _, value = item.partition("=")
        if not name or not (name[0].isalpha() or name[0] == "_") or not name.replace("_", "").isalnum() or \
                "=" in item and not value:
            raise KernelUnavailable(f"${DEFINES_ENV} holds {item!r}, not a macro (NAME or NAME=VALUE)")
        out.append(f"-D{item}")
    return tuple(out)


# ---- building --------------------------------------------------------------------------------------------------
def _cache_dir() -> Path:
    root = os.environ.get("MULTIHEAD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "multihead_nb")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_identity() -> str:
    """The CPU a library is built on: `-mtune=native` tunes for it, and a cache shared between machines must not
    hand one CPU's build to another."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def kernel_source_paths() -> list[Path]:
    """The kernel's C sources (csrc's .c and .h files), in name order."""
    return [p for p in sorted(CSRC.iterdir()) if p.suffix in (".c", ".h")]


def compile_c(flags: tuple[str, ...], out_name: str, *, cc: str | None = None, sources: tuple[Path, ...] = (SOURCE,),
              cache_dir: Path | None = None) -> Path:
    """Compile `sources` with `cc` and `flags` (once per sources, flags, compiler and CPU); the output's path.
    `out_name` is the cached file's stem and suffix, e.g. "cpu_decode-avx2.so"."""
    cc = cc or _compiler()
    if cc is None:
        raise KernelUnavailable("no C compiler found (set CC, or install gcc) for the fused CPU kernel")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelUnavailable(f"C compiler {cc!r} does not run: {e}") from e
    texts = b"".join(p.read_bytes() for p in kernel_source_paths())
    texts += b"".join(p.read_bytes() for p in sources)
    key = hashlib.sha256(texts + repr((flags, cc, version, _cpu_identity())).encode()).hexdigest()[:16]
    stem, _, suffix = out_name.partition(".")
    out_dir = cache_dir or _cache_dir()
    out = out_dir / f"{stem}-{key}{'.' + suffix if suffix else ''}"
    if out.exists():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp_out = Path(tmp) / out.name
        try:
            done = subprocess.run([cc, *flags, *map(str, sources), "-o", str(tmp_out), "-lm"],
                                  capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelUnavailable(f"building the fused CPU kernel with {cc!r} failed: {e}") from e
        if done.returncode != 0:
            raise KernelUnavailable(f"building the fused CPU kernel with {cc!r} {' '.join(flags)} failed:\n"
                                    f"{done.stderr[-2000:]}")
        os.replace(tmp_out, out)  # atomic: concurrent builders each write their own temporary file
    return out


def load_kernel(isa: str | None = None, cache_dir: Path | None = None) -> CpuKernel:
    """Build (if needed) and load the kernel for `isa` (None: the best this CPU runs that builds); raises
    `KernelUnavailable` naming the reason when it cannot."""
    import torch  # noqa: F401  (torch first: its libgomp is the one the library binds to)

    machine, feats = cpu_features()
    if isa is not None and isa not in ISAS:
        raise KernelUnavailable(f"unknown instruction set {isa!r} (known: {', '.join(ISAS)})")
    defines = kernel_defines()
    candidates = [isa] if isa is not None else cpu_isas()
    reasons = [f"this CPU ({machine}) cannot run {name}" for name in candidates
               if isa_flags(name, machine, feats) is None]
    # every build with OpenMP first; then, where none built (a compiler without OpenMP: Apple's clang), for one thread
    one_thread = tuple(f for f in LIB_FLAGS if f != OPENMP_FLAG)
    for lib in (LIB_FLAGS, one_thread):
        for name in candidates:
            flags = isa_flags(name, machine, feats)
            if flags is None:
                continue
            plain = tuple(f for f in flags if f not in VNNI_FLAGS)  # a compiler without VNNI's flag (GCC < 11)
            for attempt in dict.fromkeys((flags, plain)):
                try:
                    path = compile_c(COMMON_FLAGS + defines + lib + attempt, f"cpu_decode-{name}.so",
                                     cache_dir=cache_dir)
                    why = "" if lib is LIB_FLAGS else "; ".join(dict.fromkeys(reasons))
                    return CpuKernel(path, ctypes.CDLL(str(path)), why)
                except KernelUnavailable as e:
                    reasons.append(e.reason)
                except OSError as e:
                    reasons.append(f"loading the fused CPU kernel {name} failed: {e}")
    raise KernelUnavailable("; ".join(dict.fromkeys(reasons)))
