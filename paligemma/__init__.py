"""PaliGemma 1 and 2 in PyTorch, numerically faithful to the official big_vision JAX code."""

__version__ = "0.1.0"  # before the imports: formats.hf reads it while the package initialises

from .api import PaliGemma
from .config import VARIANTS, PaliGemmaConfig, TextConfig, VisionConfig, get_config
from .formats import load_official
from .model import PaliGemmaModel, make_attn_mask

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
