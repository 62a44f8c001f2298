"""Shared pytest fixtures: offline tiny checkpoints cached under the repo's `.cache/` (gitignored)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("MULTIHEAD_CACHE", str(ROOT / ".cache" / "tiny"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)
# The interrupt tests send real Ctrl-Cs and expect KeyboardInterrupt. A test run started in the background by a
# non-interactive shell (`cmd &`) inherits SIGINT ignored, and Python then installs no handler of its own: give it
# Python's default one, as in any terminal or Jupyter kernel.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def tiny_ckpt():
    """Factory: `tiny_ckpt(family="llama", **overrides)` -> Path of a cached tiny HF checkpoint folder."""
    from multihead_nb.testing import tiny_checkpoint

    def make(family: str = "llama", **kw) -> Path:
        return tiny_checkpoint(family, **kw)

    return make
