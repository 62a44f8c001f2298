"""The kernel's matrix products per weight format and per instruction-set build, against a float32 reference built
from the `gguf` package's reference (de)quantization, on random blocks.

- Each build this CPU runs (AVX-512, AVX2 + FMA, scalar) through ctypes; the NEON build (with and without dotprod)
  cross-compiled with Debian's gcc-aarch64-linux-gnu and run under qemu-user (skipped only where those are missing;
  .ci/run installs them); the AVX-512 and VNNI builds at least compiled here when this CPU cannot run them, and
  the VNNI products run through an exact emulation of vpdpbusd.
- The reference takes the activations as the build does (float32; bfloat16 with AVX-512 BF16; int8 per 32
  elements, scale amax / 127, on NEON and for the 32-element block formats on x86), so what remains is float32
  rounding; the cost of the activation quantization against float32 inputs is checked separately. Row dequantization (the embedding lookup) is bit-exact against `gguf.quants.dequantize`.
- A token row's result is bit-identical alone and in a batch of any size (several token blocks and tiles).
"""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.quants import quantize as gguf_quantize

from multihead_nb.backends.native.cpu_isa import FLAGS_OFF_ENV, ISAS, cpu_features, cpu_isas, isa_flags
from multihead_nb.backends.native.cpu_kernel import (COMMON_FLAGS, VNNI_FLAGS, CpuKernel, MatrixStruct, _compiler,
                                                     compile_c, load_kernel)
from multihead_nb.backends.native.quant import FORMATS, INTERLEAVED, PackedMatrix, ggml_type, interleave, quantize

from helpers import neon_build

pytestmark = pytest.mark.skipif(_compiler() is None and not os.environ.get("MULTIHEAD_REQUIRE_KERNEL"),
                                reason="no C compiler here: the fused CPU kernel cannot be built")

DRIVER = Path(__file__).with_name("c") / "kernel_driver.c"
COLS = {"bf16": 107, "q8_0": 96, "q4_0": 96, "q4_1": 96, "q5_0": 96, "q5_1": 96, "q4_k": 512, "q5_k": 512,
        "q6_k": 512}  # bf16: vector tails too
ROWS = 37
# x86: int8 activations (mh_dot_x86_int.h)
X86_INT_FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")
BLOCK_FORMATS = [f for f in FORMATS if f not in INTERLEAVED.values()]  # what every build reads
X86_ISAS = [i for i in cpu_isas() if i.startswith("avx")]


def random_matrix(fmt: str, rows: int, cols: int, seed: int) -> PackedMatrix:
    """Quantized by gguf's reference quantizer where it has one (bf16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1); K-quants as
    random blocks (any bits are a valid block) with small positive half-precision super-block scales."""
    g = torch.Generator().manual_seed(seed)
    if fmt in ("bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1"):
        w = torch.randn(rows, cols, generator=g)
        pm = quantize(w, fmt)
        if fmt != "bf16":  # the same bytes as gguf's reference quantizer
            assert np.array_equal(pm.data.numpy(), gguf_quantize(w.numpy(), ggml_type(fmt)))
        return pm
    nb, bb = rows * cols // 256, FORMATS[fmt][2]
    raw = torch.randint(0, 256, (nb, bb), generator=g, dtype=torch.uint8)
    scale = lambda: (torch.rand(nb, generator=g) * 0.02 + 0.001).half().view(torch.uint8).reshape(nb, 2)  # noqa
    if fmt in ("q4_k", "q5_k"):
        raw[:, 0:2], raw[:, 2:4] = scale(), scale()
    else:
        raw[:, 208:210] = scale()
    return PackedMatrix(fmt, rows, cols, raw.reshape(rows, -1).contiguous())


def quantized_acts(X: np.ndarray) -> np.ndarray:
    """X [T, K] float32 as the kernel's int8 activations represent it (per 32: d = amax / 127, q = rint(x 127 / amax))."""
    T, K = X.shape
    xb = X.reshape(T, K // 32, 32).astype(np.float32)
    amax = np.abs(xb).max(-1, keepdims=True)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    return (np.rint(xb * inv).astype(np.float64) * d.astype(np.float64)).reshape(T, K)


def reference(pm: PackedMatrix, X: np.ndarray, isa: str, int8: bool = True) -> np.ndarray:
    """[T, rows] float64: what the build computes (`int8`: the model's int8_activations), up to float32 rounding."""
    W = pm.dequantize().double().numpy()
    x86_int8 = isa.startswith("avx") and (int8 and pm.format in X86_INT_FORMATS or pm.format in INTERLEAVED.values())
    if pm.format != "bf16" and (isa.startswith("neon") or x86_int8):
        Xr = quantized_acts(X)
    elif pm.format == "bf16" and "bf16" in isa:  # vdpbf16ps: activations in bfloat16
        Xr = torch.from_numpy(X).to(torch.bfloat16).double().numpy()
    else:
        Xr = X.astype(np.float64)
    return Xr @ W.T


def check_product(got: np.ndarray, pm: PackedMatrix, X: np.ndarray, isa: str, int8: bool = True) -> None:
    ref = reference(pm, X, isa, int8)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert err < 2e-6, f"{pm.format} on {isa}: relative error {err:.2e} against the float32 reference"


def inputs(cols: int, T: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(T, cols, generator=g)
    X[1 % T, :32] = 0.0  # an all-zero 32-block (scale 0)
    return X.numpy()


# ---- the builds this CPU runs, through ctypes -----------------------------------------------------------------
def _matrix(pm: PackedMatrix) -> MatrixStruct:
    return MatrixStruct(pm.data.data_ptr(), pm.fmt_id, pm.rows, pm.cols, pm.row_bytes)


def product(kernel, pm: PackedMatrix, X: np.ndarray, threads: int = 2, int8: bool = True) -> np.ndarray:
    X = np.ascontiguousarray(X, dtype=np.float32)
    out = np.empty((X.shape[0], pm.rows), dtype=np.float32)
    f32p = ctypes.POINTER(ctypes.c_float)
    rc = kernel.lib.mh_matmul_test(ctypes.byref(_matrix(pm)), X.ctypes.data_as(f32p), X.shape[0],
                                   out.ctypes.data_as(f32p), threads, int(int8))
    assert rc == 0
    return out


@pytest.fixture(scope="module", params=cpu_isas())
def kernel(request):
    return load_kernel(request.param)


@pytest.mark.parametrize("int8", [True, False], ids=["int8-activations", "float32-activations"])
@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_product_per_format(kernel, fmt, int8):
    pm = random_matrix(fmt, ROWS, COLS[fmt], seed=1)
    X = inputs(pm.cols, 53, seed=2)  # 53 token rows: two token blocks, partial tiles
    full = product(kernel, pm, X, int8=int8)
    check_product(full.astype(np.float64), pm, X, kernel.isa, int8)
    for t in (0, 1, 50):  # alone, and in a batch of 3, bit for bit the same as in the batch of 53
        assert np.array_equal(product(kernel, pm, X[t:t + 1], int8=int8)[0], full[t])
    assert np.array_equal(product(kernel, pm, X[48:51], int8=int8)[1], full[49])
    assert np.array_equal(product(kernel, pm, X, threads=1, int8=int8), full)  # nor does the thread split
    # the embedding lookup's row dequantization: exactly gguf's
    row = np.empty(pm.cols, dtype=np.float32)
    ref = pm.dequantize().numpy()
    for r in (0, 17, ROWS - 1):
        kernel.lib.mh_dequant_row(ctypes.byref(_matrix(pm)), r, row.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        assert np.array_equal(row, ref[r])




def test_bfloat16_rounding_is_torchs(kernel):
    """Keys, values and vdpbf16ps inputs go to bfloat16 as torch rounds (to nearest, ties to even; NaN stays NaN),
    8 at a time on x86: ties both ways, the largest finite floats (to infinity), infinities, NaNs of both signs,
    subnormals, zeros, and random values, at lengths with and without a tail."""
    special = np.array([0x3F808000, 0x3F818000, 0x3F80_7FFF, 0x3F80_8001, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000,
                        0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x00000001, 0x80008000, 0x00000000,
                        0x80000000, 0x00FFFFFF], dtype=np.uint32).view(np.float32)
    g = torch.Generator().manual_seed(5)
    for x in (special, np.concatenate([special, torch.randn(37, generator=g).numpy() * 1e3])):
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty(x.shape[0], dtype=np.uint16)
        kernel.lib.mh_to_bf16(x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), x.shape[0],
                              out.ctypes.data_as(ctypes.POINTER(ctypes.c_uint16)))
        want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        nan = np.isnan(x)
        assert np.array_equal(out[~nan], want[~nan]), kernel.isa
        assert np.isnan(torch.from_numpy(out[nan].view(np.int16)).view(torch.bfloat16).float().numpy()).all()


@pytest.mark.parametrize("isa", X86_ISAS)
@pytest.mark.parametrize("fmt", sorted(INTERLEAVED))
def test_interleaved_product(isa, fmt):
    """x86's layouts with 8 rows interleaved: the plain blocks' products up to float32 rounding, a token row's
    result the same alone or in any batch, the thread split and the embedding lookup as exact as the plain rows'."""
    kernel = load_kernel(isa)
    plain = random_matrix(fmt, 40, COLS[fmt], seed=1)
    pm = interleave(plain)
    assert pm.format == INTERLEAVED[fmt] and pm.nbytes == plain.nbytes
    X = inputs(pm.cols, 53, seed=2)  # 53 token rows: two token blocks, partial tiles
    full = product(kernel, pm, X)
    check_product(full.astype(np.float64), pm, X, isa)
    rows = product(kernel, plain, X)
    assert np.abs(full - rows).max() <= 1e-5 * np.abs(rows).max()  # the same sums, in another order
    for t in (0, 1, 50):
        assert np.array_equal(product(kernel, pm, X[t:t + 1])[0], full[t])
    assert np.array_equal(product(kernel, pm, X[48:51])[1], full[49])
    assert np.array_equal(product(kernel, pm, X[40:53]), full[40:53])  # 13 rows: a tile of 8 (or 4) and 5 after
    assert np.array_equal(product(kernel, pm, X, threads=1), full)
    row = np.empty(pm.cols, dtype=np.float32)
    ref = plain.dequantize().numpy()
    for r in (0, 13, 39):
        kernel.lib.mh_dequant_row(ctypes.byref(_matrix(pm)), r, row.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
        assert np.array_equal(row, ref[r])


def test_interleaved_layout_round_trip_and_errors():
    """`interleave` is undone exactly by `deinterleave` (dequantize and select_rows go through it); the layouts refuse
    what they cannot hold, naming it."""
    from multihead_nb.backends.native.quant import deinterleave

    for fmt in sorted(INTERLEAVED):
        plain = random_matrix(fmt, 24, COLS[fmt], seed=5)
        pm = interleave(plain)
        assert not np.array_equal(pm.data.numpy(), plain.data.numpy())
        assert np.array_equal(deinterleave(pm).data.numpy(), plain.data.numpy())
        assert torch.equal(pm.dequantize(), plain.dequantize())
        index = torch.tensor([5, 0, 17])
        assert np.array_equal(pm.select_rows(index).data.numpy(), plain.select_rows(index).data.numpy())
    with pytest.raises(ValueError, match="bf16 has no interleaved layout"):
        interleave(random_matrix("bf16", 8, 32, seed=6))
    with pytest.raises(ValueError, match="12 rows are not whole groups of 8"):
        interleave(random_matrix("q4_0", 12, 32, seed=6))
    with pytest.raises(ValueError, match="12 rows are not whole groups of 8 rows \\(q8_0x8\\)"):
        PackedMatrix("q8_0x8", 12, 32, torch.zeros(12, 34, dtype=torch.uint8))


def test_who_reads_interleaved_rows():
    """Only x86 builds with int8 activations are handed interleaved rows (the others have no kernel for them)."""
    for isa in cpu_isas():
        kernel = load_kernel(isa)
        assert kernel.reads_interleaved(True) == isa.startswith("avx")
        assert not kernel.reads_interleaved(False)


@pytest.mark.parametrize("isa", [i for i in cpu_isas() if i != "scalar"])  # the scalar build: float32 only
@pytest.mark.parametrize("fmt", X86_INT_FORMATS)
def test_activation_quantization_cost(isa, fmt):
    """What int8 activations (x86's integer products, as NEON's) cost against float32 inputs on random data: under
    1% of the product; with float32 activations only float32 rounding is left."""
    kernel = load_kernel(isa)
    pm = random_matrix(fmt, 64, 256, seed=3)
    X = inputs(256, 8, seed=4)
    exact = X.astype(np.float64) @ pm.dequantize().double().numpy().T
    err = lambda got: np.linalg.norm(got - exact) / np.linalg.norm(exact)  # noqa: E731
    assert 1e-4 < err(product(kernel, pm, X, int8=True)) < 0.01
    assert err(product(kernel, pm, X, int8=False)) < 2e-6


# ---- NEON under qemu ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["neon+dotprod", "neon"])
def neon_driver(request):
    qemu, exe = neon_build(request.param, DRIVER)
    return request.param, qemu, exe


def run_neon(driver, mode: int, pm: PackedMatrix, X: np.ndarray | None = None) -> np.ndarray:
    isa, qemu, exe = driver
    T = 0 if X is None else X.shape[0]
    stdin = struct.pack("<5iq", mode, pm.fmt_id, pm.rows, pm.cols, T, pm.row_bytes) + pm.data.numpy().tobytes()
    if X is not None:
        stdin += np.ascontiguousarray(X, dtype=np.float32).tobytes()
    done = subprocess.run([qemu, str(exe)], input=stdin, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr.decode().strip() == f"isa {isa}"
    out = np.frombuffer(done.stdout, dtype=np.float32)
    return out.reshape(T, pm.rows) if mode == 0 else out.reshape(pm.rows, pm.cols)


@pytest.mark.parametrize("fmt", BLOCK_FORMATS)
def test_neon_product_per_format(neon_driver, fmt):
    pm = random_matrix(fmt, ROWS, COLS[fmt], seed=1)
    X = inputs(pm.cols, 53, seed=2)
    full = run_neon(neon_driver, 0, pm, X)
    check_product(full.astype(np.float64), pm, X, neon_driver[0])
    assert np.array_equal(run_neon(neon_driver, 0, pm, X[50:51])[0], full[50])  # alone = in the batch
    assert np.array_equal(run_neon(neon_driver, 1, pm), pm.dequantize().numpy())


def test_neon_activation_quantization_cost(neon_driver):
    """What NEON's int8 activations cost against float32 inputs on random data: well under 1% of the product."""
    pm = random_matrix("q8_0", 64, 256, seed=3)
    X = inputs(256, 8, seed=4)
    exact = X.astype(np.float64) @ pm.dequantize().double().numpy().T
    got = run_neon(neon_driver, 0, pm, X)
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 0.01


# ---- VNNI (vpdpbusd) where this CPU has none: its products through an exact AVX2 emulation ------------------------
@pytest.mark.skipif("avx2" not in X86_ISAS, reason="needs an AVX2 CPU")
@pytest.mark.parametrize("fmt", X86_INT_FORMATS)
def test_vnni_products(fmt):
    """The VNNI build's integer products (one vpdpbusd per 4-byte piece instead of vpmaddubsw + vpmaddwd; Q8_0 as
    q + 128 less 128 times the activations' sum instead of |q| against sign-flipped activations) form the same
    integers, so its results are bit-identical to the AVX2 build's without VNNI, in the row layout and interleaved.
    QEMU has no VNNI (10.0 neither), so here the instruction is emulated (MH_VNNI_EMULATE): what is tested is
    everything the VNNI path computes around it; on a CPU with AVX-VNNI the real AVX2 + VNNI build is compared too."""
    machine, feats = cpu_features()
    lib = COMMON_FLAGS + ("-fopenmp", "-shared", "-fPIC")
    without = isa_flags("avx2", machine, feats - {"avx_vnni"})  # vpmaddubsw, whatever this CPU has
    path = compile_c(lib + without + ("-DMH_VNNI_EMULATE",), "cpu_decode-vnni-emulated.so")
    vnni = CpuKernel(path, ctypes.CDLL(str(path)))
    path = compile_c(lib + without, "cpu_decode-avx2-without-vnni.so")
    avx2 = CpuKernel(path, ctypes.CDLL(str(path)))
    assert vnni.isa == "avx2+fma+vnni-emulated" and avx2.isa == "avx2+fma"
    builds = [vnni] + [load_kernel(i) for i in X86_ISAS if "vnni" in load_kernel(i).isa]  # and the real ones here
    plain = random_matrix(fmt, 40, COLS[fmt], seed=1)
    X = inputs(plain.cols, 11, seed=2)
    for pm in (plain, interleave(plain)):
        want = product(avx2, pm, X)
        for k in builds:
            got = product(k, pm, X)
            if k.isa.startswith("avx2"):  # AVX-512's interleaved tiles sum in another order (mh_dot_x86_x8z.h)
                assert np.array_equal(got, want), (pm.format, k.isa)
            check_product(got.astype(np.float64), pm, X, k.isa)
            assert np.array_equal(product(k, pm, X[7:8])[0], got[7])


@pytest.mark.skipif("avx2" not in X86_ISAS, reason="needs an AVX2 CPU")
def test_vnni_flag_unknown_to_the_compiler(tmp_path, monkeypatch):
    """On a CPU with AVX-VNNI, a compiler that does not know -mavxvnni (GCC < 11) still gives the AVX2 build."""
    import multihead_nb.backends.native.cpu_kernel as ck

    machine, feats = cpu_features()
    monkeypatch.setattr(ck, "cpu_features", lambda: (machine, feats | {"avx_vnni"}))
    log, cc = tmp_path / "calls", tmp_path / "old-cc"
    cc.write_text(f'#!/bin/sh\necho "$*" >> {log}\ncase " $* " in *" -mavxvnni "*) '
                  f'echo "cc: error: unrecognized command-line option \'-mavxvnni\'" >&2; exit 1;; esac\n'
                  f'exec {_compiler()} "$@"\n')
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    kernel = load_kernel("avx2", cache_dir=tmp_path)
    assert kernel.isa == "avx2+fma"
    builds = [line for line in log.read_text().splitlines() if "--version" not in line]
    assert len(builds) == 2 and "-mavxvnni" in builds[0] and "-mavxvnni" not in builds[1]


def test_cpu_flags_off_hides_features(monkeypatch):
    """$MULTIHEAD_CPU_FLAGS_OFF hides CPU features from the choice of build (to measure an older CPU's build here):
    without VNNI's flags no build compiles vpdpbusd in, without avx512f the best build is not AVX-512."""
    machine, feats = cpu_features()
    monkeypatch.setenv(FLAGS_OFF_ENV, "avx_vnni, avx512_vnni avx512f")
    _, hidden = cpu_features()
    assert hidden == feats - {"avx_vnni", "avx512_vnni", "avx512f"}
    assert "avx512" not in cpu_isas()
    if machine in ("x86_64", "amd64") and "avx2" in feats:
        assert not any(f in VNNI_FLAGS for f in isa_flags("avx2", machine, hidden))
    monkeypatch.delenv(FLAGS_OFF_ENV)
    assert cpu_features() == (machine, feats)


def test_far_attention_fetches_only_where_prefetcht1_stops_at_l2():
    """The AVX2 build asks the attention's far fetches into the L2 (MH_PREFETCH_L2) only on CPUs whose prefetcht1
    stops there: Intel's and AMD's from Zen 4 (family 25 with AVX-512, later families), not Zen 1-3 (families 23 and
    25 without AVX-512), whose prefetcht1 fills the L1 too."""
    from multihead_nb.backends.native.cpu_isa import PREFETCH_T1_L2, prefetch_t1_stops_at_l2

    assert prefetch_t1_stops_at_l2("GenuineIntel", 6, {"avx2"})
    assert prefetch_t1_stops_at_l2("AuthenticAMD", 25, {"avx2", "avx512f"})  # Zen 4
    assert prefetch_t1_stops_at_l2("AuthenticAMD", 26, {"avx2"})  # Zen 5 (its AVX-512 hidden or not)
    assert not prefetch_t1_stops_at_l2("AuthenticAMD", 25, {"avx2"})  # Zen 3
    assert not prefetch_t1_stops_at_l2("AuthenticAMD", 23, {"avx2"})  # Zen 1 and 2
    assert not prefetch_t1_stops_at_l2("HygonGenuine", 24, {"avx2"})
    avx2 = frozenset({"avx2", "fma", "f16c"})
    assert "-DMH_PREFETCH_L2=1" in isa_flags("avx2", "x86_64", avx2 | {PREFETCH_T1_L2})
    assert not any("MH_PREFETCH_L2" in f for f in isa_flags("avx2", "x86_64", avx2))


# ---- AVX-512 where this CPU cannot run it: it must at least compile --------------------------------------------
def test_every_x86_build_compiles():
    machine, _ = cpu_features()
    if machine not in ("x86_64", "amd64"):
        pytest.skip("not an x86 machine")
    plain = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"})
    for feats in (plain, plain | {"avx_vnni", "avx512_vnni", "prefetch_t1_l2"}):
        for isa in ("avx512", "avx2"):
            flags = isa_flags(isa, machine, feats)
            assert ("avx_vnni" in feats) == any(f in VNNI_FLAGS for f in flags)
            lib = compile_c(COMMON_FLAGS + ("-fopenmp", "-shared", "-fPIC") + flags, f"cpu_decode-check-{isa}.so")
            assert lib.exists()
    assert set(cpu_isas()) <= set(ISAS) and cpu_isas()[-1] == "scalar"
