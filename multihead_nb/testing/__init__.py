"""Offline test and benchmark material: tiny random checkpoints of the Llama family and real models' shapes, and
the same checkpoints written as GGUF files (`write_gguf`, the way llama.cpp's converter writes them).

Not used by the main job: `python -m multihead_nb` runs the real default model. See `checkpoints.py`.
"""

from .checkpoints import FAMILIES, SHAPES, shape_checkpoint, tiny_checkpoint
from .gguf_checkpoints import write_gguf
from .tiny_tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer

__all__ = ["CHAT_TEMPLATE", "FAMILIES", "SHAPES", "SPECIAL_TOKENS", "build_tokenizer", "shape_checkpoint",
           "tiny_checkpoint", "write_gguf"]
