"""The one dtype table: how each supported float type is named by us, numpy and safetensors."""

from __future__ import annotations

import numpy as np
import torch

# Our names (config.json `param_dtype`, --dtype flags, manifests) <-> torch.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TORCH_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# numpy has no bfloat16: big_vision's checkpoints store it as raw 2-byte void (`|V2`).
NUMPY_DTYPES = {
    torch.float32: np.dtype("<f4"),
    torch.float16: np.dtype("<f2"),
    torch.bfloat16: np.dtype("V2"),
}
# Quantized checkpoints (paligemma.quantize) also hold int8 weights and packed int4 bytes.
QUANTIZED_DTYPES = {"int8": torch.int8, "uint8": torch.uint8}
SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int8: "I8", torch.uint8: "U8",
}


def dtype_name(dtype: torch.dtype) -> str:
    """Our name of a stored dtype, float or quantized (manifests, error messages)."""
    quantized = {d: n for n, d in QUANTIZED_DTYPES.items()}
    return TORCH_DTYPE_NAMES.get(dtype) or quantized[dtype]


def from_numpy(dtype: np.dtype) -> torch.dtype | None:
    """The torch dtype of a stored numpy dtype (little-endian f32 / f16, `|V2` bf16), or None."""
    return next((t for t, n in NUMPY_DTYPES.items() if n == dtype), None)


def from_safetensors(code: str) -> torch.dtype | None:
    return next((t for t, c in SAFETENSORS_DTYPES.items() if c == code), None)
