"""`paligemma eval TASK --model DIR --data FILE [-o results.json]`: task metrics as the official
evaluators define them."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from . import datasets
from .runner import FORMAT, TASKS, check_output, run, table

DESCRIPTION = """\
Generates an answer for every example of an evaluation set (greedy by default, batched) and
scores it as PaliGemma's official evaluators (big_vision) do:

  caption  CIDEr-D and BLEU-4 as the COCO caption toolkit (its PTB tokenization), + exact match
  vqav2    VQAv2 accuracy: answers normalized, min(#humans agreeing / 3, 1) over the 10
           leave-one-out subsets, per answer type
  vqa      simple VQA accuracy (exact match; several answers: min(#equal / 3, 1)) and ANLS
  docvqa   ANLS (and accuracy), prediction and answers lowercased (DocVQA, InfoVQA, ...)
  count    TallyQA accuracy: exact match after number words -> numerals
  detect   first box of the output against the true box: accuracy at IoU >= 0.5 / 0.75, mean IoU
  segment  big_vision's referring segmentation: mean IoU of the VAE masks in original-image
           pixels, box accuracy at IoU >= 0.5 / 0.75, invalid outputs (needs --vae)

Data: the project's JSONL ({"image", "prefix", "suffix" or "answers"}) or such records as a
JSON list / under "data" (DocVQA's val_v1.0.json, TallyQA's JSON), RefCOCO-style JSONL
({"image", "sentence", "bbox": [x, y, w, h] px, "segmentation" or "mask", "split"}), COCO
captions JSON (or Karpathy's dataset_coco.json with --split test), VQAv2 questions JSON with
--annotations. Writes every prediction with its scores and the aggregate to -o (JSON), prints
a table; an interrupted run resumes from -o (rows are kept in OUT.partial.jsonl until it ends).
See docs/eval.md."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers `paligemma eval`."""
    p = sub.add_parser(
        "eval", help="task metrics (CIDEr, VQA accuracy, ANLS, mIoU, ...) on an evaluation set",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  paligemma eval caption --model pg2-3b-224 --data captions_val2014.json "
        "--images val2014/ -o coco.json\n"
        "  paligemma eval vqav2 --model pg2-3b-224 --data "
        "v2_OpenEnded_mscoco_val2014_questions.json \\\n"
        "      --annotations v2_mscoco_val2014_annotations.json --images val2014/ -o vqav2.json\n"
        "  paligemma eval segment --model pg1-3b-448 --vae vae-oid --data refcoco.jsonl "
        "--split val -o refcoco_val.json",
    )
    p.add_argument("task", choices=TASKS, help="what to score (see above)")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="converted checkpoint directory (or a Hugging Face Hub repo id)")
    p.add_argument("--data", required=True, metavar="FILE", help="evaluation set (see above)")
    p.add_argument("--split", help="keep the records whose 'split' is this (Karpathy JSON, "
                   "RefCOCO-style and project JSONL)")
    p.add_argument("--annotations", metavar="FILE", help="VQAv2 annotations JSON (vqav2)")
    p.add_argument("--images", metavar="DIR",
                   help="folder image paths are relative to (default: the data file's folder)")
    p.add_argument("--prompt", help="prompt template over the record's fields, e.g. "
                   "'segment {sentence}' for mix checkpoints (default: the task's official "
                   "prompt; a JSONL record's own 'prefix' wins)")
    p.add_argument("-o", "--output", metavar="FILE", default="results.json",
                   help="result JSON, resumed if it holds this evaluation (default: "
                   "results.json)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N examples")
    p.add_argument("--vqa-style", choices=["big_vision", "vqa"], default="big_vision",
                   help="VQAv2 answer normalization: big_vision's evaluator (default) or the "
                   "VQA team's vqaEval.py (as the evaluation server)")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="SentencePiece model (default: tokenizer.model in --model)")
    p.add_argument("--vae", metavar="PATH", help="mask VAE: vae-oid.npz or its converted "
                   "directory (segment)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="cast the weights (default: as stored)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="prompts per forward pass (default: 8)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                   help="generation budget (default: 32, big_vision's max_decode_len of "
                   "most transfers; RefCOCO uses 48)")
    p.add_argument("--beams", type=int, default=1, metavar="N",
                   help="beam search width (default: 1, greedy; COCO captions used 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from ..api import PaliGemma

    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError("--batch-size and --max-new-tokens must be at least 1")
    if args.task == "segment" and not args.vae:
        raise ValueError("segment needs the mask VAE: --vae vae-oid.npz")
    examples = datasets.load(args.task, args.data, args.images, args.split, args.annotations,
                             args.prompt)
    if args.limit is not None:
        examples = examples[: args.limit]
    source = {"data": str(Path(args.data).resolve()), "split": args.split,
              "model": str(Path(args.model).resolve()) if Path(args.model).exists()
              else args.model, "prompt": args.prompt, "limit": args.limit,
              "max_new_tokens": args.max_new_tokens, "beams": args.beams,
              "vqa_style": args.vqa_style}
    check_output(args.output, {"format": FORMAT, "task": args.task, "source": source})
    pg = PaliGemma.from_pretrained(
        args.model, tokenizer=args.tokenizer, vae=args.vae,
        dtype=getattr(torch, args.dtype) if args.dtype else None, device=args.device)
    # A malformed detection is scored (IoU 0) and kept in its row: no warning per example.
    logger = logging.getLogger("paligemma")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        result = run(pg, args.task, examples, args.output, source, batch_size=args.batch_size,
                     progress=not args.quiet, max_new_tokens=args.max_new_tokens,
                     num_beams=args.beams, vqa_style=args.vqa_style)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished batches are kept in {args.output}.partial.jsonl; "
              "run the same command again to continue", file=sys.stderr)
        return 130
    finally:
        logger.setLevel(level)
    print(table(args.task, result["metrics"]))
    print(f"wrote {args.output} ({len(result['examples'])} examples)")
    if result["metrics"]["errors"]:
        errors = [r for r in result["examples"] if "error" in r]
        print(f"{len(errors)} example(s) could not be scored, e.g. {errors[0]['id']}: "
              f"{errors[0]['error']}")
    return 0
