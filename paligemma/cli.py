"""Command line: `python -m paligemma <command>` (also installed as `paligemma`).

examples:
  paligemma caption cat.jpg dog.png --model ckpt/pg2-3b-224 --tokenizer paligemma_tokenizer.model
  paligemma ask cat.jpg -q "what color is the cat?" --model ckpt/pg2-3b-224
  paligemma ocr receipt.png --model ckpt/pg2-3b-448 --json
  paligemma detect street.jpg --objects "car ; person" --model ckpt/pg2-3b-448 --annotate out.png
  paligemma segment cat.jpg --object cat --model ckpt/pg2-3b-448 --vae vae-oid.npz --annotate m.png
  paligemma generate cat.jpg --prompt "caption es" --model ckpt/pg2-3b-224 --temperature 0.7
  paligemma explain cat.jpg --prompt "caption en" --model ckpt/pg2-3b-224 -o heat.png
  paligemma parity parity_tests/data/pg2_tiny
  paligemma eval vqav2 --model ckpt/pg2-3b-224 --data questions.json --annotations answers.json
  paligemma serve --model ckpt/pg2-3b-448 --vae vae-oid.npz   (HTTP API + web page)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import dispatch, guard, image, outputs
from .formats.dtypes import DTYPES
from .guard import positive_int
from .parity import run_case
from .quantize import MODES as QUANTIZE_MODES

if TYPE_CHECKING:
    import PIL.Image


def _parity(args: argparse.Namespace) -> int:
    if args.json:
        outputs.check(args.json, "parity-report", args.force)
    ok = True
    reports = []
    for case_dir in args.case_dirs:
        report = run_case(case_dir)
        print(report.table(), end="\n\n")
        reports.append(report.to_json())
        ok &= report.ok
    if args.json:
        with outputs.atomic(args.json, "parity-report", args.force) as tmp:
            tmp.write_text(
                json.dumps(reports[0] if len(reports) == 1 else reports, indent=2) + "\n"
            )
    return 0 if ok else 1


def _load(args: argparse.Namespace) -> Any:
    from . import tensor_parallel
    from .api import PaliGemma

    return PaliGemma.from_pretrained(
        args.model,
        tokenizer=args.tokenizer,
        vae=getattr(args, "vae", None),
        dtype=DTYPES[args.dtype] if args.dtype else None,
        device=args.device,
        quantize=args.quantize,
        tensor_parallel=tensor_parallel.active(),
    )


def _generation_options(args: argparse.Namespace) -> dict[str, Any]:
    from . import tensor_parallel

    seed = args.seed
    if seed is None and args.temperature > 0 and tensor_parallel.active():
        seed = tensor_parallel.shared_seed()  # every rank must draw the same tokens
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        num_beams=args.beams,
        seed=seed,
    )


def _annotate_path(out: str, index: int, count: int) -> Path:
    """OUT.png for one image; OUT-0.png, OUT-1.png, ... for several."""
    path = Path(out)
    return path if count == 1 else path.with_name(f"{path.stem}-{index}{path.suffix}")


def _save_png(picture: PIL.Image.Image, path: str | Path, force: bool) -> None:
    with outputs.atomic(path, "png", force) as tmp:
        picture.save(tmp, format="PNG", pnginfo=outputs.png_info())


def _check_images(paths: list[str]) -> None:
    """Every input opens (header only) before the model loads: memory stays one batch."""
    for path in paths:
        image.open_image(path, decode=False).close()


def _run_task(args: argparse.Namespace) -> int:
    from .annotate import draw_objects, to_pil

    _check_images(args.images)
    annotated = []
    if getattr(args, "annotate", None):
        annotated = [_annotate_path(args.annotate, i, len(args.images))
                     for i in range(len(args.images))]
        for out in annotated:
            outputs.check(out, "png", args.force)
    pg = _load(args)
    options = _generation_options(args)
    run: Callable[[list[Any]], list[Any]] = {
        "caption": lambda ims: pg.caption(ims, lang=args.lang, **options),
        "describe": lambda ims: pg.describe(ims, lang=args.lang, **options),
        "ask": lambda ims: pg.ask(ims, args.question, lang=args.lang, **options),
        "ocr": lambda ims: pg.ocr(ims, **options),
        "detect": lambda ims: pg.detect(ims, args.objects, **options),
        "segment": lambda ims: pg.segment(ims, args.object, **options),
        "generate": lambda ims: pg.generate(ims, args.prompt, **options),
    }[args.command]
    records = []
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start : start + args.batch_size]  # decoded batch by batch
        for i, (path, result) in enumerate(zip(paths, run(paths), strict=True), start):
            record = {"image": str(path), "prompt": result.prompt, "text": result.text}
            objects = getattr(result, "objects", None)
            if objects is not None:
                record["objects"] = [o.to_json() for o in objects]
            if annotated:
                picture = to_pil(image.to_rgb_array(path))
                _save_png(draw_objects(picture, objects), annotated[i], args.force)
                record["annotated"] = str(annotated[i])
            records.append(record)
            if not args.json:
                _print_record(record)
    if args.json:
        print(json.dumps(records, indent=2))
    return 0


def _one_line(text: str) -> str:
    return text.replace("\n", "\\n")


def _print_record(record: dict[str, Any]) -> None:
    text = _one_line(record["text"])
    if "objects" not in record:
        print(f"{record['image']}: {text}")
        return
    print(f"{record['image']}: {len(record['objects'])} object(s)  [raw output: {text}]")
    for obj in record["objects"]:
        box = ", ".join(f"{v:.1f}" for v in obj["box"])
        area = f"  mask: {obj['mask_area']} px" if "mask_area" in obj else ""
        print(f"  {obj['label'] or '?'}: box (x0, y0, x1, y1) = ({box}){area}")
    if "annotated" in record:
        print(f"  wrote {record['annotated']}")


def _indices(text: str | None) -> list[int] | None:
    """'all' / None -> None; '0,2,-1' -> [0, 2, -1]; '4:8' -> [4, 5, 6, 7]."""
    if text is None or text == "all":
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            if ":" in part:
                lo, hi = part.split(":")
                out += range(int(lo), int(hi))
            else:
                out.append(int(part))
    except ValueError:
        raise ValueError(f"bad index list {text!r}: use e.g. 'all', '0,2,-1' or '4:8'") from None
    return out


def _explain(args: argparse.Namespace) -> int:
    from .annotate import draw_attention, to_pil

    array = image.to_rgb_array(args.image)
    outputs.check(args.output, "png", args.force)
    pg = _load(args)
    result = pg.explain(array, args.prompt, layers=_indices(args.layers),
                        heads=_indices(args.heads), max_new_tokens=args.max_new_tokens)
    if not result.tokens:
        raise ValueError("the model generated no tokens (eos right away): nothing to explain")
    maps = [result.maps.mean(0), *result.maps]
    titles = [f"all: {result.text}"[:40], *(repr(p) for p in result.pieces)]
    _save_png(draw_attention(to_pil(array), maps, titles), args.output, args.force)
    print(f"{args.image}: {_one_line(result.text)}")
    print(f"wrote {args.output} ({len(result.tokens)} tokens)")
    return 0


def _add_model_args(p: argparse.ArgumentParser, generation: bool = True) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="checkpoint: our directory, a Hugging Face transformers directory, an "
                   "official .npz, or a Hugging Face Hub repo id")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="SentencePiece model (default: tokenizer.model in --model)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", choices=list(DTYPES),
                   help="cast the weights (default: as stored)")
    p.add_argument("--quantize", choices=QUANTIZE_MODES,
                   help="int8 weights with per-row scales (half of bf16's memory) or int4 with "
                   "per-group scales (a quarter): faster decoding on CPU, math stays float32; "
                   "-linear modes keep the tied embedding as stored. A checkpoint written by "
                   "paligemma-convert --quantize is already quantized and needs no flag")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                   help="generation budget per image (default: 64)")
    p.add_argument("--max-image-pixels", type=positive_int, metavar="N",
                   help="decompression-bomb limit: refuse larger images (default: "
                   f"{image.MAX_IMAGE_PIXELS})")
    if not generation:
        return
    g = p.add_argument_group("generation (default: greedy)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sample with this temperature (0 = greedy)")
    g.add_argument("--top-k", type=positive_int, metavar="K",
                   help="sample among the K most likely ids")
    g.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass")
    g.add_argument("--beams", type=positive_int, default=1, metavar="N",
                   help="beam search width")
    g.add_argument("--seed", type=int, help="seed for reproducible sampling")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="images per forward pass (default: 8)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of {image, prompt, text[, objects]} instead")


TASKS = {
    "caption": ("short caption ('caption <lang>')", "paligemma caption cat.jpg --model DIR"),
    "describe": ("longer description ('describe <lang>')",
                 "paligemma describe cat.jpg --model DIR --lang de"),
    "ask": ("answer a question ('answer <lang> <question>')",
            "paligemma ask cat.jpg -q 'how many cats are there?' --model DIR"),
    "ocr": ("read the text in the image ('ocr')", "paligemma ocr sign.png --model DIR --json"),
    "detect": ("boxes of the named objects ('detect a ; b')",
               "paligemma detect street.jpg --objects 'car ; person' --model DIR "
               "--annotate boxes.png"),
    "segment": ("box and mask of an object ('segment x'); needs --vae",
                "paligemma segment cat.jpg --object cat --model DIR --vae vae-oid.npz "
                "--annotate mask.png"),
    "generate": ("any prompt, e.g. 'caption es' or 'question en'",
                 "paligemma generate cat.jpg --prompt 'caption fr' --model DIR --top-p 0.9 "
                 "--temperature 0.8 --seed 0"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = guard.ArgumentParser(prog="paligemma", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import parity

    p = sub.add_parser(
        "parity",
        help="compare our model with official JAX outputs, stage by stage",
        description="Runs our model on one or more case directories and compares every recorded "
        "stage with the official big_vision outputs. Exits 1 if any stage fails.\n\n"
        + parity.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m paligemma parity parity_tests/data/pg2_tiny --json report.json",
    )
    p.add_argument("case_dirs", nargs="+", metavar="CASE_DIR", help="case directory")
    p.add_argument(
        "--json",
        metavar="FILE",
        help='also write {"case", "ok", "stages": [{"name", "max_abs_err", "tol", '
        '"ok", ...}]} (a list of those for several cases)',
    )
    p.add_argument("--force", action="store_true",
                   help="replace FILE if it is a previous parity report")
    p.set_defaults(func=_parity)

    for name, (summary, example) in TASKS.items():
        p = sub.add_parser(name, help=summary, description=summary.capitalize() + ".",
                           epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("images", nargs="+", metavar="IMAGE", help="image file(s)")
        if name == "ask":
            p.add_argument("-q", "--question", required=True, help="the question")
        if name in ("caption", "describe", "ask"):
            p.add_argument("--lang", default="en", help="language code (default: en)")
        if name == "detect":
            p.add_argument("--objects", required=True, help="object names, e.g. 'cat ; dog'")
        if name == "segment":
            p.add_argument("--object", required=True, help="what to segment, e.g. 'cat'")
            p.add_argument("--vae", metavar="PATH", required=True,
                           help="the mask VAE: vae-oid.npz or its converted directory")
        if name == "generate":
            p.add_argument("--prompt", required=True, help="the prefix, e.g. 'caption es'")
        if name in ("detect", "segment"):
            p.add_argument("--annotate", metavar="OUT.png",
                           help="draw the results on the image (OUT-<i>.png for several)")
            p.add_argument("--force", action="store_true",
                           help="replace --annotate PNGs that paligemma wrote before")
        _add_model_args(p)
        p.set_defaults(func=_run_task)

    p = sub.add_parser(
        "explain",
        help="heatmap of the attention from each generated token to the image patches",
        description="Generates greedily and draws, for each generated token, the attention of "
        "the query that chose it on the image patches (averaged over the chosen layers and "
        "heads), over the image; the first panel averages all tokens.",
        epilog="example:\n  paligemma explain cat.jpg --prompt 'caption en' --model DIR "
        "-o heat.png --layers=-4:0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", metavar="IMAGE", help="image file")
    p.add_argument("--prompt", required=True, help="the prefix, e.g. 'caption en'")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png", help="PNG to write")
    p.add_argument("--force", action="store_true",
                   help="replace OUT.png if paligemma wrote it before")
    p.add_argument("--layers", default="all",
                   help="decoder layers to average: 'all', '0,3,-1' or 'lo:hi' (default: all)")
    p.add_argument("--heads", default="all", help="query heads to average (same syntax)")
    _add_model_args(p, generation=False)
    p.set_defaults(func=_explain)

    from . import batch, finetune, serve
    from .demo import command as demo
    from .eval import command as evaluation

    batch.add_parser(sub)
    finetune.add_parser(sub)
    demo.add_parser(sub)
    evaluation.add_parser(sub)
    serve.add_parser(sub)
    for command in sub.choices.values():
        guard.add_debug_flag(command)
        command.add_argument(
            "--matmul-precision", choices=dispatch.PRECISIONS, default="highest",
            help="highest (default): float32 matmuls, big_vision's numerics; high: with the "
            "AMX build, prefill and vision GEMMs on x as two bf16 parts (about 16 significant "
            "bits; float32 activations), two thirds of the tile work; medium: prefill and "
            "vision matmuls as bf16 GEMMs (bf16 inputs and outputs, float32 sums) with bf16 "
            "activations inside each block, as transformers' bf16 model, on CPUs with native "
            "bf16 (AMX, AVX512-BF16): 3-5x faster prefill there (int8 and int4 weights keep "
            "their AMX int8 tiles, and int8 weights oneDNN's int8 GEMM on CPUs with VNNI but no "
            "AMX; ignored, with a warning, on other CPUs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_image_pixels", None):
        image.MAX_IMAGE_PIXELS = args.max_image_pixels
    return guard.run(_with_precision, args)


def _with_precision(args: argparse.Namespace) -> int:
    if args.matmul_precision != "highest":  # inside guard.run: its warning handler is on
        dispatch.set_matmul_precision(args.matmul_precision)
    return args.func(args)
