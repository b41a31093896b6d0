"""The decode kernel on one decode step's weights, against the kernel of another git revision.

One decode step reads every decoder matrix once (PaliGemma 1 3B: 18 layers of q, k, v, o,
gate, up and down projections, then the 257k-row tied output projection): this times exactly
that sequence of `paligemma::gemv` calls on random weights in anonymous memory, per weight dtype
(bf16, int8 + row scales, packed int4 + group scales) and rows of x (batch 1, 4), and prints
the weight bytes read per second next to `x.sum()`'s read bandwidth in the same run (measured
as `bench_inference.py` measures its decode floor).

`--against REV` builds `paligemma/csrc/gemv.cpp` as it is at git revision REV next to the
working tree's, both with the same compiler flags and under their own op names, and alternates
the two round by round: a change to the kernel's memory access is then measured side by side,
not across runs (single figures on a shared VM move 10-30% between runs; only ratios within one
run are evidence). Both are built with the AVX-512 or AVX2 flags of `paligemma.kernels` (the
decode kernel is the same in the AMX build, which only adds the tile GEMM).

    python benchmarks/decode_kernel.py                      # this tree's kernel, ~2 minutes
    python benchmarks/decode_kernel.py --against HEAD~1     # A/B, ~4 minutes, 9 GB of RAM
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_inference import read_bandwidth  # noqa: E402
from benchmarks.record import JsonReport, add_json_arguments, machine  # noqa: E402
from paligemma import dispatch, kernels  # noqa: E402
from paligemma.config import VARIANTS  # noqa: E402

SOURCE = "paligemma/csrc/gemv.cpp"
DTYPES = ("bf16", "int8", "int4")
INT4_GROUP = 128


def step_shapes(variant: str) -> list[tuple[int, int]]:
    """[N, K] of every matrix one decode step of `variant` reads, in order."""
    t = VARIANTS[variant].text
    q, kv = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    layer = [(q, t.width), (kv, t.width), (kv, t.width), (t.width, q),
             (t.mlp_dim, t.width), (t.mlp_dim, t.width), (t.width, t.mlp_dim)]
    return layer * t.depth + [(t.vocab_size, t.width)]


def random_weights(dtype: str, n: int, k: int, g: torch.Generator):
    """(weight, scale) as `paligemma.layers` / `paligemma.int4` store them; random codes."""
    if dtype == "bf16":
        return torch.randn(n, k, generator=g).bfloat16(), None
    if dtype == "int8":
        return (torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g),
                torch.rand(n, generator=g) / 100)
    return (torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=g),
            torch.rand(n, k // INT4_GROUP, 2, generator=g) / 100)


def build(tag: str, source: Path, isa: str) -> object:
    """Builds `source` as op paligemma::gemv_<tag> with `isa`'s flags; returns the op."""
    from torch.utils.cpp_extension import load

    load(name=f"paligemma_gemv_bench_{tag}", sources=[str(source)],
         extra_cflags=["-O3", f"-DPG_ISA={tag}", "-fopenmp", *kernels.ISAS[isa][1]],
         extra_ldflags=["-fopenmp"], is_python_module=False)
    return getattr(torch.ops.paligemma, f"gemv_{tag}")


def source_at(rev: str, directory: Path) -> Path:
    """The kernel source as it is at git revision `rev`, written under `directory`."""
    text = subprocess.run(["git", "show", f"{rev}:{SOURCE}"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    path = directory / "gemv.cpp"
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", metavar="REV",
                   help="also build the kernel of this git revision and alternate the two")
    p.add_argument("--isa", choices=("avx512", "avx2"),
                   help="compiler flags of both builds (default: AVX-512 where the CPU has it)")
    p.add_argument("--variant", default="pg1-3b-224", choices=sorted(VARIANTS),
                   help="whose decoder matrices (default: %(default)s)")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    p.add_argument("--rows", nargs="+", type=int, default=[1, 4], help="rows of x (batch)")
    p.add_argument("--rounds", type=int, default=4, help="best of this many (default 4)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_json_arguments(p)
    args = p.parse_args(argv)
    report = JsonReport(p, args)
    torch.set_num_threads(args.threads)
    cpu = dispatch.Cpu.detect()
    isa = args.isa or ("avx512" if kernels.ISAS["avx512"][0] <= cpu.flags else "avx2")
    if not kernels.ISAS[isa][0] <= cpu.flags:
        p.error(f"this CPU lacks the {isa} build's instruction set")

    with tempfile.TemporaryDirectory() as tmp:
        builds = {"this tree": build("bench_tree", ROOT / SOURCE, isa)}
        if args.against:
            builds[args.against] = build("bench_rev", source_at(args.against, Path(tmp)), isa)
    shapes = step_shapes(args.variant)
    g = torch.Generator().manual_seed(0)
    times: dict[tuple[str, str, int], float] = {}
    bandwidth = []
    nbytes = {}
    for dtype in args.dtypes:  # one dtype's weights at a time: memory is the largest set
        weights = [random_weights(dtype, n, k, g) for n, k in shapes]
        nbytes[dtype] = sum(w.nbytes + (0 if s is None else s.nbytes) for w, s in weights)
        xs = {m: {k: torch.randn(m, k, generator=g) for k in {k for _, k in shapes}}
              for m in args.rows}
        for round_ in range(args.rounds):
            bandwidth.append(read_bandwidth(args.threads))
            order = list(builds.items())[:: 1 if round_ % 2 == 0 else -1]  # neither always first
            for m in args.rows:
                for name, op in order:
                    start = time.perf_counter()
                    for (_, k), (w, s) in zip(shapes, weights, strict=True):
                        op(xs[m][k], w, s)
                    key = (dtype, name, m)
                    times[key] = min(times.get(key, float("inf")), time.perf_counter() - start)
        del weights

    gbps = max(bandwidth)
    info = machine()
    print(f"{args.variant} decode step, {args.threads} threads, {isa} build, {info['cpu']} "
          f"({', '.join(info['flags'])}); x.sum() {gbps:.1f} GB/s (best of {len(bandwidth)})")
    rows = []
    for dtype in args.dtypes:
        for m in args.rows:
            line = f"{dtype:5s} {nbytes[dtype] / 1e9:5.2f} GB  batch {m}:"
            base = times[(dtype, "this tree", m)]
            for name in builds:
                t = times[(dtype, name, m)]
                rate = nbytes[dtype] / t / 1e9
                line += f"  {name} {t * 1e3:7.1f} ms {rate:5.1f} GB/s ({rate / gbps:.2f} of sum)"
                rows.append({"dtype": dtype, "rows": m, "build": name, "ms": t * 1e3,
                             "gb_per_s": rate})
            if args.against:
                ratio = base / times[(dtype, args.against, m)]
                line += f"  this tree / {args.against}: {ratio:.3f}"
            print(line)
    report.save({**info, "variant": args.variant, "build_isa": isa, "against": args.against,
                 "sum_gb_per_s": gbps, "weights_bytes": nbytes, "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
