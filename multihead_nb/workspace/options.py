"""A workspace's sizes and limits, resolved and checked once, before anything is allocated (`WorkspaceOptions`).

Owns: turning the constructor's arguments (device, pool and page sizes, dtype, batch limits, history, the CPU
kernel switch) into checked values, and the `ConfigError` that names a bad one. Knows nothing of arenas, models or
the engine: the workspace builds those from these values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends.native.cpu_isa import ISAS
from ..config import device_memory, format_size, parse_size, resolve_device, resolve_dtype
from ..errors import ConfigError


@dataclass(frozen=True)
class WorkspaceOptions:
    device: torch.device
    dtype: torch.dtype
    pool_bytes: int
    page_bytes: int
    max_batched_tokens: int
    max_seqs: int
    cpu_kernel: bool | str | None  # native models' fused CPU kernel: None where it builds, or a build (ModelRunner)
    history: int  # token rows (and bus messages) the workspace-wide logs keep

    def __post_init__(self):
        if self.pool_bytes < self.page_bytes:
            raise ConfigError(f"pool of {format_size(self.pool_bytes)} is smaller than one page of "
                              f"{format_size(self.page_bytes)}")
        have = device_memory(self.device)
        if have is not None and self.pool_bytes > have:
            raise ConfigError(f"pool of {format_size(self.pool_bytes)} is larger than the {format_size(have)} of "
                              f"memory {self.device} has; ask for less (e.g. pool='1GiB')")
        if self.cpu_kernel not in (None, True, False, *ISAS):
            raise ConfigError("cpu_kernel must be None (use it where it builds), True, False or an instruction set's "
                              f"build ({', '.join(map(repr, ISAS))}), got {self.cpu_kernel!r}")
        for name in ("max_batched_tokens", "max_seqs", "history"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")

    @classmethod
    def parse(cls, device: str, pool: str | int, page_bytes: str | int, dtype: str, **limits) -> WorkspaceOptions:
        """From the user's spellings ("auto", "1GiB", ...); `limits`: max_batched_tokens, max_seqs, cpu_kernel,
        history."""
        dev = resolve_device(device)
        return cls(dev, resolve_dtype(dtype, dev), parse_size(pool, what="pool"),
                   parse_size(page_bytes, what="page_bytes"), **limits)

    @property
    def num_pages(self) -> int:
        """Pages of `page_bytes` the pool holds."""
        return self.pool_bytes // self.page_bytes
