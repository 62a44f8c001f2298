"""The one arena and its pages: `Arena` (bytes), `PagePool` (page ids), `KVLayout` (a model's view of pages),
`KVManager` (which pages hold each request's K/V; the prefix cache's hashes); `host_bytes.host_bytes` (large host
buffers on huge pages, for the fused kernel's weights)."""

from .arena import Arena
from .kv_layout import KVLayout
from .kv_manager import KVManager, KVSequence, ModelKV, hash_page, prefix_hashes
from .page_pool import PagePool, PageState

__all__ = ["Arena", "KVLayout", "KVManager", "KVSequence", "ModelKV", "PagePool", "PageState", "hash_page",
           "prefix_hashes"]
