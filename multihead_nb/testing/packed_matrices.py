"""Random weight matrices in the kernel's packed formats, for its tests and its benchmarks.

Owns `random_packed`: a format quantize= can make is quantized from random normal values (the bytes gguf's reference
quantizer writes); a K-quant, which has no quantizer at load, is random blocks (any bits are a valid block) with
small positive half-precision super-block scales, so products stay finite. Knows nothing of the kernel.
"""

from __future__ import annotations

import torch

from ..backends.native.quant import FORMATS, QUANTIZABLE, PackedMatrix, quantize

_SCALE_BYTES = {"q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}  # where a K-quant block's fp16 scales start


def random_packed(fmt: str, rows: int, cols: int, seed: int = 0) -> PackedMatrix:
    """A `[rows, cols]` matrix in `fmt` (a block format of FORMATS, or bf16), reproducible from `seed`."""
    g = torch.Generator().manual_seed(seed)
    if fmt in QUANTIZABLE:
        return quantize(torch.randn(rows, cols, generator=g), fmt)
    if fmt not in _SCALE_BYTES:
        raise ValueError(f"no random {fmt!r} matrices (formats: {', '.join(QUANTIZABLE + tuple(_SCALE_BYTES))})")
    nb, bb = rows * cols // 256, FORMATS[fmt][2]
    raw = torch.randint(0, 256, (nb, bb), generator=g, dtype=torch.uint8)
    for at in _SCALE_BYTES[fmt]:
        raw[:, at:at + 2] = (torch.rand(nb, generator=g) * 0.02 + 0.001).half().view(torch.uint8).reshape(nb, 2)
    return PackedMatrix(fmt, rows, cols, raw.reshape(rows, -1).contiguous())
