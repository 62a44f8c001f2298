"""Offline test and benchmark material: tiny random checkpoints of the Llama family and real models' shapes.

Not used by the main job: `python -m multihead_nb` runs the real default model. See `checkpoints.py`.
"""

from .checkpoints import FAMILIES, SHAPES, shape_checkpoint, tiny_checkpoint
from .tiny_tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer

__all__ = ["CHAT_TEMPLATE", "FAMILIES", "SHAPES", "SPECIAL_TOKENS", "build_tokenizer", "shape_checkpoint",
           "tiny_checkpoint"]
