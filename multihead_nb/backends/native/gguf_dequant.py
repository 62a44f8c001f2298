"""GGUF weight blocks to dense tensors: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K, vectorized
in torch.

Owns: each block format's layout (bytes per block, elements per block, where the scales and quants sit) and
`dequantize(raw, ggml_type, shape, dtype, device)`, which turns a tensor's raw bytes (row-major blocks, as GGUF
stores them) into a dense `shape` tensor of `dtype`, a chunk of blocks at a time (the float32 intermediate never
exceeds a few MiB per chunk, whatever the tensor's size). Knows nothing of files, names or models (`gguf_file.py`
hands it bytes); the layouts are ggml's (llama.cpp `ggml-common.h`), the code is written from them here.

Every block decoder takes `uint8 [n, block_bytes]` and returns `float32 [n, block_elems]`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

CHUNK_ELEMS = 1 << 21  # elements dequantized per chunk (8 MiB of float32 intermediates)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 2] → float32 [n, 1] (little-endian IEEE half)."""
    return b.contiguous().view(torch.float16).float()


_LOW4 = 0x0F0F0F0F0F0F0F0F  # the low nibble of each byte of a 64-bit word
_BIT0 = 0x0101010101010101
_LOW2 = 0x0303030303030303


def _words(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 8k] → int64 [..., k]: bit twiddling on whole words runs ~5x faster than on single bytes."""
    return b.contiguous().view(torch.int64)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 [..., k] → uint8 [..., 2, k]: the low nibbles, then the high nibbles (k a multiple of 8)."""
    w = _words(qs)  # [..., k / 8]
    return torch.stack((w & _LOW4, (w >> 4) & _LOW4), dim=-2).view(torch.uint8)


def _q8_0(b: torch.Tensor) -> torch.Tensor:  # d: f16, qs: int8[32]
    return b.view(torch.int8)[:, 2:34].float().mul_(_f16(b[:, 0:2]))


def _q4_0(b: torch.Tensor) -> torch.Tensor:  # d: f16, qs: 16 bytes; element i < 16 is qs[i] & 15, else qs[i-16] >> 4
    q = _nibbles(b[:, 2:18]).flatten(1).float()  # [n, 32]
    return q.sub_(8.0).mul_(_f16(b[:, 0:2]))


def _q4_1(b: torch.Tensor) -> torch.Tensor:  # d, m: f16, qs: 16 bytes; w = d q + m
    q = _nibbles(b[:, 4:20]).flatten(1).float()  # [n, 32]
    return torch.addcmul(_f16(b[:, 2:4]), q, _f16(b[:, 0:2]))


def _q5(b: torch.Tensor, head: int) -> torch.Tensor:
    """The 32 unsigned 5-bit quants of Q5_0 / Q5_1 blocks (`head` bytes of half-precision fields before qh) as
    float32 [n, 32]: Q4_0's nibble order, and bit i of the little-endian 32-bit qh above element i's nibble."""
    qh = b[:, head:head + 4].contiguous().view(torch.int32).long() & 0xFFFFFFFF  # [n, 1]
    high = ((qh >> torch.arange(32, device=b.device)) & 1) << 4  # [n, 32]: element i's fifth bit is qh's bit i
    return (_nibbles(b[:, head + 4:head + 20]).flatten(1).long() | high).float()


def _q5_0(b: torch.Tensor) -> torch.Tensor:  # d: f16, qh: 4 bytes, qs: 16 bytes; w = d (q - 16)
    return _q5(b, 2).sub_(16.0).mul_(_f16(b[:, 0:2]))


def _q5_1(b: torch.Tensor) -> torch.Tensor:  # d, m: f16, qh: 4 bytes, qs: 16 bytes; w = d q + m
    return torch.addcmul(_f16(b[:, 2:4]), _q5(b, 4), _f16(b[:, 0:2]))


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 scale bytes of Q4_K/Q5_K → (scales, mins) float32 [n, 8], each 6 bits.

    Sub-blocks 0-3: the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7: the nibbles of bytes 8-11
    with the top 2 bits of bytes 0-3 (scales) and 4-7 (mins) above them."""
    s0, s1, s2 = s[:, 0:4], s[:, 4:8], s[:, 8:12]  # [n, 4] each
    sc = torch.cat((s0 & 63, (s2 & 0xF) | ((s0 >> 6) << 4)), dim=1)  # [n, 8]
    mn = torch.cat((s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)), dim=1)  # [n, 8]
    return sc.float(), mn.float()


def _q4_k(b: torch.Tensor) -> torch.Tensor:  # d, dmin: f16, scales: 12, qs: 128 (8 sub-blocks of 32)
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])  # [n, 8]
    q = _nibbles(b[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32).float()  # chunk c: sub-blocks 2c (lo), 2c+1 (hi)
    y = torch.addcmul(-(_f16(b[:, 2:4]) * mn)[:, :, None], q, (_f16(b[:, 0:2]) * sc)[:, :, None])  # [n, 8, 32]
    return y.reshape(n, 256)


def _q5_k(b: torch.Tensor) -> torch.Tensor:  # d, dmin, scales: 12, qh: 32 (bit j: sub-block j's 5th bit), qs: 128
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])  # [n, 8]
    qh = _words(b[:, 16:48])  # [n, 4]: bit j of byte l is the 5th bit of element l of sub-block j
    high = torch.stack([((qh >> j) & _BIT0) << 4 for j in range(8)], dim=1)  # [n, 8, 4] words of 0/16 bytes
    low = _nibbles(b[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 4, 8).view(torch.int64).reshape(n, 8, 4)
    q = (low | high).view(torch.uint8).float()  # [n, 8, 32]
    y = torch.addcmul(-(_f16(b[:, 2:4]) * mn)[:, :, None], q, (_f16(b[:, 0:2]) * sc)[:, :, None])  # [n, 8, 32]
    return y.reshape(n, 256)


def _q6_k(b: torch.Tensor) -> torch.Tensor:  # ql: 128, qh: 64, scales: int8[16], d: f16; two halves of 128
    n = b.shape[0]
    ql = _words(b[:, 0:128]).reshape(n, 2, 2, 4)  # [n, half, l or l+32, l] in words of 8 bytes
    qh = _words(b[:, 128:192]).reshape(n, 2, 4)  # [n, half, l]
    low = torch.cat((ql & _LOW4, (ql >> 4) & _LOW4), dim=2)  # [n, 2, 4, 4]: quarters 0..3 of each half
    high = torch.stack([((qh >> s) & _LOW2) << 4 for s in (0, 2, 4, 6)], dim=2)  # [n, 2, 4, 4]
    q = (low | high).view(torch.uint8).float().sub_(32.0)  # [n, 2, 4, 32]
    sc = b.view(torch.int8)[:, 192:208].float() * _f16(b[:, 208:210])  # [n, 16]: one per 16 elements
    y = q.reshape(n, 2, 4, 2, 16).mul_(sc.reshape(n, 2, 4, 2, 1))
    return y.reshape(n, 256)


_BLOCK_DECODERS = {T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q4_K: _q4_k,
                   T.Q5_K: _q5_k, T.Q6_K: _q6_k}
_FLOATS = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
SUPPORTED = tuple(_FLOATS) + tuple(_BLOCK_DECODERS)


def block_size(ggml_type: T) -> tuple[int, int]:
    """(elements, bytes) of one block of `ggml_type` (a float type is a block of one element)."""
    return GGML_QUANT_SIZES[ggml_type]


def tensor_nbytes(ggml_type: T, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of `shape` (torch order, rows of whole blocks) takes in `ggml_type`."""
    elems, nbytes = block_size(ggml_type)
    return math.prod(shape) // elems * nbytes


def dequantize(raw: np.ndarray | torch.Tensor, ggml_type: T, shape: tuple[int, ...], dtype: torch.dtype,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """`raw` (uint8, the tensor's bytes: row-major blocks) as a dense `shape` tensor of `dtype` on `device`.

    Raises ValueError when the type is not supported, the rows are not whole blocks, or `raw` has the wrong size."""
    ggml_type = T(ggml_type)
    if ggml_type not in SUPPORTED:
        raise ValueError(f"GGML type {ggml_type.name} is not supported (supported: "
                         f"{', '.join(t.name for t in SUPPORTED)})")
    elems, nbytes = block_size(ggml_type)
    numel = math.prod(shape)
    if shape and shape[-1] % elems:
        raise ValueError(f"rows of {shape[-1]} elements are not whole {ggml_type.name} blocks of {elems}")
    n_blocks = numel // elems
    if raw.dtype not in (np.uint8, torch.uint8) or raw.ndim != 1 or raw.shape[0] != n_blocks * nbytes:
        raise ValueError(f"{ggml_type.name} data of shape {tuple(shape)} needs {n_blocks * nbytes} bytes, "
                         f"got {tuple(raw.shape)} of {raw.dtype}")
    out = torch.empty(numel, dtype=dtype, device=device)  # [numel], reshaped at the end
    per_chunk = max(1, CHUNK_ELEMS // elems)  # blocks per chunk
    for start in range(0, n_blocks, per_chunk):
        stop = min(n_blocks, start + per_chunk)
        part = raw[start * nbytes:stop * nbytes]
        # a writable copy of the chunk (the file's map is read-only), moved to the device before decoding
        chunk = (torch.from_numpy(np.array(part)) if isinstance(part, np.ndarray) else part.clone()).to(device)
        if ggml_type in _FLOATS:
            values = chunk.view(_FLOATS[ggml_type])  # [stop - start]
        else:
            values = _BLOCK_DECODERS[ggml_type](chunk.view(stop - start, nbytes))  # [blocks, elems] float32
        out[start * elems:stop * elems] = values.reshape(-1)
    return out.view(shape)
