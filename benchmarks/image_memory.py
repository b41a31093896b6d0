"""Peak memory of `paligemma caption` over many large photos: it must not grow with their number.

Writes synthetic 12 MP photos (4000x3000 JPEG: smooth gradients plus noise, a few distinct ones
copied under many names) to a temporary folder, converts the shipped demo model there, and runs,
each in its own subprocess, side by side:

  one batch   `paligemma caption` on 8 photos, --batch-size 8
  many        `paligemma caption` on N photos (default 200), --batch-size 8
  all first   the old behaviour for comparison, in fewer photos (default 20): every photo
              decoded to float32 before the first batch, then the same batches

and prints each one's peak RSS (from wait4, the subprocess alone) and the ratios to one batch.
Everything is deleted afterwards.

    python benchmarks/image_memory.py                 # 200 photos (a few minutes on 2 cores)
    python benchmarks/image_memory.py --photos 40 --old-photos 10
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "demo_model"
WIDTH, HEIGHT = 4000, 3000
# The old CLI: decode every input to float32 first, then run the batches.
ALL_FIRST = """
import sys
from paligemma import PaliGemma
from paligemma.image import to_rgb_array
model, paths = sys.argv[1], sys.argv[2:]
arrays = [to_rgb_array(p) for p in paths]
pg = PaliGemma.from_pretrained(model)
for start in range(0, len(arrays), 8):
    pg.caption(arrays[start:start + 8], max_new_tokens=4)
"""


def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    simd = [f for f in flags if f.startswith(("avx", "fma", "f16c", "amx"))]
    return f"{model}, {os.cpu_count()} CPUs, flags: {' '.join(simd)}"


def photos(folder: Path, count: int, distinct: int = 4) -> list[Path]:
    """`count` 12 MP JPEGs (`distinct` different pictures, copied)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    originals = []
    for i in range(distinct):
        base = np.stack([x / WIDTH * 255, y / HEIGHT * 255, (x + y) % 256], -1)
        noisy = base + rng.normal(0, 12, (HEIGHT, WIDTH, 1)).astype(np.float32) + 40 * i
        path = folder / f"original-{i}.jpg"
        PIL.Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
        originals.append(path)
    out = []
    for i in range(count):
        path = folder / f"photo-{i:04d}.jpg"
        shutil.copyfile(originals[i % distinct], path)
        out.append(path)
    return out


def peak_rss(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in GiB, seconds) of one subprocess."""
    start = time.time()
    child = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): {' '.join(argv[:4])}")
    return usage.ru_maxrss / 2**20, time.time() - start  # ru_maxrss is in KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, default=200)
    p.add_argument("--old-photos", type=int, default=20)
    p.add_argument("--dir", type=Path, help="where to write the photos (default: a temp dir)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.dir, prefix="image-memory-"))
    try:
        print(cpu())
        print(f"writing {args.photos} photos of {WIDTH}x{HEIGHT} to {work} ...", flush=True)
        paths = [str(p) for p in photos(work, args.photos)]
        size = sum(Path(p).stat().st_size for p in paths) / 2**20
        model = work / "model"
        subprocess.run([sys.executable, "-m", "convert", str(DEMO / "paligemma-demo.npz"),
                        "--config", str(DEMO / "config.json"), "-o", str(model), "-q"],
                       cwd=ROOT, check=True)
        shutil.copyfile(DEMO / "tokenizer.model", model / "tokenizer.model")
        caption = [sys.executable, "-m", "paligemma", "caption", "--model", str(model),
                   "--batch-size", "8", "--max-new-tokens", "4"]
        runs = {
            "one batch (8 photos)": caption + paths[:8],
            f"many ({len(paths)} photos)": caption + paths,
            f"all first, old behaviour ({args.old_photos} photos)":
                [sys.executable, "-c", ALL_FIRST, str(model), *paths[: args.old_photos]],
        }
        print(f"{len(paths)} JPEGs, {size:.0f} MiB on disk; batch size 8; demo model (2.1M "
              "parameters); peak RSS of each subprocess:")
        results = {}
        for name, argv in runs.items():
            results[name] = peak_rss(argv)
            print(f"  {name:<42} {results[name][0]:6.2f} GiB  ({results[name][1]:.0f} s)",
                  flush=True)
        first = next(iter(results.values()))[0]
        for name, (gib, _) in list(results.items())[1:]:
            print(f"  {name} / one batch: {gib / first:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
