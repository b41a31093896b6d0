"""Batch throughput: one-by-one `caption` against static batches and continuous batching, one run.

On the shipped demo model (converted to a temporary folder), over synthetic scenes, greedy:

1. captions, images/s: one image per call (what `paligemma caption a.png b.png ...
   --batch-size 1` and a loop over `PaliGemma.caption` do), static batches of 8 and 32 (the
   task commands' `--batch-size`: a batch runs until its longest caption ends), and the
   continuous-batching scheduler (`paligemma batch`'s engine) with 1, 8 and 32 rows.
2. mixed prompts: the same images asked "how many shapes" (1 token), "detect circle" (~5) and
   "caption en" (~11), static batches against continuous batching at the same batch size.
3. mixed output lengths: budgets of 4 to 64 new tokens on a random-weight model of the demo's
   shape (it never emits eos, so each row runs to its budget): static batches run every row
   to the batch's largest budget, continuous batching retires each row at its own.

Every configuration runs the same items in the same process, in turn, twice (the best of the
two counts). Time is CPU seconds of the process with one torch thread: on a shared machine (this
project's has 2 cores for 7 engineers, load average above 10) wall time varies several-fold
between identical runs, CPU time much less. Ratios are printed against one-by-one / static. The
CPU model, flags, threads and load average are recorded. "admit >= k": the scheduler's
min_prefill (new rows join once k rows are free, one prefill for several rows).

    python benchmarks/bench_batch.py [--images 48] [--json out.json]

Full-size random weights are not run here: one PaliGemma 3B-224 caption takes ~20 s on 2 cores
(benchmarks/RESULTS.md), so 7 x 48 captions at three batch sizes would take hours.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from paligemma import PaliGemma
from paligemma.demo import scenes
from paligemma.demo.command import DEMO_MODEL
from paligemma.image import preprocess, to_rgb_array
from paligemma.model import PaliGemmaModel
from paligemma.scheduler import Request, Scheduler

DEMO = DEMO_MODEL
MIXED = [("answer en how many shapes are there", 8), ("detect circle", 12), ("caption en", 24),
         ("caption en", 64)]  # (prompt, max_new_tokens): 1, ~6, ~11 and up to 64 tokens


def cpu_info() -> dict:
    info = {"threads": torch.get_num_threads(), "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability(), "load": os.getloadavg()}
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "flags") and key.strip() not in info:
            value = value.strip()
            if key.strip() == "flags":
                value = " ".join(f for f in value.split() if f.startswith(("avx", "fma", "f16c",
                                                                           "amx")))
            info[key.strip()] = value
    return info


def load_demo(folder: Path) -> PaliGemma:
    from paligemma.formats import open_checkpoint, write_ours

    write_ours(open_checkpoint([DEMO / "paligemma-demo.npz"], config_file=DEMO / "config.json"),
               folder, quiet=True)
    shutil.copyfile(DEMO / "tokenizer.model", folder / "tokenizer.model")
    return PaliGemma.from_pretrained(folder)


def timed(fn) -> tuple[float, object]:
    """Best of two runs, in CPU seconds of this process (see the module docstring)."""
    best, out = float("inf"), None
    for _ in range(2):
        start = time.process_time()
        out = fn()
        best = min(best, time.process_time() - start)
    return best, out


def static(pg: PaliGemma, requests: list[Request], size: int) -> list[list[int]]:
    """Batches of `size` in input order, each run to its longest row (pg.generate)."""
    tokens = []
    for start in range(0, len(requests), size):
        chunk = requests[start:start + size]
        budget = max(r.max_new_tokens for r in chunk)
        tokens += [r.tokens for r in pg.generate(torch.stack([r.image for r in chunk]),
                                                 [r.prompt for r in chunk],
                                                 max_new_tokens=budget)]
    return tokens


def continuous(pg: PaliGemma, requests: list[Request], size: int, min_prefill: int = 1) -> dict:
    return {h.id: h.tokens
            for h in Scheduler(pg, size, min_prefill=min_prefill).run(requests)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: CPU seconds are then a stable measure "
                        "of work on a shared machine)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp())
    try:
        pg = load_demo(folder / "model")
    finally:
        shutil.rmtree(folder)
    rng = random.Random(0)
    images = [scenes.draw_scene(rng, 112).image for _ in range(args.images)]
    pixels = list(preprocess([to_rgb_array(im) for im in images], pg.image_size))
    n = len(images)
    report: dict = {"cpu": cpu_info(), "images": n, "model": "demo (2.1M parameters)"}
    print(f"CPU: {report['cpu'].get('model name')}; {report['cpu']['capability']}; flags "
          f"{report['cpu'].get('flags')}; {report['cpu']['threads']} threads; load "
          f"{report['cpu']['load'][0]:.1f}\n")

    captions = [Request(p, "caption en", max_new_tokens=24, id=i) for i, p in enumerate(pixels)]
    one, ref = timed(lambda: [pg.caption(p[None], max_new_tokens=24)[0].tokens for p in pixels])
    rows = [("one-by-one caption", one, None)]
    for size in (8, 32):
        seconds, out = timed(lambda size=size: static(pg, captions, size))
        assert out == ref, "static batching changed a caption"
        rows.append((f"static batches of {size}", seconds, None))
    for size, min_prefill in ((1, 1), (8, 1), (8, 2), (32, 1), (32, 8)):
        seconds, out = timed(lambda s=size, m=min_prefill: continuous(pg, captions, s, m))
        assert [out[i] for i in range(n)] == ref, "continuous batching changed a caption"
        rows.append((f"continuous, {size} rows, admit >={min_prefill}", seconds, None))
    print(f"1. captions of {n} scenes (max 24 tokens, greedy), CPU seconds")
    print(f"{'':<36}{'CPU s':>8}{'images/CPU s':>14}{'x one-by-one':>14}")
    report["captions"] = {}
    for name, seconds, _ in rows:
        print(f"{name:<36}{seconds:>8.2f}{n / seconds:>14.2f}{one / seconds:>14.2f}")
        report["captions"][name] = {"seconds": seconds, "images_per_s": n / seconds}

    mixed = [Request(p, MIXED[i % len(MIXED)][0], max_new_tokens=MIXED[i % len(MIXED)][1], id=i)
             for i, p in enumerate(pixels)]
    lengths = [len(t) for t in continuous(pg, mixed, 8).values()]
    print(f"\n2. mixed prompts: {n} items, prompts {[m[0] for m in MIXED]}, budgets "
          f"{[m[1] for m in MIXED]}; generated tokens min {min(lengths)}, mean "
          f"{sum(lengths) / n:.1f}, max {max(lengths)}")
    print(f"{'batch':<8}{'static CPU s':>14}{'continuous CPU s':>18}{'speed-up':>10}")
    report["mixed"] = {"tokens_mean": sum(lengths) / n, "tokens_max": max(lengths)}
    for size in (8, 32):
        s_static, _ = timed(lambda size=size: static(pg, mixed, size))
        s_cont, _ = timed(lambda size=size: continuous(pg, mixed, size, max(1, size // 4)))
        print(f"{size:<8}{s_static:>14.2f}{s_cont:>18.2f}{s_static / s_cont:>10.2f}")
        report["mixed"][str(size)] = {"static_s": s_static, "continuous_s": s_cont}
    # A random-weight model of the demo's shape hardly ever emits eos: every row runs to its own
    # budget, a controlled mix of output lengths.
    torch.manual_seed(0)
    rand = PaliGemma(PaliGemmaModel(pg.model.config).eval(), pg.tokenizer)
    budgets = [4, 8, 16, 32, 64]
    spread = [Request(p, "caption en", max_new_tokens=budgets[i % len(budgets)], id=i)
              for i, p in enumerate(pixels)]
    lengths = [len(t) for t in continuous(rand, spread, 8).values()]
    print(f"\n3. budgets {budgets} (random weights of the demo's shape: no eos), generated "
          f"tokens mean {sum(lengths) / n:.1f}, max {max(lengths)}")
    print(f"{'batch':<8}{'static CPU s':>14}{'continuous CPU s':>18}{'speed-up':>10}")
    report["budgets"] = {"tokens_mean": sum(lengths) / n}
    for size in (8, 32):
        s_static, _ = timed(lambda size=size: static(rand, spread, size))
        s_cont, _ = timed(lambda size=size: continuous(rand, spread, size, max(1, size // 4)))
        print(f"{size:<8}{s_static:>14.2f}{s_cont:>18.2f}{s_static / s_cont:>10.2f}")
        report["budgets"][str(size)] = {"static_s": s_static, "continuous_s": s_cont}
    report["platform"] = platform.platform()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
