"""What models can be loaded here, without the network: `list_models()`.

Owns: finding the models on this machine — the embedded default (`model_ref.EMBEDDED`), the GGUF files of the
Ollama store, and the Hugging Face cache (safetensors checkpoints and GGUF files) — and describing each one:
the reference to pass as `model=`, where it was found, its architecture, parameters, file size, quantization and
whether the native runner can run it (and why not). Knows nothing of workspaces; it reads specs with
`read_spec` (headers and metadata only, no weights) and never downloads.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ...config import format_size
from ...errors import CheckpointError
from .gguf_file import GGUFFile, is_gguf
from .model_ref import EMBEDDED, ollama_names, ollama_root, resolve_embedded, resolve_ollama

COLUMNS = ["model", "source", "architecture", "quantization", "params", "size", "bytes", "runnable", "why_not"]


def _row(model: str, source: str, arch: str = "?", quant: str = "?", params: int | None = None, nbytes: int = 0,
         runnable: bool = False, why_not: str = "") -> dict:
    return dict(model=model, source=source, architecture=arch, quantization=quant,
                params=f"{params / 1e6:.0f}M" if params else "?", size=format_size(nbytes) if nbytes else "?",
                bytes=nbytes, runnable=runnable, why_not=why_not)


def _why(e: CheckpointError, path: Path) -> str:
    """The error's message without the path it starts with (the row names the model)."""
    text = str(e)
    return text.replace(f"GGUF file {path}", "").replace(str(path), "the file").lstrip(" :;,") or text


def _gguf_row(model: str, source: str, path: Path) -> dict:
    from .loader import read_spec

    try:
        g = GGUFFile(path)
    except CheckpointError as e:
        return _row(model, source, nbytes=_size(path), why_not=_why(e, path))
    arch, quant = str(g.metadata("general.architecture", "?")), g.quantization
    try:
        read_spec(path)
        runnable, why = True, ""
    except CheckpointError as e:
        runnable, why = False, _why(e, path)
    return _row(model, source, arch, quant, g.num_params, g.nbytes, runnable, why)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _embedded() -> list[dict]:
    rows = []
    for name, e in EMBEDDED.items():
        try:
            path = resolve_embedded(name)
        except CheckpointError:
            rows.append(_row(f"embedded:{name}", "embedded", why_not=f"not installed: {e.pip}"))
            continue
        rows.append(_gguf_row(f"embedded:{name}", "embedded", path))
    return rows


def _ollama(root: Path) -> list[dict]:
    rows = []
    for name in ollama_names(root):
        try:
            blob = resolve_ollama(name, root)
        except CheckpointError as e:
            rows.append(_row(f"ollama:{name}", "ollama", why_not=str(e)))
            continue
        rows.append(_gguf_row(f"ollama:{name}", "ollama", blob))
    return rows


def _folder_row(repo: str, folder: Path) -> dict:
    from .loader import read_spec
    from .weight_files import read_json

    nbytes = sum(_size(p) for p in folder.glob("*.safetensors"))
    try:
        cfg = read_json(folder / "config.json", "config file")
        arch = ", ".join(cfg.get("architectures") or []) or str(cfg.get("model_type", "?"))
        quant = (cfg.get("quantization_config") or {}).get("quant_method") or str(
            cfg.get("dtype") or cfg.get("torch_dtype") or "?")
    except CheckpointError as e:
        return _row(repo, "hf-cache", nbytes=nbytes, why_not=_why(e, folder))
    try:
        spec = read_spec(folder)
        return _row(repo, "hf-cache", arch, quant, spec.num_params(), nbytes, True)
    except CheckpointError as e:
        return _row(repo, "hf-cache", arch, quant, None, nbytes, False, _why(e, folder))


def _hf_cache() -> list[dict]:
    try:
        from huggingface_hub import scan_cache_dir

        cache = scan_cache_dir()
    except Exception:  # no cache yet, or an unreadable one: nothing to list
        return []
    rows = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        folder = Path(max(repo.revisions, key=lambda r: r.last_modified).snapshot_path)
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            rows.append(_folder_row(repo.repo_id, folder))
        for file in sorted(folder.rglob("*.gguf")):
            if is_gguf(file):
                rows.append(_gguf_row(f"{repo.repo_id}/{file.relative_to(folder).as_posix()}", "hf-cache", file))
    return rows


def list_models() -> pd.DataFrame:
    """One row per model loadable here: `model` (what to pass as `model=`), `source` (embedded, ollama,
    hf-cache), `architecture`, `quantization`, `params`, `size` (and `bytes`), `runnable` and `why_not`."""
    rows = _embedded() + _ollama(ollama_root()) + _hf_cache()
    return pd.DataFrame(rows, columns=COLUMNS)
