"""Weight-only int8 quantization: int8 weights with one float32 scale per output row.

Every `layers.Linear` and the tied `layers.Embedding` (input lookup and output projection) get
`weight` = round(w / scale) in [-127, 127] and `scale` = max|row| / 127; activations and all
other parameters stay as they are, and the math stays float32 (`layers.linear`). Decoding reads
1 byte per weight instead of 2 (bf16) or 4 (f32), and the C++ kernel keeps it bandwidth-bound.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .checkpoint import load_pretrained
from .layers import Embedding, Linear
from .model import PaliGemmaModel

MODES = ("int8",)
CHUNK_ELEMENTS = 1 << 24  # rows quantized at a time: bounds the f32 temporary to 64 MB


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] (any float dtype) -> (int8 [N, K], float32 scale [N]), weight ~ q * scale.

    Symmetric per row. A zero row gets scale 1 (its values quantize to 0 either way).
    """
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    step = max(1, CHUNK_ELEMENTS // k)
    for start in range(0, n, step):
        w = weight[start : start + step].float()
        s = w.abs().amax(1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[start : start + step] = torch.round(w / s[:, None]).clamp_(-127, 127)
        scale[start : start + step] = s
    return q, scale


@torch.no_grad()
def quantize_(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Quantizes `model`'s Linear and Embedding weights in place (one matrix at a time, so peak
    memory is the model plus one int8 matrix); returns the model."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; known: {', '.join(MODES)}")
    for module in model.modules():
        if isinstance(module, (Linear, Embedding)) and module.scale is None:
            q, scale = quantize_int8(module.weight)
            module.weight = nn.Parameter(q, requires_grad=False)
            module.scale = scale
    return model


def load_quantized(
    directory: str | Path, mode: str = "int8", device: torch.device | str = "cpu"
) -> PaliGemmaModel:
    """`checkpoint.load_pretrained` (memory-mapped, stored dtype) followed by `quantize_`."""
    return quantize_(load_pretrained(directory, device=device), mode)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (weights, scales, norms) of `model`."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
