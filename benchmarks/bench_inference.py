"""Inference benchmark: this package against Hugging Face transformers, side by side, one run.

Builds one random full-size checkpoint (PaliGemma 1 3B-224 by default, bf16 safetensors in our
format; `python -m convert --to hf` exports the same weights for transformers), then runs every
(framework, dtype) configuration in its own subprocess, interleaved ours / theirs, so that peak
RSS is per configuration and the machine's load affects both sides alike. Each subprocess:

    cold load from safetensors (file pages evicted first) -> first token (TTFT, batch 1)
    warm: vision tower; prefill = vision + prompt -> first token; decode ms/token, batch 1 and 4
    peak RSS (ru_maxrss) of the whole subprocess

Prompt: one 224px image (256 tokens) + 6 text tokens, all prefix; greedy decoding with eos off.
Decode ms/token is the time between the first and the last generated token over the number of
steps, taken from streamed tokens on both sides (transformers' `streamer`, our `stream`).
float32 and bfloat16 load the same bf16 file into that dtype; int8, int8-linear and int4 are ours
only, each loaded from the quantized checkpoint `python -m convert --quantize MODE` wrote once
from the bf16 one (memory-mapped, nothing computed at load; int8-linear leaves the tied
embedding in bf16; int4 is group-wise, 128 columns per group; `bench_load.py` compares with
quantizing at load), compared against transformers float32 and bfloat16. On CPUs with native
bf16 dot products (AMX, AVX512-BF16), float32, bfloat16, int8 and int4 of ours also run at
`--matmul-precision medium` ("bfloat16@medium": prefill and vision GEMMs with bf16 inputs, as
transformers' bf16 model computes them; decode unchanged), and with the AMX build bfloat16 at
`--matmul-precision high` ("bfloat16@high": x in two bf16 parts). The record names the
CPU (model, the /proc/cpuinfo flags that matter for matmuls, PyTorch's capability) and, per
configuration of ours, the matmul path `paligemma.dispatch` chose for each (weight dtype, few /
many rows).

The decode floor is the weight bytes one decode step must read (decoder layers and the tied
257k-row output projection) over the memory read bandwidth, measured in the same run (sum of a
1 GiB float32 tensor with the same threads), before and after the configurations.

    python benchmarks/bench_inference.py --quick            # small model, ~2 minutes
    python benchmarks/bench_inference.py --json out.json    # full size, ~17 minutes, 18 GB RAM
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.record import JsonReport, add_json_arguments, machine  # noqa: E402
from paligemma import dispatch, int4  # noqa: E402
from paligemma.config import VARIANTS, PaliGemmaConfig  # noqa: E402
from paligemma.formats import load_pretrained  # noqa: E402
from paligemma.formats import ours as checkpoint  # noqa: E402
from paligemma.model import PaliGemmaModel  # noqa: E402
from paligemma.quantize import MODES, quantized_types, stored_specs  # noqa: E402

TEXT_TOKENS = [2, 1018, 1101, 573, 4352, 108]  # bos, 4 word pieces, "\n" (fit every vocab)
# Quantized modes quantize the bf16 file as it is read; int8-linear keeps the tied embedding in
# bf16.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.bfloat16,
          "int8-linear": torch.bfloat16, "int4": torch.bfloat16}
# (framework, dtype) in run order: ours and theirs alternate so that load drifts hit both.
CONFIGS = [
    ("ours", "bfloat16"),
    ("hf", "bfloat16"),
    ("ours", "float32"),
    ("hf", "float32"),
    ("ours", "int8"),
    ("ours", "int8-linear"),
    ("ours", "int4"),
    ("ours", "bfloat16@high"),
    ("ours", "bfloat16@medium"),
    ("ours", "float32@medium"),
    ("ours", "int8@medium"),
    ("ours", "int4@medium"),
]


def split(dtype: str) -> tuple[str, str]:
    """"bfloat16@medium" -> ("bfloat16", "medium"); "int8" -> ("int8", "highest")."""
    base, _, precision = dtype.partition("@")
    return base, precision or "highest"


def quick_config() -> PaliGemmaConfig:
    """A small model with the full model's shapes where they matter: 256 image tokens, MQA."""
    base = VARIANTS["pg1-3b-224"]
    return PaliGemmaConfig(
        dataclasses.replace(base.vision, width=384, depth=4, mlp_dim=1536, num_heads=6),
        dataclasses.replace(base.text, width=512, depth=4, mlp_dim=4096, head_dim=64,
                            vocab_size=32768),
        name="pg1-quick",
    )


# ---------------------------------------------------------------------------------------------
# Checkpoints


def random_tensors(
    config: PaliGemmaConfig, seed: int = 0
) -> Iterator[tuple[str, tuple[int, ...], Iterator[torch.Tensor]]]:
    """(name, shape, float32 pieces of whole rows) of every tensor of a model of `config`, in
    state-dict order; consume each tensor's pieces before asking for the next tensor.

    Matrices ~ N(0, 1/fan_in) keep activations in a normal range (no overflow, no denormals);
    norm scales and biases are 0, as at initialization.
    """
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in PaliGemmaModel(config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    for name, shape in shapes.items():
        if len(shape) == 1:
            yield name, shape, iter([torch.zeros(shape)])
        else:
            yield name, shape, _random_rows(shape, shape[-1] if len(shape) == 3 else
                                            math.prod(shape[1:]), g)


def write_random_checkpoint(directory: Path, config: PaliGemmaConfig, seed: int = 0) -> None:
    """Our checkpoint format, bf16, `random_tensors` streamed one tensor at a time."""
    tensors = list(random_tensors(config, seed))  # lazy pieces: nothing drawn yet
    specs = {name: (shape, torch.bfloat16) for name, shape, _ in tensors}
    with checkpoint.SafetensorsWriter(directory, specs) as writer:
        for name, _, pieces in tensors:
            writer.write(name, pieces)
    checkpoint.write_json(
        directory / checkpoint.CONFIG_FILE,
        {"model_type": checkpoint.MODEL_TYPE, **config.to_dict()},
    )


def _random_rows(
    shape: tuple[int, ...], fan_in: int, g: torch.Generator
) -> Iterator[torch.Tensor]:
    """N(0, 1/fan_in) values of `shape`, in pieces of whole rows of about 64 MB (float32)."""
    step = max(1, (16 << 20) // math.prod(shape[1:]))
    for start in range(0, shape[0], step):
        n = min(step, shape[0] - start)
        yield torch.randn(n, *shape[1:], generator=g).mul_(fan_in**-0.5)


def prepare_checkpoints(workdir: Path, config: PaliGemmaConfig, hf: bool) -> tuple[Path, Path]:
    """Ours and the transformers export, reused across runs when already there."""
    ours, theirs = workdir / f"{config.name}-ours", workdir / f"{config.name}-hf"
    if not (ours / checkpoint.CONFIG_FILE).is_file():
        print(f"writing random checkpoint {ours} ...", file=sys.stderr)
        tmp = workdir / f".{ours.name}.tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        write_random_checkpoint(tmp, config)
        tmp.rename(ours)
    if hf and not (theirs / "config.json").is_file():
        print(f"exporting {theirs} with python -m convert --to hf ...", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "convert", str(ours), "--to", "hf", "-o", str(theirs), "-q"],
            cwd=ROOT,
            check=True,
        )
    return ours, theirs


def quantized_checkpoint(source: Path, mode: str) -> Path:
    """`source` quantized by `python -m convert --quantize mode`, written once and reused. int4
    directories are named after the int4 layout, so that one written in an older layout (which
    would load converted, not mapped) is not reused."""
    layout = f"-layout{int4.LAYOUT}" if mode.startswith("int4") else ""
    out = source.with_name(f"{source.name}-{mode}{layout}")
    if not (out / checkpoint.CONFIG_FILE).is_file():
        print(f"writing {out} (python -m convert --quantize {mode}) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "convert", str(source), "--quantize", mode,
                        "-o", str(out), "-q"], cwd=ROOT, check=True)
    return out


def evict_page_cache(directory: Path) -> None:
    """Drops the directory's file pages from the page cache (a cold load reads the disk)."""
    for path in directory.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ---------------------------------------------------------------------------------------------
# One configuration (runs in a subprocess)


class Runner:
    """Loads one model and generates from it; `stream` returns the time of each new token."""

    def __init__(self, framework: str, dtype: str, directory: Path, config: PaliGemmaConfig):
        dtype, precision = split(dtype)
        if precision != "highest":
            dispatch.set_matmul_precision(precision)
        self.framework, self.dtype, self.config = framework, dtype, config
        if framework == "ours" and dtype in MODES:  # a quantized checkpoint of this mode
            self.model = load_pretrained(directory, quantize=dtype)
        elif framework == "ours":
            torch_dtype = None if dtype == "bfloat16" else DTYPES[dtype]
            self.model = load_pretrained(directory, dtype=torch_dtype)
        else:
            from transformers import PaliGemmaForConditionalGeneration

            self.model = PaliGemmaForConditionalGeneration.from_pretrained(
                directory, dtype=DTYPES[dtype]
            ).eval()

    def inputs(self, batch: int) -> dict[str, torch.Tensor]:
        size = self.config.vision.image_size
        g = torch.Generator().manual_seed(batch)
        images = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
        text = torch.tensor([TEXT_TOKENS] * batch)
        if self.framework == "ours":
            return {"images": images, "tokens": text}
        n_img = self.config.num_image_tokens
        image_token = self.config.text.vocab_size  # the export's image_token_index
        ids = torch.cat([torch.full((batch, n_img), image_token), text], 1)
        return {
            "pixel_values": images.to(DTYPES[self.dtype]),
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "token_type_ids": torch.zeros_like(ids),
        }

    @torch.inference_mode()
    def vision(self, inputs: dict[str, torch.Tensor]) -> None:
        if self.framework == "ours":
            self.model.embed_image(inputs["images"])
        else:
            self.model.model.get_image_features(inputs["pixel_values"])

    def stream(self, inputs: dict[str, torch.Tensor], steps: int) -> list[float]:
        """Times (perf_counter) at which tokens 1..steps were available."""
        times: list[float] = []
        if self.framework == "ours":
            from paligemma.generate import stream

            tokens = inputs["tokens"]
            zeros = torch.zeros_like(tokens)
            for _ in stream(self.model, inputs["images"], tokens, zeros, zeros == 0, steps):
                times.append(time.perf_counter())
            return times
        from transformers.generation.streamers import BaseStreamer

        class Clock(BaseStreamer):
            def put(self, value: torch.Tensor) -> None:
                times.append(time.perf_counter())

            def end(self) -> None:
                pass

        self.model.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            streamer=Clock(),
        )
        return times[1:]  # the first put is the prompt


def time_generation(runner: Runner, batch: int, steps: int) -> tuple[float, float]:
    """(seconds to the first token, seconds per later token) of one generation."""
    inputs = runner.inputs(batch)
    start = time.perf_counter()
    times = runner.stream(inputs, steps)
    return times[0] - start, (times[-1] - times[0]) / (len(times) - 1)


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Cold: load and generate (TTFT, decode); warm: vision, generate again, then batch 4
    (warm figures: best of `repeats`)."""
    torch.set_num_threads(spec["threads"])
    config = PaliGemmaConfig.from_dict(spec["config"])
    directory = Path(spec["directory"])
    evict_page_cache(directory)
    start = time.perf_counter()
    runner = Runner(spec["framework"], spec["dtype"], directory, config)
    out: dict[str, Any] = {"load_s": time.perf_counter() - start,
                           "peak_rss_after_load": _peak_rss()}
    first, decode = time_generation(runner, 1, spec["steps"])
    out["ttft_cold_s"] = out["load_s"] + first
    out["peak_rss_after_first_generation"] = _peak_rss()
    inputs = runner.inputs(1)
    out["vision_ms"] = 1e3 * min(_timed(runner.vision, inputs) for _ in range(spec["repeats"]))
    b1 = [time_generation(runner, 1, spec["steps"]) for _ in range(spec["repeats"])]
    out["prefill_ms"] = 1e3 * min(p for p, _ in b1)
    out["decode_b1_ms"] = 1e3 * min([decode] + [d for _, d in b1])
    # best of `repeats` as at batch 1: one sample against a best of several made the batch-4 /
    # batch-1 ratio read high on a busy host
    out["decode_b4_ms"] = 1e3 * min(time_generation(runner, 4, spec["steps_b4"])[1]
                                    for _ in range(spec["repeats"]))
    out["peak_rss"] = _peak_rss()
    if spec["framework"] == "ours":  # the matmul path each (weight dtype, rows) took
        out["paths"] = dispatch.plan().describe()["paths"]
        out["sgemm"] = dispatch.plan().sgemm  # the f32 GEMM of "widen"
    return out


def _timed(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------
# Parent: machine, bandwidth, configurations, table


def read_bandwidth(threads: int) -> float:
    """GB/s of summing a 1 GiB float32 tensor (best of 5), in a fresh subprocess."""
    code = (
        f"import torch, time; torch.set_num_threads({threads}); x = torch.ones(1 << 28); t = []\n"
        "for _ in range(6):\n s = time.perf_counter(); x.sum(); t.append(time.perf_counter() - s)\n"
        "print(x.nbytes / min(t) / 1e9)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def decode_bytes(config: PaliGemmaConfig, dtype: str) -> int:
    """Weight bytes read by one decode step: decoder layers + the tied output projection."""
    with torch.device("meta"):
        decoder = PaliGemmaModel(config).decoder
    quantized: set[int] = set()
    if dtype in MODES:  # the matrices the mode quantizes: stored weights + scales
        types = quantized_types(dtype)
        quantized = {id(m.weight) for m in decoder.modules() if isinstance(m, types)}
    total = 0
    for p in decoder.parameters():
        if id(p) in quantized:
            stored = stored_specs(tuple(p.shape), dtype).values()
            total += sum(math.prod(shape) * t.itemsize for shape, t in stored)
        elif p.dim() == 2:
            total += p.numel() * DTYPES[dtype].itemsize
        else:  # norms and other vectors are float32
            total += p.numel() * 4
    return total


def run_configuration(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


METRICS = [
    ("vision_ms", "vision tower, ms", 1.0),
    ("prefill_ms", "prefill (vision + 262 tok), ms", 1.0),
    ("decode_b1_ms", "decode batch 1, ms/token", 1.0),
    ("decode_b4_ms", "decode batch 4, ms/token", 1.0),
    ("ttft_cold_s", "TTFT from cold load, s", 1.0),
    ("load_s", "load, s", 1.0),
    ("peak_rss", "peak RSS, GiB", 2.0**-30),
]


def table(results: dict[str, dict[str, Any]], floors: dict[str, float]) -> str:
    """One block per dtype: ours, transformers, ours/theirs (int8: against float32 and bf16)."""
    lines = []
    for name in [dtype for framework, dtype in CONFIGS if framework == "ours"]:
        ours = results.get(f"ours/{name}")
        if ours is None:
            continue
        dtype = split(name)[0]
        theirs = (
            [("hf f32", results.get("hf/float32")), ("hf bf16", results.get("hf/bfloat16"))]
            if dtype in MODES
            else [("transformers", results.get(f"hf/{dtype}"))]
        )
        theirs = [(name, r) for name, r in theirs if r and "error" not in r]
        header = f"{name:<34}{'ours':>10}" + "".join(
            f"{name:>14}{'ours/theirs':>13}" for name, _ in theirs
        )
        lines += [header, "-" * len(header)]
        if "error" in ours:
            lines += [f"ours failed: {ours['error']}", ""]
            continue
        for key, label, unit in METRICS:
            row = f"{label:<34}{ours[key] * unit:>10.3g}"
            for _, r in theirs:
                row += f"{r[key] * unit:>14.3g}{ours[key] / r[key]:>13.2f}"
            lines.append(row)
        lines.append(f"{'decode floor (bandwidth), ms/token':<34}{floors[dtype]:>10.3g}")
        b4_over_b1 = [r["decode_b4_ms"] / r["decode_b1_ms"] for r in [ours, *dict(theirs).values()]]
        lines.append(f"{'decode batch 4 / batch 1':<34}{b4_over_b1[0]:>10.2f}"
                     + "".join(f"{v:>14.2f}{'':>13}" for v in b4_over_b1[1:]))
        paths = ours.get("paths", {})
        weights = ("float32" if dtype == "float32" else "uint8" if dtype.startswith("int4")
                   else "int8" if dtype in MODES else "bfloat16")
        line = (f"paths ({weights} weights): few rows {paths.get(f'{weights}/few')}, "
                f"many rows {paths.get(f'{weights}/many')}")
        if weights == "uint8":  # packed int4; a matrix whose K is no multiple of G is int8
            line += (f"; int8 ones: few rows {paths.get('int8/few')}, many rows "
                     f"{paths.get('int8/many')}")
        if "sgemm" in ours:
            line += f"; f32 GEMM of widen: {ours['sgemm']}"
        lines.append(line)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model (~2 minutes)")
    add_json_arguments(p)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "pg-bench",
                   help="where the random checkpoints are written and reused")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--steps", type=int, default=None, help="decode steps at batch 1")
    p.add_argument("--repeats", type=int, default=1, help="warm repetitions (best is kept)")
    p.add_argument("--only", default=None,
                   help="comma-separated subset of configurations, e.g. ours/int8,hf/float32")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0
    report = JsonReport(p, args)

    config = quick_config() if args.quick else VARIANTS["pg1-3b-224"]
    configs = [c for c in CONFIGS if args.only is None or "/".join(c) in args.only.split(",")]
    if not dispatch.Cpu.detect().native_bf16:  # "medium" would change nothing
        configs = [c for c in configs if split(c[1])[1] == "highest"]
    # Builds the C++ kernel here if this source has no build yet: built inside a child, its
    # ~30 s would count in that configuration's time to first token.
    if dispatch.plan().kernel != "amx":  # "high" would change nothing
        configs = [c for c in configs if split(c[1])[1] != "high"]
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("transformers is not installed: measuring ours only", file=sys.stderr)
        configs = [c for c in configs if c[0] == "ours"]
    ours_dir, hf_dir = prepare_checkpoints(
        args.workdir, config, hf=any(fw == "hf" for fw, _ in configs)
    )
    directories = {f"ours/{d}": quantized_checkpoint(ours_dir, split(d)[0])
                   if split(d)[0] in MODES else ours_dir for fw, d in configs if fw == "ours"}
    steps = args.steps or (32 if args.quick else 10)
    if os.getloadavg()[0] > 0.5:
        print(f"note: load average {os.getloadavg()[0]:.1f}: other processes compete for the "
              "cores; with fewer free cores than --threads, parallel regions wait for "
              "descheduled threads (see RESULTS.md)", file=sys.stderr)
    info = {"machine": machine(), "threads": args.threads, "model": config.name,
            "load_avg_before": os.getloadavg(), "bandwidth_gbs": [read_bandwidth(args.threads)]}
    results: dict[str, dict[str, Any]] = {}
    for framework, dtype in configs:
        spec = {
            "framework": framework,
            "dtype": dtype,
            "directory": str(directories.get(f"{framework}/{dtype}", hf_dir)),
            "config": config.to_dict(),
            "threads": args.threads,
            "steps": steps,
            # as many steps as batch 1: with a third of them (3 at the default 10) the batch-4
            # figure was the mean of two intervals, and moved 20-30% between runs
            "steps_b4": steps,
            "repeats": args.repeats,
        }
        print(f"running {framework}/{dtype} ...", file=sys.stderr)
        results[f"{framework}/{dtype}"] = run_configuration(spec)
    info["bandwidth_gbs"].append(read_bandwidth(args.threads))
    info["load_avg_after"] = os.getloadavg()
    bandwidth = max(info["bandwidth_gbs"])
    floors = {d: decode_bytes(config, d) / bandwidth / 1e6 for d in DTYPES}
    weights = sum(f.stat().st_size for f in ours_dir.glob("*.safetensors"))
    print(
        f"{config.name}, random weights ({weights / 1e9:.2f} GB bf16 safetensors), "
        f"{args.threads} threads, {info['machine']['cpu']} (torch capability "
        f"{info['machine']['isa']}; {' '.join(info['machine']['flags'])}), "
        f"torch {info['machine']['torch']}, transformers {info['machine']['transformers']}\n"
        f"read bandwidth {' / '.join(f'{b:.1f}' for b in info['bandwidth_gbs'])} GB/s "
        f"(before / after), load average {info['load_avg_before'][0]:.2f} -> "
        f"{info['load_avg_after'][0]:.2f}\n"
    )
    print(table(results, floors))
    report.save({**info, "weights_bytes": weights, "floors_ms": floors, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
