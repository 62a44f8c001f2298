"""The native model runner for the Llama family: checkpoints (`loader`), the model (`llama`), paged attention
(`attention`), and `ModelRunner` (one model's forward over a `ForwardBatch`)."""

from ..batch import ForwardBatch
from .loader import ModelSpec, read_spec
from .model_ref import resolve_checkpoint, resolve_model
from .weight_files import load_weights
from .runner import ModelRunner

__all__ = ["ForwardBatch", "ModelRunner", "ModelSpec", "load_weights", "read_spec", "resolve_checkpoint",
           "resolve_model"]
