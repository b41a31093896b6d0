"""The fast paths compute what the plain ones do: the C++ decode kernel (every instruction set
this CPU can run), chunk-widened GEMMs, the dispatch between them, SDPA attention, low-precision
weight storage and int8 quantization. No timings here."""

import dataclasses
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torch.utils.cpp_extension

from paligemma import dispatch, int4, kernels, layers
from paligemma.config import PaliGemmaConfig, TextConfig, VisionConfig
from paligemma.gemma import MASK_FILL, GeGLU
from paligemma.generate import generate
from paligemma.layers import dequantize, linear
from paligemma.model import PaliGemmaModel
from paligemma.quantize import quantize_, quantize_int8
from paligemma.siglip import SiglipVisionEncoder

# The kernel builds this CPU can run (each is built on first use, then cached by torch).
CPU = dispatch.Cpu.detect()
KERNEL_ISAS = [isa for isa, (needs, _) in kernels.ISAS.items()
               if needs <= CPU.flags and kernels.load(isa)]
# PALIGEMMA_DISABLE values that give this machine each of its plans: kernel builds, then none,
# then no int8 GEMM either where the CPU has one.
PLANS = ([",".join(isa for isa in KERNEL_ISAS[:i]) for i in range(len(KERNEL_ISAS))] + ["kernel"]
         + (["kernel,int8-gemm"] if CPU.native_int8 else [])
         + (["kernel,onednn"] if dispatch.choose(CPU, frozenset({"kernel"})).sgemm == "onednn"
            else []))


def test_every_kernel_build_this_cpu_can_run_loads():
    """A failed build only skips the tests of that build (a machine without a compiler still
    runs the suite); PALIGEMMA_REQUIRE_KERNELS=1 makes it a failure, for machines that must
    test the kernels."""
    failed = [isa for isa, (needs, _) in kernels.ISAS.items()
              if needs <= CPU.flags and isa not in KERNEL_ISAS]
    if failed and os.environ.get("PALIGEMMA_REQUIRE_KERNELS") != "1":
        pytest.skip(f"kernel builds {failed} failed here (their warning says why); "
                    "PALIGEMMA_REQUIRE_KERNELS=1 fails instead")
    assert not failed, f"kernel builds {failed} failed here (their warning says why)"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def replan(monkeypatch):
    """replan("avx512") chooses the paths again with PALIGEMMA_DISABLE=avx512; the process's own
    plan comes back afterwards."""

    def choose(disable: str) -> dispatch.Plan:
        monkeypatch.setenv("PALIGEMMA_DISABLE", disable)
        monkeypatch.delenv("PALIGEMMA_NO_KERNELS", raising=False)
        return dispatch.replan()

    yield choose
    monkeypatch.undo()
    dispatch.replan()


def weights(dtype: torch.dtype, n: int, k: int, seed: int = 0):
    """(stored weight [n, k], scale [n] or None)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return quantize_int8(w) if dtype == torch.int8 else (w.to(dtype), None)


def reference(x, w, scale):
    return (x.double() @ dequantize(w, scale, torch.float64).T).float()


AMX = dispatch.Cpu("a Xeon", frozenset({"avx2", "fma", "f16c", "amx_bf16"}), "AVX2", "GenuineIntel")
AMX_INT8 = dispatch.Cpu("a Xeon", AMX.flags | {"amx_int8"}, "AVX2")
VNNI = dispatch.Cpu("a Xeon", frozenset({"avx2", "fma", "f16c", "avx512_vnni"}), "AVX2")
NO_BF16 = dispatch.Cpu("an EPYC", frozenset({"avx2", "fma", "f16c"}), "AVX2", "AuthenticAMD")
# AVX512-BF16 and VNNI, no AMX (an AMD EPYC Zen 5)
BF16_VNNI = dispatch.Cpu("an EPYC", NO_BF16.flags | {"avx512_bf16", "avx512_vnni"}, "AVX2",
                         "AuthenticAMD")

INT8_STEP = {"amx": 64, "avx512": 64, "avx2": 32}  # int8 weights per step (csrc/gemv.cpp)


def int16_rounded(x, step, group=256, levels=32767):
    """x as the kernel multiplies it with int8 weights: the first K // step * step columns
    rounded to int16 steps of max|x| / 32767 per group of 256 (the rest stays float32); with
    levels=127 to int8 steps, as for int4 weights (`int8_rounded`). x * (levels / max|x|) is
    rounded as the kernel rounds it, in f32."""
    out = x.clone()
    body = x.shape[1] // step * step
    for start in range(0, body, group):
        end = min(start + group, body)
        amax = x[:, start:end].abs().amax(1, keepdim=True)
        unit = torch.where(amax > 0, amax / levels, 1.0)
        inverse = torch.where(amax > 0, levels / amax, 0.0)
        out[:, start:end] = torch.round(x[:, start:end] * inverse) * unit
    return out


def int8_rounded(x, group):
    """x as the kernel multiplies it with packed int4 weights: int8 steps of max|x| / 127 per
    group of G columns."""
    return int16_rounded(x, group, group, levels=127)


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
# tails after 8-, 16-, 32-, 64- and 256-element blocks, and a row longer than the prefetch distance
@pytest.mark.parametrize("k", [7, 64, 200, 1000, 2100])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_gemv_kernel_matches_float64(isa, dtype, k, m):
    w, scale = weights(dtype, 5, k)
    x = torch.randn(m, k)
    xr = int16_rounded(x, INT8_STEP[isa]) if dtype == torch.int8 else x
    atol = 1e-3 if dtype == torch.int8 else 1e-4  # an x/step tie may round the other way
    torch.testing.assert_close(kernels.gemv(isa, x, w, scale), reference(xr, w, scale),
                               rtol=1e-5, atol=atol)


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 8])
def test_gemv_kernel_int4_matches_float64(isa, group, m):
    """Packed int4 (3 blocks of 16 rows): the dequantized weights times x rounded to int8 per
    group of G (codes and offsets alike); x rows 4, 2 and 1 at a time (AVX2: 2, 1)."""
    w, scale = int4.quantize_int4(torch.randn(48, 2 * group) * torch.rand(48, 1), group)
    x = torch.randn(m, 2 * group) * 3
    expected = reference(int8_rounded(x, group), w, scale)
    torch.testing.assert_close(kernels.gemv(isa, x, w, scale), expected, rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
def test_gemv_kernel_keeps_a_nan_in_its_row(isa, dtype):
    """A NaN in a row of x makes that row's outputs NaN with quantized weights too, whose
    kernels round x to integer steps first (a NaN step, not a clamped code)."""
    w, scale = (int4.quantize_int4(torch.randn(32, 256), 128) if dtype == torch.uint8
                else weights(dtype, 32, 256))
    x = torch.randn(3, 256)
    x[1, 70] = float("nan")
    y = kernels.gemv(isa, x, w, scale)
    assert y[1].isnan().all() and y[[0, 2]].isfinite().all()


@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_int4_kernels_refuse_rows_that_are_not_whole_blocks(isa):
    w, scale = int4.quantize_int4(torch.randn(32, 64), 32)
    with pytest.raises(RuntimeError, match="blocks of 16"):
        kernels.gemv(isa, torch.randn(1, 64), w[:24], scale[:24])
    with pytest.raises(RuntimeError, match="blocks of 16"):
        kernels.dequantize_int4(isa, w[:24], scale[:24], torch.empty(24, 64))


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8, torch.uint8])
@pytest.mark.parametrize("m", [1, 3, 4])
def test_gemv_kernel_on_rows_shorter_than_a_page(isa, dtype, m):
    """Rows of 2 KB (bf16) and 1 KB (int8), K = 1024: the AVX-512 builds read 2 or 4 of them
    per stream (csrc/gemv.cpp `Rows`), so outputs and scales are taken that many rows apart; 75
    rows leave a partial run, a block of 4 and single rows at the end. int4 rows (512 B) are
    never spread; they take 80 rows (whole blocks of 16)."""
    x = torch.randn(m, 1024)
    if dtype == torch.uint8:
        w, scale = int4.quantize_int4(torch.randn(80, 1024), 128)
        expected, atol = reference(int8_rounded(x, 128), w, scale), 2e-4
    else:
        w, scale = weights(dtype, 75, 1024)
        xr = int16_rounded(x, INT8_STEP[isa]) if dtype == torch.int8 else x
        expected, atol = reference(xr, w, scale), 1e-3 if dtype == torch.int8 else 1e-4
    torch.testing.assert_close(kernels.gemv(isa, x, w, scale), expected, rtol=1e-5, atol=atol)


def int16_edge_rows(k: int) -> torch.Tensor:
    """6 rows of x: rows whose largest value sits at either end of the int16 range (units
    +32639 and -32639: high halves 127 and -127), tiny and large rows and an all-zero row."""
    x = torch.randn(6, k) * torch.tensor([[1.0], [1e-3], [50.0], [1.0], [1.0], [0.0]])
    x[3, 7], x[4, 9] = 10.0, -10.0
    return x


@pytest.mark.parametrize("fused", [True, False], ids=["kernel", "pytorch-ops"])
def test_int8_gemm_is_exact_on_x_rounded_to_int16_steps(fused, monkeypatch):
    """`_int8_mm` = x rounded to int16 steps of max|x_row| / 32639, times the dequantized
    weights, in pieces of output columns (the last one short), with x split and the output
    combined by the AVX-512 build's ops or by PyTorch ops."""
    if fused and dispatch.plan().kernel not in kernels.INT8_HALVES_ISAS:
        pytest.skip("needs the AVX-512 build")
    if not fused:
        monkeypatch.setattr(kernels, "INT8_HALVES_ISAS", ())
    monkeypatch.setattr(layers, "INT32_PIECE_BYTES", 4 * 2 * 6 * 10)  # 6 rows: 256 columns
    w, scale = weights(torch.int8, 600, 96)
    x = int16_edge_rows(96)
    unit = (x.abs().amax(1, keepdim=True) / layers.X_INT16_LEVELS).clamp(min=1e-38)
    rounded = torch.round(x / unit) * unit
    torch.testing.assert_close(layers._int8_mm(x, w, scale), reference(rounded, w, scale),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not set(KERNEL_ISAS) & set(kernels.INT8_HALVES_ISAS),
                    reason="needs an AVX-512 build")
@pytest.mark.parametrize("k", [96, 100])  # 100: a tail after 16-column vectors
def test_int8_gemm_ops_of_the_kernel_are_the_pytorch_ops_bit_for_bit(k, monkeypatch):
    """The kernel's split of x and combination of the sums give the same bits as PyTorch's ops
    (strided x, pieces of output columns of 16 x 3 + 2 and the last one short, a NaN row)."""
    isa = next(i for i in KERNEL_ISAS if i in kernels.INT8_HALVES_ISAS)
    monkeypatch.setattr(dispatch, "_plan", dataclasses.replace(dispatch.plan(), kernel=isa))
    monkeypatch.setattr(layers, "INT32_PIECE_BYTES", 4 * 2 * 7 * 50)  # 7 rows: 50 columns
    x = torch.cat([int16_edge_rows(k), torch.randn(1, k)]).T.contiguous().T  # column stride 7
    x[6, 3] = float("nan")
    w, scale = weights(torch.int8, 130, k)
    for s in (scale, None):
        fused = layers._int8_mm(x, w, s)
        with monkeypatch.context() as m:
            m.setattr(kernels, "INT8_HALVES_ISAS", ())
            assert torch.equal(fused[:6], layers._int8_mm(x, w, s)[:6])
        assert fused[6].isnan().all()


@pytest.mark.parametrize("cpu", [AMX_INT8, VNNI, AMX, BF16_VNNI],
                         ids=["amx-int8-bf16", "vnni", "amx-bf16", "avx512-bf16-vnni"])
@pytest.mark.parametrize("matmul_precision", ["highest", "medium"])
def test_int8_weights_take_the_int8_gemm_only_with_int8_dot_products(cpu, matmul_precision):
    """...except at medium where oneDNN's bf16 GEMM runs on AMX tiles (a little faster there);
    with AVX512-BF16 and VNNI only the int8 GEMM was the faster one, and stays."""
    plan = dispatch.choose(cpu, frozenset({"kernel"}), matmul_precision)
    off = dispatch.choose(cpu, frozenset({"kernel", "int8-gemm"}), matmul_precision)
    medium_bf16 = matmul_precision == "medium" and cpu.native_bf16
    without = "bf16-gemm" if medium_bf16 else "widen"
    int8_gemm = cpu.native_int8 and not (medium_bf16 and "amx_bf16" in cpu.flags)
    assert plan.paths[torch.int8, False] == ("int8-gemm" if int8_gemm else without)
    assert off.paths[torch.int8, False] == without
    assert plan.paths[torch.int8, True] == off.paths[torch.int8, True] == "widen"  # decode


needs_amx = pytest.mark.skipif("amx" not in KERNEL_ISAS, reason="needs AMX-BF16 and the AMX build")


def scaled_rows(m: int, k: int) -> torch.Tensor:
    """x [m, k] whose rows range over six orders of magnitude."""
    return torch.randn(m, k) * torch.logspace(-3, 3, m)[:, None]


@needs_amx
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
# x rows: one, a block of 16 and one more, three blocks (an odd count: the last one alone), past
# the 512-row chunk (two chunks of 19 blocks); columns: one tile, past the 2048-column chunk with a
# 16-column tail; weight rows: 16, a tail of 8, an odd number of blocks
@pytest.mark.parametrize("m", [1, 17, 40, 600])
@pytest.mark.parametrize("k", [32, 4304])
@pytest.mark.parametrize("n", [16, 40, 48])
def test_amx_gemm_matches_float64(dtype, m, k, n):
    """bf16 weights and int8 codes (scaled per row) at many rows on AMX tiles: x in three bf16
    parts, so products stay exact and only the f32 sums round (about 5e-6 of max|x_row| max|w|
    over 4304 terms; two parts would leave ~4e-5, one part ~1e-2); the bias is added once,
    whatever the number of 2048-column chunks."""
    w, scale = weights(dtype, n, k)
    x = scaled_rows(m, k)
    bias = torch.randn(n)
    row_scale = x.abs().amax(1, keepdim=True) * dequantize(w, scale).abs().max()
    torch.testing.assert_close(layers._amx_mm(x, w, scale, bias) / row_scale,
                               (reference(x, w, scale) + bias) / row_scale, rtol=1e-5,
                               atol=1.5e-5)


def int16_rounded_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row of x rounded to int16 steps of its largest |x| / 32639 (`layers._int8_mm`)."""
    unit = (x.abs().amax(1, keepdim=True) / layers.X_INT16_LEVELS).clamp(min=1e-38)
    return torch.round(x / unit) * unit


@needs_amx
# x rows: one, a block of 16 and one more, past the 1536-row chunk; columns: one int8 tile, past
# the 2048-column chunk with a 16-column tail; weight rows: 16, a tail of 8, an odd number of
# blocks
@pytest.mark.parametrize("m", [1, 17, 1600])
@pytest.mark.parametrize("k", [64, 4304])
@pytest.mark.parametrize("n", [16, 40, 48])
def test_amx_int8_tiles_are_exact_on_x_rounded_to_int16_steps(m, k, n):
    """int8 weights on int8 tiles ("amx-int8"): each row of x's whole tiles (the first k // 64 *
    64 columns) rounded to int16 steps of its largest value, in two int8 halves whose int32
    sums with the codes are exact; the 16-column tail, and the 8 weight rows past the last
    whole tile, are multiplied in f32 by x as it is. Rows at either end of the int16 range, and
    an all-zero row, included."""
    w, scale = weights(torch.int8, n, k)
    x = scaled_rows(m, k)
    if m > 2:
        x[1], x[2, 5], x[2, 6] = 0.0, x[2].abs().max() * 2, -x[2].abs().max() * 2
    bias = torch.randn(n)
    tiles, n_tiles = k // 64 * 64, n // 16 * 16
    rounded = torch.cat([int16_rounded_rows(x[:, :tiles]), x[:, tiles:]], 1)
    expected = torch.cat([reference(rounded, w[:n_tiles], scale[:n_tiles]),
                          reference(x, w[n_tiles:], scale[n_tiles:])], 1) + bias
    row_scale = x.abs().amax(1, keepdim=True).clamp(min=1e-30) * dequantize(w, scale).abs().max()
    # f32 sums over 4304 terms (the tail's) round by up to ~5e-6 of the row's scale; against x
    # not rounded the error would be ~5e-4
    torch.testing.assert_close(layers._amx_mm(x, w, scale, bias, int8_tiles=True) / row_scale,
                               expected / row_scale, rtol=1e-5, atol=1.5e-5)


@needs_amx
@pytest.mark.parametrize("group", [64, 128, 256])
@pytest.mark.parametrize("m", [1, 17, 300])
@pytest.mark.parametrize("n", [16, 48])
def test_amx_int8_tiles_take_int4_groups(group, m, n):
    """Packed int4 on int8 tiles, 2304 columns (past the 2048-column chunk): per group, the
    exact products of the codes with x rounded to int16 steps per row, times the group's scale,
    plus its offset times the group's sum of x as it is."""
    w, scale = int4.quantize_int4(torch.randn(n, 2304) * torch.rand(n, 1), group)
    x = scaled_rows(m, 2304)
    codes = int4.unpack(w).double().view(n, -1, group)
    s = int4.row_scales(scale).double()
    rounded = int16_rounded_rows(x).double().view(m, -1, group)
    expected = (torch.einsum("mgk,ngk,ng->mn", rounded, codes, s[..., 0])
                + torch.einsum("mgk,ng->mn", x.double().view(m, -1, group), s[..., 1])).float()
    row_scale = x.abs().amax(1, keepdim=True) * s[..., 0].abs().max().float() * 15
    torch.testing.assert_close(layers._amx_mm(x, w, scale, int8_tiles=True) / row_scale,
                               expected / row_scale, rtol=1e-5, atol=1.5e-5)


@needs_amx
def test_int4_groups_of_32_leave_the_int8_tiles_for_three_bf16_parts(replan):
    """A 64-column int8 tile would hold two groups of 32, whose scales differ: such weights
    take "amx-gemm" (float32 numerics) on the "amx-int8" path."""
    assert replan("").paths[torch.uint8, False] == "amx-int8"
    w, scale = int4.quantize_int4(torch.randn(32, 256), 32)
    x = scaled_rows(20, 256)
    expected = (x.double() @ int4.dequantize(w, scale, torch.float64).T).float()
    row_scale = x.abs().amax(1, keepdim=True) * int4.row_scales(scale)[..., 0].abs().max() * 15
    torch.testing.assert_close(linear(x, w, None, scale) / row_scale, expected / row_scale,
                               rtol=1e-5, atol=1e-6)


@needs_amx
@pytest.mark.parametrize("disable", ["", "int8-gemm"])
def test_int8_and_int4_keep_the_int8_tiles_at_medium(disable, replan, precision):
    """At medium, int8 and int4 weights at many rows stay on "amx-int8" (at least as fast as one
    bf16 part on AMX, and exact); with it switched off, their codes meet one bf16 part of x."""
    torch.set_float32_matmul_precision("medium")
    paths = replan(disable).paths
    expected = "amx-int8" if not disable else "amx-gemm-bf16"
    assert paths[torch.int8, False] == paths[torch.uint8, False] == expected
    assert paths[torch.bfloat16, False] == "bf16-gemm"


@needs_amx
def test_int4_groups_of_32_at_medium_meet_one_bf16_part_of_x(replan, precision):
    """Groups of 32 leave the int8 tiles (above); at medium their f32 x meets the codes rounded
    to bf16 once, as the one-part GEMM of bf16 x would (the offsets' sums of x stay f32)."""
    torch.set_float32_matmul_precision("medium")
    assert replan("").paths[torch.uint8, False] == "amx-int8"
    w, scale = int4.quantize_int4(torch.randn(32, 256), 32)
    x = scaled_rows(20, 256)
    codes = int4.unpack(w).double().view(32, -1, 32)
    s = int4.row_scales(scale).double()
    expected = (torch.einsum("mgk,ngk,ng->mn", x.bfloat16().double().view(20, -1, 32), codes,
                             s[..., 0])
                + torch.einsum("mgk,ng->mn", x.double().view(20, -1, 32), s[..., 1])).float()
    row_scale = x.abs().amax(1, keepdim=True) * int4.row_scales(scale)[..., 0].abs().max() * 15
    y = linear(x, w, None, scale)
    torch.testing.assert_close(y / row_scale, expected / row_scale, rtol=1e-5, atol=1e-6)
    assert y.dtype == torch.float32


@needs_amx
def test_amx_int8_tiles_keep_a_nan_in_its_row():
    """A NaN in a row of x makes that row's outputs NaN (rounding it to an integer would hide
    it), and no other row's."""
    w, scale = weights(torch.int8, 32, 128)
    x = torch.randn(3, 128)
    x[1, 70] = float("nan")
    y = kernels.gemm_amx_int8(x, w, scale)
    assert y[1].isnan().all() and y[[0, 2]].isfinite().all()


@needs_amx
@pytest.mark.parametrize("group", [32, 128, 256])
@pytest.mark.parametrize("m", [1, 17, 300])
@pytest.mark.parametrize("n", [16, 48])
def test_amx_gemm_int4_matches_float64(group, m, n):
    """Packed int4 on AMX tiles, 2304 columns (past the 2048-column chunk): each group's exact
    products with the codes, scaled, plus the offset times the group's sum of x, against the
    dequantized weights in float64."""
    w, scale = int4.quantize_int4(torch.randn(n, 2304) * torch.rand(n, 1), group)
    x = scaled_rows(m, 2304)
    expected = (x.double() @ int4.dequantize(w, scale, torch.float64).T).float()
    row_scale = x.abs().amax(1, keepdim=True) * int4.row_scales(scale)[..., 0].abs().max() * 15
    torch.testing.assert_close(layers._amx_mm(x, w, scale) / row_scale, expected / row_scale,
                               rtol=1e-5, atol=1.5e-5)


@needs_amx
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8, torch.uint8])
def test_amx_gemm_on_bf16_x_is_one_part(dtype):
    """bf16 x ("amx-gemm-bf16", `--matmul-precision medium`): exact products of x's own values,
    f32 sums, the same as float32 x rounded to bf16 first; the output is those sums rounded
    once to bf16 (2304 columns: two chunks, the first one's sums kept in f32)."""
    x = scaled_rows(40, 2304).bfloat16()
    if dtype == torch.uint8:
        w, scale = int4.quantize_int4(torch.randn(48, 2304), 128)
        expected = x.double() @ int4.dequantize(w, scale, torch.float64).T
    else:
        w, scale = weights(dtype, 48, 2304)
        expected = reference(x.float(), w, scale).double()
    row_scale = x.float().abs().amax(1, keepdim=True)
    y = layers._amx_mm(x, w, scale)
    assert y.dtype == torch.bfloat16  # rounded once: within half a bf16 step (2^-8) of the sums
    torch.testing.assert_close(y.float() / row_scale, expected.float() / row_scale,
                               rtol=2**-8, atol=5e-5)


@needs_amx
def test_amx_gemm_takes_strided_x():
    w = torch.randn(32, 64).bfloat16()
    x = torch.randn(64, 20).T  # [20, 64], column stride 20
    torch.testing.assert_close(layers._amx_mm(x, w, None), reference(x, w, None),
                               rtol=1e-5, atol=1e-5)


@needs_amx
def test_amx_gemm_refuses_partial_tiles():
    with pytest.raises(RuntimeError, match="K % 32 and N % 16 must be 0"):
        kernels.gemm_amx(torch.randn(4, 48), torch.randn(16, 48).bfloat16())
    with pytest.raises(RuntimeError, match="K % 64 and N % 16 must be 0"):
        kernels.gemm_amx_int8(torch.randn(4, 96), torch.ones(16, 96, dtype=torch.int8))


@needs_amx
def test_an_amx_build_the_os_refuses_falls_back_to_avx512(monkeypatch):
    """Linux grants the tile state on request (5.16+): where it refuses, the AMX build is not
    used, and bf16 weights at many rows widen on the AVX-512 build."""
    def refused(*args):
        raise RuntimeError("gemm_amx: Linux refused the AMX tile state")

    monkeypatch.setattr(torch.ops.paligemma, "gemm_amx", refused)
    # Built and loaded already: building again in this process would make torch rebuild it
    # under a new name, and the next process rebuild it once more.
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kwargs: None)
    with pytest.warns(UserWarning, match=r"C\+\+ kernel \(amx\) unavailable .*refused"):
        assert not kernels._build("amx")
    monkeypatch.setitem(kernels._loaded, "amx", False)
    plan = dispatch.choose(CPU, frozenset())
    assert plan.kernel == "avx512" and plan.paths[torch.bfloat16, False] == "widen"


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("group", int4.GROUP_SIZES)
def test_int4_dequantize_kernel_is_exact(isa, group):
    """q * scale + offset of every packed column, on each build (the many-row GEMM's widening)."""
    w, scale = int4.quantize_int4(torch.randn(32, 4 * group) * torch.rand(32, 1), group)
    codes, s = int4.unpack(w).double().view(32, 4, group), int4.row_scales(scale).double()
    expected = (codes * s[..., :1] + s[..., 1:]).view(32, -1).float()  # one rounding, as an FMA
    out = torch.empty(32, 4 * group)
    kernels.dequantize_int4(isa, w, scale, out)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
def test_widening_gemm_matches_float64_across_chunks(dtype, monkeypatch):
    monkeypatch.setattr(layers, "CHUNK_BYTES", 3 * 4 * 96)  # 3 rows per chunk, last one short
    w, scale = weights(dtype, 11, 96)
    x = torch.randn(20, 96)
    torch.testing.assert_close(layers._widening_mm(x, w, scale), reference(x, w, scale),
                               rtol=1e-5, atol=1e-4)


INTEL = dispatch.Cpu("a Xeon", frozenset({"avx2", "fma", "f16c", "avx512f"}), "AVX512",
                     "GenuineIntel")
AMD = dataclasses.replace(INTEL, model="an EPYC", vendor="AuthenticAMD")
AMD_AVX2 = dataclasses.replace(AMD, flags=frozenset({"avx2", "fma", "f16c"}), capability="AVX2")
ARM = dispatch.Cpu("a Neoverse", frozenset({"asimd", "bf16"}), "DEFAULT")


@pytest.mark.parametrize("precision", ["highest", "medium"])
def test_f32_gemms_take_onednn_on_avx512_cpus_not_intels(precision):
    amd = dispatch.choose(AMD, frozenset({"kernel"}), precision)
    assert amd.sgemm == ("onednn" if dispatch.onednn_sgemm() else "aten")
    # at medium F.linear stays: PyTorch rounds its inputs to bf16 there, oneDNN's call would not
    expected = "onednn" if amd.sgemm == "onednn" and precision == "highest" else "aten"
    assert amd.paths[torch.float32, False] == expected
    for cpu, disabled in [(INTEL, set()), (AMD_AVX2, set()), (ARM, set()), (AMD, {"onednn"})]:
        plan = dispatch.choose(cpu, frozenset({"kernel"} | disabled), precision)
        assert (plan.sgemm, plan.paths[torch.float32, False]) == ("aten", "aten")


@pytest.mark.skipif(not dispatch.onednn_sgemm(), reason="this PyTorch has no oneDNN linear op")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_onednn_sgemm_matches_float64_on_every_cpu(dtype, monkeypatch):
    """The oneDNN engine as an AVX-512 AMD CPU takes it, whatever the CPU here: the "onednn"
    path and the widened pieces (3 rows per chunk, the last one short)."""
    monkeypatch.setattr(layers, "CHUNK_BYTES", 3 * 4 * 96)
    amd = dataclasses.replace(CPU, vendor="AuthenticAMD", flags=CPU.flags | {"avx512f"})
    plan = dispatch.choose(amd, frozenset({"kernel"}))
    monkeypatch.setattr(dispatch, "_plan", plan)
    w, _ = weights(dtype, 11, 96)
    bias, x = torch.randn(11), torch.randn(2, 150, 96)
    assert plan.paths[dtype, False] == ("onednn" if dtype == torch.float32 else "widen")
    torch.testing.assert_close(linear(x, w, bias), reference(x, w, None) + bias,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("disable", PLANS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("rows", [1, dispatch.FEW_ROWS, dispatch.FEW_ROWS + 1, 300])
def test_linear_is_the_same_on_every_path(disable, dtype, rows, replan):
    """Each plan this machine can run (kernel builds forced off one by one, then the kernel)
    against F.linear on the dequantized weights."""
    plan = replan(disable)
    w, scale = weights(dtype, 33, 48)
    bias = torch.randn(33)
    x = torch.randn(rows, 48)
    expected = F.linear(x, dequantize(w, scale), bias)
    # int8 on the kernel or the int8 GEMM: x is rounded to int16 steps (error <= sum|w| max|x| /
    # 65278, ~1e-3).
    rounds_x = plan.paths[dtype, rows <= dispatch.FEW_ROWS] != "widen"
    atol = 2e-3 if dtype == torch.int8 and rounds_x else 1e-5
    torch.testing.assert_close(linear(x.view(1, rows, 48), w, bias, scale)[0], expected,
                               rtol=1e-5, atol=atol)


def test_dispatch_follows_the_cpu_and_the_switches(replan):
    plan = replan("")
    best = KERNEL_ISAS[0] if KERNEL_ISAS else None
    assert plan.kernel == best
    assert plan.paths[torch.bfloat16, True] == (f"kernel-{best}" if best else "widen")
    assert plan.paths[torch.float32, False] == ("onednn" if plan.sgemm == "onednn" else "aten")
    assert replan("onednn").paths[torch.float32, False] == "aten"
    assert replan("onednn").sgemm == "aten"
    tiles = "amx-gemm" if best == "amx" else "widen"
    assert plan.paths[torch.bfloat16, False] == tiles
    int8_gemm = "amx-int8" if best == "amx" else "int8-gemm" if CPU.native_int8 else tiles
    assert plan.paths[torch.int8, False] == int8_gemm
    assert plan.paths[torch.uint8, False] == ("amx-int8" if best == "amx" else tiles)
    assert replan("int8-gemm").paths[torch.int8, False] == tiles
    assert replan("int8-gemm").paths[torch.uint8, False] == tiles
    if best == "amx":  # the AVX-512 build: oneDNN's int8 GEMM where AMX-INT8 is there
        assert replan("amx").paths[torch.int8, False] == "int8-gemm"
    assert replan("amx").paths[torch.uint8, False] == "widen"
    described = plan.describe()
    assert described["capability"] == torch.backends.cpu.get_cpu_capability()
    assert len(described["paths"]) == 2 * len(dispatch.WEIGHT_DTYPES)
    if "avx512" in KERNEL_ISAS:
        assert replan("avx512").kernel == ("avx2" if "avx2" in KERNEL_ISAS else None)
    assert replan("kernel").paths[torch.int8, True] == "widen"
    assert replan("").paths[torch.int8, True] == plan.paths[torch.int8, True]


def test_old_and_new_switches(replan, monkeypatch):
    monkeypatch.delenv("PALIGEMMA_DISABLE", raising=False)
    monkeypatch.setenv("PALIGEMMA_NO_KERNELS", "1")
    assert dispatch.disabled_switches() == {"kernel"}
    monkeypatch.setenv("PALIGEMMA_DISABLE", "avx512, kernal")
    known = "kernel, amx, avx512, int8-gemm, onednn"
    with pytest.raises(ValueError, match=f"unknown kernal; known: {known}"):
        dispatch.disabled_switches()


@pytest.fixture
def precision():
    """Restores PyTorch's float32 matmul precision (and the plan) after the test."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)
    dispatch.replan()




@pytest.mark.parametrize("cpu", [AMX, BF16_VNNI, NO_BF16],
                         ids=["amx-bf16", "avx512-bf16-vnni", "no-bf16"])
def test_medium_precision_takes_the_bf16_gemm_only_with_native_bf16(cpu):
    highest = dispatch.choose(cpu, frozenset({"kernel"}), "highest")
    medium = dispatch.choose(cpu, frozenset({"kernel"}), "medium")
    assert medium.precision == "medium" and medium.describe()["precision"] == "medium"
    changed = {key: path for key, path in medium.paths.items() if path != highest.paths[key]}
    moved = (torch.bfloat16, torch.float16, torch.uint8)  # no AMX build here: packed int4 too
    if not cpu.native_int8:  # int8 was widened; with VNNI it keeps the int8 GEMM
        moved += (torch.int8,)
    expected = {(dtype, False): "bf16-gemm" for dtype in moved} if cpu.native_bf16 else {}
    if highest.paths[torch.float32, False] == "onednn":  # F.linear, which rounds at medium
        expected[torch.float32, False] = "aten"
    assert changed == expected


def test_plan_follows_the_matmul_precision(precision):
    assert dispatch.plan().precision == torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    assert dispatch.plan().precision == "medium"
    torch.set_float32_matmul_precision("highest")
    assert dispatch.plan().precision == "highest"


def test_medium_is_refused_without_native_bf16(precision, monkeypatch):
    warned = []
    monkeypatch.setattr(dispatch.logger, "warning", lambda msg, *args: warned.append(msg % args))
    monkeypatch.setattr(dispatch, "_plan", dispatch.choose(NO_BF16, frozenset({"kernel"})))
    assert dispatch.set_matmul_precision("medium") == "highest"
    assert torch.get_float32_matmul_precision() == "highest"
    assert len(warned) == 1 and "(an EPYC) has no native bf16" in warned[0]
    with pytest.raises(ValueError, match="'low': expected one of highest, high, medium"):
        dispatch.set_matmul_precision("low")


def test_high_is_refused_without_the_amx_build(precision, monkeypatch):
    """"high" changes only the AMX build's GEMM: elsewhere it would change nothing."""
    warned = []
    monkeypatch.setattr(dispatch.logger, "warning", lambda msg, *args: warned.append(msg % args))
    monkeypatch.setattr(dispatch, "_plan", dispatch.choose(AMX, frozenset({"kernel"})))
    assert dispatch.set_matmul_precision("high") == "highest"
    assert len(warned) == 1 and "no AMX build (CPU a Xeon)" in warned[0]


@needs_amx
def test_high_precision_takes_x_in_two_bf16_parts(precision):
    """At "high", bf16 weights at many rows meet x as two bf16 parts, hi = bf16(x) and mid =
    bf16(x - hi): through identity weights, x comes out as hi + mid (within 2^-16 of x), where
    "highest" returns x itself; decode steps are unchanged."""
    w = torch.eye(48, 64).bfloat16()
    x = torch.randn(40, 64)
    hi = x.bfloat16().float()
    two_parts = hi + (x - hi).bfloat16().float()
    assert torch.equal(linear(x, w), x[:, :48])
    assert dispatch.set_matmul_precision("high") == "high"
    assert torch.equal(linear(x, w), two_parts[:, :48])
    assert not torch.equal(two_parts, x)
    assert torch.equal(linear(x[:2], w), x[:2, :48])


@pytest.mark.skipif(not CPU.native_bf16, reason="needs native bf16 dot products (AMX/AVX512-BF16)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_medium_precision_rounds_the_inputs_of_many_row_matmuls_to_bf16(dtype, precision):
    """At many rows, medium = an f32-accumulated product of the bf16-rounded x and weights
    (float32 weights: an f32 output; bf16 / int8 weights: a bf16 output, then the int8 scale),
    unless int8 weights keep their int8 GEMM (`dispatch.choose`); at few rows (decode) nothing
    changes."""
    w, scale = weights(dtype, 64, 256)
    x = torch.randn(40, 256)
    exact = linear(x, w, None, scale)
    assert dispatch.set_matmul_precision("medium") == "medium"
    if dispatch.plan().paths[dtype, False] in ("amx-int8", "int8-gemm"):  # kept: faster, exact
        assert torch.equal(linear(x, w, None, scale), exact)
        return
    # f32 weights are rounded; bf16 ones are already; int8 values are exact in bf16.
    rounded = w.bfloat16() if dtype == torch.float32 else w.to(torch.float64)
    products = (x.bfloat16().double() @ rounded.double().T).float()
    if dtype == torch.float32 and "amx_bf16" not in CPU.flags:
        # F.linear: PyTorch rounds f32 inputs to bf16 at medium only on AMX CPUs; without AMX
        # (AVX512-BF16 alone: an AMD EPYC) its result stayed within 4e-5 of float64 here
        torch.testing.assert_close(linear(x, w, None, scale), exact, rtol=1e-5, atol=2e-4)
        return
    if dtype == torch.float32:
        torch.testing.assert_close(linear(x, w, None, scale), products, rtol=1e-5, atol=1e-4)
    else:  # one bf16 rounding of the output, which a different f32 sum may put one ulp away
        expected = products if scale is None else products * scale
        torch.testing.assert_close(linear(x, w, None, scale), expected, rtol=2**-7, atol=1e-5)
    assert (linear(x, w, None, scale) - exact).abs().max() > 1e-3  # it did round
    torch.testing.assert_close(linear(x[:2], w, None, scale), exact[:2], rtol=1e-5,
                               atol=2e-3 if dtype == torch.int8 else 1e-5)


@pytest.mark.skipif(not CPU.native_bf16, reason="needs native bf16 dot products (AMX/AVX512-BF16)")
def test_medium_precision_takes_int4_weights_dequantized_to_bf16(precision, monkeypatch):
    """Without the AMX build ("bf16-gemm"): the bf16-rounded x times the dequantized int4
    weights rounded to bf16, f32 sums, one rounding of the output; pieces of 3 weight rows,
    rounded up to a block of 16."""
    monkeypatch.setattr(layers, "CHUNK_BYTES", 3 * 4 * 256)
    w, scale = int4.quantize_int4(torch.randn(64, 256), 128)
    x, bias = torch.randn(40, 256), torch.randn(64)
    assert dispatch.set_matmul_precision("medium") == "medium"
    monkeypatch.setattr(dispatch, "_plan", dataclasses.replace(
        dispatch.plan(), paths={**dispatch.plan().paths, (torch.uint8, False): "bf16-gemm"}))
    rounded = int4.dequantize(w, scale).bfloat16().double()
    products = (x.bfloat16().double() @ rounded.T).float() + bias.bfloat16().float()  # bias: bf16
    torch.testing.assert_close(linear(x, w, bias, scale), products, rtol=2**-7, atol=1e-5)


@pytest.fixture
def medium_plan(monkeypatch, precision):
    """Plans as an AMX CPU at medium precision (bf16 weights at many rows: "bf16-gemm") on any
    machine: PyTorch's bf16 GEMM runs everywhere, natively or not, and these are tiny."""
    torch.set_float32_matmul_precision("medium")
    monkeypatch.setattr(dispatch, "_plan", dispatch.choose(AMX, frozenset({"kernel"}), "medium"))


def test_matmul_dtype_is_bf16_only_where_linear_rounds_to_bf16(medium_plan):
    w16, w32 = torch.zeros(8, 32, dtype=torch.bfloat16), torch.zeros(8, 32)
    many, few = torch.randn(dispatch.FEW_ROWS + 1, 32), torch.randn(dispatch.FEW_ROWS, 32)
    assert layers.matmul_dtype(many, w16) == torch.float32  # autograd on: training is f32
    with torch.no_grad():
        assert layers.matmul_dtype(many, w16) == torch.bfloat16
        assert layers.matmul_dtype(few, w16) == torch.float32  # decode keeps the f32 kernel
        assert layers.matmul_dtype(many, w32) == torch.float32  # "aten": oneDNN rounds inside
        torch.set_float32_matmul_precision("highest")
        assert layers.matmul_dtype(many, w16) == torch.float32


def test_medium_keeps_activations_bf16_between_matmuls_and_close_to_highest(medium_plan):
    """At medium the projections of a vision block and of the Gemma MLP take bf16 inputs (GELU
    and attention in between run in bf16, as transformers' bf16 model); the residual stream and
    the blocks' outputs stay f32, within bf16 rounding of the default precision's."""
    vision = SiglipVisionEncoder(VisionConfig(width=32, depth=2, mlp_dim=64, num_heads=2,
                                              patch_size=14, image_size=56))
    mlp = GeGLU(TextConfig(width=48, depth=1, mlp_dim=64, num_heads=4, num_kv_heads=2,
                           head_dim=16, vocab_size=97))
    with torch.no_grad():
        for p in itertools.chain(vision.parameters(), mlp.parameters()):
            p.normal_(0, 0.3)
    vision, mlp = vision.bfloat16().eval(), mlp.bfloat16().eval()
    seen = set()
    for module in itertools.chain(vision.blocks.modules(), mlp.modules()):
        if isinstance(module, layers.Linear):
            module.register_forward_pre_hook(lambda _, args: seen.add(args[0].dtype))
    images, x = torch.rand(1, 3, 56, 56) * 2 - 1, torch.randn(20, 48)

    def run():
        seen.clear()
        with torch.inference_mode():
            return vision(images), mlp(x)

    medium = run()
    assert seen == {torch.bfloat16}
    torch.set_float32_matmul_precision("highest")
    highest = run()
    assert seen == {torch.float32}
    assert medium[0].dtype == torch.float32  # the residual stream
    for m, h in zip(medium, highest, strict=True):
        error = (m.float() - h).abs().max() / h.abs().max()
        assert 0 < error < 2**-6  # a few bf16 roundings (2^-9 each) through two layers


def tiny_model(softcap: float | None = None, seed: int = 0) -> PaliGemmaModel:
    torch.manual_seed(seed)
    config = PaliGemmaConfig(
        VisionConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=14, image_size=28),
        TextConfig(width=48, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=2, head_dim=16,
                   vocab_size=97, attn_logits_softcap=softcap),
    )
    model = PaliGemmaModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.uniform_(-0.5, 0.5)
            else:
                p.normal_(0, 0.3)
    return model


def ragged_prompts():
    """Two rows of different lengths: the short one is padded, so it has fully masked rows."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 97, (2, 7), generator=g)
    input_mask = torch.arange(7)[None] < torch.tensor([[7], [3]])
    mask_ar = (torch.arange(7)[None] >= 2).long().expand(2, -1)
    images = torch.rand(2, 3, 28, 28, generator=g) * 2 - 1
    return images, tokens * input_mask, mask_ar, input_mask


def test_sdpa_attention_equals_the_explicit_path():
    """Observing the probabilities forces the explicit f32 softmax path; outputs must agree."""
    model, prompts = tiny_model(), ragged_prompts()
    fast_tokens, fast = generate(model, *prompts, max_new_tokens=6)
    hooks = [layer.attn.probs.register_forward_hook(lambda *a: None)
             for layer in model.decoder.layers]
    try:
        tokens, explicit = generate(model, *prompts, max_new_tokens=6)
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(fast_tokens, tokens)
    torch.testing.assert_close(fast, explicit, rtol=0, atol=1e-4)


@pytest.mark.parametrize("softcap", [None, 50.0])
def test_decode_without_the_kernel_is_the_same(softcap, replan):
    model, prompts = tiny_model(softcap), ragged_prompts()
    tokens, logits = generate(model, *prompts, max_new_tokens=6)
    replan("kernel")
    plain_tokens, plain = generate(model, *prompts, max_new_tokens=6)
    assert torch.equal(tokens, plain_tokens)
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-4)


def test_bf16_storage_is_float32_math_on_rounded_weights():
    model, prompts = tiny_model(), ragged_prompts()
    rounded = model.to(torch.bfloat16).float()
    stored = tiny_model().to(torch.bfloat16)
    assert stored.dtype == torch.float32  # activations
    tokens, logits = generate(rounded, *prompts, max_new_tokens=6)
    stored_tokens, stored_logits = generate(stored, *prompts, max_new_tokens=6)
    assert torch.equal(tokens, stored_tokens)
    torch.testing.assert_close(logits, stored_logits, rtol=0, atol=1e-4)


def test_int8_weights_are_within_half_a_step():
    w = torch.randn(64, 300) * torch.rand(64, 1) * 3  # rows of different ranges
    w[5] = 0  # a zero row must not divide by zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert ((dequantize(q, scale) - w).abs() <= scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("rows", [1, 300])
def test_int8_linear_error_is_bounded_by_the_rounding(rows):
    """|x @ (q s - w).T| <= sum_k |x_k| s / 2 on both the kernel and the widening path."""
    w = torch.randn(40, 128)
    q, scale = quantize_int8(w)
    x = torch.randn(rows, 128)
    err = (linear(x, q, None, scale) - x @ w.T).abs()
    bound = x.abs().sum(-1, keepdim=True) * scale / 2 + 1e-4
    assert (err <= bound).all()


def test_quantized_model_uses_int8_everywhere_and_stays_close():
    model, prompts = tiny_model(), ragged_prompts()
    with torch.no_grad():  # tame weights: the 0.3-std ones amplify any perturbation chaotically
        for p in model.parameters():
            p.mul_(0.2)
    tokens, logits = generate(model, *prompts, max_new_tokens=4)
    quantize_(model)
    big = [p for p in model.parameters() if p.dim() == 2]
    assert big and all(p.dtype == torch.int8 for p in big)
    embedder = model.decoder.embedder
    torch.testing.assert_close(
        embedder(torch.tensor([[3, 5]]))[0], dequantize(embedder.weight, embedder.scale)[[3, 5]]
    )
    q_tokens, q_logits = generate(model, *prompts, max_new_tokens=4)
    assert torch.equal(tokens, q_tokens)
    assert (q_logits - logits).abs().max() < 0.02 * logits.abs().max()


def test_training_keeps_autograd_on_every_path():
    w, scale = weights(torch.bfloat16, 6, 16)
    for rows in (1, 20):
        x = torch.randn(rows, 16, requires_grad=True)
        linear(x, w, None, scale).sum().backward()
        torch.testing.assert_close(x.grad, w.float().sum(0).expand(rows, -1))


def test_building_on_the_meta_device_does_not_import_dynamo():
    """Loaders build the model on meta; drawing the embedding's normal there imported
    torch._dynamo, about 1 s of every load."""
    code = ("import sys, torch\n"
            "from paligemma.model import PaliGemmaModel\n"
            "from paligemma.config import VARIANTS\n"
            "with torch.device('meta'):\n"
            "    PaliGemmaModel(VARIANTS['pg1-3b-224'])\n"
            "assert 'torch._dynamo' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_gelu_kernel_matches_float64(isa):
    """The kernel's tanh-GELU (x * sigmoid(2u)) against 0.5 x (1 + tanh(u)) in float64: within
    a few ulp wherever gelu(x) is not negligible, times `other` in the same pass; 1001
    elements (a tail past the last vector), large |x| on both sides, and a NaN kept."""
    x = torch.cat([torch.randn(900) * 3, torch.linspace(-60, 60, 100),
                   torch.tensor([float("nan")])])
    other = torch.randn(1001)
    expected = F.gelu(x.double(), approximate="tanh")
    y = x.clone()
    kernels.gelu_tanh_(isa, y)
    finite = expected.abs() > 1e-6
    assert ((y.double() - expected)[finite].abs() / expected[finite].abs()).max() < 1e-5
    assert (y.double() - expected)[~finite & ~x.isnan()].abs().max() < 1e-6
    assert y[-1].isnan()
    y = x.clone()
    kernels.gelu_tanh_(isa, y, other)
    torch.testing.assert_close(y[:-1].double(), (expected * other.double())[:-1], rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_gelu_kernel_rounds_bf16_once(isa):
    """bf16 x and other (`--matmul-precision medium`): gelu(x) * other computed in f32 and
    rounded once, within half a bf16 ulp (plus f32 rounding) of the float64 value; NaN kept."""
    x = torch.cat([torch.randn(2000) * 3, torch.linspace(-30, 30, 101),
                   torch.tensor([float("nan")])]).bfloat16()
    other = torch.randn(x.shape).bfloat16()
    expected = F.gelu(x.double(), approximate="tanh") * other.double()
    y = x.clone()
    kernels.gelu_tanh_(isa, y, other)
    assert y.dtype == torch.bfloat16 and y[-1].isnan()
    y, expected = y[:-1].double(), expected[:-1]
    # where gelu is not negligible (float64's 1 + tanh(u) cancels to 0 before the kernel's does)
    large = expected.abs() > 1e-6
    half_ulp = torch.ldexp(torch.ones_like(y), torch.frexp(y).exponent - 9)  # bf16: 8 bits
    assert ((y - expected).abs() <= half_ulp * 1.001)[large].all()
    assert (y - expected)[~large].abs().max() < 1e-6


def attention_float64(q, k, v, mask, softcap):
    """big_vision's attention in float64: q [B, K, G * C, H], k/v [B, K, S, H], mask [B, C, S]."""
    scores = q.double() @ k.double().transpose(-1, -2)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = mask[:, None].repeat(1, 1, q.shape[2] // mask.shape[1], 1)
    scores = torch.where(allowed, scores, torch.tensor(MASK_FILL, dtype=torch.float64))
    return scores.softmax(-1) @ v.double()


# (B, K, G, C, H, S): decode steps of 3B (one kv head of 8 query heads, head_dim 256), of
# Gemma 2 (4 kv heads), several query positions, and head_dims with a partial last vector.
ATTENTION_SHAPES = [(1, 1, 8, 1, 256, 274), (4, 1, 8, 1, 256, 37), (2, 4, 2, 3, 64, 100),
                    (3, 2, 3, 2, 48, 5), (2, 1, 4, 1, 20, 7), (1, 2, 2, 1, 8, 3)]


@pytest.mark.parametrize("softcap", [None, 50.0])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_cached_attention_kernel_matches_float64(isa, shape, softcap):
    """`kernels.attend_cached` over views of a longer cache, with masked keys and a fully masked
    query row (uniform weights, as the explicit path gives): within 5e-6 of float64, which is
    what PyTorch's f32 scores, softcap and softmax reach on these inputs (2.7e-6)."""
    b, kv_heads, groups, c, h, s = shape
    cache_k, cache_v = torch.randn(2, b, kv_heads, s + 9, h)
    k, v = cache_k[:, :, :s], cache_v[:, :, :s]
    q = torch.randn(b, kv_heads, groups * c, h) * 0.3
    mask = torch.rand(b, c, s) > 0.3
    mask[0, 0] = False
    out = kernels.attend_cached(isa, q, k, v, mask, softcap)
    torch.testing.assert_close(out.double(), attention_float64(q, k, v, mask, softcap),
                               rtol=0, atol=5e-6)


@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_rms_norm_kernel_matches_float64(isa):
    """`kernels.rms_norm` on rows with a partial last vector and of very different scales."""
    x = torch.randn(5, 2051) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 1.0])[:, None]
    gain = torch.randn(2051)
    expected = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(kernels.rms_norm(isa, x, gain, 1e-6).double(),
                               expected * gain.double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("softcap", [None, 50.0])
def test_decode_steps_take_the_attention_and_norm_kernels(softcap, monkeypatch, replan):
    """Each decode step's attention (every layer) and every RMSNorm take the kernel's ops, the
    prompt's attention (7 + 4 query rows) does not; the tokens and logits are those of PyTorch's
    ops (`test_decode_without_the_kernel_is_the_same` covers the whole kernel)."""
    if not KERNEL_ISAS:
        pytest.skip("no kernel build here")
    model, prompts = tiny_model(softcap), ragged_prompts()
    calls = {"attend_cached": [], "rms_norm": []}
    for name, seen in calls.items():
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *a, f=original, seen=seen: seen.append(1) or f(*a))
    tokens, logits = generate(model, *prompts, max_new_tokens=4)
    depth = model.config.text.depth
    assert len(calls["attend_cached"]) == 3 * depth  # the 3 steps after the prompt
    assert len(calls["rms_norm"]) == 4 * (2 * depth + 1)  # the prompt and 3 steps
    monkeypatch.undo()
    replan("kernel")
    plain_tokens, plain = generate(model, *prompts, max_new_tokens=4)
    assert torch.equal(tokens, plain_tokens)
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-4)


def test_gelu_without_the_kernel_is_pytorchs(replan):
    replan("kernel")
    x, other = torch.randn(3, 40), torch.randn(3, 40)
    expected = F.gelu(x, approximate="tanh") * other
    assert torch.equal(layers.gelu_tanh_(x.clone(), other), expected)


def test_vision_blocks_add_in_place_only_while_unobserved(monkeypatch):
    """Without autograd the encoder's blocks add into its own residual stream; while a hook
    observes a block they return new tensors, so what the hook kept is not added into by the
    next block. The values are the same either way, and as with autograd."""
    vision = SiglipVisionEncoder(VisionConfig(width=32, depth=3, mlp_dim=64, num_heads=2,
                                              patch_size=14, image_size=56)).eval()
    with torch.no_grad():
        for p in vision.parameters():
            p.normal_(0, 0.3)
    images = torch.rand(2, 3, 56, 56) * 2 - 1
    in_place_calls = []
    original = type(vision.blocks[0]).forward_in_place
    monkeypatch.setattr(type(vision.blocks[0]), "forward_in_place",
                        lambda self, x: in_place_calls.append(1) or original(self, x))
    with torch.no_grad():
        in_place = vision(images)
        assert len(in_place_calls) == 3
        kept = []
        vision.blocks[0].register_forward_hook(lambda m, a, out: kept.append((out, out.clone())))
        observed = vision(images)
        assert len(in_place_calls) == 3  # none while observed
    assert torch.equal(in_place, observed)
    assert torch.equal(kept[0][0], kept[0][1])
    # autograd: out of place, and PyTorch's GELU, a few ulp from the kernel's
    torch.testing.assert_close(vision(images), in_place, rtol=1e-5, atol=1e-5)
