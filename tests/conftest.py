"""Shared pytest fixtures: offline tiny checkpoints cached under the repo's `.cache/` (gitignored)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("MULTIHEAD_CACHE", str(ROOT / ".cache" / "tiny"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_ckpt():
    """Factory: `tiny_ckpt(family="llama", **overrides)` -> Path of a cached tiny HF checkpoint folder."""
    from multihead_nb.testing import tiny_checkpoint

    def make(family: str = "llama", **kw) -> Path:
        return tiny_checkpoint(family, **kw)

    return make
