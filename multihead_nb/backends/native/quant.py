"""Weight matrices kept packed as the fused CPU kernel reads them: bfloat16 rows, or GGUF blocks (Q8_0, Q5_0, Q5_1,
Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) row after row, exactly as a GGUF file stores them, or the same blocks with each 8 rows
interleaved (`interleave`: x86's integer products read 8 rows at once).

Owns: the formats' names, block sizes and the kernel's ids for them; `PackedMatrix` (format, shape, the bytes);
quantizing a dense matrix at load (`quantize`, llama.cpp's reference rounding as the `gguf` package implements it:
Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, and bfloat16); wrapping a GGUF tensor's raw bytes (`from_ggml`, no copy); dequantizing (for the
PyTorch path and for tests); interleaving rows and undoing it. Knows nothing of models, files or the kernel's code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# name -> (kernel id, elements per block, bytes per block); ids mirror mh_kernel.h
FORMATS = {
    "bf16": (1, 1, 2),
    "q8_0": (2, 32, 34),
    "q4_0": (3, 32, 18),
    "q4_1": (4, 32, 20),
    "q5_0": (7, 32, 22),
    "q5_1": (8, 32, 24),
    "q4_k": (5, 256, 144),
    "q5_k": (16, 256, 176),
    "q6_k": (6, 256, 210),
    # the same blocks with each 8 rows interleaved (`interleave`): what x86's integer products read fastest
    "q8_0x8": (9, 32, 34),
    "q4_0x8": (10, 32, 18),
    "q4_1x8": (11, 32, 20),
    "q5_0x8": (12, 32, 22),
    "q5_1x8": (13, 32, 24),
    "q4_kx8": (14, 256, 144),
    "q6_kx8": (15, 256, 210),
    "q5_kx8": (17, 256, 176),
}
INTERLEAVED = {"q8_0": "q8_0x8", "q4_0": "q4_0x8", "q4_1": "q4_1x8", "q5_0": "q5_0x8", "q5_1": "q5_1x8",
               "q4_k": "q4_kx8", "q5_k": "q5_kx8", "q6_k": "q6_kx8"}
_BASE = {v: k for k, v in INTERLEAVED.items()}  # interleaved layout -> its block format
# A block's bytes as runs of fields (field bytes, fields), each field of the 8 rows put side by side when interleaved:
# half-precision d (and m / dmin), Q5's qh (as fifth-bit bytes), Q4_K's 12 scale bytes, the quants in 4-byte pieces.
_FIELDS = {"q8_0": ((2, 1), (4, 8)), "q4_0": ((2, 1), (4, 4)), "q4_1": ((2, 2), (4, 4)), "q5_0": ((2, 1), (4, 5)),
           "q5_1": ((2, 2), (4, 5)), "q4_k": ((2, 2), (1, 12), (4, 32)), "q5_k": ((2, 2), (1, 12), (4, 8), (4, 32)),
           "q6_k": ((4, 32), (4, 16), (1, 16), (2, 1))}
_FIFTH_BITS = {"q5_0": 2, "q5_1": 4}  # where a Q5 block's qh starts
QUANTIZABLE = ("q8_0", "q5_0", "q5_1", "q4_0", "q4_1", "bf16")  # what `quantize=` can make from a dense model


def ggml_type(fmt: str):
    """The `gguf.GGMLQuantizationType` of a format name."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[fmt.upper()]


def format_of_ggml(qtype) -> str | None:
    """A GGML type (enum or int) as one of FORMATS' names, or None where the kernel does not read it."""
    from gguf import GGMLQuantizationType

    name = GGMLQuantizationType(int(qtype)).name.lower()
    return name if name in FORMATS else None


def shape_problem(fmt: str, cols: int) -> str | None:
    """Why rows of `cols` elements cannot be packed in `fmt` (None: they can)."""
    if fmt not in FORMATS:
        return f"unknown weight format {fmt!r} (known: {', '.join(FORMATS)})"
    block = FORMATS[fmt][1]
    if cols % block:
        return f"rows of {cols} elements are not whole {fmt} blocks of {block}"
    return None


@dataclass
class PackedMatrix:
    """A `[rows, cols]` weight matrix; `data` is uint8 `[rows, row_bytes]`, row-major, contiguous, on the CPU;
    `mapped`: `data` is a read-only file mapping's own bytes (a GGUF file read without a copy): kept where it is, or
    copied with its file pages released (`KernelWeights.place_in_one_buffer`), never written."""

    format: str
    rows: int
    cols: int
    data: torch.Tensor
    mapped: bool = False

    def __post_init__(self):
        problem = shape_problem(self.format, self.cols)
        if not problem and self.format in _BASE and self.rows % 8:
            problem = f"{self.rows} rows are not whole groups of 8 rows ({self.format})"
        if problem:
            raise ValueError(problem)
        assert self.data.dtype == torch.uint8 and self.data.is_contiguous()
        assert tuple(self.data.shape) == (self.rows, self.row_bytes), (tuple(self.data.shape), self.row_bytes)

    @property
    def fmt_id(self) -> int:
        return FORMATS[self.format][0]

    @property
    def row_bytes(self) -> int:
        _, elems, nbytes = FORMATS[self.format]
        return self.cols // elems * nbytes

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def select_rows(self, index: torch.Tensor) -> PackedMatrix:
        """Rows `index` (a row permutation of packed rows is a gather of whole rows)."""
        if self.format in _BASE:
            return deinterleave(self).select_rows(index)
        return PackedMatrix(self.format, int(index.numel()), self.cols, self.data.index_select(0, index).contiguous())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`[rows, cols]` in `dtype`, by the `gguf` package's reference dequantization."""
        if self.format in _BASE:
            return deinterleave(self).dequantize(dtype)
        if self.format == "bf16":
            return self.data.view(torch.bfloat16).to(dtype)
        from gguf.quants import dequantize

        dense = dequantize(self.data.numpy(), ggml_type(self.format))  # [rows, cols] float32
        return torch.from_numpy(np.ascontiguousarray(dense)).reshape(self.rows, self.cols).to(dtype)


def quantize(w: torch.Tensor, fmt: str, chunk_rows: int = 4096) -> PackedMatrix:
    """A dense `[rows, cols]` matrix packed in `fmt` (one of QUANTIZABLE), a chunk of rows at a time."""
    if fmt not in QUANTIZABLE:
        raise ValueError(f"cannot quantize to {fmt!r} at load (supported: {', '.join(QUANTIZABLE)}); "
                         "K-quants come from GGUF files")
    assert w.dim() == 2
    rows, cols = w.shape
    problem = shape_problem(fmt, cols)
    if problem:
        raise ValueError(problem)
    if fmt == "bf16":
        data = w.to(torch.bfloat16).contiguous().view(torch.uint8).reshape(rows, cols * 2)  # may share w's bytes
        return PackedMatrix(fmt, rows, cols, data)
    from gguf.quants import quantize as gguf_quantize

    qtype = ggml_type(fmt)
    out = torch.empty(rows, cols // FORMATS[fmt][1] * FORMATS[fmt][2], dtype=torch.uint8)
    for r in range(0, rows, chunk_rows):
        block = w[r:r + chunk_rows].float().numpy()
        out[r:r + chunk_rows] = torch.from_numpy(np.ascontiguousarray(gguf_quantize(block, qtype)))
    return PackedMatrix(fmt, rows, cols, out)


def from_ggml(raw, qtype, shape: tuple[int, int]) -> PackedMatrix:
    """A GGUF tensor's raw bytes (numpy or torch uint8, any shape) as a packed `shape` matrix, without copying."""
    fmt = format_of_ggml(qtype)
    if fmt is None:
        raise ValueError(f"GGML type {qtype} is not one the kernel reads (it reads {', '.join(FORMATS)})")
    rows, cols = shape
    data = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(np.asarray(raw))
    data = data.view(torch.uint8).reshape(rows, -1)
    return PackedMatrix(fmt, rows, cols, data.contiguous())


def _split(pm: PackedMatrix, base: str) -> tuple[int, int, int]:
    """(groups of 8 rows, blocks per row, block bytes) of `pm` in `base`'s blocks."""
    _, elems, nbytes = FORMATS[base]
    return pm.rows // 8, pm.cols // elems, nbytes


_SHIFTS = (4 * np.arange(8)[None, :] + np.arange(4)[:, None]).astype(np.uint32)  # [byte k, bit c]: qh bit 4 c + k


def _fifth_bit_bytes(qh: np.ndarray) -> np.ndarray:
    """uint8 [..., 4] (Q5's little-endian qh) -> uint8 [..., 4]: bit c of byte k is qh's bit 4 c + k."""
    v = qh.copy().view(np.uint32)  # [..., 1]
    bits = (v[..., None] >> _SHIFTS) & 1  # [..., 1, 4, 8]
    return (bits << np.arange(8, dtype=np.uint32)).sum(-1, dtype=np.uint32).astype(np.uint8).reshape(qh.shape)


def _qh_of(h: np.ndarray) -> np.ndarray:
    """`_fifth_bit_bytes`' inverse."""
    bits = (h[..., :, None].astype(np.uint32) >> np.arange(8, dtype=np.uint32)) & 1  # [..., 4, 8]
    qh = (bits << _SHIFTS).sum((-2, -1), dtype=np.uint32)
    return np.ascontiguousarray(qh[..., None]).view(np.uint8)


def interleave(pm: PackedMatrix) -> PackedMatrix:
    """`pm` (any quantized format, rows a multiple of 8) with each 8 rows interleaved, a copy: per group of 8 rows and
    block b, each field of the 8 blocks side by side, in the block's order (`_FIELDS`): the half-precision d (then
    m, or Q4_K's dmin), for Q5 each row's qh as 4 fifth-bit bytes (bit c of byte k: element 4 c + k's fifth bit),
    the K-quants' scale bytes one by one, the quants (Q6_K: ql, then qh) in 4-byte pieces, piece c of row i at
    32 c + 4 i (mh_kernel.h; x86's mh_dot_x86_x8.h reads it). The same bytes, reordered."""
    if pm.format not in INTERLEAVED:
        raise ValueError(f"{pm.format} has no interleaved layout (those have: {', '.join(INTERLEAVED)})")
    if pm.rows % 8:
        raise ValueError(f"{pm.rows} rows are not whole groups of 8 rows")
    G, nb, bb = _split(pm, pm.format)
    blocks = pm.data.numpy().reshape(G, 8, nb, bb)  # [group, row, block, byte]
    if pm.format in _FIFTH_BITS:
        at, blocks = _FIFTH_BITS[pm.format], blocks.copy()
        blocks[..., at:at + 4] = _fifth_bit_bytes(blocks[..., at:at + 4])
    runs, start = [], 0
    for width, count in _FIELDS[pm.format]:
        run = blocks[..., start:start + width * count].reshape(G, 8, nb, count, width)
        runs.append(run.transpose(0, 2, 3, 1, 4).reshape(G, nb, 8 * width * count))  # [G, nb, field, row, bytes]
        start += width * count
    out = np.concatenate(runs, axis=2)
    return PackedMatrix(INTERLEAVED[pm.format], pm.rows, pm.cols,
                        torch.from_numpy(np.ascontiguousarray(out).reshape(pm.rows, nb * bb)))


def deinterleave(pm: PackedMatrix) -> PackedMatrix:
    """The block format's plain rows of an interleaved matrix (`interleave`'s inverse), a copy."""
    base = _BASE[pm.format]
    G, nb, bb = _split(pm, base)
    groups = pm.data.numpy().reshape(G, nb, 8 * bb)
    runs, start = [], 0
    for width, count in _FIELDS[base]:
        run = groups[..., start:start + 8 * width * count].reshape(G, nb, count, 8, width)
        runs.append(run.transpose(0, 3, 1, 2, 4).reshape(G, 8, nb, width * count))  # [G, row, nb, field, bytes]
        start += 8 * width * count
    out = np.concatenate(runs, axis=3)
    if base in _FIFTH_BITS:
        at = _FIFTH_BITS[base]
        out[..., at:at + 4] = _qh_of(out[..., at:at + 4])
    return PackedMatrix(base, pm.rows, pm.cols, torch.from_numpy(np.ascontiguousarray(out).reshape(pm.rows, nb * bb)))
