"""EXL2 checkpoints: recognising them, reading their shape without weights, and the lazy import of exllamav2.

Owns: `is_exl2_checkpoint`, `Exl2Spec` / `read_exl2_spec`, and `require_exllamav2`, which imports the optional
backend only when asked and raises one error naming everything missing (CUDA torch, a CUDA device, exllamav2,
flash-attn >= 2.5.7). Does not know: the arena, batches or the runner. exllamav2 is never imported at module
import: `import exllamav2` JIT-builds a C++/CUDA extension and fails on a CPU-only torch.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import struct
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...errors import CheckpointError, ConfigError
from .region import bytes_per_exl2_page
from ..native.loader import resolve_checkpoint

MIN_FLASH_ATTN = (2, 5, 7)  # exllamav2's paged attention calls flash_attn_with_kvcache(block_table=...)
INSTALL_HINT = "pip install 'multihead-nb[exl2]'"


# ---- recognising a checkpoint ------------------------------------------------------------------------------
def _safetensors_names(file: Path) -> list[str]:
    """Tensor names in a safetensors header ([] when the file is unreadable: this is a sniff, not a check)."""
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return []
            (n,) = struct.unpack("<Q", head)
            if n > 100_000_000:
                return []
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return []
    return [k for k in header if k != "__metadata__"] if isinstance(header, dict) else []


def is_exl2_checkpoint(path: str | Path) -> bool:
    """Whether the local folder `path` holds an EXL2-quantized model.

    Signs (exllamav2's convert writes them): config.json `quantization_config.quant_method == "exl2"`; tensors
    named `*.q_weight` / `*.q_scale` (EXL2; GPTQ's are `qweight` / `scales`); `measurement.json` or `job_new.json`
    beside the `*.safetensors`. A missing folder is not one (no download is tried).
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        return False
    cfg = p / "config.json"
    if cfg.is_file():
        try:
            qc = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config")
        except (OSError, ValueError, UnicodeDecodeError, AttributeError):
            qc = None
        if isinstance(qc, dict) and str(qc.get("quant_method", "")).lower() == "exl2":
            return True
    files = sorted(p.glob("*.safetensors"))
    for f in files:
        if any(n.endswith((".q_weight", ".q_scale")) for n in _safetensors_names(f)):
            return True
    return bool(files) and ((p / "measurement.json").is_file() or (p / "job_new.json").is_file())


@dataclass(frozen=True)
class Exl2Spec:
    """What the scheduler and the region need of an EXL2 (or FP16 Llama-family) checkpoint, from config.json."""

    name: str
    path: Path
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    bits: float | None = None  # quantization_config.bits (None: not quantized)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    weight_files: tuple[Path, ...] = field(default=(), compare=False, repr=False)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight files (quantized tensors are loaded as stored)."""
        return sum(f.stat().st_size for f in self.weight_files)

    @property
    def bytes_per_page(self) -> int:
        return bytes_per_exl2_page(self.num_layers, self.num_kv_heads, self.head_dim)


def read_exl2_spec(name_or_path: str | Path) -> Exl2Spec:
    """The shape of an EXL2 checkpoint folder (no weights loaded, no exllamav2 needed)."""
    path = resolve_checkpoint(name_or_path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"checkpoint folder {path} has no config.json")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"config file {cfg_path} cannot be read ({e})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"config file {cfg_path} is not a JSON object")
    files = tuple(sorted(path.glob("*.safetensors")))
    if not files:
        raise CheckpointError(f"checkpoint folder {path} has no *.safetensors weights file")
    archs = cfg.get("architectures") or []
    if len(archs) != 1:
        raise CheckpointError(f"config file {cfg_path} must name exactly one architecture (exllamav2 needs it)")

    def ids(v) -> tuple[int, ...]:
        return () if v is None else (int(v),) if isinstance(v, int) else tuple(int(x) for x in v)

    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        qc = cfg.get("quantization_config") if isinstance(cfg.get("quantization_config"), dict) else {}
        bos = cfg.get("bos_token_id")
        return Exl2Spec(
            name=str(name_or_path), path=path, architecture=str(archs[0]),
            num_layers=int(cfg["num_hidden_layers"]), hidden_size=hidden, num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), vocab_size=int(cfg["vocab_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            bits=float(qc["bits"]) if qc.get("bits") is not None else None,
            eos_token_ids=ids(cfg.get("eos_token_id")), bos_token_id=int(bos) if isinstance(bos, int) else None,
            weight_files=files,
        )
    except KeyError as e:
        raise CheckpointError(f"config file {cfg_path} lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config file {cfg_path} has a malformed value ({e})") from None


# ---- the optional backend ----------------------------------------------------------------------------------
def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit()) if part[:1].isdigit() else ""
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _flash_attn_version() -> str | None:
    for dist in ("flash-attn", "flash_attn"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def require_exllamav2() -> types.SimpleNamespace:
    """Import exllamav2 (only now), or raise one `ConfigError` naming everything that is missing.

    Returns a namespace with `ExLlamaV2`, `ExLlamaV2Config`, `ExLlamaV2Cache`, `ExLlamaV2Tokenizer`,
    `ExLlamaV2Attention`, `PagedParams` and `version`.
    """
    missing: list[str] = []
    if not (torch.version.cuda or getattr(torch.version, "hip", None)):
        missing.append(f"a CUDA build of PyTorch (this torch {torch.__version__} is a CPU-only build)")
    elif not torch.cuda.is_available():
        missing.append(f"a CUDA device (torch {torch.__version__} is built for CUDA {torch.version.cuda}, "
                       "but torch.cuda.is_available() is False)")
    if importlib.util.find_spec("exllamav2") is None:
        missing.append(f"the exllamav2 package ({INSTALL_HINT})")
    want = ".".join(map(str, MIN_FLASH_ATTN))
    if importlib.util.find_spec("flash_attn") is None:
        missing.append(f"flash-attn >= {want} (not installed; exllamav2's paged attention needs it)")
    else:
        have = _flash_attn_version()
        if have is None or _version_tuple(have) < MIN_FLASH_ATTN:
            missing.append(f"flash-attn >= {want} (found {have or 'an unknown version'}; "
                           "exllamav2's paged attention needs flash_attn_with_kvcache with block tables)")
    if missing:
        raise ConfigError("EXL2 models cannot run here; missing: " + "; ".join(missing))
    try:
        exl = importlib.import_module("exllamav2")
        attn = importlib.import_module("exllamav2.attn")
    except Exception as e:  # the JIT build of its C++/CUDA extension, a torch/CUDA mismatch, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(
            f"exllamav2 is installed but failed to import ({type(e).__name__}: {first}); it builds a C++/CUDA "
            "extension on first import, which needs the CUDA toolkit (nvcc) matching torch's CUDA version and ninja"
        ) from None
    if not getattr(attn, "has_flash_attn_with_paged", False):
        raise ConfigError(
            f"exllamav2 found no usable paged attention: flash-attn >= {want} must import with this torch and GPU "
            "(an Ampere or newer GPU; check `import flash_attn_2_cuda`), and EXLLAMA_NO_FLASH_ATTN must be unset"
        )
    try:
        get_device_stream = importlib.import_module("exllamav2.device").get_device_stream
    except (ImportError, AttributeError):
        get_device_stream = None
    return types.SimpleNamespace(
        get_device_stream=get_device_stream, ExLlamaV2=exl.ExLlamaV2, ExLlamaV2Config=exl.ExLlamaV2Config, ExLlamaV2Cache=exl.ExLlamaV2Cache,
        ExLlamaV2Tokenizer=exl.ExLlamaV2Tokenizer, ExLlamaV2Attention=attn.ExLlamaV2Attention,
        PagedParams=attn.ExLlamaV2Attention.PagedParams, version=getattr(exl, "__version__", "?"),
    )
