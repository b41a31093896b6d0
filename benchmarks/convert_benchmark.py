"""Converter benchmark: wall time, throughput and peak memory on a full-size checkpoint.

Writes a synthetic checkpoint in the official layout (random normal values, every key and shape
of the variant, bf16 stored as |V2 like the real PaliGemma releases) to a temporary directory,
converts it with `python -m convert` in a subprocess, and prints wall time, MB/s and the
subprocess's peak RSS next to the checkpoint size. Everything is deleted afterwards.

    python benchmarks/convert_benchmark.py                 # PaliGemma 1 3B-224, bf16, 5.9 GB
    python benchmarks/convert_benchmark.py --quick         # 2 + 2 layers, vocab 32768: 0.4 GB
    python benchmarks/convert_benchmark.py --variant pg2-3b-224 --dir /big/disk

Needs free disk space of twice the checkpoint size. The source is read back from the page cache
right after being written (warm cache), so the figure is the converter's own speed, not the
disk's.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from paligemma.config import VARIANTS, PaliGemmaConfig  # noqa: E402
from paligemma.formats.mapping import official_shapes  # noqa: E402
from paligemma.formats.npz import PARAMS_PREFIX, NpzWriter  # noqa: E402
from paligemma.formats.ours import CHUNK_BYTES  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def quick_config(config: PaliGemmaConfig) -> PaliGemmaConfig:
    """Same widths, 2 ViT and 2 LLM layers, a 32k vocabulary."""
    return PaliGemmaConfig(
        dataclasses.replace(config.vision, depth=2),
        dataclasses.replace(config.text, depth=2, vocab_size=32768),
        name=f"{config.name}-quick",
    )


def random_chunks(
    numel: int, dtype: torch.dtype, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """`numel` random normal values as flat pieces of at most CHUNK_BYTES (in float32).

    The npz writer only concatenates bytes, so the pieces need not follow the array's rows.
    """
    step = CHUNK_BYTES // 4
    for start in range(0, numel, step):
        yield torch.randn(min(step, numel - start), generator=generator).to(dtype)


def write_synthetic(path: Path, config: PaliGemmaConfig, dtype: torch.dtype) -> int:
    """Random official-layout checkpoint, written one chunk at a time; returns its data bytes."""
    generator = torch.Generator().manual_seed(0)
    total = 0
    with NpzWriter(path) as npz:
        for key, shape in sorted(official_shapes(config).items()):
            chunks = random_chunks(math.prod(shape), dtype, generator)
            npz.add(PARAMS_PREFIX + key, shape, dtype, chunks)
            total += math.prod(shape) * dtype.itemsize
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="pg1-3b-224", choices=sorted(VARIANTS))
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--quick", action="store_true", help="2+2 layers and a 32k vocabulary")
    p.add_argument("--dir", default=None, help="where to put the temporary files")
    p.add_argument("--convert-args", default="", help="extra flags for the converter")
    p.add_argument("--write-only", metavar="NPZ", help=argparse.SUPPRESS)  # internal
    args = p.parse_args()

    config = VARIANTS[args.variant]
    if args.quick:
        config = quick_config(config)
    if args.write_only:
        write_synthetic(Path(args.write_only), config, DTYPES[args.dtype])
        return
    work = Path(tempfile.mkdtemp(prefix="convert-bench-", dir=args.dir))
    try:
        src, out = work / "checkpoint.npz", work / "converted"
        # Written by a child process: the converter, forked from this process, would otherwise
        # inherit the writer's peak RSS as its own starting point.
        t0 = time.perf_counter()
        same = ["--variant", args.variant, "--dtype", args.dtype, *(["--quick"] * args.quick)]
        subprocess.run([sys.executable, __file__, *same, "--write-only", str(src)], check=True)
        print(f"wrote synthetic {config.name} in {time.perf_counter() - t0:.0f} s")
        writer_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        flags = ["--variant", args.variant]
        if args.quick:
            config.save(work / "config.json")
            flags = ["--config", str(work / "config.json")]
        cmd = [sys.executable, "-m", "convert", str(src), "-o", str(out), "-q", *flags]
        t0 = time.perf_counter()
        subprocess.run([*cmd, *args.convert_args.split()], cwd=ROOT, check=True)
        wall = time.perf_counter() - t0
        # The largest peak RSS among finished children (KiB on Linux): the converter's, unless
        # the writer's was larger (then the converter's is unknown but at most that).
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        bound = "<= " if rss == writer_rss else ""
        data = sum(math.prod(s) for s in official_shapes(config).values())
        data *= DTYPES[args.dtype].itemsize
        written = sum(f.stat().st_size for f in out.iterdir())
        print(f"variant      {config.name} ({args.dtype})")
        print(f"checkpoint   {src.stat().st_size / 1e9:.2f} GB ({data / 1e9:.2f} GB of arrays)")
        print(f"output       {written / 1e9:.2f} GB in {len(list(out.iterdir()))} files")
        print(f"wall time    {wall:.1f} s")
        print(f"throughput   {data / 1e6 / wall:.0f} MB/s")
        print(f"peak RSS     {bound}{rss / 1e9:.2f} GB ({rss / data:.1%} of the checkpoint)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
