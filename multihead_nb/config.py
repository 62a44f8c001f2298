"""Parsing and validating user-facing values: sizes ("1GiB", "25%"), dtypes, devices; and `ceil_div`.

Owns: the small value parsers (and the page arithmetic) every layer shares. Knows nothing of models, pools or heads.
"""

from __future__ import annotations

import os
import re

import torch

from .errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def ceil_div(a: int, b: int) -> int:
    """`a / b` rounded up, for non-negative `a` and positive `b`: how many units of `b` hold `a` (pages for bytes
    or tokens)."""
    return -(-a // b)


def parse_size(value: int | str, *, what: str = "size") -> int:
    """Bytes from an int or a string like "1GiB", "256 KiB", "1.5GB", "4096"."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a size like '1GiB', got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ConfigError(f"{what} must be positive, got {value}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a size like '1GiB', got {value!r}")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{what} must be a size like '512MiB' or '1GiB', got {value!r}")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ConfigError(f"{what} must be positive, got {value!r}")
    return n


def parse_share(value: int | float | str, total: int, *, what: str = "quota") -> int:
    """A count out of `total` from "25%", a fraction in (0, 1], or a size in bytes ("256MiB")."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            pct = float(value.strip()[:-1])
        except ValueError:
            raise ConfigError(f"{what} must be like '25%' or a size, got {value!r}") from None
        if not 0 < pct <= 100:
            raise ConfigError(f"{what} percentage must be in (0, 100], got {value!r}")
        return max(1, int(total * pct / 100))
    if isinstance(value, float) and not isinstance(value, bool):
        if not 0 < value <= 1:
            raise ConfigError(f"{what} as a fraction must be in (0, 1], got {value!r}")
        return max(1, int(total * value))
    return parse_size(value, what=what)


def parse_pages(value: int | float | str, total: int, page_bytes: int, *, what: str, round_up: bool = False) -> int:
    """Pages from a share of `total` pages ("25%", a fraction in (0, 1]) or a size in bytes ("256MiB"), the size
    in pages of `page_bytes`: rounded down (at least one), or up with `round_up`."""
    if (isinstance(value, str) and value.strip().endswith("%")) or (
            isinstance(value, float) and not isinstance(value, bool)):
        return parse_share(value, total, what=what)
    n = parse_size(value, what=what)
    return ceil_div(n, page_bytes) if round_up else max(1, n // page_bytes)


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """A torch dtype from a name ("bfloat16", "fp16", ...) or a dtype; only float32/bfloat16/float16."""
    if isinstance(value, torch.dtype):
        if value in _DTYPES.values():
            return value
        raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {value}")
    key = str(value).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise ConfigError(f"dtype must be one of float32, bfloat16, float16 (or 'auto'), got {value!r}")
    return _DTYPES[key]


def resolve_device(value: str | torch.device = "auto") -> torch.device:
    """'auto' → cuda when available, else cpu; otherwise the named device, checked to exist."""
    if str(value) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {value!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {value!r} asked for, but this torch build sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device must be cpu or cuda, got {value!r}")
    return dev


def resolve_dtype(value: str | torch.dtype, device: torch.device) -> torch.dtype:
    """'auto' → bfloat16 (CPU and CUDA alike); otherwise `parse_dtype`."""
    if str(value) == "auto":
        return torch.bfloat16
    return parse_dtype(value)


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory the device has (the machine's RAM for the CPU), or None when it cannot be told."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None


def format_size(n: int) -> str:
    """Human bytes: 1536 → '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
