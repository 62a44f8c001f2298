"""A native checkpoint's tokenizer (with its chat template), loaded the fast way where the files allow.

Owns turning a checkpoint's tokenizer files into a transformers tokenizer: a folder's `tokenizer.json` as it is, and
a GGUF file's tokenizer metadata converted by transformers once, then cached on disk (`$MULTIHEAD_CACHE`, else
`~/.cache/multihead_nb`, under `gguf-tokenizers/`) keyed by the hash of that metadata and the transformers version
(conversion takes seconds; loading the cached `tokenizer.json` a fraction of one). Knows nothing of heads or prompts.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from ...errors import CheckpointError


def load_tokenizer(source):
    """The tokenizer of a checkpoint: `source` is a `ModelSpec` (a GGUF spec's open file is reused) or a path (a
    folder, or a GGUF file). A `tokenizer.json` is loaded as it is (fast: no `AutoTokenizer` machinery, which
    imports every model family's config, ~1.5 s); other folders go through `AutoTokenizer`."""
    gguf = getattr(source, "gguf", None)
    path = Path(getattr(source, "path", source))
    if gguf is not None or path.is_file():
        if gguf is None:
            from .gguf_file import GGUFFile

            gguf = GGUFFile(path)
        return gguf_tokenizer(gguf)
    if (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def cache_root() -> Path:
    return Path(os.environ.get("MULTIHEAD_CACHE")
                or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "multihead_nb"))


def gguf_tokenizer(gguf):
    """The tokenizer and chat template of an open `GGUFFile`, converted once per tokenizer and cached."""
    import transformers
    from transformers import PreTrainedTokenizerFast

    key = hashlib.sha256(f"{gguf.tokenizer_key}:{transformers.__version__}".encode()).hexdigest()[:32]
    folder = cache_root() / "gguf-tokenizers" / key
    if not (folder / "tokenizer.json").is_file():
        _convert(gguf, folder)
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def _convert(gguf, folder: Path) -> None:
    """Convert `gguf`'s tokenizer with transformers and save it into `folder` (written aside, then renamed)."""
    from transformers import AutoTokenizer

    if gguf.metadata("tokenizer.ggml.model", None) is None:
        raise CheckpointError(f"GGUF file {gguf.path} holds no tokenizer (no tokenizer.ggml.model metadata)")
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.path.parent), gguf_file=gguf.path.name)
    except Exception as e:  # transformers raises many kinds for tokenizers it cannot convert
        raise CheckpointError(f"GGUF file {gguf.path}: its tokenizer cannot be converted by transformers "
                              f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
                              ) from None
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process saved it first
            if not (folder / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
