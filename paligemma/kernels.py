"""The optional C++ decode kernel (`csrc/gemv.cpp`), built on first use and cached by torch.

`gemv(isa, x, w, scale)` computes `x @ (w * scale[:, None]).T` in float32 for a few rows of x with
f32 / bf16 / f16 / int8 weights, at memory bandwidth. The source is built once per instruction
set (`ISAS`), each as its own extension and op (`paligemma::gemv_avx512`, `paligemma::gemv_avx2`),
so both can live in one process. The AMX build (`amx`: the AVX-512 kernel plus AMX-BF16 and
AMX-INT8 tiles) also has `gemm_amx`, the GEMM of many rows on tiles for bf16, int8 and int4
weights, and `gemm_amx_int8`, the same for int8 and int4 weights on int8 tiles. Which build
a process uses, if any, is `paligemma.dispatch`'s choice; building needs a C++ compiler, and
without one `load` returns False and `linear` uses PyTorch ops, with the same results up to f32
rounding.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).parent / "csrc" / "gemv.cpp"
logger = logging.getLogger("paligemma")

# instruction set -> (/proc/cpuinfo flags it needs, compiler flags). at::parallel_for is OpenMP
# in the header: without -fopenmp it runs serially; libgomp.so.1 then resolves to the copy torch
# already loaded (same soname, one thread pool).
_AVX512 = (frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "fma", "f16c"}),
           ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-mf16c"])
ISAS: dict[str, tuple[frozenset[str], list[str]]] = {
    "amx": (_AVX512[0] | {"amx_tile", "amx_bf16", "amx_int8"},
            [*_AVX512[1], "-mamx-tile", "-mamx-bf16", "-mamx-int8"]),
    "avx512": _AVX512,
    "avx2": (frozenset({"avx2", "fma", "f16c"}), ["-mavx2", "-mfma", "-mf16c"]),
}

_loaded: dict[str, bool] = {}  # instruction set -> whether its build loaded
STALE_LOCK_SECONDS = 600  # a build takes about 30 s: a lock this old outlived a killed build


def load(isa: str) -> bool:
    """Builds (first time, ~30 s) and loads the kernel for `isa`; False if that fails here.

    The caller checks that the CPU has the instruction set (`ISAS[isa][0]`)."""
    if isa not in _loaded:
        _loaded[isa] = _build(isa)
    return _loaded[isa]


def _build(isa: str) -> bool:
    logger.info("loading the C++ decode kernel for %s (built once, about 30 s, then cached by "
                "torch)", isa)
    name = f"paligemma_gemv_{isa}"
    try:
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError:  # private in torch; without it the lock is not checked
        pass
    else:
        _clear_stale_lock(Path(_get_build_directory(name, False)))
    try:
        from torch.utils.cpp_extension import load as load_extension

        load_extension(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", f"-DPG_ISA={isa}", "-fopenmp", *ISAS[isa][1]],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
        if isa == "amx":  # the OS must also grant the tile state (Linux 5.16+)
            gemm_amx(torch.zeros(1, 32), torch.zeros(16, 32).bfloat16())
    except Exception as e:  # no compiler, no headers, build error: fall back, but say so
        warnings.warn(f"paligemma: C++ kernel ({isa}) unavailable ({e}); dispatch falls back to "
                      "the next instruction set or PyTorch ops", stacklevel=4)
        return False
    torch.library.register_fake(f"paligemma::gemv_{isa}")(_gemv_shape)
    torch.library.register_fake(f"paligemma::gelu_tanh_{isa}")(_in_place)
    torch.library.register_fake(f"paligemma::attend_cached_{isa}")(_attend_shape)
    torch.library.register_fake(f"paligemma::rms_norm_{isa}")(_rms_norm_shape)
    if isa in INT8_HALVES_ISAS:
        torch.library.register_fake(f"paligemma::int8_halves_{isa}")(_halves_in_place)
        torch.library.register_fake(f"paligemma::int8_combine_{isa}")(_combine_in_place)
    if isa == "amx":
        torch.library.register_fake("paligemma::gemm_amx")(_gemm_shape)
        torch.library.register_fake("paligemma::gemm_amx_int8")(_gemm_int8_shape)
    return True


def _clear_stale_lock(build_directory: Path) -> None:
    """Removes torch's build lock (`<build directory>/lock`) when a killed build left it.

    torch creates the lock for the length of a build and waits, with no time limit, for one it
    finds; a build interrupted in its first half minute (Ctrl-C, a killed job) leaves it behind,
    and every later process then hangs on loading the kernel. A lock older than
    STALE_LOCK_SECONDS is removed, with a warning; a younger one is another process's build.
    """
    lock = build_directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        warnings.warn(f"paligemma: removing {lock}, left {age / 60:.0f} minutes ago by a kernel "
                      "build that did not finish", stacklevel=5)
        lock.unlink(missing_ok=True)


def _gemm_shape(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
    parts: int,
) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def _gemm_int8_shape(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def _in_place(x: torch.Tensor, other: torch.Tensor | None) -> None:
    return None


def _attend_shape(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, softcap: float
) -> torch.Tensor:
    return torch.empty_like(q)


def _rms_norm_shape(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


def _halves_in_place(x: torch.Tensor, halves: torch.Tensor, step: torch.Tensor) -> None:
    return None


def _combine_in_place(
    sums: torch.Tensor, step: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor
) -> None:
    return None


def _gemv_shape(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])  # lets torch.compile trace through the op


def gelu_tanh_(isa: str, x: torch.Tensor, other: torch.Tensor | None = None) -> None:
    """x = gelu(x, approximate="tanh") * other (or without `other`), in place; float32 or
    bfloat16 (computed in f32, rounded once), contiguous, other of x's dtype and shape. Only call
    after `load(isa)` returned True."""
    getattr(torch.ops.paligemma, f"gelu_tanh_{isa}")(x, other)


def attend_cached(
    isa: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of a few query rows over the KV cache (a decode step), float32:
    softmax(where(mask, cap(q k^T), MASK_FILL)) v.

    q [B, K, Q, H] (Q = G * C: the G query heads of each kv head at C positions, roped and scaled),
    k and v [B, K, S, H] with contiguous rows of H (views of the cache), mask [B, C, S] bool
    (query row g * C + c reads mask row c), softcap: cap * tanh(scores / cap) if given
    -> [B, K, Q, H]. Only call after `load(isa)` returned True.
    """
    mask = mask if mask.stride(-1) == 1 else mask.contiguous()
    return getattr(torch.ops.paligemma, f"attend_cached_{isa}")(
        q.contiguous(), k, v, mask, softcap or 0.0)


def rms_norm(isa: str, x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] float32 -> x / sqrt(mean(x^2) + eps) * gain, gain [D] float32, in one pass per
    row. Only call after `load(isa)` returned True."""
    rows = x.reshape(-1, x.shape[-1])
    return getattr(torch.ops.paligemma, f"rms_norm_{isa}")(
        rows if rows.stride(-1) == 1 else rows.contiguous(), gain.contiguous(), eps).view(x.shape)


def gemv(
    isa: str, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] float32, w [N, K] float32/bf16/f16/int8, scale [N] float32 -> [M, N] float32.

    Only call after `load(isa)` returned True.
    """
    return getattr(torch.ops.paligemma, f"gemv_{isa}")(x.contiguous(), w, scale)


INT8_HALVES_ISAS = ("amx", "avx512")  # the builds with `int8_halves` and `int8_combine`


def int8_halves(isa: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float32 -> (halves int8 [2M, K], step [M, 1] float32): each row of x rounded to
    int16 steps of its largest |x| / 32639 and split as x / step = 256 hi + lo, the high halves'
    rows first (what `layers._int8_mm` computes in PyTorch ops, in one pass). Only after
    `load(isa)` returned True, isa in INT8_HALVES_ISAS."""
    halves = torch.empty(2 * x.shape[0], x.shape[1], dtype=torch.int8)
    step = x.new_empty(x.shape[0], 1)
    getattr(torch.ops.paligemma, f"int8_halves_{isa}")(
        x if x.stride(-1) == 1 else x.contiguous(), halves, step)
    return halves, step


def int8_combine(
    isa: str, sums: torch.Tensor, step: torch.Tensor, scale: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """out [M, W] = (lo + 256 hi) * step * scale from the int32 sums [2M, W] of both halves of
    `int8_halves` (high rows first), step [M, 1], scale [W] or None; out in place, unit column
    stride. Only after `load(isa)` returned True, isa in INT8_HALVES_ISAS."""
    getattr(torch.ops.paligemma, f"int8_combine_{isa}")(sums, step, scale, out)


def dequantize_int4(isa: str, w: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> None:
    """Packed int4 w [N, K / 2] uint8, s [N, K / G, 2] float32 -> out [N, K] float32 (in place),
    q * scale + offset (`paligemma.int4`'s layout). Only call after `load(isa)` returned True."""
    getattr(torch.ops.paligemma, f"int4_dequantize_{isa}")(w.contiguous(), s.contiguous(), out)


def gemm_amx(
    x: torch.Tensor,
    w: torch.Tensor,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    parts: int = 3,
) -> torch.Tensor:
    """x [M, K] @ (w [N, K] in float32).T + bias -> [M, N] in x's dtype on AMX tiles; K % 32
    == 0 and N % 16 == 0, x and w with unit column stride, bias float32 [N]. Only after
    `load("amx")`.

    x float32 is split into `parts` bf16 parts: 3 make every product exact (float32 numerics up
    to summation order), 1 rounds x to bf16 (`--matmul-precision medium`); bf16 x takes 1,
    and its output is the f32 sums rounded once to bf16.
    w: bf16; int8 codes with scale [N]; or packed int4 [N, K / 2] with scale [N, K / G, 2]
    (`paligemma.int4`), whose group-wise scales and offsets are applied to each group's f32 sums.
    """
    return torch.ops.paligemma.gemm_amx(x, w, scale, bias, parts)


def gemm_amx_int8(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] float32 @ (w [N, K] int8 * scale [N]).T + bias -> [M, N] float32 on AMX-INT8
    tiles; K % 64 == 0 and N % 16 == 0, x and w with unit column stride, scale and bias float32
    [N]. Or w packed int4 [N, K / 2] with scale [N, K / G, 2] (`paligemma.int4`), G a multiple
    of 64: each group's sums scaled, plus its offset times the group's sum of x. Only after
    `load("amx")`.

    Each row of x is rounded to int16 steps of its largest |x| / 32639 and split into two int8
    halves, x = step * (256 hi + lo) (as `layers._int8_mm` and the decode kernel round x for int8
    weights: relative to the row's largest value, 2^-16, about 100x below the int8 weights'
    own rounding); their int32 sums with the codes are exact, combined and scaled in f32.
    """
    return torch.ops.paligemma.gemm_amx_int8(x, w, scale, bias)
