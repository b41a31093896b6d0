"""PaliGemma 1 and 2 in PyTorch, numerically faithful to the official big_vision JAX code."""

from .api import PaliGemma
from .config import VARIANTS, PaliGemmaConfig, TextConfig, VisionConfig, get_config
from .model import PaliGemmaModel, make_attn_mask
from .weights import load_official

__all__ = [
    "PaliGemma",
    "PaliGemmaModel",
    "PaliGemmaConfig",
    "TextConfig",
    "VisionConfig",
    "VARIANTS",
    "get_config",
    "load_official",
    "make_attn_mask",
]
__version__ = "0.1.0"
