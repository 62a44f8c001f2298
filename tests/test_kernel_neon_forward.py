"""The NEON build's whole forward (embedding, norms, RoPE, K/V into pages, attention, products with int8
activations, logits) under qemu-user, on tiny models of several families and weight formats.

`tests/c/forward_driver.c` takes a model (the same `KernelWeights` the x86 builds run, rows not interleaved, as the
NEON build reads them) and forwards of one sequence on stdin, and writes each forward's last-token logits. Checked:
a prompt's last-token logits against the float32 reference (the PyTorch path on the same dequantized weights), and
bit for bit the same whether the prompt runs in one forward, in uneven chunks, or its last tokens one at a time
(the NEON build's attention and products give a token the same bits in any batch). The driver also runs natively
on x86, where its logits must equal the ctypes path's bit for bit: the driver itself is checked.
Skipped only without an aarch64 cross compiler or qemu-user (.ci/run installs both).
"""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from multihead_nb.backends.native import ForwardBatch, ModelRunner, read_spec
from multihead_nb.backends.native.cpu_isa import cpu_features, cpu_isas, isa_flags
from multihead_nb.backends.native.cpu_kernel import COMMON_FLAGS, CSRC, _compiler, compile_c, load_kernel
from multihead_nb.backends.native.fused_forward import FusedForward
from multihead_nb.backends.native.kernel_weights import KernelWeights
from multihead_nb.backends.native.llama import RotaryTable
from multihead_nb.backends.native.quant import PackedMatrix
from multihead_nb.backends.native.weight_files import load_weights
from multihead_nb.memory import Arena

from helpers import neon_build

pytestmark = pytest.mark.skipif(_compiler() is None and not os.environ.get("MULTIHEAD_REQUIRE_KERNEL"),
                                reason="no C compiler here: the fused CPU kernel cannot be built")

DRIVER = Path(__file__).with_name("c") / "forward_driver.c"
TOKENS_PER_PAGE = 4
CASES = {  # family, checkpoint overrides, weight format (None: bfloat16)
    "llama-bf16": ("llama", {}, None),
    "qwen2-bias-q8_0": ("qwen2", {}, "q8_0"),
    "qwen3-qk-norm-q4_0": ("qwen3", {}, "q4_0"),
    "mistral-window-q4_1": ("mistral", {"sliding_window": 5}, "q4_1"),
    "wide-group-q5_0": ("llama", {"hidden_size": 96, "num_attention_heads": 12, "num_key_value_heads": 1}, "q5_0"),
    "head-dim-32-q8_0": ("llama", {"hidden_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}, "q8_0"),
}
INT8_KV_CASES = ("head-dim-32-q8_0",)  # head sizes the int8 K/V cache takes (multiples of 32)


def _matrix(m: PackedMatrix) -> bytes:
    return struct.pack("<3iq", m.fmt_id, m.rows, m.cols, m.row_bytes) + m.data.contiguous().numpy().tobytes()


def _vector(t: torch.Tensor | None) -> bytes:
    if t is None:
        return struct.pack("<i", 0)
    return struct.pack("<i", t.numel()) + t.detach().to(torch.float32).contiguous().numpy().tobytes()


def model_bytes(spec, weights: KernelWeights, pages: int, kv_int8: bool = False) -> bytes:
    """The driver's model input: sizes, then every matrix and vector in the order forward_driver.c reads them."""
    out = struct.pack("<11if", spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim,
                      spec.intermediate_size, spec.vocab_size, TOKENS_PER_PAGE, spec.sliding_window or 0, pages,
                      int(kv_int8), spec.rms_norm_eps)
    out += _matrix(weights.embed) + _matrix(weights.lm_head) + _vector(weights.norm)
    for L in weights.layers:
        out += _vector(L.ln1) + _vector(L.ln2) + b"".join(_matrix(L.mats[n]) for n in ("q", "k", "v"))
        out += _vector(L.bqkv) + _vector(L.q_norm) + _vector(L.k_norm) + _matrix(L.mats["o"]) + _vector(L.bo)
        out += b"".join(_matrix(L.mats[n]) for n in ("gate", "up", "down"))
    return out


def forwards_bytes(spec, ids: list[int], chunks: list[int]) -> bytes:
    """The driver's forwards: `ids` fed in consecutive chunks of these lengths, with their RoPE rows."""
    assert sum(chunks) == len(ids)
    rope = RotaryTable(spec, torch.float32, torch.device("cpu"))
    rope.ensure(len(ids))
    out, start = struct.pack("<i", len(chunks)), 0
    for n in chunks:
        pos = list(range(start, start + n))
        out += struct.pack("<i", n) + np.asarray(ids[start:start + n], np.int64).tobytes()
        out += np.asarray(pos, np.int32).tobytes()
        out += rope.cos[pos].contiguous().numpy().tobytes() + rope.sin[pos].contiguous().numpy().tobytes()
        start += n
    return out


def run_driver(cmd: list[str], model: bytes, spec, ids: list[int], chunks: list[int]) -> tuple[str, np.ndarray]:
    """(the build's isa, last-token logits of each forward [len(chunks), V])."""
    done = subprocess.run(cmd, input=model + forwards_bytes(spec, ids, chunks), capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()
    logits = np.frombuffer(done.stdout, dtype=np.float32).reshape(len(chunks), spec.vocab_size)
    return done.stderr.decode().strip().removeprefix("isa "), logits


def setup_case(tiny_ckpt, case: str, n: int, fmt: str | None = "case"):
    """(spec, weights, format, n token ids) of `case`, its weights in its own format unless `fmt` says another."""
    family, overrides, case_fmt = CASES[case]
    fmt = case_fmt if fmt == "case" else fmt
    spec = read_spec(tiny_ckpt(family, **overrides))
    weights = KernelWeights.build(spec, load_weights(spec, torch.float32 if fmt else torch.bfloat16), fmt)
    ids = torch.randint(3, spec.vocab_size, (n,), generator=torch.Generator().manual_seed(7)).tolist()
    return spec, weights, fmt, ids


def last_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """The logits [V] of the last of `ids`, prefilled in one forward on pages 0, 1, ... of the runner's arena."""
    n, tpp = len(ids), runner.tokens_per_page
    t = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    table = list(range(-(-n // tpp)))
    slots = [table[p // tpp] * tpp + p % tpp for p in range(n)]
    return runner.forward(ForwardBatch(t(ids), t(range(n)), t(slots), [n], [n], [table], t([n - 1])))[0]


def reference_logits(spec, fmt, ids: list[int]) -> torch.Tensor:
    """The float32 reference's logits of the prompt's last token (the PyTorch path, dequantized weights)."""
    runner = ModelRunner(spec, Arena(16, 1 << 17, device="cpu"), dtype=torch.float32, device="cpu", kernel=False,
                         quantize=fmt)
    return last_logits(runner, ids)


@pytest.fixture(scope="module", params=["neon+dotprod", "neon"])
def neon_forward(request):
    qemu, exe = neon_build(request.param, DRIVER)
    return request.param, [qemu, str(exe)]


@pytest.mark.parametrize("case", list(CASES))
def test_neon_forward_matches_float32_in_any_chunks(neon_forward, tiny_ckpt, case):
    isa, cmd = neon_forward
    spec, weights, fmt, ids = setup_case(tiny_ckpt, case, 41)
    model = model_bytes(spec, weights, pages=-(-len(ids) // TOKENS_PER_PAGE))
    got_isa, whole = run_driver(cmd, model, spec, ids, [41])
    assert got_isa == isa
    ref = reference_logits(spec, fmt, ids)
    err = float((torch.from_numpy(whole[0].copy()) - ref).norm() / ref.norm())
    assert err < 0.03, f"relative error {err:.4f} against the float32 reference"
    # the same prompt in uneven chunks, and its last three tokens one at a time: the same bits
    _, chunked = run_driver(cmd, model, spec, ids, [17, 1, 20, 1, 1, 1])
    assert np.array_equal(chunked[-1], whole[0])
    assert not np.array_equal(chunked[-2], whole[0])  # a different token's logits, not a copy


@pytest.mark.parametrize("kv_cache", ["bf16", "int8"])
@pytest.mark.parametrize("isa", cpu_isas())
def test_forward_driver_equals_ctypes_path(tiny_ckpt, isa, kv_cache):
    """The driver built for an instruction set this CPU runs gives that build's ctypes path (the runner's fused
    forward, 2 threads) the same logits bit for bit: what the NEON tests feed the kernel is the model a runner holds,
    its K/V pages laid out as the runner's (bfloat16, or the int8 cache). bfloat16 weights: the x86 builds read
    quantized rows interleaved, the driver plain ones."""
    machine, feats = cpu_features()
    flags = COMMON_FLAGS + isa_flags(isa, machine, feats) + ("-fopenmp", f"-I{CSRC}")
    exe = compile_c(flags, f"forward_driver-{isa}", sources=(DRIVER,))
    case = "llama-bf16" if kv_cache == "bf16" else INT8_KV_CASES[0]
    spec, weights, _, ids = setup_case(tiny_ckpt, case, 23, fmt=None)
    model = model_bytes(spec, weights, pages=-(-len(ids) // TOKENS_PER_PAGE), kv_int8=kv_cache == "int8")
    _, whole = run_driver([str(exe)], model, spec, ids, [23])
    _, chunked = run_driver([str(exe)], model, spec, ids, [9, 13, 1])
    assert np.array_equal(chunked[-1], whole[0])
    layout = spec.kv_layout(torch.bfloat16, 1 << 17, kv_cache)
    page_bytes = -(-layout.bytes_per_token * TOKENS_PER_PAGE // 256) * 256  # the driver's tokens per page
    arena = Arena(16, page_bytes, device="cpu")
    runner = ModelRunner(spec, arena, dtype=torch.bfloat16, device="cpu", kernel=isa, kv_cache=kv_cache)
    assert runner.tokens_per_page == TOKENS_PER_PAGE
    runner.fused = FusedForward(load_kernel(isa), spec, weights, arena.data, runner.layout, arena.page_bytes)
    assert np.array_equal(last_logits(runner, ids).numpy(), whole[0])


@pytest.mark.parametrize("case", INT8_KV_CASES)
def test_neon_forward_int8_kv_cache(neon_forward, tiny_ckpt, case):
    """The int8 K/V cache (kv_cache="int8") on NEON, its portable attention: the logits near the float32 reference
    (K/V rounded to int8 on top of the int8 activations), and a token's logits the same bits in any chunks."""
    _, cmd = neon_forward
    spec, weights, fmt, ids = setup_case(tiny_ckpt, case, 41)
    model = model_bytes(spec, weights, pages=-(-len(ids) // TOKENS_PER_PAGE), kv_int8=True)
    _, whole = run_driver(cmd, model, spec, ids, [41])
    ref = reference_logits(spec, fmt, ids)
    err = float((torch.from_numpy(whole[0].copy()) - ref).norm() / ref.norm())
    assert err < 0.05, f"relative error {err:.4f} against the float32 reference"
    _, bf16_kv = run_driver(cmd, model_bytes(spec, weights, pages=-(-len(ids) // TOKENS_PER_PAGE)), spec, ids, [41])
    assert not np.array_equal(bf16_kv[0], whole[0])  # the int8 cache was read, not a bfloat16 one
    _, chunked = run_driver(cmd, model, spec, ids, [17, 1, 20, 1, 1, 1])
    assert np.array_equal(chunked[-1], whole[0])
