"""Which kernel each matmul of `layers.linear` runs on this CPU, chosen once per process.

A matmul's path depends on its weight's storage dtype and on whether it has few rows (a decode
step, bandwidth-bound: up to `FEW_ROWS`) or many (prefill, vision: compute-bound):

- "kernel-amx" / "kernel-avx512" / "kernel-avx2": the C++ kernel (`paligemma.kernels`), built
  for the widest instruction set this CPU has (AVX-512 F/BW/VL/VNNI with AMX-BF16 and AMX-INT8
  tiles, else without, else AVX2 + FMA + F16C; the AMX build decodes as the AVX-512 one);
- "amx-gemm": bf16 weights at many rows with the AMX build (and int8 and int4 weights with
  `int8-gemm` switched off, or int4 in groups of 32): x split into three bf16 parts whose
  products with the weights (or with the int4 / int8 codes, which bf16 holds exactly; scales
  applied to the f32 sums) are exact in the tiles' f32 sums (`layers._amx_mm`): float32
  numerics, 2.2-3x faster than "widen" for bf16 and 1.6-1.9x for int4 on one AMX Xeon;
- "amx-int8": int8 and packed int4 weights at many rows with the AMX build: x rounded to int16
  steps per row and split into two int8 halves, as "int8-gemm" below, whose products with the
  codes are exact in AMX-INT8 tiles' int32 sums (`layers._amx_mm`, `kernels.gemm_amx_int8`;
  int4: per group of 64, 128 or 256 columns, scaled in f32, plus the offset times the group's
  sum of x). int8 codes are read as they are stored, int4 ones only split into bytes, and int8
  tiles do twice the products of bf16 ones. 262 x 2048 -> 16384 on one AMX Xeon: int8 9.5 ms,
  against 26.8 on "amx-gemm", 21.4 on "int8-gemm" and 12.6 for transformers' bf16 GEMM; int4
  16.0 against 39.0 on "amx-gemm" (`benchmarks/bf16_matmul.py`, `benchmarks/RESULTS.md`);
- "aten": `F.linear` on the stored float32 weights (MKL's sgemm on x86);
- "onednn": float32 weights at many rows where MKL is slow (`Plan.sgemm`, below): oneDNN's f32
  GEMM (`torch.ops.mkldnn._linear_pointwise`, what torch.compile's CPU backend calls);
- "widen": the stored weights widened to float32 a few MB at a time, each piece feeding an f32
  GEMM (`layers._widening_mm`, on `Plan.sgemm`); also what few rows take without the kernel;
- "int8-gemm": int8 weights at many rows on CPUs with int8 dot products but not the AMX build
  (AVX512-VNNI, or AMX with `amx` switched off): x rounded to int16 steps per row and split
  into two int8 halves, both multiplied by one exact int8 GEMM, `torch._int_mm` (oneDNN;
  `layers._int8_mm`; the split and the combination of the int32 sums in one C++ pass each with
  an AVX-512 build). 2-4x faster than "widen" on one AMX Xeon;
- "bf16-gemm" and "amx-gemm-bf16" (only at `--matmul-precision medium`, below): PyTorch's bf16
  GEMM on the bf16-rounded x and weights (`layers._bf16_mm`), or the AMX GEMM on x in one bf16
  part.

At the default precision every path computes in float32 (big_vision's numerics); they differ only in
f32 summation order, except that int8 weights on the kernel, int8 and int4 weights on "amx-int8",
and int8 weights on "int8-gemm", take x rounded to int16 steps of 2^-15 of its group's (row's)
largest value, see `csrc/gemv.cpp`: an error about 100x below that of the int8 weights
themselves; and int4 weights on the kernel (decode steps) take x rounded to int8 steps of 1/127
of its group's largest value: an rms error 6-15x below that of the int4 weights themselves, for
half the dot products. Library kernels
were measured against ours on an AVX-512 + AMX Xeon (`benchmarks/bf16_matmul.py`,
`benchmarks/RESULTS.md`): none keeps float32 activations as fast at few rows (`F.linear` in f32 ties
the kernel at 1 row and is about 2x slower at 4 and 8, `torch._weight_int8pack_mm` with f32
activations is 7-24x slower, bf16 `F.linear` rounds x to bf16), and an f32-exact bf16x3 GEMM through
MKL or oneDNN gained at most 1.2x over "widen" at one thread, so they are not paths (our own, on AMX
tiles with x split once per call and the weights read in place, is: "amx-gemm"). At many rows MKL's
sgemm on widened weights ("widen") ties or beats the kernel's int16 products for int8 weights with
two threads on that Xeon; oneDNN's int8 GEMM on the two halves of int16-rounded x beats both
("int8-gemm").

Faster prefill at lower precision, on request: `torch.set_float32_matmul_precision("medium")` (the
CLI's `--matmul-precision medium`, `set_matmul_precision`) lets the GEMMs of many rows round their
inputs to bf16, on CPUs with native bf16 dot products (AMX-BF16 or AVX512-BF16): bf16, f16 and int8
weights take "bf16-gemm" (oneDNN's bf16 GEMM, as transformers' bf16 model computes its matmuls:
inputs and outputs bf16, f32 accumulation; 3-5x faster than "widen" on one AMX Xeon; int8 weights
where that GEMM runs on AMX tiles: a little faster than "int8-gemm", vision tower 583-602 vs
644-733 ms; with AVX512-BF16 and VNNI only they keep "int8-gemm": on an AVX-512 AMD EPYC it was the
faster one, vision 425 vs 477 ms, prefill 2.14 vs 2.41 s, and it is exact on 16-bit steps of x;
without the AMX build packed int4 weights take "bf16-gemm" too, dequantized and rounded to bf16 a
few MB at a time as f32 weights are: prefill 2.3-2.5 s against 3.9-5.0 widened on an AVX-512 AMD
EPYC), except that with the AMX build int8 and packed int4 weights keep "amx-int8" (9.5 vs 11.5 ms
for int8 at 262 x 2048 x 16384 against one bf16 part, 16.0 vs 17.4 ms for int4; the whole int8
model at medium was slower than at the default, vision 1.22-1.44 vs 1.16-1.30 of transformers'
time: benchmarks/RESULTS.md), or, where that is switched off, "amx-gemm-bf16" (the same numerics as
"bf16-gemm"; the codes are converted inside the GEMM instead of a few MB at a time before it: 11 vs
22 ms for int8, 18 vs 74 ms for int4, which otherwise widens; `benchmarks/bf16_matmul.py`), and
float32 weights stay on `F.linear` ("aten"), which PyTorch then runs with bf16 inputs and float32
output on AMX CPUs (elsewhere it stays within 4e-5 of float32 on sums of 256 terms of size 1, and
still ran 2x faster than MKL's sgemm on an AVX-512 AMD EPYC). Between the projections of a block
(the vision tower's attention and MLP, the Gemma MLP) activations then stay bf16
(`layers.matmul_dtype`: GELU and vision attention in bf16, no widening and rounding again at the
next GEMM). Decode steps keep the float32 kernel (bandwidth-bound: rounding would buy nothing);
norms, the residual stream and the decoder's attention stay float32. The default, "highest", is
big_vision's numerics.

In between, "high" (`--matmul-precision high`; PyTorch's name for "each float32 as the sum of
two bfloat16"): "amx-gemm" splits x into two bf16 parts instead of three, about 16 significant
bits of each x value, so its products round by at most 2^-17 of |x w| (over a 2304-term sum
the largest error was as large as that of the f32 sums themselves), for two thirds of the tile
work. Only the AMX build's GEMM changes; activations stay float32 and every other path is as at
"highest".

The f32 GEMM itself (`Plan.sgemm`: "aten" or "onednn") follows the CPU's vendor. PyTorch's x86
build runs f32 `F.linear` on MKL, whose fast AVX-512 code runs only on Intel CPUs: on an AMD EPYC
with AVX-512 (Zen 5) MKL's sgemm reached 130-170 GFLOP/s with two threads where oneDNN's, on the
same CPU, reached 350-390 (262 x 2048 -> 16384; the vision tower's 256 x 1152 -> 4304 and
256 x 1152 -> 1152: 2.1x; `benchmarks/RESULTS.md`). So AVX-512 x86 CPUs of other vendors take
oneDNN for f32 GEMMs at the default precision; Intel ones keep MKL, and so do AVX2-only CPUs
(where MKL runs its AVX2 code whatever the vendor; oneDNN was not measured against it there).
Both are float32 throughout (oneDNN's call ignores the matmul precision); they differ in
summation order only (max error 6e-6 vs 2e-6 against float64 on sums of 2048 terms of size 1).

The choice is made from the CPU's vendor and flags (/proc/cpuinfo), PyTorch's capability
(`torch.backends.cpu.get_cpu_capability()`) and the float32 matmul precision, the first time
`plan()` is called (the first forward, or a loader or benchmark calling it), and logged; again
only if the precision changes. `PALIGEMMA_DISABLE` turns paths off, a comma-separated list of
`SWITCHES`: `kernel` (no C++ kernel), `amx` (the AVX-512 build even on AMX CPUs: bf16 and int4
weights at many rows widen), `avx512` (the AVX2 build even on AVX-512 CPUs),
`int8-gemm` (int8 weights at many rows take neither "amx-int8" nor "int8-gemm": they widen, or
take "amx-gemm"), `onednn` (f32 GEMMs on MKL whatever the vendor).
`PALIGEMMA_NO_KERNELS=1` is the older spelling of `PALIGEMMA_DISABLE=kernel`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch

from . import kernels

logger = logging.getLogger("paligemma")

FEW_ROWS = 8  # up to this many rows a matmul is bandwidth-bound: the kernel beats a GEMM
SWITCHES = ("kernel", "amx", "avx512", "int8-gemm", "onednn")
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8)  # uint8:
# packed int4 (`paligemma.int4`)


@dataclasses.dataclass(frozen=True)
class Cpu:
    """What the machine offers: model name, /proc/cpuinfo flags, PyTorch's capability, vendor
    ("GenuineIntel", "AuthenticAMD"; "" where /proc/cpuinfo names none, as on ARM)."""

    model: str
    flags: frozenset[str]
    capability: str
    vendor: str = ""

    @classmethod
    def detect(cls) -> Cpu:
        model, flags, vendor = platform.processor() or platform.machine(), frozenset(), ""
        cpuinfo = Path("/proc/cpuinfo")
        if cpuinfo.is_file():
            for line in cpuinfo.read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "vendor_id":
                    vendor = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:  # x86, arm
                    flags = frozenset(value.split())
        return cls(model, flags, torch.backends.cpu.get_cpu_capability(), vendor)

    @property
    def native_bf16(self) -> bool:
        """bf16 dot products in hardware: oneDNN's bf16 GEMM beats f32 sgemm (x86 AMX / AVX512)."""
        return bool({"amx_bf16", "avx512_bf16"} & self.flags)

    @property
    def native_int8(self) -> bool:
        """int8 dot products with int32 sums (AMX-INT8, AVX512-VNNI): oneDNN's int8 GEMM
        (`torch._int_mm`) is several times faster than f32 sgemm."""
        return bool({"amx_int8", "avx512_vnni"} & self.flags)

    @property
    def mkl_slow(self) -> bool:
        """An AVX-512 x86 CPU that is not Intel's: MKL's AVX-512 sgemm runs only on Intel CPUs,
        so oneDNN's beats it (2.1-2.7x on an AVX-512 AMD EPYC, see the module docstring). On
        AVX2-only ones both run AVX2 code: not measured against each other, MKL stays."""
        return bool(self.vendor) and self.vendor != "GenuineIntel" and "avx512f" in self.flags

    def matmul_flags(self) -> list[str]:
        """The flags that matter for the matmul paths (for logs and benchmark records)."""
        wanted = ("avx2", "fma", "f16c", "avx512", "amx", "vnni", "bf16", "fp16", "neon", "sve")
        return sorted(f for f in self.flags if any(w in f for w in wanted))


@dataclasses.dataclass(frozen=True)
class Plan:
    """The path of every (weight dtype, few rows?) pair on this machine."""

    cpu: Cpu
    disabled: frozenset[str]
    kernel: str | None  # the instruction set the C++ kernel was built for, None without it
    paths: dict[tuple[torch.dtype, bool], str]
    precision: str = "highest"  # torch.get_float32_matmul_precision() when chosen
    sgemm: str = "aten"  # the f32 GEMM of "widen" (and of "onednn"): "aten" or "onednn"

    def describe(self) -> dict[str, Any]:
        """JSON-ready: the CPU, the switches, and e.g. {"bfloat16/few": "kernel-avx512"}."""
        return {
            "cpu": self.cpu.model,
            "capability": self.cpu.capability,
            "flags": self.cpu.matmul_flags(),
            "disabled": sorted(self.disabled),
            "precision": self.precision,
            "sgemm": self.sgemm,
            "paths": {
                f"{str(dtype).removeprefix('torch.')}/{'few' if few else 'many'}": path
                for (dtype, few), path in self.paths.items()
            },
        }


def disabled_switches() -> frozenset[str]:
    """The paths PALIGEMMA_DISABLE (and PALIGEMMA_NO_KERNELS) turn off; unknown names are an
    error rather than a silently ignored typo."""
    names = {n.strip() for n in os.environ.get("PALIGEMMA_DISABLE", "").split(",") if n.strip()}
    unknown = names - set(SWITCHES)
    if unknown:
        raise ValueError(f"PALIGEMMA_DISABLE: unknown {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(SWITCHES)}")
    if os.environ.get("PALIGEMMA_NO_KERNELS", "") not in ("", "0"):
        names.add("kernel")
    return frozenset(names)


def choose(cpu: Cpu, disabled: frozenset[str], precision: str = "highest") -> Plan:
    """The plan for `cpu` with `disabled` paths off at a float32 matmul `precision` (builds the
    kernel it picks)."""
    kernel = None
    if "kernel" not in disabled:
        for isa, (needs, _) in kernels.ISAS.items():
            off = isa in disabled or (isa == "amx" and "avx512" in disabled)  # AVX-512 code too
            if off or not needs <= cpu.flags:
                continue
            if kernels.load(isa):
                kernel = isa
                break
    sgemm = "onednn" if cpu.mkl_slow and "onednn" not in disabled and onednn_sgemm() else "aten"
    paths = {}
    for dtype in WEIGHT_DTYPES:
        paths[dtype, True] = f"kernel-{kernel}" if kernel else (
            "aten" if dtype == torch.float32 else "widen")
        paths[dtype, False] = "aten" if dtype == torch.float32 else "widen"
    if sgemm == "onednn" and precision == "highest":  # else F.linear rounds as PyTorch's precision
        paths[torch.float32, False] = "onednn"
    if kernel == "amx":
        for dtype in (torch.bfloat16, torch.int8, torch.uint8):
            paths[dtype, False] = "amx-gemm"
    if cpu.native_int8 and "int8-gemm" not in disabled:
        paths[torch.int8, False] = "amx-int8" if kernel == "amx" else "int8-gemm"
        if kernel == "amx":
            paths[torch.uint8, False] = "amx-int8"
    if precision == "medium" and cpu.native_bf16:
        paths[torch.bfloat16, False] = paths[torch.float16, False] = "bf16-gemm"
        if kernel != "amx":
            paths[torch.uint8, False] = "bf16-gemm"  # int4: else widened to f32
            # int8 too where oneDNN's bf16 GEMM runs on AMX tiles (5-20% faster than its int8
            # GEMM there); with AVX512-BF16 and VNNI only, "int8-gemm" was 11% faster (and
            # exact on 16-bit steps of x), so int8 keeps it (benchmarks/RESULTS.md)
            if paths[torch.int8, False] != "int8-gemm" or "amx_bf16" in cpu.flags:
                paths[torch.int8, False] = "bf16-gemm"
        elif paths[torch.int8, False] != "amx-int8":  # codes converted in the tiles' loop
            paths[torch.int8, False] = paths[torch.uint8, False] = "amx-gemm-bf16"
        # else int8 and int4 keep "amx-int8": at least as fast as one bf16 part, and exact
    return Plan(cpu, disabled, kernel, paths, precision, sgemm)


def onednn_sgemm() -> bool:
    """Whether this PyTorch build has oneDNN's f32 linear op (x86 builds since before 2.4)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_plan: Plan | None = None  # a plain global (not functools.cache): torch.compile reads it


def plan() -> Plan:
    """This process's plan: chosen and logged on the first call, the same afterwards unless the
    float32 matmul precision changed."""
    global _plan
    if torch.compiler.is_compiling() and _plan is not None:  # the precision getter breaks graphs
        return _plan
    precision = torch.get_float32_matmul_precision()
    if _plan is None or _plan.precision != precision:
        cpu = _plan.cpu if _plan is not None else Cpu.detect()
        _plan = choose(cpu, disabled_switches(), precision)
        logger.info("matmul paths: %s", _plan.describe())
    return _plan


PRECISIONS = ("highest", "high", "medium")


def set_matmul_precision(precision: str) -> str:
    """Sets PyTorch's float32 matmul precision for this process, and returns the one in effect.

    "medium" rounds matmul inputs to bf16 (see the module docstring); it is only worth it with
    native bf16 dot products: elsewhere oneDNN would emulate them, slower than float32, so the
    precision stays "highest" (with a warning). "high" (x in two bf16 parts) changes only the
    AMX build's GEMM, and stays "highest" (with a warning) without it.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"matmul precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    cpu = plan().cpu
    if precision == "medium" and not cpu.native_bf16:
        logger.warning("--matmul-precision medium: this CPU (%s) has no native bf16 dot products "
                       "(amx_bf16 / avx512_bf16), where bf16 GEMMs are slower than float32: "
                       "keeping float32 (highest)", cpu.model)
        precision = "highest"
    if precision == "high" and plan().kernel != "amx":
        logger.warning("--matmul-precision high: only the AMX build's GEMM takes x in two bf16 "
                       "parts, and this process has no AMX build (CPU %s): keeping float32 "
                       "(highest)", cpu.model)
        precision = "highest"
    torch.set_float32_matmul_precision(precision)
    return plan().precision


def replan() -> Plan:
    """Chooses again (after PALIGEMMA_DISABLE changed: tests, benchmarks)."""
    global _plan
    _plan = None
    return plan()
