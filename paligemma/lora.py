"""LoRA (Hu et al. 2021) for the decoder's linear layers, merged back into plain weights for export.

`add_lora` gives each targeted linear layer two parameters, `lora_A` [r, in] and `lora_B`
[out, r] (B starts at zero, so the model is unchanged until trained), and a forward hook that
adds `(alpha / r) * dropout(x) A^T B^T` to the layer's output. The layer itself stays what it
was (class, forward, `weight` name), so the one mapping table to the official layout keeps
working; peft instead wraps layers and renames their weights (`base_layer.weight`).
`merge_lora` folds `W + (alpha / r) B A` into the weight and removes the parameters and hook.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Every projection of the Gemma decoder layers (attention and GeGLU MLP).
DECODER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _lora_hook(layer: nn.Linear, inputs: tuple[torch.Tensor], output: torch.Tensor
               ) -> torch.Tensor:
    """output [..., out] + (alpha / r) * dropout(x) A^T B^T for the layer's input x [..., in]."""
    x = F.dropout(inputs[0], layer.lora_dropout, layer.training)
    update = F.linear(F.linear(x.to(layer.lora_A.dtype), layer.lora_A), layer.lora_B)
    return output + layer.lora_scaling * update.to(output.dtype)


def add_lora(
    module: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: tuple[str, ...] = DECODER_TARGETS,
) -> list[str]:
    """Adds LoRA to every nn.Linear in `module` whose attribute name is in `targets` (in place).
    The adapters are float32 whatever the weights' dtype. Returns the layers' qualified names."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    layers = [(name, m) for name, m in module.named_modules()
              if name.rsplit(".", 1)[-1] in targets and isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError(f"no nn.Linear named {targets} found to add LoRA to")
    for _, layer in layers:
        if hasattr(layer, "lora_A"):
            raise ValueError("LoRA was already added to this model")
        layer.lora_A = nn.Parameter(torch.empty(rank, layer.in_features,
                                                device=layer.weight.device))
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))  # nn.Linear's (and peft's) init
        layer.lora_B = nn.Parameter(torch.zeros(layer.out_features, rank,
                                                device=layer.weight.device))
        layer.lora_scaling, layer.lora_dropout = alpha / rank, dropout
        layer.lora_handle = layer.register_forward_hook(_lora_hook)
    return [name for name, _ in layers]


@torch.no_grad()
def merge_lora(module: nn.Module) -> int:
    """Folds every adapter in `module` into its weight (computed in float32) and removes it.
    Returns the number of layers merged."""
    count = 0
    for layer in module.modules():
        if not hasattr(layer, "lora_handle"):
            continue
        if getattr(layer, "scale", None) is not None:
            raise ValueError("cannot merge LoRA into quantized weights: merge before quantizing")
        delta = layer.lora_scaling * (layer.lora_B.float() @ layer.lora_A.float())
        layer.weight.copy_((layer.weight.float() + delta).to(layer.weight.dtype))
        layer.lora_handle.remove()
        for name in ("lora_A", "lora_B", "lora_scaling", "lora_dropout", "lora_handle"):
            delattr(layer, name)
        count += 1
    return count
