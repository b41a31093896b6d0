"""Peak memory and time of a full-size 896 px prefill, before and after bounding its activations.

PaliGemma 2 takes the explicit attention path (logit softcap), whose scores and probabilities are
[B, heads, T, S] float32: at 896 px (4096 image tokens + prompt) about 0.55 GB each per layer for
3B; the MLP's hidden activations are 4 x 0.15 GB. `paligemma.gemma` runs attention in query
chunks of at most ATTENTION_CHUNK_SCORES scores and the MLP in row chunks of at most
MLP_CHUNK_ELEMENTS activations, and `paligemma.heap` keeps glibc from holding freed activations.
This script writes one random checkpoint in the official layout (bf16 `.npz`, PaliGemma 2 3B-896
by default; reused when present), then prefills 4096 image tokens + a 64-token prompt through the
real path (`load_official` -> `generate.prefill`, f32 KV cache) in two subprocesses, one per
setting, and prints side by side the prefill's peak RSS (the kernel's high-water mark, reset
through /proc/self/clear_refs once the model is loaded), the whole process's peak (load
included), the prefill time, and how far the settings' logits are apart:

    "one piece"   attention and MLP each in one piece, glibc's default mmap threshold (the
                  in-place residual stream, RoPE and attention output are not switchable:
                  before issue 15, see RESULTS.md's figures from that code)
    "chunked"     the defaults

    python benchmarks/bench_long_prefill.py --workdir /tmp/pg896 [--variant pg2-3b-896] [--json F]

About 7 GB of disk for the checkpoint and 8-10 GB of RAM per subprocess; a few minutes per
prefill on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from safetensors.torch import load_file, save_file  # noqa: E402

from benchmarks.convert_benchmark import write_synthetic  # noqa: E402
from benchmarks.record import JsonReport, add_json_arguments, machine  # noqa: E402
from paligemma import gemma, heap  # noqa: E402
from paligemma.config import VARIANTS  # noqa: E402
from paligemma.formats import load_official  # noqa: E402
from paligemma.generate import prefill  # noqa: E402

PROMPT_TOKENS = 64
UNBOUNDED = 1 << 62
# name -> (attention chunk scores, MLP chunk elements, glibc mmap threshold fixed by `heap`)
SETTINGS = {
    "one piece": (UNBOUNDED, UNBOUNDED, False),
    "chunked": (gemma.ATTENTION_CHUNK_SCORES, gemma.MLP_CHUNK_ELEMENTS, True),
}


def child(npz: Path, variant: str, setting: str, logits_path: Path) -> dict[str, float]:
    """Loads the checkpoint (bf16 storage) and runs one prefill; returns time and peak RSS and
    writes the last position's logits to `logits_path`."""
    gemma.ATTENTION_CHUNK_SCORES, gemma.MLP_CHUNK_ELEMENTS, map_heap = SETTINGS[setting]
    if not map_heap:
        heap.map_large_allocations = lambda: None  # as before: glibc's dynamic threshold
    config = VARIANTS[variant]
    model = load_official(npz, config, dtype=torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    load_peak = _peak_rss()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the prefill's own peak next
    rss_before = _status_bytes("VmRSS:")
    g = torch.Generator().manual_seed(0)
    size = config.vision.image_size
    images = torch.rand(1, 3, size, size, generator=g) * 2 - 1
    tokens = torch.randint(3, 1000, (1, PROMPT_TOKENS), generator=g)
    mask_ar = torch.zeros_like(tokens)
    input_mask = torch.ones_like(tokens, dtype=torch.bool)
    start = time.perf_counter()
    with torch.no_grad():
        state = prefill(model, images, tokens, mask_ar, input_mask, max_new_tokens=1)
    seconds = time.perf_counter() - start
    save_file({"logits": state.logits}, logits_path)
    return {
        "prefill_s": seconds,
        "prefill_peak_rss_gb": _status_bytes("VmHWM:") / 1e9,
        "rss_before_prefill_gb": rss_before / 1e9,
        "process_peak_rss_gb": _peak_rss() / 1e9,
        "load_peak_rss_gb": load_peak / 1e9,
        "weight_gb": weight_bytes / 1e9,
        "positions": config.num_image_tokens + PROMPT_TOKENS,
        "logits_finite": bool(torch.isfinite(state.logits).all()),
    }


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _status_bytes(field: str) -> int:
    """A /proc/self/status size in bytes: VmRSS (now) or VmHWM (peak RSS since start or the
    last clear_refs reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True,
                        help="folder for the random checkpoint (reused when present)")
    parser.add_argument("--variant", default="pg2-3b-896", choices=sorted(VARIANTS))
    add_json_arguments(parser)
    parser.add_argument("--only", choices=sorted(SETTINGS), help="run one setting only")
    parser.add_argument("--child", nargs=3, metavar=("NPZ", "SETTING", "LOGITS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        npz, setting, logits = args.child
        print(json.dumps(child(Path(npz), args.variant, setting, Path(logits))))
        return 0
    json_report = JsonReport(parser, args)

    npz = args.workdir / f"{args.variant}-random.b16.npz"
    if not npz.is_file():
        print(f"writing {npz} ...", file=sys.stderr)
        args.workdir.mkdir(parents=True, exist_ok=True)
        tmp = npz.with_name(f".{npz.name}.{os.getpid()}.tmp")
        write_synthetic(tmp, VARIANTS[args.variant], torch.bfloat16)
        tmp.rename(npz)
    results, logits = {}, {}
    for name in SETTINGS:
        if args.only and name != args.only:
            continue
        print(f"prefill, {name} ...", file=sys.stderr)
        logits_path = args.workdir / f"logits-{name.replace(' ', '-')}.safetensors"
        out = subprocess.run(
            [sys.executable, __file__, "--workdir", str(args.workdir), "--variant", args.variant,
             "--child", str(npz), name, str(logits_path)],
            capture_output=True, text=True, check=True,
        )
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        logits[name] = load_file(logits_path)["logits"]
    report = {"machine": {**machine(), "load_avg": os.getloadavg()},
              "variant": args.variant,
              "settings": {name: dict(zip(("attention_chunk_scores", "mlp_chunk_elements",
                                           "map_large_allocations"), v, strict=True))
                           for name, v in SETTINGS.items()},
              "results": results}
    budget = next(iter(results.values()))["weight_gb"] + 1.5
    first = next(iter(results.values()))
    print(f"{args.variant}: {first['positions']} positions, weights {first['weight_gb']:.2f} GB "
          f"(bf16), {report['machine']['cpu']}, {report['machine']['isa']}, "
          f"load average {report['machine']['load_avg'][0]:.1f}")
    print(f"{'setting':<10} {'RSS before GB':>14} {'prefill peak GB':>16} "
          f"{'over weights GB':>16} {'process peak GB':>16} {'prefill s':>10}")
    for name, r in results.items():
        print(f"{name:<10} {r['rss_before_prefill_gb']:>14.2f} {r['prefill_peak_rss_gb']:>16.2f} "
              f"{r['prefill_peak_rss_gb'] - r['weight_gb']:>16.2f} "
              f"{r['process_peak_rss_gb']:>16.2f} {r['prefill_s']:>10.1f}")
    if len(results) == len(SETTINGS):
        before, after = results["one piece"], results["chunked"]
        error = (logits["chunked"] - logits["one piece"]).abs().max().item()
        scale = logits["one piece"].abs().max().item()
        report["logits_max_abs_difference"] = error
        print(f"chunked / one piece: prefill peak "
              f"{after['prefill_peak_rss_gb'] / before['prefill_peak_rss_gb']:.2f}, "
              f"time {after['prefill_s'] / before['prefill_s']:.2f}; last logits max-abs "
              f"difference {error:.2e} (largest logit {scale:.1f})")
    if "chunked" in results:
        peak = results["chunked"]["prefill_peak_rss_gb"]
        print(f"target: prefill peak <= weights + 1.5 GB = {budget:.2f} GB: "
              f"{'met' if peak <= budget else 'MISSED'} ({peak:.2f} GB)")
    json_report.save(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
