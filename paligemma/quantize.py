"""Weight-only int8 quantization: int8 weights with one float32 scale per output row.

Quantized matrices get `weight` = round(w / scale) in [-127, 127] and `scale` = max|row| / 127;
activations and all other parameters stay as they are, and the math stays float32
(`layers.linear`). Decoding reads 1 byte per weight instead of 2 (bf16) or 4 (f32), and the C++
kernel keeps it bandwidth-bound. Modes:

- "int8": every `layers.Linear` and the tied `layers.Embedding` (input lookup and output
  projection: 18% of PaliGemma 3B's weights).
- "int8-linear": every `layers.Linear`; the tied embedding keeps its stored dtype. For models
  whose `<loc>` rows differ from their neighbours by less than int8's per-row rounding (the
  demo model), this keeps greedy boxes identical to bf16's, for a slightly slower decode.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import Embedding, Linear

MODES = ("int8", "int8-linear")
CHUNK_ELEMENTS = 1 << 20  # rows quantized at a time: bounds the f32 temporaries to 4 MB


def quantized_types(mode: str) -> tuple[type[nn.Module], ...]:
    """The module types a mode quantizes."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; known: {', '.join(MODES)}")
    return (Linear, Embedding) if mode == "int8" else (Linear,)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] (any float dtype) -> (int8 [N, K], float32 scale [N]), weight ~ q * scale.

    Symmetric per row. A zero row gets scale 1 (its values quantize to 0 either way).
    """
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    step = max(1, CHUNK_ELEMENTS // k)
    for start in range(0, n, step):
        w = weight[start : start + step].to(torch.float32, copy=True)
        s = w.abs().amax(1) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[start : start + step] = w.div_(s[:, None]).round_()  # |w / s| <= 127: no clamp
        scale[start : start + step] = s
    return q, scale


@torch.no_grad()
def quantize_(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Quantizes `model`'s Linear and Embedding weights in place, one matrix at a time; returns
    the model. The other parameters are copied, so that nothing refers to the original storage
    any more: a memory-mapped checkpoint (`load_pretrained`) is unmapped. `load_pretrained(...,
    quantize=mode)` avoids mapping the whole checkpoint in the first place."""
    types = quantized_types(mode)
    for module in model.modules():
        if isinstance(module, types) and module.scale is None:
            q, scale = quantize_int8(module.weight)
            module.weight = nn.Parameter(q, requires_grad=False)
            module.scale = scale
    for p in model.parameters():
        if p.dtype != torch.int8:
            p.data = p.data.clone()
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (weights, scales, norms) of `model`."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
