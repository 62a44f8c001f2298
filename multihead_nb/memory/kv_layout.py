"""A model's view of the arena's pages as K/V storage.

Owns: the arithmetic from a model's shape to `tokens_per_page`, and the tensor views of the arena through which
the model reads and writes its keys and values. Knows nothing of which pages belong to whom (`PagePool`).

Inside a page the bytes are `[2, layers, tokens_per_page, kv_heads, head_dim]` in the model's dtype; the bytes
past that are unused. A layer's keys over all pages are one strided view of the arena, no copy.
With `dtype=torch.int8` (a model loaded with `kv_cache="int8"`, read by the fused CPU kernel only) the same
elements are int8, followed from `scales_offset` by one float32 scale per 32 of them in the same order (a value is
its int8 times its scale; llama.cpp's q8_0 blocks with float32 scales): 1.125 bytes an element instead of
bfloat16's 2.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..config import ceil_div
from ..errors import ConfigError
from .arena import Arena


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    page_bytes: int

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "page_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"KVLayout.{name} must be positive, got {getattr(self, name)}")
        if self.int8 and self.head_dim % 32:
            raise ConfigError(f"an int8 K/V cache needs a head_dim that is a multiple of 32; this model's is "
                              f"{self.head_dim}")
        if self.tokens_per_page < 1:
            raise ConfigError(
                f"a page of {self.page_bytes} bytes cannot hold one token of this model, which needs "
                f"{self.bytes_per_token} bytes of K/V per token ({self.num_layers} layers x {self.num_kv_heads} "
                f"KV heads x {self.head_dim} head dim x 2 x "
                + ("1 byte, and a float32 scale per 32" if self.int8 else f"{self.itemsize} bytes")
                + "); use a larger page_bytes"
            )

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def int8(self) -> bool:
        """Whether K/V are int8 with a float32 scale per 32 values (the module's docstring)."""
        return self.dtype == torch.int8

    @property
    def elements_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @property
    def bytes_per_token(self) -> int:
        if self.int8:
            return self.elements_per_token + self.elements_per_token // 32 * 4
        return self.elements_per_token * self.itemsize

    @property
    def scales_offset(self) -> int:
        """int8 layouts: the byte of a page where the scales start (after every token's int8 elements)."""
        return self.tokens_per_page * self.elements_per_token

    @cached_property  # asked for on every step of every request: computed once
    def tokens_per_page(self) -> int:
        return self.page_bytes // self.bytes_per_token

    @property
    def used_bytes(self) -> int:
        """Bytes of a page that hold K/V (the rest of the page is unused by this model)."""
        return self.tokens_per_page * self.bytes_per_token

    def pages_for(self, num_tokens: int) -> int:
        return ceil_div(num_tokens, self.tokens_per_page)

    def view(self, arena: Arena) -> torch.Tensor:
        """All pages as `[num_pages, 2, layers, tokens_per_page, kv_heads, head_dim]` (a view, no copy)."""
        if arena.page_bytes != self.page_bytes:
            raise ConfigError(f"layout is for pages of {self.page_bytes} bytes, arena has {arena.page_bytes}")
        if self.int8:
            raise ConfigError("an int8 K/V cache is read by the fused CPU kernel only; it has no tensor view")
        raw = arena.pages()[:, : self.used_bytes]  # [P, used_bytes] uint8, row stride page_bytes
        typed = raw.view(self.dtype)  # [P, used_bytes / itemsize]
        out = typed.view(
            arena.num_pages, 2, self.num_layers, self.tokens_per_page, self.num_kv_heads, self.head_dim
        )
        assert out.data_ptr() == arena.data.data_ptr()
        return out

    def layer_views(self, arena: Arena) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, (keys, values), each `[num_pages, tokens_per_page, kv_heads, head_dim]` strided views."""
        full = self.view(arena)
        return [(full[:, 0, layer], full[:, 1, layer]) for layer in range(self.num_layers)]
