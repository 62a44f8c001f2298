"""A native checkpoint's tokenizer (with its chat template), loaded the fast way where the files allow.

Owns turning a checkpoint's tokenizer files into a transformers tokenizer. Knows nothing of heads or prompts.
"""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(path: Path):
    """The checkpoint's tokenizer. A `tokenizer.json` is loaded as it is (fast: no `AutoTokenizer` machinery, which
    imports every model family's config, ~1.5 s); other checkpoints go through `AutoTokenizer`."""
    if (Path(path) / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path))
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
