"""The one arena and its pages: `Arena` (bytes), `PagePool` (page ids), `KVLayout` (a model's view of pages)."""

from .arena import Arena
from .kv_layout import KVLayout
from .page_pool import PagePool, PageState, hash_page, prefix_hashes

__all__ = ["Arena", "KVLayout", "PagePool", "PageState", "hash_page", "prefix_hashes"]
