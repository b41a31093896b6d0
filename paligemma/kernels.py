"""The optional C++ decode kernel (`csrc/gemv.cpp`), built on first use and cached by torch.

`gemv(x, w, scale)` computes `x @ (w * scale[:, None]).T` in float32 for a few rows of x with
f32 / bf16 / f16 / int8 weights, at memory bandwidth on AVX2 CPUs. Building needs a C++
compiler; without one (or on CPUs without AVX2, or with PALIGEMMA_NO_KERNELS=1 set) `available()`
is False and `paligemma.linear` uses PyTorch ops, with the same results up to f32 rounding.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).parent / "csrc" / "gemv.cpp"
logger = logging.getLogger("paligemma")


_available: bool | None = None  # a plain global (not functools.cache): torch.compile reads it


def available() -> bool:
    """Builds (first time, ~30 s) and loads the kernel; False if that is not possible here."""
    global _available
    if _available is None:
        _available = _load()
    return _available


def _load() -> bool:
    if os.environ.get("PALIGEMMA_NO_KERNELS", "") not in ("", "0"):
        return False
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return False
    logger.info("loading the C++ decode kernel (built once, about 30 s, then cached by torch)")
    try:
        from torch.utils.cpp_extension import load

        load(
            name="paligemma_gemv",
            sources=[str(_SOURCE)],
            # at::parallel_for is OpenMP in the header: without -fopenmp it runs serially.
            # libgomp.so.1 resolves to the copy torch already loaded (same soname, one pool).
            extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as e:  # no compiler, no headers, build error: fall back, but say so
        warnings.warn(
            f"paligemma: C++ decode kernel unavailable, using PyTorch ops ({e})", stacklevel=3
        )
        return False
    torch.library.register_fake("paligemma::gemv")(_gemv_shape)
    return True


def _gemv_shape(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])  # lets torch.compile trace through the op


def gemv(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32, w [N, K] float32/bf16/f16/int8, scale [N] float32 -> [M, N] float32.

    Only call after `available()` returned True.
    """
    return torch.ops.paligemma.gemv(x.contiguous(), w, scale)
