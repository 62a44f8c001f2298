"""Offline test and benchmark material: tiny random checkpoints of the Llama family and real models' shapes, the
same checkpoints written as GGUF files (`write_gguf`, the way llama.cpp's converter writes them), and random weight
matrices in the kernel's packed formats (`random_packed`).

Not used by the main job: `python -m multihead_nb` runs the real default model. See `checkpoints.py`.
"""

from .checkpoints import FAMILIES, SHAPES, shape_checkpoint, tiny_checkpoint
from .gguf_checkpoints import write_gguf
from .packed_matrices import random_packed
from .tiny_tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer

__all__ = ["CHAT_TEMPLATE", "FAMILIES", "SHAPES", "SPECIAL_TOKENS", "build_tokenizer", "random_packed",
           "shape_checkpoint", "tiny_checkpoint", "write_gguf"]
