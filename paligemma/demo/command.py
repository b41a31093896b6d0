"""`paligemma demo`: the whole path on the shipped demo model, in well under two minutes on a CPU.

official `.npz` -> converter -> PaliGemma -> caption, questions, detection on a freshly drawn
scene -> annotated PNG + JSON report; then the gold parity check against the official JAX
outputs. The demo model (`paligemma/demo/model/`, installed with the package) is a tiny
PaliGemma 2 trained from scratch on synthetic shape scenes by `examples/train_demo_model.py`;
see its README. The gold cases ship with the source repository, not the package: the parity
check runs when `parity_tests/data/pg2_tiny` is under the current folder (or --parity-case).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from .. import outputs
from ..annotate import draw_objects, wrap_text
from ..api import PaliGemma
from ..eval.metrics import box_iou
from ..formats import open_checkpoint, write_ours
from ..parity import run_case
from ..tasks import Detection, parse_detections
from . import scenes

DEMO_MODEL = Path(__file__).resolve().parent / "model"
NPZ, TOKENIZER, CONFIG = "paligemma-demo.npz", "tokenizer.model", "config.json"
PARITY_CASE = Path("parity_tests") / "data" / "pg2_tiny"  # relative to the current folder
DISPLAY_SIZE = 448  # the scene is drawn at this size; the model sees it resized to 112 px
STEPS = 5


def run_demo(out: Path, seed: int | None = None, parity: bool = True,
             model_dir: Path = DEMO_MODEL, parity_case: Path = PARITY_CASE,
             force: bool = False) -> dict[str, Any]:
    """Runs the demo, writing the folder `out` (atomically; `force` replaces a previous demo
    output, nothing else); returns the report it also writes to `out/report.json`."""
    for name in (NPZ, TOKENIZER, CONFIG):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir / name}: the demo model file is missing")
    with outputs.atomic(out, "demo", force) as work:
        return _run(work, out, seed, parity, model_dir, parity_case)


def _run(work: Path, out: Path, seed: int | None, parity: bool, model_dir: Path,
         parity_case: Path) -> dict[str, Any]:
    """The demo, written into `work`, which becomes `out` when it is done."""
    start = time.time()
    seed = random.randrange(10**6) if seed is None else seed

    _step(1, f"converting the official-format checkpoint {_shown(model_dir / NPZ)}")
    converted = out / "model"
    write_ours(open_checkpoint(model_dir / NPZ, config_file=model_dir / CONFIG), work / "model",
               quiet=True)
    shutil.copyfile(model_dir / TOKENIZER, work / "model" / TOKENIZER)
    print(f"      -> {converted}/ (config.json, model.safetensors, {TOKENIZER})")

    _step(2, "loading it with PaliGemma.from_pretrained")
    pg = PaliGemma.from_pretrained(work / "model")
    config = pg.model.config
    print(f"      {config.name}: {sum(p.numel() for p in pg.model.parameters()) / 1e6:.1f}M "
          f"parameters, {config.vision.image_size} px images, vocabulary "
          f"{config.text.vocab_size}")

    _step(3, f"drawing a fresh scene (seed {seed}; rerun with --seed {seed})")
    scene = scenes.draw_scene(random.Random(seed), DISPLAY_SIZE)
    scene.image.save(work / "scene.png")
    print(f"      truth: {scene.caption()}")

    _step(4, "asking the model")
    kind = random.Random(seed).choice(scene.shapes).kind
    questions = [f"what color is the {kind}", "how many shapes are there"]
    caption = pg.caption(scene.image).text
    answers = [r.text for r in pg.ask([scene.image] * len(questions), questions)]
    truth = dict(scenes.examples(scene))
    results: dict[str, Any] = {
        "caption": {"prompt": "caption en", "answer": caption, "truth": scene.caption()},
        "questions": [
            {"prompt": f"answer en {q}", "answer": a, "truth": truth[f"answer en {q}"]}
            for q, a in zip(questions, answers, strict=True)
        ],
    }
    for item in [results["caption"], *results["questions"]]:
        mark = "ok" if item["answer"] == item["truth"] else f"expected {item['truth']!r}"
        print(f"      {item['prompt']!r:<40} -> {item['answer']!r}  ({mark})")
    # Detect what the model's own caption mentions, one prompt per kind, as one batch.
    kinds = [k for k in scenes.SHAPES if k in re.findall(r"[a-z]+", caption)]
    detections: list[Detection] = []
    results["detections"] = []
    found = pg.generate([scene.image] * len(kinds), [f"detect {k}" for k in kinds]) if kinds else []
    for k, result in zip(kinds, found, strict=True):
        objects = parse_detections(result.text, *scene.image.size)[:1]
        detections += objects
        box, truth_box = (objects[0].box if objects else None), _truth_box(scene, k)
        overlap = box_iou(box, truth_box) if box and truth_box else 0.0
        results["detections"].append({
            "prompt": f"detect {k}", "answer": result.text, "box": _rounded(box),
            "truth": _rounded(truth_box), "iou": round(overlap, 3),
        })
        print(f"      {'detect ' + k!r:<40} -> {result.text!r}  (IoU with truth {overlap:.2f})")
    annotated = out / "annotated.png"
    _annotate(scene.image, detections, results).save(work / "annotated.png")
    print(f"      -> {annotated}")

    report: dict[str, Any] = {"seed": seed, "model": str(model_dir / NPZ), "results": results}
    if parity and parity_case.is_dir():
        _step(5, f"gold parity check against the official JAX outputs ({parity_case.name})")
        parity_report = run_case(parity_case)
        worst = max(parity_report.stages, key=lambda s: s.max_abs_err / max(s.tol, 1e-30))
        print(f"      {'PASS' if parity_report.ok else 'FAIL'}: "
              f"{sum(s.ok for s in parity_report.stages)}/{len(parity_report.stages)} stages "
              f"within tolerance (closest to its limit: {worst.name} {worst.max_abs_err:.2g} "
              f"<= {worst.tol:g})")
        report["parity"] = {"case": str(parity_case), "ok": parity_report.ok,
                            "stages": len(parity_report.stages)}
    else:
        reason = "--no-parity" if not parity else (
            f"{parity_case} not found (run from a source checkout, or pass --parity-case)")
        _step(5, f"parity check skipped: {reason}")
        report["parity"] = None
    report["seconds"] = round(time.time() - start, 1)
    report["files"] = {"scene": str(out / "scene.png"), "annotated": str(annotated),
                       "model": str(converted)}
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"done in {report['seconds']} s; wrote {out}/ (scene.png, annotated.png, report.json, "
          "model/)")
    return report


def _shown(path: Path) -> Path:
    """`path` relative to the current folder when it is under it (the README's output)."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def _rounded(box: tuple[float, ...] | None) -> list[float] | None:
    return None if box is None else [round(v, 1) for v in box]


def _step(i: int, text: str) -> None:
    print(f"[{i}/{STEPS}] {text}", flush=True)


def _truth_box(scene: scenes.Scene, kind: str) -> tuple[float, ...] | None:
    """Ground-truth box of `kind` in pixels (x0, y0, x1, y1), or None if not in the scene."""
    if kind not in [s.kind for s in scene.shapes]:
        return None
    y0, x0, y1, x1 = scene.shape(kind).box
    w, h = scene.image.size
    return (x0 * w, y0 * h, x1 * w, y1 * h)


def _annotate(image: PIL.Image.Image, detections: list[Detection], results: dict[str, Any]
              ) -> PIL.Image.Image:
    """The detections drawn on the scene, with the caption and answers in a panel below."""
    boxed = draw_objects(image, detections)
    lines = [f"caption: {results['caption']['answer']}",
             f"(truth: {results['caption']['truth']})"]
    lines += [f"{q['prompt'].removeprefix('answer en ')}? {q['answer']}"
              for q in results["questions"]]
    font = PIL.ImageFont.load_default(size=18)
    lines = [part for line in lines for part in wrap_text(line, font, boxed.width - 20)]
    panel = PIL.Image.new("RGB", (boxed.width, 12 + 26 * len(lines)), "white")
    draw = PIL.ImageDraw.Draw(panel)
    for i, line in enumerate(lines):
        draw.text((10, 8 + 26 * i), line, fill=(0, 0, 0), font=font)
    sheet = PIL.Image.new("RGB", (boxed.width, boxed.height + panel.height), "white")
    sheet.paste(boxed, (0, 0))
    sheet.paste(panel, (0, boxed.height))
    return sheet


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers `paligemma demo`."""
    p = sub.add_parser(
        "demo",
        help="run the shipped demo model end to end, then the gold parity check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: paligemma demo --out out/demo --seed 7",
    )
    p.add_argument("--out", type=Path, default=Path("out/demo"),
                   help="output folder (default: out/demo); must not exist unless --force")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it is a previous demo output (nothing else)")
    p.add_argument("--seed", type=int, help="scene seed (default: a fresh random scene)")
    p.add_argument("--no-parity", dest="parity", action="store_false",
                   help="skip the gold parity check")
    p.add_argument("--parity-case", type=Path, default=PARITY_CASE, metavar="DIR",
                   help=f"gold case of the parity check (default: {PARITY_CASE}, found from a "
                   "source checkout's root)")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    run_demo(args.out, args.seed, args.parity, parity_case=args.parity_case, force=args.force)
    return 0
