"""Weight-only int4 with group-wise scales and offsets (`--quantize int4`, `paligemma.quantize`).

A matrix w [N, K] is stored as

    weight  uint8 [N, K / 2]       4-bit codes q in [0, 15], rows in blocks of BLOCK_ROWS (16):
                                   within a block, the rows' 4-byte words (8 columns each) side
                                   by side, word c of row r at byte 64 c + 4 r; byte j of a word
                                   holds column 8 c + 2 j in its low nibble, 8 c + 2 j + 1 in its
                                   high one
    scale   float32 [N, K / G, 2]  (scale, offset) of each group of G columns of a row,
                                   w ~ q * scale + offset, in the same blocks: within a block,
                                   group g's 16 scales, then its 16 offsets (offset = the
                                   group's minimum, scale = (maximum - minimum) / 15: asymmetric
                                   min-max)

So a slice of whole blocks of rows (`weight[16 a : 16 b]`, `scale[16 a : 16 b]`) is a packed
matrix of its own, and `rows` reads single rows. The blocks put 16 weight rows across the
lanes of the decode kernel's vectors, whose int32 sums then need no adding across lanes (with
one row per vector that took a quarter of a decode step at batch 4; benchmarks/RESULTS.md).
G is the group size (`GROUP_SIZES`, default `DEFAULT_GROUP_SIZE`); a matrix whose width K is
not a multiple of G (SigLIP's MLP output, K = 4304), or whose height N is not a multiple of 16
(none in the official models), is quantized per row to int8 instead (`quantize.quantize_weight`).
The layout is fixed here, not by a library or CPU: checkpoints written on one machine load on
any other. Checkpoints of the first int4 layout (rows one after another, runs of 32 columns
with column j and j + 16 in one byte; `LAYOUT` 1) are converted when loaded (`from_layout_1`).

Math stays float32 (`layers.linear` calls `linear` here for uint8 weights):
- a few rows (decode steps): the C++ decode kernel (`csrc/gemv.cpp`, `paligemma.kernels`, the
  instruction set `paligemma.dispatch` chose) reads the packed weights directly, once (0.56
  bytes per weight at G = 128, against int8's 1.0), with x rounded to int8 steps of its
  group's largest |x| / 127 (an rms error 6-15x below the int4 codes' own on Gaussian,
  heavy-tailed and outlier-laden x; `csrc/gemv.cpp`): half the dot products of int16 steps, so
  a step at batch 4 costs little more than one at batch 1 (benchmarks/RESULTS.md);
- many rows (prefill, vision): with the AMX build, the tile GEMM on the codes (exact in bf16)
  and x in three bf16 parts, each group's f32 sums then scaled and offset (`layers._amx_mm`,
  "amx-gemm", from `dispatch.FEW_ROWS` + 1 rows on: at 16 rows 4.1 vs 5.4 ms for the kernel on
  2048 -> 16384, at 9 rows 4.0 vs 3.2); elsewhere, above `GEMV_MAX_ROWS` rows, weights are
  dequantized to float32 a few MB at a time into one cached buffer, each piece feeding an f32
  GEMM on its output columns (as `layers._widening_mm`).
PyTorch's own int4 kernel (`aten._weight_int4pack_mm_for_cpu`) is not used: with float32
activations it measured 7-10x slower than the int8 kernel (0.12 s vs 0.016 s for a
16384 x 2048 matrix, one row; bf16 activations 0.036 s, and rounding them changes the model's
numerics), and its packed layout depends on the CPU (64-row blocks on AVX-512, 32 on AVX2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import dispatch, kernels, layers  # layers imports this module too: used at call time only

GROUP_SIZES = (32, 64, 128, 256)  # multiples of the kernel's 4 words of 8 columns; int32 sums safe
DEFAULT_GROUP_SIZE = 128
GEMV_MAX_ROWS = 16  # above this a GEMM on dequantized weights beats the kernel (RESULTS.md)
BLOCK_ROWS = 16  # rows of a block: the decode kernel's AVX-512 lanes
LAYOUT = 2  # the layout above, as a quantized checkpoint's config records it
_WORD = 4  # bytes of a row's word in a block (8 columns)
_QUANTIZE_CHUNK = 1 << 20  # weights quantized at a time: bounds the f32 temporaries


def check_group_size(group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size!r}")


def supported(shape: tuple[int, ...] | torch.Size, group_size: int) -> bool:
    """Whether a weight matrix of this shape can be stored as int4 with this group size."""
    check_group_size(group_size)
    return len(shape) == 2 and shape[1] % group_size == 0 and shape[0] % BLOCK_ROWS == 0


def group_size(weight: torch.Tensor, scale: torch.Tensor) -> int:
    """G of a packed weight [N, K / 2] and its scales [N, K / G, 2]."""
    return 2 * weight.shape[1] // scale.shape[1]


def quantize_int4(
    weight: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] (any float dtype) -> (uint8 [N, K / 2], float32 [N, K / G, 2]).

    Blocks of rows are quantized a few at a time, so the float32 temporaries stay about 4 MB. A
    constant group gets scale 1 (every code 0, the offset carries the value exactly).
    """
    if not supported(weight.shape, group_size):
        raise ValueError(
            f"int4 needs a 2-D weight whose width is a multiple of {group_size} and whose "
            f"height is a multiple of {BLOCK_ROWS}, got shape {list(weight.shape)}"
        )
    n, k = weight.shape
    packed = torch.empty(n, k // 2, dtype=torch.uint8, device=weight.device)
    scale = torch.empty(n, k // group_size, 2, dtype=torch.float32, device=weight.device)
    step = max(1, _QUANTIZE_CHUNK // k // BLOCK_ROWS) * BLOCK_ROWS
    for start in range(0, n, step):
        w = weight[start : start + step].to(torch.float32).view(-1, k // group_size, group_size)
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        s = (high - low) / 15
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = ((w - low) / s).round_().clamp_(0, 15).to(torch.uint8)  # clamp: f32 rounding at 15
        packed[start : start + step] = pack(q.view(-1, k))
        scale[start : start + step] = block_scales(torch.cat([s, low], -1))
    return packed, scale


def _to_blocks(t: torch.Tensor, unit: int) -> torch.Tensor:
    """[N, W] row-major -> the same shape with each block's rows side by side every `unit`
    elements: [N / 16, 16, W / unit, unit] -> [N / 16, W / unit, 16, unit]."""
    n, w = t.shape
    blocks = t.reshape(n // BLOCK_ROWS, BLOCK_ROWS, w // unit, unit).transpose(1, 2)
    return blocks.contiguous().view(n, w)


def _from_blocks(t: torch.Tensor, unit: int) -> torch.Tensor:
    """The inverse of `_to_blocks`."""
    n, w = t.shape
    rows = t.reshape(n // BLOCK_ROWS, w // unit, BLOCK_ROWS, unit).transpose(1, 2)
    return rows.contiguous().view(n, w)


def pack(q: torch.Tensor) -> torch.Tensor:
    """Codes [N, K] (uint8, 0..15; N a multiple of 16) -> [N, K / 2] in the module's layout."""
    return _to_blocks(q[:, 0::2] | (q[:, 1::2] << 4), _WORD)


def _codes(row_bytes: torch.Tensor) -> torch.Tensor:
    """Rows of packed bytes [T, K / 2] (byte j: columns 2 j, 2 j + 1) -> codes [T, K]."""
    return torch.stack([row_bytes & 15, row_bytes >> 4], -1).view(row_bytes.shape[0], -1)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """[N, K / 2] uint8 -> codes [N, K] (uint8, 0..15); the inverse of `pack`."""
    return _codes(_from_blocks(packed, _WORD))


def block_scales(scale: torch.Tensor) -> torch.Tensor:
    """(scale, offset) pairs by row [N, K / G, 2] -> the same shape in the module's blocks."""
    n = scale.shape[0]
    return _to_blocks(scale.reshape(n, -1), 1).view(scale.shape)


def row_scales(scale: torch.Tensor) -> torch.Tensor:
    """The inverse of `block_scales`: [N, K / G, 2] with row n's (scale, offset) at [n, g]."""
    n = scale.shape[0]
    return _from_blocks(scale.reshape(n, -1), 1).view(scale.shape)


def rows(
    weight: torch.Tensor, scale: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows `index` [T] of a packed matrix: (codes [T, K] uint8, (scale, offset) [T, K / G, 2])."""
    n, half = weight.shape
    block, row = index // BLOCK_ROWS, index % BLOCK_ROWS
    words = weight.view(n // BLOCK_ROWS, half // _WORD, BLOCK_ROWS, _WORD)[block, :, row]
    pairs = scale.view(n // BLOCK_ROWS, -1, BLOCK_ROWS)[block, :, row]
    return _codes(words.reshape(len(index), half)), pairs.reshape(len(index), *scale.shape[1:])


def from_layout_1(
    weight: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix stored in the first int4 layout (rows one after another; per run of 32 columns,
    byte j holds column j low, j + 16 high; scales by row) -> this module's layout, the same
    codes and scales. N must be a multiple of 16."""
    n, half = weight.shape
    runs = weight.reshape(n, half // 16, 1, 16)
    codes = torch.cat([runs & 15, runs >> 4], 2).view(n, 2 * half)
    return pack(codes), block_scales(scale)


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """weight [N, K / 2] uint8, scale [N, K / G, 2] -> [N, K] in `dtype` (q * scale + offset)."""
    n, k = weight.shape[0], 2 * weight.shape[1]
    out = torch.empty(n, k, dtype=torch.float32, device=weight.device)
    _dequantize_into(weight, scale, out)
    return out.to(dtype)


def _dequantize_into(weight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """Writes dequantize(weight, scale) into out [N, K] float32: the C++ kernel where the
    dispatch chose one (`csrc/gemv.cpp`), PyTorch ops otherwise (the same values)."""
    kernel = dispatch.plan().kernel if weight.is_cpu else None
    if kernel:
        kernels.dequantize_int4(kernel, weight, scale, out)
        return
    _dequantize_codes(unpack(weight), row_scales(scale), out)


def _dequantize_codes(codes: torch.Tensor, pairs: torch.Tensor, out: torch.Tensor) -> None:
    """codes [T, K] uint8, (scale, offset) by row [T, K / G, 2] -> out [T, K] float32."""
    t, groups = pairs.shape[:2]
    q = codes.view(t, groups, -1).to(torch.float32)
    torch.addcmul(pairs[..., 1:], q, pairs[..., :1], out=out.view(t, groups, -1))


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor
) -> torch.Tensor:
    """x [..., K] -> [..., N]: x @ dequantize(weight, scale).T + bias, in x's dtype."""
    bias = None if bias is None else bias.to(x.dtype)
    if (torch.is_grad_enabled() and x.requires_grad) or x.dtype != torch.float32 or not x.is_cpu:
        return F.linear(x, dequantize(weight, scale, x.dtype), bias)
    rows = x.numel() // x.shape[-1]
    x2 = x.reshape(rows, -1)
    plan = dispatch.plan()
    if rows <= GEMV_MAX_ROWS and plan.kernel:
        y = kernels.gemv(plan.kernel, x2, weight, scale)
    else:
        y = _dequantizing_mm(x2, weight, scale)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], -1)


def embedding(tokens: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """tokens [...] -> [..., K] float32: the dequantized rows of a packed embedding."""
    codes, pairs = rows(weight, scale, tokens.reshape(-1))
    out = torch.empty(codes.shape, dtype=torch.float32, device=weight.device)
    _dequantize_codes(codes, pairs, out)
    return out.view(*tokens.shape, -1)


def _dequantizing_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] f32 @ dequantize(weight, scale).T, dequantizing weight rows chunk by chunk into
    one buffer that stays in cache (`layers.chunked_weight_mm`)."""

    def fill(start: int, stop: int, buf: torch.Tensor) -> None:
        _dequantize_into(weight[start:stop], scale[start:stop], buf)

    return layers.chunked_weight_mm(x, weight.shape[0], fill, BLOCK_ROWS)
