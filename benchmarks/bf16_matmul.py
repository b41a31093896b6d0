"""Every matmul path for one prefill-sized and a few decode-sized products, in one table.

One weight of Gemma 2B's MLP (16384 x 2048) against 262 rows (256 image + 6 text tokens:
prefill) and 8, 4, 1 rows (decode steps). Decode rows stream several copies of the weight (more
than the last-level cache), so they measure memory bandwidth, not cache bandwidth. Ways:

  f32            F.linear, float32 weights and activations (MKL's sgemm on x86)
  f32 onednn     oneDNN's f32 GEMM (`layers.onednn_linear`; what "onednn" and the widened pieces
                 run on AVX-512 x86 CPUs not Intel's, `dispatch.Plan.sgemm`)
  aten bf16      F.linear, bf16 weights and activations (what transformers runs in bfloat16;
                 rounds x to bf16, so not a path of ours: for comparison)
  ours bf16      `paligemma.layers.linear` on bf16 weights, float32 activations, as this
                 process's plan (`paligemma.dispatch`) runs it; each kernel build this CPU can
                 run ("bf16 avx512", "bf16 avx2"), and the widening GEMM ("bf16 widen", on the
                 plan's f32 GEMM), alone
  ours int8      the same with int8 weights + per-row scales
  int8pack       torch._weight_int8pack_mm (float32 activations), the library int8 kernel
  bf16x3 mkl     x split into three bf16 parts (x1 + x2 + x3 == x exactly for normal floats),
                 one bf16 x bf16 -> f32 GEMM on the stacked [3M, K] rows (MKL's
                 gemm_bf16bf16f32 exported by libtorch_cpu, where it is), parts summed in f32
  bf16x3 onednn  the same stacked rows through oneDNN with fp32 matmul precision "bf16" (AMX or
                 AVX-512-BF16 with f32 accumulation; the weights are passed widened to f32)
  amx ... x3     with the AMX build, prefill rows: our tile GEMM (`kernels.gemm_amx`) on x in
                 three bf16 parts ("amx-gemm"), for bf16, int8 and packed int4 (group 128)
                 weights; "x1": on x rounded to bf16 ("amx-gemm-bf16", --matmul-precision
                 medium), next to what medium runs otherwise: "bf16-gemm int8" (`_bf16_mm`);
                 "amx int8 tiles", "amx int4 tiles": int8 and int4 codes on AMX-INT8 tiles, x
                 rounded to int16 steps in two int8 halves ("amx-int8")
  int8 gemm      oneDNN's int8 GEMM on x in two int8 halves ("int8-gemm", `layers._int8_mm`)
  int4 widen     packed int4 dequantized to f32 a few MB at a time, f32 GEMM (no AMX build)

Printed: ms (best of several) and GB/s of weights (decode) or GFLOP/s (prefill); the max
absolute difference from a float64 reference. `--cpu-time` times the thread's CPU time instead
of wall time (with --threads 1 this is robust to other processes sharing the cores).

    python benchmarks/bf16_matmul.py [--threads N] [--cpu-time]
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paligemma import dispatch, int4, kernels, layers  # noqa: E402
from paligemma.quantize import quantize_int8  # noqa: E402

N, K, PREFILL_ROWS, DECODE_COPIES = 16384, 2048, 262, 12


def split3(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] f32 -> [3M, K] bf16: x1, x2, x3 with x1 + x2 + x3 == x (normal floats)."""
    x1 = x.bfloat16()
    r = x - x1.float()
    x2 = r.bfloat16()
    return torch.cat([x1, x2, (r - x2.float()).bfloat16()])


def sum3(y: torch.Tensor) -> torch.Tensor:
    m = y.shape[0] // 3
    return (y[2 * m :] + y[m : 2 * m]) + y[:m]


def mkl_gemm_bf16bf16f32() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """a [M, K] bf16 @ b [N, K] bf16 .T -> [M, N] f32 through MKL, if libtorch_cpu exports it."""
    try:
        gemm = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        fn = gemm.GEMM_BF16BF16F32
    except (OSError, AttributeError):
        return None

    def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        m, k = a.shape
        n = b.shape[0]
        c = torch.empty(m, n)
        i32 = [ctypes.c_int(v) for v in (n, m, k)]
        one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        ptr = ctypes.c_void_p
        # column-major: C^T [N, M] = B [N, K] (stored as K x N, transposed) @ A^T [K, M]
        fn(b"T", b"N", *map(ctypes.byref, i32), ctypes.byref(one), ptr(b.data_ptr()),
           ctypes.byref(i32[2]), ptr(a.data_ptr()), ctypes.byref(i32[2]), ctypes.byref(zero),
           ptr(c.data_ptr()), ctypes.byref(i32[0]))
        return c

    return mm


def onednn_bf32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear in f32 with oneDNN's bf16 math mode (inputs must be bf16-exact for f32 math)."""
    before = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    try:
        return F.linear(x, w)
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = before


def best_ms(fn: Callable[[], object], repeats: int, cpu_time: bool) -> float:
    clock = time.thread_time if cpu_time else time.perf_counter
    fn()
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1e3 * min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--cpu-time", action="store_true", help="time the thread's CPU time")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    plan = dispatch.plan()
    described = plan.describe()
    print(f"{described['cpu']}; torch capability {described['capability']}; "
          f"{' '.join(described['flags'])}\n{args.threads} threads, "
          f"{'thread CPU time' if args.cpu_time else 'wall time'}; weight {N} x {K}; "
          f"this process's paths: {described['paths']}")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g) * K**-0.5
    copies = {"f32": [w], "bf16": [w.bfloat16()], "int8": [quantize_int8(w)],
              "int4": [int4.quantize_int4(w, 128)]}
    mkl = mkl_gemm_bf16bf16f32()
    isas = [isa for isa, (needs, _) in kernels.ISAS.items()
            if "kernel" not in plan.disabled and needs <= plan.cpu.flags and kernels.load(isa)]
    for rows in (PREFILL_ROWS, 8, 4, 1):
        decode = rows <= dispatch.FEW_ROWS
        if decode and len(copies["f32"]) == 1:  # more weight bytes than the caches hold
            for c in range(1, DECODE_COPIES):
                wc = torch.randn(N, K, generator=g) * K**-0.5
                if c < DECODE_COPIES // 2:  # f32 copies: half as many, the same bytes
                    copies["f32"].append(wc)
                copies["bf16"].append(wc.bfloat16())
                copies["int8"].append(quantize_int8(wc))
        x = torch.randn(rows, K, generator=g)
        ways: dict[str, tuple[str, Callable[[torch.Tensor, object], torch.Tensor]]] = {
            "f32": ("f32", lambda x, w: F.linear(x, w)),
            "aten bf16": ("bf16", lambda x, w: F.linear(x.bfloat16(), w).float()),
            "ours bf16": ("bf16", lambda x, w: layers.linear(x, w)),
            "ours int8": ("int8", lambda x, w: layers.linear(x, w[0], None, w[1])),
            "int8pack": ("int8", lambda x, w: torch._weight_int8pack_mm(x, *w)),
        }
        for isa in isas:
            for kind in ("f32", "bf16", "int8"):
                ways[f"{kind} {isa}"] = (kind, lambda x, w, isa=isa, kind=kind: (
                    kernels.gemv(isa, x, *w) if kind == "int8" else kernels.gemv(isa, x, w)))
        if not decode:
            if dispatch.onednn_sgemm():
                ways["f32 onednn"] = ("f32", lambda x, w: layers.onednn_linear(x, w))
            ways["bf16 widen"] = ("bf16", lambda x, w: layers._widening_mm(x, w, None))
            if mkl is not None:
                ways["bf16x3 mkl"] = ("bf16", lambda x, w: sum3(mkl(split3(x), w)))
            ways["bf16x3 onednn"] = ("f32bf16",
                                     lambda x, w: sum3(onednn_bf32(split3(x).float(), w)))
            ways["int8 gemm"] = ("int8", lambda x, w: layers._int8_mm(x, *w))
            ways["bf16-gemm int8"] = ("int8", lambda x, w: layers._bf16_mm(x.bfloat16(), *w[:1],
                                                                           None, w[1]).float())
            ways["int4 widen"] = ("int4", lambda x, w: int4._dequantizing_mm(x, *w))
            if "amx" in isas:
                for kind in ("bf16", "int8", "int4"):
                    unpack = (lambda w: (w, None)) if kind == "bf16" else (lambda w: w)
                    ways[f"amx {kind} x3"] = (kind, lambda x, w, u=unpack: layers._amx_mm(x, *u(w)))
                    ways[f"amx {kind} x1"] = (kind, lambda x, w, u=unpack: layers._amx_mm(
                        x.bfloat16(), *u(w)))
                for kind in ("int8", "int4"):
                    ways[f"amx {kind} tiles"] = (kind, lambda x, w: layers._amx_mm(
                        x, *w, int8_tiles=True))
        copies["f32bf16"] = [c.bfloat16().float() for c in copies["f32"][:1]]
        print(f"\n{rows} rows: {'ms per weight, GB/s of weights' if decode else 'ms, GFLOP/s'}; "
              "max |error| against float64")
        for name, (kind, fn) in ways.items():
            ws = copies[kind] if decode else copies[kind][:1]
            ms = best_ms(lambda fn=fn, ws=ws, x=x: [fn(x, c) for c in ws], 3 if decode else 2,
                         args.cpu_time) / len(ws)
            w0 = ws[0]
            exact = (w0[0].double() * w0[1].double()[:, None] if kind == "int8"
                     else int4.dequantize(*w0, torch.float64) if kind == "int4" else w0.double())
            err = (fn(x, w0).double() - x.double() @ exact.T).abs().max().item()
            nbytes = (sum(t.numel() * t.element_size() for t in w0) if kind in ("int8", "int4")
                      else w0.numel() * w0.element_size())
            speed = nbytes / ms / 1e6 if decode else 2 * rows * N * K / ms / 1e6
            print(f"  {name:<16}{ms:>9.2f} ms {speed:>8.1f} {'GB/s' if decode else 'GFLOP/s'}"
                  f"   error {err:.1e}")


if __name__ == "__main__":
    main()
