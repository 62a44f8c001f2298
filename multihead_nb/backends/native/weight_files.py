"""A checkpoint's weight files: which `*.safetensors` files hold its tensors (sharded or not), their headers checked
against the files' sizes, the tensors' names and shapes checked against a `ModelSpec`, and `load_weights` (from
safetensors, or from a GGUF file: dequantized into the workspace dtype, llama-arch Q/K rows put back in Hugging
Face order).

Knows nothing of config.json beyond the JSON reading it shares with `loader.py`, nor of how the weights are used.
Every problem is a `CheckpointError` naming the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...errors import CheckpointError

if TYPE_CHECKING:
    from .loader import ModelSpec


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{what} {path} is not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} {path} cannot be read ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} is not a JSON object")
    return data


def weight_files(path: Path) -> tuple[Path, ...]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index, "weight index")
        names = sorted(set((data.get("weight_map") or {}).values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {path}: the weight index names missing shards {', '.join(missing)}")
        if names:
            return tuple(path / n for n in names)
    files = tuple(sorted(path.glob("*.safetensors")))
    if not files:
        extra = " (only PyTorch .bin weights, which are not supported; convert to safetensors)" if any(
            path.glob("*.bin")
        ) else ""
        raise CheckpointError(f"checkpoint folder {path} has no *.safetensors weights file{extra}")
    return files


def read_header(file: Path) -> dict[str, dict]:
    """The tensors (name → {dtype, shape, data_offsets}) of a safetensors file, checked against its size."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"weights file {file} is truncated or corrupt (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"weights file {file} is truncated or corrupt (header of {n} bytes claimed)")
            header = json.loads(f.read(n))
    except CheckpointError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"weights file {file} is corrupt or unreadable ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"weights file {file} is corrupt (header is not a JSON object)")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise CheckpointError(f"weights file {file} is corrupt (bad entry for tensor {name!r})") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"weights file {file} is truncated: its header needs {8 + n + end} bytes, the file has {size}"
        )
    return header


def check_tensors(spec: ModelSpec) -> None:
    found: dict[str, tuple] = {}
    for file in spec.weight_files:
        for name, info in read_header(file).items():
            found[name] = tuple(info.get("shape", ()))
    expected = spec.tensor_shapes()
    missing = [n for n in expected if n not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {spec.path} lacks tensors {shown}")
    wrong = [f"{n} {found[n]} (expected {s})" for n, s in expected.items() if found[n] != s]
    if wrong:
        raise CheckpointError(f"checkpoint {spec.path} has tensors of the wrong shape: {'; '.join(wrong[:3])}")


def load_weights(spec: ModelSpec, dtype: torch.dtype, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor `spec` needs, by Hugging Face name, in `dtype` on `device` (extra tensors are skipped)."""
    if spec.gguf is not None:
        return _load_gguf(spec, dtype, device)
    from safetensors import SafetensorError, safe_open

    expected = spec.tensor_shapes()
    out: dict[str, torch.Tensor] = {}
    for file in spec.weight_files or weight_files(spec.path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name in expected:
                        out[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"weights file {file} cannot be read ({e})") from None
    missing = [n for n in expected if n not in out]
    if missing:
        raise CheckpointError(f"checkpoint {spec.path} lacks tensors {', '.join(missing[:5])}")
    return out


def _load_gguf(spec: ModelSpec, dtype: torch.dtype, device: torch.device | str) -> dict[str, torch.Tensor]:
    """A GGUF spec's tensors, dequantized; llama.cpp permutes the Q/K rows of llama-arch files for its rotary
    layout (`unpermute_rows` undoes it); a tied model has no `output.weight` (the spec then needs no lm_head)."""
    from .gguf_config import gguf_name, unpermute_rows
    from .gguf_dequant import dequantize

    g = spec.gguf
    permuted = g.architecture == "llama"
    out: dict[str, torch.Tensor] = {}
    for name, shape in spec.tensor_shapes().items():
        t = g.tensors.get(gguf_name(name))
        if t is None:
            raise CheckpointError(f"GGUF file {g.path} lacks the tensor {gguf_name(name)}")
        try:
            w = dequantize(t.raw, t.ggml_type, shape, dtype, device)  # [shape] in dtype
        except ValueError as e:
            raise CheckpointError(f"GGUF file {g.path}: tensor {t.name} cannot be loaded ({e})") from None
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rows(w, spec.num_heads)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rows(w, spec.num_kv_heads)
        if not bool(torch.isfinite(w.sum())):  # one read; any inf or NaN makes the sum non-finite
            raise CheckpointError(f"GGUF file {g.path} is corrupt: tensor {t.name} holds non-finite values"
                                  f"{'' if dtype == torch.float32 else f' in {dtype}'}")
        out[name] = w
    return out
