"""The arena: one `uint8` tensor on the device, allocated once, cut into pages of a fixed number of bytes.

Owns: the bytes. Knows nothing of which page is in use (that is `PagePool`) nor of how a model reads a page
(that is `KVLayout`).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError

PAGE_ALIGN = 256  # bytes; keeps every page aligned for any dtype and vector loads


class Arena:
    """`num_pages * page_bytes` bytes on `device`, allocated once at construction."""

    def __init__(self, num_pages: int, page_bytes: int, device: torch.device | str = "cpu"):
        if num_pages < 1:
            raise ConfigError(f"the arena needs at least one page, got num_pages={num_pages}")
        if page_bytes < PAGE_ALIGN or page_bytes % PAGE_ALIGN:
            raise ConfigError(f"page_bytes must be a positive multiple of {PAGE_ALIGN}, got {page_bytes}")
        self.num_pages = num_pages
        self.page_bytes = page_bytes
        self.device = torch.device(device)
        try:
            self.data = torch.zeros(num_pages * page_bytes, dtype=torch.uint8, device=self.device)
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            raise ConfigError(
                f"could not allocate an arena of {num_pages * page_bytes} bytes on {self.device}: {e}"
            ) from None

    @property
    def nbytes(self) -> int:
        return self.num_pages * self.page_bytes

    def pages(self) -> torch.Tensor:
        """The arena as `[num_pages, page_bytes]` uint8 (a view, no copy)."""
        return self.data.view(self.num_pages, self.page_bytes)

    def __repr__(self) -> str:
        return f"Arena(num_pages={self.num_pages}, page_bytes={self.page_bytes}, device={self.device})"
