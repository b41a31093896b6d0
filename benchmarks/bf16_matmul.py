"""Why transformers' bfloat16 prefill is slower than its float32 one on this CPU, in one table.

Times one prefill-sized matmul (262 rows: 256 image + 6 text tokens, against Gemma 2B's 16384 x
2048 MLP matrix) and one decode-sized one (1 row, and 4), four ways:
  f32        F.linear, float32 weights and activations (MKL sgemm)
  aten bf16  F.linear, bf16 weights and activations (what transformers runs in bfloat16)
  ours bf16  bf16 weights, float32 activations (`paligemma.layers.linear`)
  ours int8  int8 weights + per-row scales, float32 activations

    python benchmarks/bf16_matmul.py [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paligemma.layers import linear  # noqa: E402
from paligemma.quantize import quantize_int8  # noqa: E402


def best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    w = torch.randn(16384, 2048) * 2048**-0.5
    w_bf16 = w.bfloat16()
    q, scale = quantize_int8(w)
    print(f"{torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, "
          f"weight 16384 x 2048; ms (best of several), GFLOP/s for 262 rows")
    print(f"{'rows':>5}{'f32':>10}{'aten bf16':>11}{'ours bf16':>11}{'ours int8':>11}")
    for rows in (262, 4, 1):
        x = torch.randn(rows, 2048)
        repeats = 3 if rows > 8 else 20
        ways = [
            lambda x: F.linear(x, w),
            lambda x: F.linear(x.bfloat16(), w_bf16),
            lambda x: linear(x, w_bf16),
            lambda x: linear(x, q, None, scale),
        ]
        ms = [best_ms(lambda f=f, x=x: f(x), repeats) for f in ways]
        print(f"{rows:>5}" + "".join(f"{t:>10.2f} " for t in ms))
        if rows > 8:
            flops = 2 * rows * w.numel()
            print("     " + "".join(f"{flops / t / 1e6:>10.0f} " for t in ms) + " GFLOP/s")


if __name__ == "__main__":
    main()
