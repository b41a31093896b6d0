"""Weight-only quantization: int8 weights with one float32 scale per output row, or int4 with
group-wise scales (`paligemma.int4`).

int8 matrices get `weight` = round(w / scale) in [-127, 127] and `scale` = max|row| / 127;
activations and all other parameters stay as they are, and the math stays float32
(`layers.linear`). Decoding reads 1 byte per weight instead of 2 (bf16) or 4 (f32), and the C++
kernel keeps it bandwidth-bound; int4 reads 0.56 (group size 128). Modes:

- "int8": every `layers.Linear` and the tied `layers.Embedding` (input lookup and output
  projection: 18% of PaliGemma 3B's weights).
- "int8-linear": every `layers.Linear`; the tied embedding keeps its stored dtype. For models
  whose `<loc>` rows differ from their neighbours by less than int8's per-row rounding (the
  demo model), this keeps greedy boxes identical to bf16's, for a slightly slower decode.
- "int4", "int4-linear": the same matrices as int8 / int8-linear, as int4 where the matrix's
  width is a multiple of the group size and its height a multiple of `int4.BLOCK_ROWS`, and as
  int8 where it is not (`quantize_weight`).

`load_pretrained(..., quantize=mode)` quantizes while loading; `paligemma-convert --quantize`
writes a quantized checkpoint once (`formats.writers.write_ours`), which then loads memory-mapped
with nothing to compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import int4
from .layers import Embedding, Linear

MODES = ("int8", "int8-linear", "int4", "int4-linear")
# int4 packings a checkpoint can record: 1, the first (rows one after another; loaded by
# converting each matrix, `int4.from_layout_1`), and `int4.LAYOUT`, the one `paligemma.int4` uses.
INT4_LAYOUTS = (1, int4.LAYOUT)
CHUNK_ELEMENTS = 1 << 20  # rows quantized at a time: bounds the f32 temporaries to 4 MB


def quantized_types(mode: str) -> tuple[type[nn.Module], ...]:
    """The module types a mode quantizes."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; known: {', '.join(MODES)}")
    return (Linear,) if mode.endswith("-linear") else (Linear, Embedding)


Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class Quantization:
    """How a checkpoint is quantized: its config.json's "quantization" object,
    {"mode": "int4", "group_size": 128, "int4_layout": 2} (group_size and int4_layout for int4
    modes only). int4_layout is the packing of its int4 matrices (`INT4_LAYOUTS`): new
    quantizations write `int4.LAYOUT`; a record without one is layout 1, from checkpoints
    written before the layout had a number (`formats.load` converts those as they load)."""

    mode: str
    group_size: int = int4.DEFAULT_GROUP_SIZE
    int4_layout: int = int4.LAYOUT

    def __post_init__(self) -> None:
        quantized_types(self.mode)  # raise ValueError for an unknown mode or group size
        int4.check_group_size(self.group_size)
        check_int4_layout(self.int4_layout)

    def to_dict(self) -> dict[str, Any]:
        if self.mode.startswith("int4"):
            return {"mode": self.mode, "group_size": self.group_size,
                    "int4_layout": self.int4_layout}
        return {"mode": self.mode}

    @classmethod
    def from_dict(cls, d: object) -> Quantization:
        """Raises ValueError naming what is wrong. An int4 record without "int4_layout" is
        layout 1 (checkpoints written before the layout was recorded)."""
        if not isinstance(d, dict) or set(d) - {"mode", "group_size", "int4_layout"}:
            raise ValueError(
                f'expected {{"mode": ..., "group_size": ..., "int4_layout": ...}}, got {d!r}')
        mode = d.get("mode")
        if mode not in MODES:
            raise ValueError(f"unknown quantization mode {mode!r}; known: {', '.join(MODES)}")
        if not mode.startswith("int4"):
            for key in ("group_size", "int4_layout"):
                if key in d:
                    raise ValueError(f"{key} is for int4 modes, not {mode}")
            return cls(mode)
        if type(d.get("group_size")) is not int:
            raise ValueError(f"{mode} needs an integer group_size, got {d.get('group_size')!r}")
        return cls(mode, d["group_size"], d.get("int4_layout", 1))  # checked in __post_init__


def check_int4_layout(layout: int) -> None:
    if type(layout) is not int or layout not in INT4_LAYOUTS:
        raise ValueError(f"int4_layout must be one of {INT4_LAYOUTS}, got {layout!r}")


def quantized_modules(model: nn.Module, mode: str) -> set[str]:
    """Names of the modules whose weight `mode` quantizes (`model` may be on the meta device)."""
    types = quantized_types(mode)
    return {name for name, m in model.named_modules() if isinstance(m, types)}


def quantized_specs(model: nn.Module, specs: Specs, q: Quantization) -> Specs:
    """The unquantized state `specs` ({name: (shape, dtype)}) as `q` stores it: each quantized
    weight's entry replaced by `stored_specs`' weight, its scale following it."""
    modules = quantized_modules(model, q.mode)
    out: Specs = {}
    for name, (shape, dtype) in specs.items():
        module, _, kind = name.rpartition(".")
        if module in modules and kind == "weight":
            stored = stored_specs(shape, q.mode, q.group_size, q.int4_layout)
            out[name], out[f"{module}.scale"] = stored["weight"], stored["scale"]
        else:
            out[name] = (shape, dtype)
    return out


def quantize_weight(
    weight: torch.Tensor, mode: str, group_size: int = int4.DEFAULT_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (weight, scale) a mode stores for one matrix [N, K]: int4 modes give packed int4
    (uint8 [N, K / 2], float32 [N, K / G, 2]) where K is a multiple of the group size and N of
    `int4.BLOCK_ROWS` (`int4.supported`), and per-row int8 (int8 [N, K], float32 [N])
    otherwise, as the int8 modes always do. Rows quantize independently, but only a whole
    matrix decides between the two: quantize row pieces with the quantizer it chose."""
    if stores_int4(weight.shape, mode, group_size):
        return int4.quantize_int4(weight, group_size)
    return quantize_int8(weight)


def stored_specs(
    shape: tuple[int, ...],
    mode: str,
    group_size: int = int4.DEFAULT_GROUP_SIZE,
    int4_layout: int = int4.LAYOUT,
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{"weight": (shape, dtype), "scale": (shape, dtype)} that `quantize_weight` returns for a
    matrix of this shape, without computing it (planning and checking checkpoints);
    int4_layout 1: as the first int4 layout stored it (`stores_int4`)."""
    n, k = shape
    if stores_int4(shape, mode, group_size, int4_layout):
        return {"weight": ((n, k // 2), torch.uint8),
                "scale": ((n, k // group_size, 2), torch.float32)}
    return {"weight": ((n, k), torch.int8), "scale": ((n,), torch.float32)}


def stores_int4(
    shape: tuple[int, ...] | torch.Size,
    mode: str,
    group_size: int = int4.DEFAULT_GROUP_SIZE,
    int4_layout: int = int4.LAYOUT,
) -> bool:
    """Whether `mode` stores a whole matrix of this shape as packed int4 (else as int8):
    `int4.supported`; in int4_layout 1, whatever its height (that layout had no row blocks)."""
    if not mode.startswith("int4"):
        return False
    check_int4_layout(int4_layout)
    if int4_layout == 1:
        int4.check_group_size(group_size)
        return len(shape) == 2 and shape[1] % group_size == 0
    return int4.supported(shape, group_size)


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
def quantize_(
    model: nn.Module, mode: str = "int8", group_size: int = int4.DEFAULT_GROUP_SIZE
) -> nn.Module:
    """Quantizes `model`'s Linear and Embedding weights in place, one matrix at a time; returns
    the model (group_size: int4 modes only). The other parameters are copied, so that nothing
    refers to the original storage any more: a memory-mapped checkpoint (`load_pretrained`) is
    unmapped. `load_pretrained(...,
    quantize=mode)` avoids mapping the whole checkpoint in the first place."""
    types = quantized_types(mode)
    for module in model.modules():
        if isinstance(module, types) and module.scale is None:
            q, scale = quantize_weight(module.weight, mode, group_size)
            module.weight = nn.Parameter(q, requires_grad=False)
            module.scale = scale
    for p in model.parameters():
        if p.dtype not in (torch.int8, torch.uint8):
            p.data = p.data.clone()
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (weights, scales, norms) of `model`."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)
