"""Checkpoint -> model: every loader goes through `open_checkpoint`, then `load_model`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import heap
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
    tensors never copied or computed again; quantize, if given, must name its mode.
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
    state = {}
    for name, chunks in source.tensors(NoProgress()):
        pieces = list(chunks)
        tensor = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).to(device)
        module, _, kind = name.rpartition(".")
        if module in quantized and kind == "weight":
            layer = model.get_submodule(module)
            if stored is None:
                state[name], state[f"{module}.scale"] = quantize_weight(
                    tensor, plan.mode, plan.group_size)
            else:  # as mapped: its scale comes as a tensor of its own
                state[name] = tensor
            # Placeholders of the stored shapes and dtypes (int4 packs two weights per byte).
            specs = stored_specs(tuple(layer.weight.shape), plan.mode, plan.group_size)
            (w_shape, w_dtype), (s_shape, _) = specs["weight"], specs["scale"]
            layer.weight = nn.Parameter(
                torch.empty(w_shape, dtype=w_dtype, device="meta"), requires_grad=False)
            layer.scale = torch.empty(s_shape, device="meta")  # now a state key
        elif stored is not None and kind == "scale" and module in quantized:
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
