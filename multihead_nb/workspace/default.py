"""The kernel-resident default workspace: the one `mh.workspace()` returns and `%mh` / `%%head` use.

Owns creating it on first use, refusing to silently re-create it with other options, and replacing it
(`reset_workspace`): the new workspace is built before the old one is closed, so a bad option leaves the old one
(its heads, its requests) as it was. Knows nothing of notebooks.
"""

from __future__ import annotations

import threading

from ..errors import ConfigError
from .workspace import Workspace


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
        if _default.ws is None or _default.ws.closed:
            _default.ws = Workspace(**options)
            _default.options = dict(options)
        elif options and options != _default.options:
            raise ConfigError(
                f"the default workspace already exists with {_default.options or 'default options'}; "
                "use reset_workspace(...) to recreate it"
            )
        return _default.ws


def current() -> Workspace | None:
    """The default workspace if it exists and is open, else None (creates nothing)."""
    with _default.lock:
        ws = _default.ws
        return None if ws is None or ws.closed else ws


def reset_workspace(**options) -> Workspace:
    """Replace the default workspace with a new one built with `options`; the old one is closed (its pages freed)
    only once the new one exists."""
    with _default.lock:
        new = Workspace(**options)  # fails before the old one is touched
        old, _default.ws, _default.options = _default.ws, new, dict(options)
        if old is not None:
            old.close()
        return new
