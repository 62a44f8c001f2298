"""Backends: how a model reference becomes a loaded model (`base.py`, the protocol). `native/` runs the Llama family
from safetensors (PyTorch and fused C kernels), `exl2/` runs EXL2 models on CUDA in a region of the arena, `remote/`
serves a head from an OpenAI-compatible engine over HTTP (a stream source: `engine/sources.py`).
`batch.py` is what every runner runs: a `ForwardBatch`."""

from __future__ import annotations


def default_backends() -> dict:
    """A fresh set of the built-in backends, by name, in the order `backend="auto"` asks them (native last: it takes
    whatever no other backend claims). Importing them imports no optional dependency."""
    from .exl2.backend import Exl2Backend
    from .native.backend import NativeBackend
    from .remote.backend import RemoteBackend

    return {"remote": RemoteBackend(), "exl2": Exl2Backend(), "native": NativeBackend()}
