"""Layers that compute in float32 whatever dtype their weights are stored in.

big_vision computes in float32 for f32, bf16 and f16 checkpoints alike; here too, only the
storage of the parameters changes: f32, bf16, f16, int8 with a float32 scale per output row
(`paligemma.quantize`), or packed int4 (uint8) with group-wise scales (`paligemma.int4`, which
computes those matmuls). Activations stay float32, which is also the fast choice on CPUs without
native bf16 arithmetic (AVX2, most AVX-512), where PyTorch's bf16 matmul is several times slower
than f32.

How a matmul runs (`linear`) is chosen once per process by `paligemma.dispatch` from the CPU's
capabilities, per weight dtype and row count:
- a few rows (decode steps): the C++ kernel reads the stored weights directly, at memory
  bandwidth (`paligemma.kernels`, built for AMX, AVX-512 or AVX2);
- many rows (prefill, vision) with non-f32 weights: bf16 weights on CPUs with AMX take the
  kernel's tile GEMM on x split into three bf16 parts (exact products, f32 sums: `_amx_mm`);
  int8 and int4 weights there its int8 tiles, and int8 weights on other CPUs with int8 dot
  products oneDNN's int8 GEMM, on x rounded to int16 steps in two int8 halves (exact int32
  sums: `_amx_mm`, `_int8_mm`); otherwise the weights are widened to f32 a few MB at a time into
  one buffer that stays in cache, each piece feeding an f32 GEMM on its output columns
  (at `--matmul-precision medium` on CPUs with native bf16: PyTorch's bf16 GEMM instead, or the
  tile GEMM on x in one bf16 part, and the activations between a block's projections stay bf16:
  `matmul_dtype`);
- f32 weights otherwise: `F.linear`, or oneDNN's f32 GEMM on AVX-512 x86 CPUs where MKL is slow
  (which also runs the widened pieces' GEMMs there: `dispatch.Plan.sgemm`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch, int4, kernels

CHUNK_BYTES = 4 << 20  # f32 bytes of weights widened at a time (fits in L2/L3 with room)
# bf16 bytes of f16 / int8 weights converted at a time for the bf16 GEMM: larger pieces keep
# oneDNN's per-call packing cheap (16384 x 2048 int8 on the AMX Xeon: 17.8 ms vs 20.1 at 4 MB).
BF16_CHUNK_BYTES = 16 << 20


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """weight [N, ...] (any dtype), scale [N] or None -> weight * scale in `dtype`.
    Packed int4 (uint8 [N, K / 2], scale [N, K / G, 2]) -> [N, K]."""
    if weight.dtype == torch.uint8:
        return int4.dequantize(weight, scale, dtype)
    w = weight.to(dtype)
    return w if scale is None else w * scale.to(dtype).view(-1, *[1] * (w.dim() - 1))


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] -> [..., N]: x @ (weight * scale[:, None]).T + bias, in x's dtype.

    weight [N, K] is f32, bf16, f16 or int8, scale [N] float32 or None; or packed int4 (uint8
    [N, K / 2], scale [N, K / G, 2]: `paligemma.int4`). Results agree across the float32 paths up
    to summation order; "bf16-gemm" and "amx-gemm-bf16" (`--matmul-precision medium`) round x
    and the output to bf16, and also take bf16 x (from `matmul_dtype`).
    """
    bias = None if bias is None else bias.to(x.dtype)
    # The kernel and the chunked GEMM (mm with out=) have no autograd: training takes F.linear.
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if needs_grad or not x.is_cpu:
        return F.linear(x, dequantize(weight, scale, x.dtype), bias)
    rows = x.numel() // x.shape[-1]
    path = _path(weight, rows)
    if weight.dtype == torch.uint8 and not path.startswith(("amx-gemm", "amx-int8", "bf16-gemm")):
        return int4.linear(x, weight, bias, scale)
    if path in BF16_PATHS and x.dtype in (torch.bfloat16, torch.float32):
        x2 = x.reshape(rows, -1).bfloat16()  # bf16 x: `matmul_dtype`
        if path == "bf16-gemm":
            y = _bf16_mm(x2, weight, bias, scale)
        else:
            y = _amx_mm(x2, weight, scale, bias).bfloat16()
        return y.view(*x.shape[:-1], -1).to(x.dtype)
    if x.dtype != torch.float32:
        return F.linear(x, dequantize(weight, scale, x.dtype), bias)
    if path.startswith("kernel"):
        y = kernels.gemv(dispatch.plan().kernel, x.reshape(rows, -1), weight, scale)
    elif path == "aten" and scale is None:
        return F.linear(x, weight, bias)
    elif path == "onednn" and scale is None:
        return onednn_linear(x.reshape(rows, -1), weight, bias).view(*x.shape[:-1], -1)
    elif path == "int8-gemm":
        y = _int8_mm(x.reshape(rows, -1), weight, scale)
    elif path in ("amx-gemm", "amx-int8"):  # adds the bias itself
        int8_tiles = path == "amx-int8" and (  # int4 groups of whole int8 tiles
            weight.dtype == torch.int8 or int4.group_size(weight, scale) % 64 == 0)
        y = _amx_mm(x.reshape(rows, -1), weight, scale, bias, int8_tiles=int8_tiles)
        return y.view(*x.shape[:-1], -1)
    else:
        y = _widening_mm(x.reshape(rows, -1), weight, scale)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], -1)


BF16_PATHS = ("bf16-gemm", "amx-gemm-bf16")  # `--matmul-precision medium`: x rounded to bf16


def _path(weight: torch.Tensor, rows: int) -> str:
    """The path `dispatch` chose for a matmul of `rows` rows on this weight's dtype."""
    return dispatch.plan().paths.get((weight.dtype, rows <= dispatch.FEW_ROWS), "widen")


def _widening_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] f32 @ weight [N, K] (any dtype).T * scale, widening weight rows chunk by chunk."""
    def widen(start: int, stop: int, buf: torch.Tensor) -> None:
        buf.copy_(weight[start:stop])

    out = chunked_weight_mm(x, weight.shape[0], widen)
    return out if scale is None else out.mul_(scale)


def _amx_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    int8_tiles: bool = False,
) -> torch.Tensor:
    """x [M, K] @ (weight * scale).T + bias -> [M, N] on AMX tiles ("amx-gemm",
    `kernels.gemm_amx`): float32 x in three bf16 parts (products exact, f32 sums; two at
    `--matmul-precision high`, one at medium) -> f32; bf16 x ("amx-gemm-bf16") in one -> bf16,
    rounded once from the f32 sums. weight bf16, int8 with scale [N], or packed int4 with scale
    [N, K / G, 2]; bias [N] (any float dtype) added to the f32 sums. `int8_tiles` ("amx-int8",
    `kernels.gemm_amx_int8`): float32 x, int8 weights or int4 ones in groups of a multiple of 64
    columns on int8 tiles, x rounded to int16 steps per row -> f32. The kernel takes whole tiles
    (32 columns, 64 on int8 tiles; 16 rows); the last K % 32 (64) columns (never int4's: its
    groups are whole tiles) and N % 16 rows widen."""
    x = x if x.stride(1) == 1 else x.contiguous()  # the kernel reads rows of x in place
    precision = dispatch.plan().precision  # medium: f32 x in one part (int4 groups of 32)
    parts = {"medium": 1, "high": 2}.get(precision, 3) if x.dtype == torch.float32 else 1
    k, n = x.shape[1], weight.shape[0]
    tile_k = 64 if int8_tiles else 32
    k_main, n_main = k // tile_k * tile_k, n // 16 * 16
    if k_main < k and parts == 1:  # f32 sums, for the columns past the tiles: one rounding
        x = x.float()
    bias = None if bias is None else bias.float()
    if k_main == 0 or n_main == 0:
        return F.linear(x.float(), dequantize(weight, scale), bias)
    main, main_scale = weight[:n_main], None if scale is None else scale[:n_main]
    w = main if main.dtype == torch.uint8 else main[:, :k_main]
    main_bias = None if bias is None else bias[:n_main]
    if int8_tiles:
        y = kernels.gemm_amx_int8(x[:, :k_main], w, main_scale, main_bias)
    else:
        y = kernels.gemm_amx(x[:, :k_main], w, main_scale, main_bias, parts)  # in x's dtype
    if k_main < k:
        y.addmm_(x[:, k_main:].float(), dequantize(main[:, k_main:], main_scale).T)
    if n_main < n:
        tail = dequantize(weight[n_main:], None if scale is None else scale[n_main:])
        tail = F.linear(x.float(), tail, None if bias is None else bias[n_main:])
        y = torch.cat([y, tail.to(y.dtype)], 1)
    return y


X_INT16_LEVELS = 127 * 256 + 127  # |x| / step of `_int8_mm`: its high half stays within int8
INT32_PIECE_BYTES = 4 << 20  # int32 products of `_int8_mm` per piece of output columns


def _int8_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] f32 @ int8 weight [N, K].T * scale -> [M, N] f32 through exact int8 GEMMs
    (`torch._int_mm`: oneDNN, AMX-INT8 / VNNI where the CPU has them; "int8-gemm").

    Each row of x is rounded to int16 steps of max|x_row| / 32639 (as the decode kernel rounds
    x for int8 weights: 2^-15 of the row's largest value) and split into int8 halves,
    x / step = 256 hi + lo. Both halves go through one int8 GEMM with int32 sums, which are
    exact; only the final combination 256 hi.w + lo.w is rounded to f32. The output is made a
    few MB of columns at a time, so the int32 sums stay in cache."""
    (m, k), n = x.shape, weight.shape[0]
    isa = dispatch.plan().kernel
    fused = isa in kernels.INT8_HALVES_ISAS  # the same numbers in one pass (AVX-512 builds)
    if fused:
        halves, step = kernels.int8_halves(isa, x)
    else:
        step = (x.abs().amax(1, keepdim=True).div_(X_INT16_LEVELS)
                .clamp_(min=torch.finfo(x.dtype).tiny))
        units = x.div(step).round_().to(torch.int16)
        high = units.add(128).bitwise_right_shift_(8)  # so that lo = units - 256 hi: [-128, 127]
        halves = torch.empty(2 * m, k, dtype=torch.int8)  # hi, then lo
        halves[:m] = high
        halves[m:] = units.sub_(high.bitwise_left_shift_(8))
    out = x.new_empty(m, n)
    width = min(n, max(256, INT32_PIECE_BYTES // (4 * 2 * m)))
    sums = torch.empty(2 * m * width, dtype=torch.int32)  # reused: no fresh pages
    for start in range(0, n, width):
        stop = min(start + width, n)
        piece = sums[: 2 * m * (stop - start)].view(2 * m, stop - start)
        torch._int_mm(halves, weight[start:stop].T, out=piece)
        y = out[:, start:stop]
        if fused:
            kernels.int8_combine(isa, piece, step, None if scale is None else scale[start:stop], y)
            continue
        y.copy_(piece[m:]).add_(piece[:m], alpha=256).mul_(step)
        if scale is not None:
            y.mul_(scale[start:stop])
    return out


def _bf16_mm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] bf16 @ weight [N, K].T * scale + bias -> [M, N] bf16, through PyTorch's bf16
    GEMM (oneDNN; AMX where the CPU has it): products accumulated in f32, the output rounded to
    bf16 (`--matmul-precision medium`). f16 / int8 / packed int4 weights are converted a few MB
    at a time; int8 codes are exact in bf16, and the scale and bias are applied to each piece's
    output in f32 before its one rounding (an in-place bf16 * f32 multiply would widen the whole
    output twice); int4 weights are dequantized (their group-wise scales applied) and rounded
    to bf16, as f32 weights are at this precision."""
    if weight.dtype == torch.bfloat16 and scale is None:
        return F.linear(x, weight, None if bias is None else bias.bfloat16())  # bias fused
    (m, k), n = x.shape, weight.shape[0]
    out = x.new_empty(m, n)
    packed = weight.dtype == torch.uint8
    # int4 pieces pass through f32 (dequantized) on their way: CHUNK_BYTES of them stay in cache
    # (16384 x 2048 at 262 rows on an AMD EPYC: 29 ms, 43 ms with 16 MB pieces; bf16: 24 ms)
    step = max(1, CHUNK_BYTES // (4 * k) if packed else BF16_CHUNK_BYTES // (2 * k))
    if packed:  # whole blocks of rows (`int4`)
        step = max(1, step // int4.BLOCK_ROWS) * int4.BLOCK_ROWS
    buf = x.new_empty(min(step, n), k)  # reused: no fresh pages
    wide = x.new_empty(buf.shape, dtype=torch.float32) if packed else None
    for start in range(0, n, step):
        cols = slice(start, start + step)
        w = buf[: min(step, n - start)]
        if packed:
            int4._dequantize_into(weight[cols], scale[cols], wide[: len(w)])
            w.copy_(wide[: len(w)])
        else:
            w.copy_(weight[cols])
        if scale is None or packed:
            out[:, cols] = F.linear(x, w, None if bias is None else bias[cols].bfloat16())
        else:
            y = F.linear(x, w).float().mul_(scale[cols])
            out[:, cols] = y if bias is None else y.add_(bias[cols])
    return out


def gelu_tanh_(x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
    """x = gelu(x, approximate="tanh") * other (or gelu(x)), in place (no autograd), returning x.

    float32 or bf16 x and other on CPU take the kernel's one pass (`kernels.gelu_tanh_`:
    x * sigmoid(2u), the same function as 0.5 x (1 + tanh(u)), a few ulp from it; bf16 computed
    in f32 and rounded once) where PyTorch makes two passes with a slower tanh: 3.5x faster for a
    Gemma 2B MLP's 262 x 16384 f32 on one AMX Xeon; bf16 (`--matmul-precision medium`): see
    benchmarks/RESULTS.md."""
    isa = dispatch.plan().kernel
    same = other is None or (other.dtype == x.dtype and other.shape == x.shape
                             and other.is_contiguous())
    fast_dtype = x.dtype in (torch.float32, torch.bfloat16)
    if isa and fast_dtype and x.is_cpu and x.is_contiguous() and same:
        kernels.gelu_tanh_(isa, x, other)
        return x
    x = torch.ops.aten.gelu_(x, approximate="tanh")
    return x if other is None else x.mul_(other)


def matmul_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype for x [..., K] entering a run of matmuls on weights like `weight` (a block's
    projections and what lies between them: GELU, attention): bfloat16 where `linear` rounds x
    and its output to bf16 anyway (`BF16_PATHS`, `--matmul-precision medium`), so the activations
    in between stay bf16 instead of being widened to f32 and rounded again at the next matmul
    (as transformers' bf16 model computes them); x's own dtype otherwise."""
    if x.dtype != torch.float32 or not x.is_cpu or torch.is_grad_enabled():
        return x.dtype
    bf16 = _path(weight, x.numel() // x.shape[-1]) in BF16_PATHS
    return torch.bfloat16 if bf16 else x.dtype


def chunked_weight_mm(
    x: torch.Tensor, n: int, fill: Callable[[int, int, torch.Tensor], None], rows: int = 1
) -> torch.Tensor:
    """x [M, K] f32 @ W.T -> [M, N] for weights W [N, K] stored in another form (bf16, int8, packed
    int4): `fill(start, stop, buf)` writes rows [start, stop) of W as float32 into buf, `start`
    a multiple of `rows` (packed int4: whole blocks).

    Widening the whole matrix at once would write and re-read 4 bytes per weight through main
    memory (and page-fault a fresh buffer); one cached chunk buffer keeps the GEMM compute-bound.
    """
    m, k = x.shape
    step = max(1, CHUNK_BYTES // (4 * k) // rows) * rows
    out = x.new_empty(m, n)
    buf = x.new_empty(min(step, n), k)
    onednn = dispatch.plan().sgemm == "onednn"
    for start in range(0, n, step):
        stop = min(start + step, n)
        w = buf[: stop - start]
        fill(start, stop, w)
        if onednn:  # no out=: its [M, stop - start] result is copied into the column block
            out[:, start:stop] = onednn_linear(x, w)
        else:
            torch.mm(x, w.T, out=out[:, start:stop])  # a column block: BLAS ldc = n
    return out


def onednn_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] f32 @ weight [N, K] f32 .T + bias -> [M, N] on oneDNN's f32 GEMM ("onednn",
    `dispatch.Plan.sgemm`): float32 math whatever the matmul precision."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


class Linear(nn.Linear):
    """nn.Linear with float32 math for any stored weight dtype, and an optional `scale` buffer
    for int8 (per output row) or int4 (per group) weights (None, and absent from the state dict,
    otherwise)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("scale", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.scale)


class Embedding(nn.Embedding):
    """Lookup table returning float32 rows; `attend` is the tied output projection."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)
        self.register_buffer("scale", None)

    def reset_parameters(self) -> None:
        # Loaders build the model on the meta device, where there is nothing to draw, and
        # drawing a normal there imports torch._dynamo: about 1 s of every load.
        if not self.weight.is_meta:
            super().reset_parameters()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [...] -> [..., D] float32."""
        if self.weight.dtype == torch.uint8:
            return int4.embedding(tokens, self.weight, self.scale)
        x = F.embedding(tokens, self.weight).float()
        return x if self.scale is None else x * self.scale[tokens, None]

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [..., V]: dot products with every row (logits of a tied embedding)."""
        return linear(x, self.weight, None, self.scale)


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(
            x, self.normalized_shape, self.weight.float(), self.bias.float(), self.eps
        )


class Conv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        return self._conv_forward(x.float(), self.weight.float(), bias)
