"""MultiHead: a team of small LLM agents (heads) on one device, sharing one paged KV arena.

    import multihead_nb as mh
    ws = mh.workspace()                      # the kernel-resident default workspace
    ws.add_head("coder", "HuggingFaceTB/SmolLM2-135M-Instruct", system="You write Python.")
    print(ws.generate("coder", "a function that reverses a list").text)

In Jupyter: `%load_ext multihead_nb` for the `%%head`, `%%team` and `%mh` magics.
"""

from __future__ import annotations

import threading

from .errors import (
    CheckpointError, ConfigError, MultiHeadError, OutOfPagesError, QuotaExceededError, RequestError, TeamError,
)
from .heads import Head, SamplingParams
from .workspace import Completion, RequestHandle, Workspace

__version__ = "0.1.0"

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


class _DefaultWorkspace:
    """The one kernel-resident workspace `workspace()` returns (created on first use, replaced by `reset`)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.ws: Workspace | None = None
        self.options: dict = {}


_default = _DefaultWorkspace()


def workspace(**options) -> Workspace:
    """The kernel-resident default workspace, created on first use with `options` (see `Workspace`).

    Passing options when it already exists with other options is an error: call `reset_workspace(**options)`.
    """
    with _default.lock:
        if _default.ws is None or _default.ws._closed:
            _default.ws = Workspace(**options)
            _default.options = dict(options)
        elif options and options != _default.options:
            raise ConfigError(
                f"the default workspace already exists with {_default.options or 'default options'}; "
                "use reset_workspace(...) to recreate it"
            )
        return _default.ws


def reset_workspace(**options) -> Workspace:
    """Close the default workspace (freeing every page) and create a new one with `options`."""
    with _default.lock:
        if _default.ws is not None:
            _default.ws.close()
        _default.ws = Workspace(**options)
        _default.options = dict(options)
        return _default.ws


def load_ipython_extension(ipython):
    from .magics.magic import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython):
    from .magics.magic import unload_ipython_extension as unload

    unload(ipython)


__all__ = [
    "CheckpointError", "Completion", "ConfigError", "DEFAULT_MODEL", "Head", "MultiHeadError", "OutOfPagesError",
    "QuotaExceededError", "RequestError", "RequestHandle", "SamplingParams", "TeamError", "Workspace",
    "reset_workspace", "workspace",
]
