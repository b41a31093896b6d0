"""What `paligemma.heap.map_large_allocations` costs in speed: prefill time with and without it.

The fixed glibc mmap threshold gives every activation of 4 MB or more its own mapping, so each
such allocation page-faults its memory in again. This script times the prefill of a 2-layer
decoder of PaliGemma 2 3B's width (bf16 weights, f32 activations, random values) at a 224 px
and a 448 px sequence length, each in a fresh subprocess, alternating the two settings so that
the machine's load hits both alike, and prints the ratio of the best times.

    python benchmarks/bench_heap_threshold.py [--repeats 3] [--json F]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.record import JsonReport, add_json_arguments, machine  # noqa: E402
from paligemma import heap  # noqa: E402
from paligemma.config import VARIANTS  # noqa: E402
from paligemma.gemma import GemmaDecoder  # noqa: E402

LENGTHS = {"224 px": 256 + 6, "448 px": 1024 + 6}


def child(rows: int, mapped: bool) -> float:
    """Best of 3 timed prefills (after one warm-up) of `rows` positions, in seconds."""
    if mapped:
        heap.map_large_allocations()
    cfg = dataclasses.replace(VARIANTS["pg2-3b-224"].text, depth=2)
    torch.manual_seed(0)
    decoder = GemmaDecoder(cfg).to(torch.bfloat16)
    x = torch.randn(1, rows, cfg.width)
    positions = torch.arange(rows)[None]
    mask = torch.ones(1, rows, rows, dtype=torch.bool).tril()
    times = []
    with torch.no_grad():
        for _ in range(4):
            decoder.setup_kv_cache(1, rows + 8)
            start = time.perf_counter()
            decoder(x, positions, mask)
            times.append(time.perf_counter() - start)
    return min(times[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="subprocesses per setting")
    add_json_arguments(parser)
    parser.add_argument("--child", nargs=2, metavar=("ROWS", "MAPPED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(child(int(args.child[0]), args.child[1] == "1"))
        return 0
    json_report = JsonReport(parser, args)
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    results = {}
    for name, rows in LENGTHS.items():
        times: dict[str, list[float]] = {"glibc default": [], "mapped >= 4 MB": []}
        for _ in range(args.repeats):
            for setting, mapped in zip(times, ("0", "1"), strict=True):
                out = subprocess.run([sys.executable, __file__, "--child", str(rows), mapped],
                                     env=env, capture_output=True, text=True, check=True)
                times[setting].append(float(out.stdout.split()[-1]))
        ratio = min(times["mapped >= 4 MB"]) / min(times["glibc default"])
        results[name] = {"rows": rows, "seconds": times, "ratio_of_best": ratio}
        print(f"{name} ({rows} rows): best {min(times['glibc default']):.3f} s default, "
              f"{min(times['mapped >= 4 MB']):.3f} s mapped: ratio {ratio:.3f}", flush=True)
    report = {"machine": {**machine(), "load_avg": os.getloadavg()},
              "results": results}
    print(f"{report['machine']['cpu']}, {report['machine']['isa']}, "
          f"load average {report['machine']['load_avg'][0]:.1f}")
    json_report.save(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
