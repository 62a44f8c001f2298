"""The machine a bench runs on, as the benches see it: its memory's copy and read bandwidth (what a decode step's
time is set against) and waiting until other processes leave the CPUs idle before a timing (a shared 2-core VM).
Knows nothing of models, runners or peers.
"""

from __future__ import annotations

import statistics
import time

import torch


def copy_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 9) -> float:
    """Bytes per second of `dst.copy_(src)`, counting the bytes read and written (STREAM's convention);
    the median of `repeats` copies after one that faults the pages in."""
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * nbytes / statistics.median(times)


def read_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 9) -> float:
    """Bytes per second of `x.sum()` over a large bfloat16 tensor (reads only; what decode does to weights)."""
    x = torch.ones(nbytes // 2, dtype=torch.bfloat16)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times)


def _busy_fraction(interval: float = 0.25) -> float | None:
    """The share of all CPUs busy over `interval` seconds (/proc/stat; None where there is none)."""
    try:
        def read():
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            return sum(v), v[3] + v[4]  # total, idle + iowait

        t0, i0 = read()
        time.sleep(interval)
        t1, i1 = read()
        return 1 - (i1 - i0) / max(1, t1 - t0)
    except (OSError, ValueError, IndexError):
        return None


def wait_quiet(max_wait: float = 20.0, busy: float = 0.15) -> None:
    """Wait (at most `max_wait` s) until other processes leave the CPUs idle: on a shared 2-core machine a busy
    neighbour stalls every parallel region of a 2-thread run, and timings would measure the neighbour."""
    end = time.monotonic() + max_wait
    while time.monotonic() < end:
        f = _busy_fraction()
        if f is None or f < busy:
            return
