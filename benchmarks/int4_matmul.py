"""Which int4 matmul `paligemma.int4` uses, in one table: every candidate on Gemma 2B's 16384 x
2048 MLP matrix, interleaved round by round (best of the rounds), against our int8 kernel.

  ours int8         int8 weights + per-row scales (`layers.linear`, the reference to beat)
  ours int4         packed int4, group 128 (`int4.linear`: the kernel up to GEMV_MAX_ROWS rows,
                    the dequantizing GEMM above)
  int4 kernel       the C++ decode kernel at every row count (`csrc/gemv.cpp`, the dispatched build)
  int4 dequant-mm   dequantize 4 MB of rows at a time + f32 GEMM, at every row count
  aten int4 f32     torch.ops.aten._weight_int4pack_mm_for_cpu with float32 activations
  aten int4 bf16    the same with bf16 activations (rounds the activations: not our numerics)

    python benchmarks/int4_matmul.py [--threads N] [--rounds N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paligemma import dispatch, int4, kernels  # noqa: E402
from paligemma.layers import linear  # noqa: E402
from paligemma.quantize import quantize_int8  # noqa: E402

ROWS = (1, 4, 8, 16, 64, 262)
GROUP = 128


def aten_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's packed int4 for this CPU (same min-max quantization as ours), scales [K/G, N, 2]:
    w ~ (q - 8) * scale + zero."""
    packed, scale = int4.quantize_int4(w, GROUP)
    codes = int4.unpack(packed).to(torch.int32)
    aten = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    by_row = int4.row_scales(scale)
    s, offset = by_row[..., 0], by_row[..., 1]
    return aten, torch.stack([s, offset + 8 * s], -1).transpose(0, 1).contiguous()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    w = torch.randn(16384, 2048) * 2048**-0.5
    q8, s8 = quantize_int8(w)
    q4, s4 = int4.quantize_int4(w, GROUP)
    aten, aten_scale = aten_int4(w)
    plan = dispatch.plan()
    ways = {
        "ours int8": lambda x: linear(x, q8, None, s8),
        "ours int4": lambda x: linear(x, q4, None, s4),
        "int4 kernel": lambda x: kernels.gemv(plan.kernel, x, q4, s4),
        "int4 dequant-mm": lambda x: int4._dequantizing_mm(x, q4, s4),
        "aten int4 f32": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, aten, GROUP, aten_scale),
        "aten int4 bf16": lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.bfloat16(), aten, GROUP, aten_scale.bfloat16()),
    }
    if not plan.kernel:
        del ways["int4 kernel"]
    print(f"{torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, weight "
          f"16384 x 2048 (int8 {q8.nbytes / 1e6:.1f} MB, int4 {(q4.nbytes + s4.nbytes) / 1e6:.1f}"
          f" MB); ms, best of {args.rounds} interleaved rounds")
    print(f"{'rows':>5}" + "".join(f"{name:>17}" for name in ways))
    for rows in ROWS:
        x = torch.randn(rows, 2048)
        best = dict.fromkeys(ways, float("inf"))
        slow = rows > 16  # aten's f32 path takes seconds there: one round
        for r in range(args.rounds if not slow else 2):
            for name, fn in ways.items():
                if r > 0 and slow and name.startswith("aten"):
                    continue
                start = time.perf_counter()
                fn(x)
                best[name] = min(best[name], 1e3 * (time.perf_counter() - start))
        print(f"{rows:>5}" + "".join(f"{best[name]:>17.2f}" for name in ways))


if __name__ == "__main__":
    main()
