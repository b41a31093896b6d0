"""Checkpoint -> model: every loader goes through `open_checkpoint`, then `load_model`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .. import heap, int4
from ..config import VARIANTS, PaliGemmaConfig
from ..model import PaliGemmaModel
from ..quantize import (
    Quantization,
    quantize_weight,
    quantized_modules,
    stored_specs,
)
from .errors import CheckpointError
from .open import NoProgress, OfficialSource, Source, open_checkpoint

logger = logging.getLogger("paligemma")


def load_model(
    source: Source,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    quantize: str | None = None,
) -> PaliGemmaModel:
    """Builds the model from an opened checkpoint, one tensor at a time.

    The model is created on the meta device and each parameter is assigned as it is read, so
    peak memory is the model plus one stored tensor (an official array is read one layer at a
    time). dtype None keeps the stored dtype: a safetensors directory's tensors then stay
    memory-mapped (one copy of the weights, never two). quantize (`quantize.MODES`: "int8",
    "int8-linear", "int4", "int4-linear") quantizes each matrix as it is read (dtype is then
    ignored): about 0.5x the bf16 checkpoint's memory for a 3B model with int8 instead of 1.5x.
    A quantized checkpoint (`paligemma-convert --quantize`) is mapped as stored, its quantized
    tensors never copied or computed again; quantize, if given, must name its mode. One
    written in the first int4 layout (config.json's "quantization" without "int4_layout") has
    each packed matrix converted as it is read (`int4.from_layout_1`: a copy, on every load).
    """
    if source.config is None:
        raise CheckpointError(
            f"{source.files[0]}: the segmentation VAE is not a PaliGemma model "
            "(load it with paligemma.segmentation.load_mask_decoder)"
        )
    heap.map_large_allocations()  # activations freed later are returned to the OS (see `heap`)
    stored = source.quantization
    if stored is not None and quantize not in (None, stored.mode):
        raise CheckpointError(
            f"{source.files[0]}: the checkpoint is already quantized ({stored.mode}); "
            f"--quantize {quantize} needs the unquantized checkpoint it was written from"
        )
    plan = stored or (Quantization(quantize) if quantize else None)
    with torch.device("meta"):
        model = PaliGemmaModel(source.config).requires_grad_(plan is None)
    quantized = quantized_modules(model, plan.mode) if plan else set()
    layout_1 = _layout_1_matrices(source, quantized)  # modules whose (weight, scale) convert
    pending: dict[str, dict[str, torch.Tensor]] = {}  # module -> the half of its pair read first
    state = {}

    def convert(module: str, kind: str, tensor: torch.Tensor) -> None:
        """Keeps a layout-1 matrix's weight or scale until the other is read (scale usually
        comes right after its weight, but any order is), then converts the pair."""
        pair = pending.setdefault(module, {})
        pair[kind] = tensor
        if len(pair) == 2:
            del pending[module]
            state[f"{module}.weight"], state[f"{module}.scale"] = int4.from_layout_1(
                pair["weight"], pair["scale"])

    for name, chunks in source.tensors(NoProgress()):
        pieces = list(chunks)
        tensor = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).to(device)
        module, _, kind = name.rpartition(".")
        if module in quantized and kind == "weight":
            layer = model.get_submodule(module)
            if stored is None:
                state[name], state[f"{module}.scale"] = quantize_weight(
                    tensor, plan.mode, plan.group_size)
            elif module in layout_1:
                convert(module, kind, tensor)
            else:  # as mapped: its scale comes as a tensor of its own
                state[name] = tensor
            # Placeholders of the shapes and dtypes as held (int4 packs two weights per byte;
            # always in the current int4 layout).
            specs = stored_specs(tuple(layer.weight.shape), plan.mode, plan.group_size)
            (w_shape, w_dtype), (s_shape, _) = specs["weight"], specs["scale"]
            layer.weight = nn.Parameter(
                torch.empty(w_shape, dtype=w_dtype, device="meta"), requires_grad=False)
            layer.scale = torch.empty(s_shape, device="meta")  # now a state key
        elif stored is not None and kind == "scale" and module in quantized:
            if module in layout_1:
                convert(module, kind, tensor)
            else:
                state[name] = tensor
        elif quantize and stored is None:  # own memory: a file mapping goes with `tensor`
            state[name] = tensor.clone(memory_format=torch.contiguous_format)
        else:
            state[name] = tensor.to(dtype=dtype or tensor.dtype).contiguous()
    model.load_state_dict(state, strict=True, assign=True)
    # The per-layer temporaries freed during loading stay resident in glibc's heap otherwise
    # (measured: 1.2 GB for PaliGemma 2 3B from a bf16 .npz).
    heap.release_free_heap()
    return model.eval()


def _layout_1_matrices(source: Source, quantized: set[str]) -> set[str]:
    """The modules whose packed int4 weight and scale `source` stores in the first int4 layout
    (int4_layout 1): converted on every load, with a warning; none for any other checkpoint.
    Raises CheckpointError for a matrix that cannot be converted (N not a multiple of 16)."""
    stored = source.quantization
    if stored is None or not stored.mode.startswith("int4") or stored.int4_layout != 1:
        return set()
    modules = set()
    for name, (shape, dtype) in source.specs.items():
        module, _, kind = name.rpartition(".")
        if module not in quantized or kind != "weight" or dtype != torch.uint8:
            continue  # int8 fallbacks (1-D scales) are the same in both layouts
        if shape[0] % int4.BLOCK_ROWS:
            where = getattr(source, "weight_map", {}).get(name, source.files[0])
            raise CheckpointError(
                f"{where}: {name!r} is packed int4 with N = {shape[0]} rows, not a multiple of "
                f"{int4.BLOCK_ROWS}: the checkpoint was written with the first int4 layout "
                "(its config.json's \"quantization\" has no \"int4_layout\") and this matrix "
                "cannot be converted to the current one; re-quantize from the unquantized "
                f"checkpoint with paligemma-convert SRC -o OUT --quantize {stored.mode}"
            )
        modules.add(module)
    if modules:
        logger.warning(
            "%s: written with the first int4 layout (config.json's \"quantization\" has no "
            "\"int4_layout\"): its %d packed int4 matrices are converted in memory on every "
            "load; re-writing it with paligemma-convert SRC -o OUT --quantize %s from the "
            "unquantized checkpoint makes loading map it directly",
            getattr(source, "directory", source.files[0]), len(modules), stored.mode,
        )
    return modules


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    quantize: str | None = None,
) -> PaliGemmaModel:
    """A checkpoint directory (ours or Hugging Face) or official `.npz` -> the model
    (`load_model`; dtype None keeps the stored dtype)."""
    return load_model(open_checkpoint(path), dtype, device, quantize)


def load_official(
    paths: str | Path | list[str | Path],
    config: PaliGemmaConfig | str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> PaliGemmaModel:
    """Builds the model from an official big_vision `.npz` (one file or its parts).

    config: a PaliGemmaConfig, a variant name or a config file (default: detected from the
    shapes). `dtype=float32` (default) reproduces the official numerics for f32, f16 and bf16
    checkpoints alike (big_vision computes in f32).
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if isinstance(config, PaliGemmaConfig):
        source = OfficialSource(paths, config=config)
    elif isinstance(config, str) and config in VARIANTS:
        source = OfficialSource(paths, variant=config)
    else:
        source = OfficialSource(paths, config_file=config)
    return load_model(source, dtype, device)
