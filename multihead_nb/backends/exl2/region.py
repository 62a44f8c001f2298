"""An EXL2 model's region of the arena: a contiguous run of arena pages viewed as ExLlamaV2's per-layer cache.

ExLlamaV2's paged attention (flash-attn's `flash_attn_with_kvcache` with a block table) reads, per layer, one dense
contiguous fp16 tensor of keys and one of values, each `[1, N * 256, kv_heads, head_dim]`: N pages of 256 tokens.
It cannot read our scattered arena pages, so the pool grants an EXL2 model a *contiguous* run of arena pages (a
region) and the region's bytes are cut, layer by layer, into those tensors:

    region bytes = [layers, 2 (K, V), N * 256, kv_heads, head_dim] fp16, then unused tail bytes

Owns: the byte math (`bytes_per_exl2_page`, `region_pages_for`, `exl2_pages_in`), the views of the arena (no copy)
that become `cache.key_states[i]` / `cache.value_states[i]`, the accounting map from each 256-token EXL2 page to the
arena pages it is charged to. The pool reserves the region itself (`PagePool.reserve_run`).

Does not know: exllamav2 (nothing here imports it; it all runs on the CPU), which head holds which EXL2 page (a
page-id allocator over the region's N pages does, e.g. a second `PagePool(N)`), nor requests or batches.

Accounting: physically an EXL2 page's bytes are spread over every layer's K and V tensors, so no arena page belongs
to one EXL2 page. For the page map we *charge* EXL2 page j the region bytes `[j * B, (j + 1) * B)`, B =
`bytes_per_exl2_page`: the region's arena pages are split evenly, in order, over the N EXL2 pages (an arena page
on a boundary is charged to two). `ws.pages()` can then show an arena page of the region as owned by the heads
holding the EXL2 pages charged to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch

from ...config import ceil_div
from ...errors import ConfigError
from ...memory import Arena

EXL2_PAGE_TOKENS = 256  # exllamav2's PAGED_PAGE_SIZE; flash-attn's paged KV needs a multiple of 256
EXL2_DTYPE = torch.float16  # ExLlamaV2Cache (the FP16 cache) is the one whose tensors we can supply
_ITEMSIZE = 2


def bytes_per_exl2_page(num_layers: int, kv_heads: int, head_dim: int) -> int:
    """Bytes of K and V of one 256-token EXL2 page over all layers: `2 * layers * 256 * kv_heads * head_dim * 2`."""
    for name, v in (("num_layers", num_layers), ("kv_heads", kv_heads), ("head_dim", head_dim)):
        if v < 1:
            raise ConfigError(f"{name} must be positive, got {v}")
    return 2 * num_layers * EXL2_PAGE_TOKENS * kv_heads * head_dim * _ITEMSIZE


def region_pages_for(num_layers: int, kv_heads: int, head_dim: int, n_pages: int, arena_page_bytes: int) -> int:
    """Arena pages a region needs to hold `n_pages` EXL2 pages (of 256 tokens each)."""
    if n_pages < 1:
        raise ConfigError(f"a region needs at least one EXL2 page, got {n_pages}")
    need = n_pages * bytes_per_exl2_page(num_layers, kv_heads, head_dim)
    return ceil_div(need, arena_page_bytes)


def exl2_pages_in(num_layers: int, kv_heads: int, head_dim: int, n_arena_pages: int, arena_page_bytes: int) -> int:
    """EXL2 pages (256 tokens each) that fit in `n_arena_pages` arena pages."""
    return n_arena_pages * arena_page_bytes // bytes_per_exl2_page(num_layers, kv_heads, head_dim)


@dataclass(frozen=True)
class Exl2Region:
    """Arena pages `[first_page, first_page + num_arena_pages)` holding one EXL2 model's FP16 cache."""

    first_page: int
    num_arena_pages: int
    arena_page_bytes: int
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self):
        if self.first_page < 0 or self.num_arena_pages < 1:
            raise ConfigError(f"bad region: first_page={self.first_page}, num_arena_pages={self.num_arena_pages}")
        if self.num_exl2_pages < 1:
            raise ConfigError(
                f"a region of {self.num_arena_pages} arena pages ({self.nbytes} bytes) cannot hold one 256-token "
                f"EXL2 page, which needs {self.bytes_per_exl2_page} bytes ({self.num_layers} layers x "
                f"{self.num_kv_heads} KV heads x {self.head_dim} head dim x 256 tokens x 2 (K, V) x 2 bytes); "
                f"grant it at least {region_pages_for(self.num_layers, self.num_kv_heads, self.head_dim, 1, self.arena_page_bytes)} pages"
            )

    @classmethod
    def from_pages(cls, pages: Sequence[int], arena_page_bytes: int, num_layers: int, num_kv_heads: int,
                   head_dim: int) -> "Exl2Region":
        """The region over `pages`, which must be consecutive ascending page ids."""
        pages = [int(p) for p in pages]
        if not pages:
            raise ConfigError("an EXL2 region needs at least one arena page")
        if pages != list(range(pages[0], pages[0] + len(pages))):
            raise ConfigError(f"an EXL2 region must be a contiguous run of arena pages, got {pages[:8]}...")
        return cls(pages[0], len(pages), arena_page_bytes, num_layers, num_kv_heads, head_dim)

    # ---- sizes ---------------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return self.num_arena_pages * self.arena_page_bytes

    @property
    def bytes_per_exl2_page(self) -> int:
        return bytes_per_exl2_page(self.num_layers, self.num_kv_heads, self.head_dim)

    @property
    def num_exl2_pages(self) -> int:
        """N: the 256-token EXL2 pages that fit in the region."""
        return self.nbytes // self.bytes_per_exl2_page

    @property
    def max_seq_len(self) -> int:
        """Tokens of the cache tensors (`ExLlamaV2Cache(max_seq_len=...)`): N * 256."""
        return self.num_exl2_pages * EXL2_PAGE_TOKENS

    @property
    def plane_bytes(self) -> int:
        """Bytes of one layer's K (or V) tensor: N * 256 * kv_heads * head_dim * 2."""
        return self.max_seq_len * self.num_kv_heads * self.head_dim * _ITEMSIZE

    @property
    def used_bytes(self) -> int:
        return 2 * self.num_layers * self.plane_bytes  # == num_exl2_pages * bytes_per_exl2_page

    @property
    def arena_pages(self) -> list[int]:
        return list(range(self.first_page, self.first_page + self.num_arena_pages))

    # ---- views ---------------------------------------------------------------------------------------------
    def layer_views(self, arena: Arena) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(keys, values): per layer a contiguous fp16 `[1, N * 256, kv_heads, head_dim]` view into `arena`."""
        if arena.page_bytes != self.arena_page_bytes:
            raise ConfigError(f"region is for pages of {self.arena_page_bytes} bytes, arena has {arena.page_bytes}")
        if self.first_page + self.num_arena_pages > arena.num_pages:
            raise ConfigError(
                f"region pages {self.first_page}..{self.first_page + self.num_arena_pages - 1} lie past the "
                f"arena's {arena.num_pages} pages"
            )
        start = self.first_page * self.arena_page_bytes
        raw = arena.data[start : start + self.used_bytes]  # [used_bytes] uint8, contiguous
        n_tok, kv, d = self.max_seq_len, self.num_kv_heads, self.head_dim
        full = raw.view(EXL2_DTYPE).view(self.num_layers, 2, 1, n_tok, kv, d)  # [layers, 2, 1, N*256, KV, d]
        keys = [full[i, 0] for i in range(self.num_layers)]
        values = [full[i, 1] for i in range(self.num_layers)]
        lo = arena.data.data_ptr() + start
        hi = lo + self.used_bytes
        for i, t in enumerate(keys + values):
            assert t.shape == (1, n_tok, kv, d) and t.dtype == EXL2_DTYPE and t.is_contiguous()
            assert t.device == arena.data.device
            assert lo <= t.data_ptr() and t.data_ptr() + t.numel() * _ITEMSIZE <= hi, f"view {i} outside the region"
            assert t.untyped_storage().data_ptr() == arena.data.untyped_storage().data_ptr(), "not a view of the arena"
        return keys, values

    # ---- accounting ----------------------------------------------------------------------------------------
    def arena_pages_of(self, exl2_page: int) -> list[int]:
        """The arena page ids EXL2 page `exl2_page` is charged to (its share `[j*B, (j+1)*B)` of the region)."""
        if not 0 <= exl2_page < self.num_exl2_pages:
            raise IndexError(f"EXL2 page {exl2_page} outside 0..{self.num_exl2_pages - 1}")
        b, pb = self.bytes_per_exl2_page, self.arena_page_bytes
        lo, hi = exl2_page * b, (exl2_page + 1) * b  # region byte range [lo, hi)
        return list(range(self.first_page + lo // pb, self.first_page + (hi - 1) // pb + 1))

    def exl2_pages_on(self, arena_page: int) -> list[int]:
        """The EXL2 pages charged to `arena_page` (none for the region's unused tail, or outside the region)."""
        local = arena_page - self.first_page
        if not 0 <= local < self.num_arena_pages:
            return []
        b, pb = self.bytes_per_exl2_page, self.arena_page_bytes
        lo, hi = local * pb, (local + 1) * pb
        return list(range(lo // b, min(self.num_exl2_pages, ceil_div(hi, b))))

    def charge_map(self) -> list[list[int]]:
        """For each EXL2 page j, `arena_pages_of(j)`."""
        return [self.arena_pages_of(j) for j in range(self.num_exl2_pages)]

    def arena_holders(self, holders_of: Callable[[int], Mapping[str, int] | Iterable[str]]) -> dict[int, list[str]]:
        """Arena page → sorted names holding any EXL2 page charged to it; `holders_of(j)` names EXL2 page j's.

        With a `PagePool(N)` over the EXL2 pages, pass its `holders` method.
        """
        out: dict[int, list[str]] = {}
        for p in self.arena_pages:
            names: set[str] = set()
            for j in self.exl2_pages_on(p):
                names.update(holders_of(j))
            if names:
                out[p] = sorted(names)
        return out
