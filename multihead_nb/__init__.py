"""MultiHead: a team of small LLM agents (heads) on one device, sharing one paged KV arena.

    import multihead_nb as mh
    ws = mh.workspace()                      # the kernel-resident default workspace
    ws.add_head("coder", "HuggingFaceTB/SmolLM2-135M-Instruct", system="You write Python.")
    print(ws.generate("coder", "a function that reverses a list").text)

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

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def load_ipython_extension(ipython):
    from .notebook.magics.magic import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython):
    from .notebook.magics.magic import unload_ipython_extension as unload

    unload(ipython)


__all__ = [
    "CheckpointError", "Completion", "ConfigError", "DEFAULT_MODEL", "Head", "MultiHeadError", "OutOfPagesError",
    "QuotaExceededError", "RequestError", "RequestHandle", "SamplingParams", "TeamError", "Workspace", "load_team",
    "reset_workspace", "workspace",
]
