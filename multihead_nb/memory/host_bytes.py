"""Large host buffers that the CPU streams through: the fused kernel's weights (`KernelWeights.place_in_one_buffer`).

Owns: allocating `nbytes` of zeroed host memory as one `uint8` tensor that starts on a 2 MiB boundary, in a private
anonymous mapping for which the OS is asked for transparent huge pages (`madvise(MADV_HUGEPAGE)`). Linux's usual
setting (`/sys/kernel/mm/transparent_hugepage/enabled` = `madvise`) gives huge pages only to memory that asks, and
PyTorch's allocator does not ask (unless `THP_MEM_ALLOC_ENABLE=1` is set before it starts). With 4 KiB pages a
decode step's stream of ~100 MB of weights misses the TLB every 4 KiB; with 2 MiB pages it does not (bench/README.md:
two threads streaming 32-34 -> 36 GB/s on a Zen 4, decode steps 2-5% faster). Where there is no such mapping
(Windows) or no such advice (macOS), a plain zeroed tensor. Also `return_freed_memory`: what the C heap holds free
given back to the OS, for code that frees large tensors it has just copied; and `release_file_pages`: a read-only
file mapping's pages, once copied, dropped from the process's resident set. Knows nothing of what the bytes hold.
"""

from __future__ import annotations

import ctypes
import mmap

import torch

HUGE_PAGE = 2 << 20  # bytes: x86-64's and (4 KiB-granule) aarch64's transparent huge page


def host_bytes(nbytes: int) -> torch.Tensor:
    """`nbytes` zeroed bytes as a contiguous `uint8` tensor on the CPU, 2 MiB-aligned and advised to the OS as huge
    pages where it can be (else a plain `torch.zeros`). The tensor keeps its mapping alive; freeing it unmaps it."""
    if nbytes < 0:
        raise ValueError(f"host_bytes needs a size of at least 0, got {nbytes}")
    flags = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)
    if nbytes < HUGE_PAGE or None in flags:  # small (no whole huge page), or no anonymous private mapping
        return torch.zeros(nbytes, dtype=torch.uint8)
    size = (nbytes + 2 * HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE  # room to start on a 2 MiB boundary
    mapping = mmap.mmap(-1, size, flags=flags[0] | flags[1])  # anonymous: zeroed, faulted in on first touch
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # a kernel without transparent huge pages: 4 KiB pages, as torch's own memory
            pass
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # holds `mapping`: unmapped when the last view goes
    start = -whole.data_ptr() % HUGE_PAGE
    out = whole[start:start + nbytes]
    assert out.data_ptr() % HUGE_PAGE == 0 and out.numel() == nbytes
    return out


def _libc_function(name: str, argtypes: tuple, restype):
    """The C library's function `name` through ctypes (errno kept), or None where there is none (musl has no
    malloc_trim, Windows neither call). A lookup of microseconds: callers ask each time, nothing is kept."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError, TypeError):
        return None
    fn.argtypes, fn.restype = list(argtypes), restype
    return fn


def return_freed_memory() -> bool:
    """Give the memory the C heap holds free back to the OS (glibc's `malloc_trim(0)`): tensors freed after being
    copied elsewhere otherwise stay in the process's resident size (glibc keeps freed blocks of a few MB for reuse).
    Whether it could (False where the C library has no such call: musl, macOS, Windows)."""
    trim = _libc_function("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)
    if trim is None:
        return False
    trim(0)
    return True


def _madvise():
    """libc's `madvise(addr, length, advice)`, or None where there is none (Windows)."""
    return _libc_function("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int)


def copying_file_pages_pays() -> bool:
    """Whether bytes that a read-only file mapping holds are better copied into `host_bytes` (then released with
    `release_file_pages`) than read where they are: where the copy can be on huge pages (Linux: a 4 KiB-page file
    mapping misses the TLB every 4 KiB; bench/README.md, bf16 decode steps 3-8% faster on a Zen 4) and the file's
    pages can be released afterwards, so that the process holds the bytes once."""
    return (hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MADV_DONTNEED") and hasattr(mmap, "MAP_ANONYMOUS")
            and _madvise() is not None)


def release_file_pages(t: torch.Tensor) -> bool:
    """Drop the whole OS pages inside `t`'s bytes from this process's resident set (`madvise(MADV_DONTNEED)`).
    Only for a view of a **read-only file mapping** whose bytes are no longer needed here (copied elsewhere): the
    pages stay in the OS's page cache and a later read faults them back in from the file, unchanged. On anonymous or
    written private memory the same call would zero the bytes, so nothing else may be passed. The pages at either end
    that `t` shares with its neighbours stay. Whether it could (False without madvise)."""
    assert t.is_contiguous()
    fn = _madvise()
    if fn is None or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    page = mmap.PAGESIZE
    start = -(-t.data_ptr() // page) * page
    end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
    if end > start and fn(start, end - start, mmap.MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), f"madvise(MADV_DONTNEED) of {end - start} bytes failed")
    return True
