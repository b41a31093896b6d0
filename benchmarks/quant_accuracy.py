"""Accuracy of int8 and int4 weights against bf16 weights (and f32): greedy agreement and logit
error.

Gold cases (parity_tests/data, the tiny models the official JAX code produced the references
for): each checkpoint loaded four ways, f32, bf16 storage, int8 (per-row scales) and int4
(groups of 32 columns, as these models are 32-1024 wide; matrices whose width is not a multiple
of 32 fall back to int8, and `int4_share` says which part of the quantized weights is int4),
all with float32 math and an f32 KV cache.
For each: greedy decode of the gold prompts (tokens equal to bf16's, position by position, and
whole sequences), and the logits of one teacher-forced pass
over the prompt + bf16's greedy tokens (max |difference| to f32, next to the logit range).

Demo model (the trained tiny PaliGemma 2 of `paligemma/demo/model/`: official-format npz,
config.json, tokenizer.model): greedy outputs of bf16, int8, int8-linear (tied embedding left
in bf16), int4 and int4-linear (group size 128, `--group-size`) on freshly drawn scenes (224 px,
as the demo draws them) for every task prompt (identical texts), and the task scores of each
(`paligemma.demo.scenes.score`).

On CPUs with native bf16 dot products (`dispatch.Cpu.native_bf16`) the bf16 model is also run at
`--matmul-precision medium` ("bf16-medium": prefill and vision GEMMs with bf16 inputs), the same
measurements against f32 and bf16.

    python benchmarks/quant_accuracy.py [--demo DIR] [--scenes N] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.record import JsonReport, add_json_arguments, machine  # noqa: E402
from paligemma import dispatch  # noqa: E402
from paligemma.config import PaliGemmaConfig  # noqa: E402
from paligemma.formats import load_official  # noqa: E402
from paligemma.generate import generate  # noqa: E402
from paligemma.int4 import DEFAULT_GROUP_SIZE, GROUP_SIZES  # noqa: E402
from paligemma.layers import Embedding, Linear  # noqa: E402
from paligemma.model import PaliGemmaModel  # noqa: E402
from paligemma.parity import case_config  # noqa: E402
from paligemma.quantize import quantize_  # noqa: E402

CASES = ROOT / "parity_tests" / "data"
DEMO_SCENE_SIZE = 224
GOLD_GROUP_SIZE = 32


# The bf16 model at medium precision, where "medium" changes anything (native bf16 dot products).
MEDIUM = ("bf16-medium",) if dispatch.Cpu.detect().native_bf16 else ()


@contextlib.contextmanager
def precision(name: str) -> Iterator[None]:
    """Runs the block at float32 matmul precision `name` ("bf16-medium": medium)."""
    before = torch.get_float32_matmul_precision()
    dispatch.set_matmul_precision("medium" if name.endswith("-medium") else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def runs(models: dict[str, PaliGemmaModel]) -> list[tuple[str, PaliGemmaModel]]:
    """(name, model) of every measured configuration: each model, and bf16 at medium."""
    return [*models.items(), *((name, models["bf16"]) for name in MEDIUM)]


def variants(npz: Path, config: PaliGemmaConfig, group_size: int) -> dict[str, PaliGemmaModel]:
    return {
        "f32": load_official(npz, config),
        "bf16": load_official(npz, config, dtype=torch.bfloat16),
        "int8": quantize_(load_official(npz, config)),
        "int4": quantize_(load_official(npz, config), "int4", group_size),
    }


def int4_share(model: PaliGemmaModel) -> float:
    """The part of a quantized model's quantized weights (counted in weights) stored as int4."""
    packed = [m.weight for m in model.modules() if isinstance(m, (Linear, Embedding))
              and m.scale is not None]
    return sum(2 * w.numel() for w in packed if w.dtype == torch.uint8) / sum(
        2 * w.numel() if w.dtype == torch.uint8 else w.numel() for w in packed)


def gold_case(case: Path) -> dict[str, Any]:
    with np.load(case / "vectors.npz") as f:
        vec = {k: torch.from_numpy(f[k]) for k in f.files}
    images = vec["image"].permute(0, 3, 1, 2)
    config = case_config(json.loads((case / "config.json").read_text()), images.shape[-1])
    prompt = (vec["prompt_text"].long(), vec["prompt_mask_ar"].long(),
              vec["prompt_input_mask"].bool())
    steps = vec["decode_tokens"].shape[1]
    models = variants(case / "params.npz", config, GOLD_GROUP_SIZE)
    tokens = {}
    for name, m in runs(models):
        with precision(name):
            tokens[name] = generate(m, images, *prompt, max_new_tokens=steps,
                                    cache_dtype=torch.float32)[0]
    # Teacher-forced logits on identical inputs: row 0's prompt + bf16's greedy continuation.
    n = int(prompt[2][0].sum())
    text = torch.cat([prompt[0][0, :n], tokens["bf16"][0]])[None]
    ar = torch.cat([prompt[1][0, :n], torch.ones(steps, dtype=torch.long)])[None]
    logits = {}
    for name, m in runs(models):
        with torch.no_grad(), precision(name):
            logits[name] = m(images[:1], text, ar)[0, n - 1 :]
    out: dict[str, Any] = {"case": case.name, "int4_group_size": GOLD_GROUP_SIZE,
                           "int4_share": int4_share(models["int4"]),
                           "logit_range": float(logits["f32"].abs().max()),
                           "official_tokens_equal_f32": bool(
                               torch.equal(tokens["f32"], vec["decode_tokens"].long()))}
    for name in ("bf16", "int8", "int4", *MEDIUM):
        out[f"{name}_max_logit_err"] = float((logits[name] - logits["f32"]).abs().max())
    for a, b in (("bf16", "f32"), ("int8", "bf16"), ("int8", "f32"), ("int4", "bf16"),
                 ("int4", "f32"), *((name, "bf16") for name in MEDIUM)):
        same = tokens[a] == tokens[b]
        out[f"{a}_vs_{b}_tokens"] = float(same.float().mean())
        out[f"{a}_vs_{b}_sequences"] = f"{int(same.all(1).sum())}/{len(same)}"
    return out


def demo_model(directory: Path, n_scenes: int, group_size: int, seed: int = 0) -> dict[str, Any]:
    from paligemma.api import PaliGemma
    from paligemma.demo import scenes
    from paligemma.tokenizer import Tokenizer

    config = PaliGemmaConfig.load(directory / "config.json")
    tokenizer = Tokenizer(directory / "tokenizer.model")
    npz = directory / "paligemma-demo.npz"
    models = variants(npz, config, group_size)
    models["int8-linear"] = quantize_(load_official(npz, config), "int8-linear")
    models["int4-linear"] = quantize_(load_official(npz, config), "int4-linear", group_size)
    rng = random.Random(seed)
    drawn = [scenes.draw_scene(rng, DEMO_SCENE_SIZE) for _ in range(n_scenes)]
    pairs = [(s.image, prefix) for s in drawn for prefix, _ in scenes.examples(s)]
    texts: dict[str, list[str]] = {}
    out: dict[str, Any] = {"model": str(directory), "scenes": n_scenes, "prompts": len(pairs),
                           "int4_group_size": group_size,
                           "int4_share": int4_share(models["int4"])}
    others = ("int8", "int8-linear", "int4", "int4-linear", *MEDIUM)
    for name in ("bf16", *others):
        pg = PaliGemma(models[name.removesuffix("-medium")], tokenizer)
        with precision(name):
            results = pg.generate([p[0] for p in pairs], [p[1] for p in pairs],
                                  max_new_tokens=24)
            out[f"{name}_scores"] = scenes.score(pg, drawn)
        texts[name] = [r.text for r in results]
    for name in others:
        same = sum(a == b for a, b in zip(texts["bf16"], texts[name], strict=True))
        out[f"{name}_vs_bf16_identical_outputs"] = f"{same}/{len(pairs)}"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, default=ROOT / "paligemma" / "demo" / "model")
    p.add_argument("--scenes", type=int, default=40)
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=DEFAULT_GROUP_SIZE,
                   help="int4 group size for the demo model")
    add_json_arguments(p)
    args = p.parse_args(argv)
    json_report = JsonReport(p, args)
    torch.manual_seed(0)
    # The paths decide part of the numerics (int8-gemm rounds x; amx-gemm sums in another order)
    paths = dispatch.plan().describe()["paths"]
    report: dict[str, Any] = {"machine": {**machine(), "paths": paths}, "gold": []}
    print(f"{report['machine']['cpu']} ({report['machine']['isa']}; "
          f"{' '.join(report['machine']['flags'])}), paths {report['machine']['paths']}")
    print(f"{'case':<26}{'logit range':>12}{'bf16 err':>10}{'int8 err':>10}{'int4 err':>10}"
          f"{'bf16=f32':>10}{'int8=bf16':>11}{'int8=f32':>10}{'int4=bf16':>11}{'int4=f32':>10}"
          "  (tokens; sequences)")
    for case in sorted(CASES.iterdir()):
        if not (case / "params.npz").is_file() or case.name == "seg_vae":
            continue
        r = gold_case(case)
        report["gold"].append(r)
        print(f"{r['case']:<26}{r['logit_range']:>12.3g}{r['bf16_max_logit_err']:>10.3g}"
              f"{r['int8_max_logit_err']:>10.3g}{r['int4_max_logit_err']:>10.3g}"
              f"{r['bf16_vs_f32_tokens']:>10.0%}{r['int8_vs_bf16_tokens']:>11.0%}"
              f"{r['int8_vs_f32_tokens']:>10.0%}{r['int4_vs_bf16_tokens']:>11.0%}"
              f"{r['int4_vs_f32_tokens']:>10.0%}  ({r['bf16_vs_f32_sequences']}; "
              f"{r['int8_vs_bf16_sequences']}; {r['int8_vs_f32_sequences']}; "
              f"{r['int4_vs_bf16_sequences']}; {r['int4_vs_f32_sequences']}; int4 share "
              f"{r['int4_share']:.0%})")
        if MEDIUM:
            print(f"{'  bf16 at medium precision':<38}{r['bf16-medium_max_logit_err']:>10.3g}"
                  f"  tokens = bf16 {r['bf16-medium_vs_bf16_tokens']:.0%} "
                  f"({r['bf16-medium_vs_bf16_sequences']})")
    if (args.demo / "paligemma-demo.npz").is_file():
        report["demo"] = demo_model(args.demo, args.scenes, args.group_size)
        print(json.dumps(report["demo"], indent=2))
    else:
        print(f"no demo model at {args.demo}")
    json_report.save(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
