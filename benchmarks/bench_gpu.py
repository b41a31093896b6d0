"""GPU benchmark: prefill and decode at batch 1 / 8 / 32, ours against transformers, one run.

For when a GPU is lent (`benchmarks/bench_gpu.sh`, under 5 minutes on one GPU for the full-size
model): every figure is measured on the device, nothing is read from disk. One random
PaliGemma 1 3B-224 (bf16 weights, N(0, 1/fan_in) matrices, zero norms: activations stay in a
normal range) is built on the device; transformers gets the same weights through our export
mapping (`formats.hf`). Configurations, run one after the other:

    ours/bfloat16        this package: bf16 storage, float32 math (big_vision's numerics), eager
    hf-eager/bfloat16    transformers, bf16, SDPA attention, dynamic cache, eager
    hf/bfloat16          transformers, bf16, SDPA attention, static cache, torch.compile (the
                         decode step, as `generate` compiles it for a static cache)

Per batch size B (the same prompt per row: one 224px image = 256 tokens + 6 text tokens):
prefill = images + prompt -> first token, ms (best of --repeats); decode = ms per later token
(greedy, eos off), timed with the device synchronized after every token on both sides; and the
peak device memory of the configuration. The decode floor is the weight bytes one step reads
over the device's read bandwidth (sum of a 1 GiB tensor), measured before and after.

The JSON has bench_inference.py's shape (machine, threads, model, bandwidth_gbs, floors_ms,
results["framework/dtype"] = {metric: value}), written after every configuration so that a run
cut short keeps what it measured. An existing FILE is replaced only with --force, and only if it
is a previous benchmark report (`benchmarks/record.py`).

    benchmarks/bench_gpu.sh --json out.json                      # cuda, full size
    benchmarks/bench_gpu.sh --device cpu --tiny --no-compile     # the CPU test's run, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from bench_inference import TEXT_TOKENS, decode_bytes  # noqa: E402

from benchmarks.record import JsonReport, add_json_arguments, machine  # noqa: E402
from paligemma.config import VARIANTS, PaliGemmaConfig  # noqa: E402
from paligemma.formats.hf import hf_chunks, hf_config, hf_names  # noqa: E402
from paligemma.generate import decode_step, prefill  # noqa: E402
from paligemma.model import PaliGemmaModel  # noqa: E402

CONFIGS = ("ours/bfloat16", "hf-eager/bfloat16", "hf/bfloat16")
BATCHES = (1, 8, 32)


def tiny_config() -> PaliGemmaConfig:
    """A few-MB PaliGemma 1 (Gemma 1 decoder, MQA) that runs every path in seconds on a CPU."""
    base = VARIANTS["pg1-3b-224"]
    return PaliGemmaConfig(
        dataclasses.replace(base.vision, width=32, depth=1, mlp_dim=64, num_heads=2,
                            patch_size=14, image_size=56),
        dataclasses.replace(base.text, width=64, depth=2, mlp_dim=128, num_heads=2,
                            num_kv_heads=1, head_dim=32, vocab_size=8192),
        name="pg1-tiny",
    )


def random_model(config: PaliGemmaConfig, device: torch.device, seed: int = 0) -> PaliGemmaModel:
    """Our model on `device`, bf16 weights ~ N(0, 1/fan_in), norms and biases zero."""
    with torch.device(device):
        model = PaliGemmaModel(config).to(torch.bfloat16).eval().requires_grad_(False)
    g = torch.Generator(device).manual_seed(seed)
    for p in model.parameters():
        if p.dim() >= 2:
            fan_in = p.shape[-1] if p.dim() == 3 else p[0].numel()
            p.normal_(0.0, fan_in**-0.5, generator=g)
        else:
            p.zero_()
    return model


def hf_model(ours: PaliGemmaModel, attention: str = "sdpa") -> Any:
    """transformers' PaliGemmaForConditionalGeneration with `ours`' weights, on ours' device.

    The weights go through our export mapping (`formats.hf`, the names `--to hf` writes) and
    transformers' own loading (`from_pretrained` with a state dict: its key renaming, tying)."""
    from transformers import PaliGemmaConfig as HFConfig
    from transformers import PaliGemmaForConditionalGeneration

    config = ours.config
    device = next(ours.parameters()).device
    state = ours.state_dict()
    names = hf_names(config, list(state))
    converted = {names[k]: torch.cat(list(hf_chunks(config, k, iter([v.cpu()]))))
                 for k, v in state.items()}
    model = PaliGemmaForConditionalGeneration.from_pretrained(
        None,
        config=HFConfig.from_dict(hf_config(config, torch.bfloat16, {"pad_token_id": 0})),
        state_dict=converted,
        dtype=torch.bfloat16,
        attn_implementation=attention,
    )
    return model.to(device).eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images(config: PaliGemmaConfig, batch: int, device: torch.device) -> torch.Tensor:
    size = config.vision.image_size
    g = torch.Generator().manual_seed(batch)
    return (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)


@torch.inference_mode()
def run_ours(model: PaliGemmaModel, batch: int, steps: int) -> tuple[float, float]:
    """(s to the first token, s per later token) of one greedy generation."""
    device = next(model.parameters()).device
    pixels = images(model.config, batch, device)
    tokens = torch.tensor([TEXT_TOKENS] * batch, device=device)
    zeros = torch.zeros_like(tokens)
    sync(device)
    start = time.perf_counter()
    state = prefill(model, pixels, tokens, zeros, zeros == 0, steps)
    token = state.logits.argmax(-1)
    sync(device)
    times = [time.perf_counter()]
    try:
        for _ in range(steps - 1):
            state = decode_step(model, state, token)
            token = state.logits.argmax(-1)
            sync(device)
            times.append(time.perf_counter())
    finally:
        model.decoder.clear_kv_cache()
    return times[0] - start, (times[-1] - times[0]) / max(1, len(times) - 1)


def run_hf(model: Any, config: PaliGemmaConfig, batch: int, steps: int, *,
           static: bool, compile_: bool) -> tuple[float, float]:
    """(s to the first token, s per later token) of one greedy `generate`."""
    from transformers import CompileConfig
    from transformers.generation.streamers import BaseStreamer

    device = model.device
    n_img = config.num_image_tokens
    ids = torch.tensor([[config.text.vocab_size] * n_img + TEXT_TOKENS] * batch, device=device)
    times: list[float] = []

    class Clock(BaseStreamer):
        def put(self, value: torch.Tensor) -> None:
            sync(device)
            times.append(time.perf_counter())

        def end(self) -> None:
            pass

    options: dict[str, Any] = {}
    if static:
        options["cache_implementation"] = "static"
        compile_config = CompileConfig(dynamic=False)
        compile_config._compile_all_devices = device.type != "cuda"  # CPU: only when asked
        options["compile_config"] = compile_config
    options["disable_compile"] = not compile_
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            pixel_values=images(config, batch, device).to(torch.bfloat16),
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            token_type_ids=torch.zeros_like(ids),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
            streamer=Clock(),
            **options,
        )
    times = times[1:]  # the first put is the prompt
    return times[0] - start, (times[-1] - times[0]) / max(1, len(times) - 1)


def measure(run: Callable[[int, int], tuple[float, float]], device: torch.device,
            batches: tuple[int, ...], steps: int, repeats: int) -> dict[str, Any]:
    """Per batch: a warm-up generation (compiles, allocates), then the best of `repeats`."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out: dict[str, Any] = {}
    for b in batches:
        run(b, min(steps, 3))
        timings = [run(b, steps) for _ in range(repeats)]
        out[f"prefill_b{b}_ms"] = 1e3 * min(p for p, _ in timings)
        out[f"decode_b{b}_ms"] = 1e3 * min(d for _, d in timings)
    if device.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def read_bandwidth(device: torch.device) -> float:
    """GB/s of summing a 1 GiB float32 tensor on `device` (best of 5; CPU: 256 MiB)."""
    x = torch.ones((1 << 28) if device.type == "cuda" else (1 << 26), device=device)
    times = []
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        x.sum()
        sync(device)
        times.append(time.perf_counter() - start)
    return x.nbytes / min(times[1:]) / 1e9


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, capability=list(torch.cuda.get_device_capability()))
    return info


def table(results: dict[str, dict[str, Any]], batches: tuple[int, ...], floor: float) -> str:
    ours = results.get("ours/bfloat16", {})
    theirs = [(k.split("/")[0], r) for k, r in results.items() if not k.startswith("ours")]
    header = f"{'bfloat16':<28}{'ours':>10}" + "".join(
        f"{name:>12}{'ours/theirs':>13}" for name, _ in theirs)
    lines = [header, "-" * len(header)]
    for key, label in [(f"{m}_b{b}_ms", f"{m} batch {b}, ms" + ("/token" if m == "decode"
                                                                 else ""))
                       for m in ("prefill", "decode") for b in batches]:
        row = f"{label:<28}{_fmt(ours.get(key)):>10}"
        for _, r in theirs:
            ratio = ours.get(key) / r[key] if ours.get(key) and r.get(key) else None
            row += f"{_fmt(r.get(key)):>12}{_fmt(ratio, '.2f'):>13}"
        lines.append(row)
    lines.append(f"{'decode floor (bandwidth), ms':<28}{floor:>10.3g}")
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name} failed: {r['error']}")
    return "\n".join(lines)


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    p.add_argument("--tiny", action="store_true", help="a few-MB model (tests, dry runs)")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)),
                   help="comma-separated batch sizes (default: 1,8,32)")
    p.add_argument("--steps", type=int, default=32, help="decode steps per generation")
    p.add_argument("--repeats", type=int, default=2, help="timed generations per batch size")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--no-compile", action="store_true",
                   help="hf/bfloat16 without torch.compile (static cache still)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    add_json_arguments(p, default="bench_gpu.json")
    args = p.parse_args(argv)
    report = JsonReport(p, args)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible to torch (pass --device cpu for a dry run)",
              file=sys.stderr)
        return 2
    batches = tuple(int(b) for b in args.batches.split(","))
    configs = [c for c in CONFIGS if args.only is None or c in args.only.split(",")]
    config = tiny_config() if args.tiny else VARIANTS["pg1-3b-224"]
    torch.backends.cuda.matmul.allow_tf32 = False  # ours computes in float32: keep it float32
    info: dict[str, Any] = {
        "machine": {**machine(), **device_info(device)},
        "threads": torch.get_num_threads(),
        "model": config.name,
        "load_avg_before": os.getloadavg(),
        "bandwidth_gbs": [read_bandwidth(device)],
        "steps": args.steps,
        "batches": list(batches),
    }
    results: dict[str, dict[str, Any]] = {}

    def save() -> None:
        report.save({**info, "results": results})

    started = time.perf_counter()
    ours = random_model(config, device)
    info["weights_bytes"] = sum(t.nbytes for t in ours.state_dict().values())
    theirs = None
    for name in configs:
        print(f"running {name} ({time.perf_counter() - started:.0f} s so far) ...",
              file=sys.stderr, flush=True)
        try:
            if name.startswith("ours"):
                run = functools.partial(run_ours, ours)
            else:
                theirs = theirs or hf_model(ours)
                static = name == "hf/bfloat16"
                run = functools.partial(run_hf, theirs, config, static=static,
                                        compile_=static and not args.no_compile)
            results[name] = measure(run, device, batches, args.steps, args.repeats)
        except Exception as e:  # one configuration failing keeps the others' figures
            results[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
        save()
    info["bandwidth_gbs"].append(read_bandwidth(device))
    info["load_avg_after"] = os.getloadavg()
    bandwidth = max(info["bandwidth_gbs"])
    info["floors_ms"] = {"bfloat16": decode_bytes(config, "bfloat16") / bandwidth / 1e6}
    info["wall_s"] = time.perf_counter() - started
    save()
    print(f"{config.name}, random weights, {info['machine'].get('gpu', device)}, torch "
          f"{torch.__version__}, transformers {info['machine']['transformers']}, read bandwidth "
          f"{' / '.join(f'{b:.0f}' for b in info['bandwidth_gbs'])} GB/s, "
          f"{info['wall_s']:.0f} s\n")
    print(table(results, batches, info["floors_ms"]["bfloat16"]))
    print(f"\nwrote {args.json}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
