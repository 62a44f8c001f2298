"""The workspace floor: `Workspace` (the public API), heads, request handles, prompts, the bus, model loading through
the registered backends (`models.py`) and the reports on pages and usage (`report.py`)."""

from .handles import Completion, RequestHandle
from .heads import Head
from .workspace import Workspace

__all__ = ["Completion", "Head", "RequestHandle", "Workspace"]
