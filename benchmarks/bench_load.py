"""Load time of quantized checkpoints against bf16, side by side in one run.

One random checkpoint (PaliGemma 1 3B-224 by default, bf16, bench_inference.py's), and the
quantized checkpoints `python -m convert SRC --quantize MODE` writes from it once. Each
configuration loads in its own subprocess (page cache of its files evicted first: a cold load
from disk; imports not timed), interleaved, `--repeats` times:

    bf16            load_pretrained(bf16 dir)                    memory-mapped as stored
    int8 at load    load_pretrained(bf16 dir, quantize="int8")   quantized while reading
    int8 saved      load_pretrained(int8 dir)                    memory-mapped, nothing computed
    int4 at load, int4 saved                                     the same for int4 (group 128)

A load reads every float tensor once (the NaN/Inf check) but not the integer weights of a saved
quantized checkpoint, which stay on disk until first used; so each child then also touches every
page of every tensor (one byte per 4 KiB: what the first generation would read) and reports
load + touch, "weights resident", the fair figure to compare. Prints the best and median of
each and their ratio to bf16's, and the peak RSS; records the CPU model and flags.

    python benchmarks/bench_load.py --quick                  # small model, about a minute
    python benchmarks/bench_load.py --json out.json          # full size: 11 GB of disk, 5 GB RAM
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_inference import (  # noqa: E402, I001
    evict_page_cache,
    prepare_checkpoints,
    quantized_checkpoint,
    quick_config,
)

from benchmarks.record import JsonReport, add_json_arguments, machine  # noqa: E402
from paligemma.config import VARIANTS  # noqa: E402

# (name, checkpoint, quantize at load); checkpoint "bf16" or a quantization mode written once.
CONFIGS = [
    ("bf16", "bf16", None),
    ("int8 saved", "int8", None),
    ("int8 at load", "bf16", "int8"),
    ("int4 saved", "int4", None),
    ("int4 at load", "bf16", "int4"),
]
def child(spec: dict[str, Any]) -> dict[str, Any]:
    import resource

    import torch

    from paligemma.formats import load_pretrained

    torch.set_num_threads(spec["threads"])
    directory = Path(spec["directory"])
    evict_page_cache(directory)
    start = time.perf_counter()
    model = load_pretrained(directory, quantize=spec["quantize"])
    seconds = time.perf_counter() - start
    for t in model.state_dict().values():  # page in what was only mapped
        t.reshape(-1).view(torch.uint8)[::4096].sum()
    resident = time.perf_counter() - start
    weights = sum(t.nbytes for t in model.state_dict().values())
    return {"load_s": seconds, "resident_s": resident, "weights_bytes": weights,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pg-bench-load")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--repeats", type=int, default=3)
    add_json_arguments(p)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    report = JsonReport(p, args)
    config = quick_config() if args.quick else VARIANTS["pg1-3b-224"]
    bf16, _ = prepare_checkpoints(args.workdir, config, hf=False)
    dirs = {"bf16": bf16, **{m: quantized_checkpoint(bf16, m) for m in ("int8", "int4")}}
    sizes = {k: sum(f.stat().st_size for f in d.glob("*.safetensors")) for k, d in dirs.items()}
    info: dict[str, Any] = {"machine": machine(),
                            "threads": args.threads, "model": config.name,
                            "load_avg_before": os.getloadavg(), "files_bytes": sizes}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in CONFIGS}
    for _ in range(args.repeats):
        for name, ckpt, quantize in CONFIGS:
            spec = {"directory": str(dirs[ckpt]), "quantize": quantize, "threads": args.threads}
            proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                  capture_output=True, text=True, cwd=ROOT, check=True)
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    info["load_avg_after"] = os.getloadavg()
    base = {k: statistics.median(r[k] for r in runs["bf16"]) for k in ("load_s", "resident_s")}
    print(f"{config.name}, {args.threads} threads, {info['machine']['cpu']} "
          f"({' '.join(info['machine']['flags'])}), torch {info['machine']['torch']}, load "
          f"average {info['load_avg_before'][0]:.1f} -> {info['load_avg_after'][0]:.1f}\n")
    print(f"{'':<14}{'file GB':>9}{'load best':>11}{'median':>8}{'/ bf16':>8}"
          f"{'resident best':>15}{'median':>8}{'/ bf16':>8}{'peak RSS GiB':>14}")
    summary = {}
    for name, ckpt, _ in CONFIGS:
        row = {"peak_rss": max(r["peak_rss"] for r in runs[name])}
        line = f"{name:<14}{info['files_bytes'][ckpt] / 1e9:>9.2f}"
        for key, width in (("load_s", 11), ("resident_s", 15)):
            times = [r[key] for r in runs[name]]
            median = statistics.median(times)
            row[key] = {"best": min(times), "median": median, "ratio_to_bf16": median / base[key]}
            line += f"{min(times):>{width}.2f}{median:>8.2f}{median / base[key]:>8.2f}"
        summary[name] = row
        print(f"{line}{row['peak_rss'] / 2**30:>14.2f}")
    report.save({**info, "summary": summary, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
