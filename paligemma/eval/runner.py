"""Runs a model over EvalExamples and scores them: one row per example, then the task's
aggregate metrics, as big_vision's evaluators compute them.

    metrics, rows = evaluate(pg, "vqav2", examples, batch_size=16)   # in memory
    run(pg, "vqav2", examples, "results.json", source)        # + progress, resume, JSON file

`predict` yields each batch's rows (generation and per-example scores), `aggregate` turns rows
into the task's metrics.

Output file (`run`): {"format": "paligemma-eval", "task", "source": {...}, "metrics", "examples":
[row, ...]}, written atomically at the end. While it runs, rows are appended to
`<output>.partial.jsonl` after each batch, so an interrupted run continues where it stopped
(examples are matched by id: none repeated, none lost).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

from ..image import to_rgb_array
from ..tasks import LOC_GRID, parse_detections
from . import metrics as M
from .datasets import EvalExample

TASKS = ("caption", "vqav2", "vqa", "docvqa", "count", "detect", "segment")
TEXT_TASKS = ("caption", "vqav2", "vqa", "docvqa", "count")  # scored against answers
# The metric a task is known by (first in its table).
HEADLINE = {"caption": "cider", "vqav2": "accuracy", "vqa": "accuracy", "docvqa": "anls",
            "count": "accuracy", "detect": "accuracy@0.5", "segment": "miou"}
FORMAT = "paligemma-eval"
SEG_TOKENS = 4 + 16  # a referring segmentation: 4 <loc>, then 16 <seg>
DET_IOUS = (0.5, 0.75)  # big_vision's segmentation evaluator reports box accuracy at both


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


# ---------------------------------------------------------------------------------------------
# Per-example scores


def score(task: str, example: EvalExample, text: str, tokens: Sequence[int], pg: Any,
          vqa_style: str = "big_vision") -> dict[str, Any]:
    """One generated answer -> the row's task fields (prediction and per-example scores). A
    text task's example without answers (a test split scored by a server: VQAv2 test-dev,
    DocVQA test) gets its prediction only."""
    row: dict[str, Any] = {"prediction": text}
    if task in TEXT_TASKS and not example.answers:
        return row
    if task == "caption":
        row["exact"] = M.exact_match(text, example.answers)
    elif task == "vqav2":
        row["accuracy"] = M.vqav2_accuracy(text, example.answers, vqa_style)
        row["answer_type"] = example.info.get("answer_type", "other")
    elif task in ("vqa", "docvqa"):
        # DocVQA's config lowercases prediction and answers (to_lower=True); the others not.
        pred, answers = text, example.answers
        if task == "docvqa":
            pred, answers = text.lower(), [a.lower() for a in answers]
        row["accuracy"] = M.vqa_accuracy(pred, answers)
        row["anls"] = M.anls(pred, answers)
    elif task == "count":
        row["accuracy"] = M.count_accuracy(text, example.answers[0])
    elif task == "detect":
        found = parse_detections(text, 1, 1)  # first well-formed object, [0, 1] coordinates
        box = None
        if found:
            x0, y0, x1, y1 = found[0].box
            box = (y0, x0, y1, x1)
        row["box"] = [round(v, 6) for v in box] if box else None
        row["iou"] = M.box_iou(box, example.box) if box else 0.0
    elif task == "segment":
        row.update(_segment_scores(example, tokens, pg))
    return row


def _segment_scores(example: EvalExample, tokens: Sequence[int], pg: Any) -> dict[str, Any]:
    """big_vision's segmentation evaluator on one output: the first 20 tokens must be 4 <loc>
    (y_min < y_max, x_min < x_max) then 16 <seg>, else the example is invalid and scores 0.
    Box: token / 1023 against the true box in [0, 1]. Mask: the VAE's 64x64 logits resized
    (Pillow bilinear) into the box truncated to whole pixels of the original image, > 0, IoU
    with the true full-size mask."""
    loc = {t: i for i, t in enumerate(pg.tokenizer.loc_ids)}
    seg = {t: i for i, t in enumerate(pg.tokenizer.seg_ids)}
    head = list(tokens[:SEG_TOKENS])
    valid = (len(head) == SEG_TOKENS and all(t in loc for t in head[:4])
             and all(t in seg for t in head[4:]))
    box = (0.0, 0.0, 0.0, 0.0)
    if valid:
        box = tuple(loc[t] / LOC_GRID for t in head[:4])
        valid = box[2] > box[0] and box[3] > box[1]
    truth = example.mask()
    h, w = truth.shape
    y0, x0, y1, x1 = int(box[0] * h), int(box[1] * w), int(box[2] * h), int(box[3] * w)
    out = {"box": [round(v, 6) for v in box], "box_iou": M.box_iou(box, example.box)}
    if not valid or x1 <= x0 or y1 <= y0:  # can still happen after int()
        return out | {"iou": 0.0, "valid": False}
    decoder = pg.vae
    codes = torch.tensor([[seg[t] for t in head[4:]]], device=decoder._vq_vae._embedding.device)
    with torch.no_grad():
        logits = decoder(codes)[0].float().cpu().numpy()
    inside = np.asarray(PIL.Image.fromarray(logits).resize((x1 - x0, y1 - y0),
                                                           PIL.Image.BILINEAR)) > 0
    mask = np.zeros_like(truth)
    mask[y0:y1, x0:x1] = inside
    return out | {"iou": M.mask_iou(mask, truth), "valid": True}


# ---------------------------------------------------------------------------------------------
# Aggregates


def aggregate(task: str, rows: Sequence[dict], examples: Sequence[EvalExample]
              ) -> dict[str, float]:
    """Rows (with "id") -> the task's metrics over the rows without an error. "num": examples
    scored; "errors": rows that could not be (bad image, ...), left out of every mean;
    "unscored" (text tasks): rows of examples without answers, predictions only."""
    _check_task(task)
    ok = [r for r in rows if "error" not in r]
    out: dict[str, float] = {"num": len(ok), "errors": len(rows) - len(ok)}
    if not ok:
        return out

    if task in TEXT_TASKS:  # rows without answers (test splits) have predictions only
        scored = [r for r in ok if set(r) - {"id", "prefix", "prediction"}]
        if len(scored) < len(ok):
            out["unscored"] = len(ok) - len(scored)
        ok = scored
        out["num"] = len(ok)
        if not ok:
            return out

    def mean(key: str, subset: Sequence[dict] = ok) -> float:
        return float(np.mean([float(r[key]) for r in subset]))

    if task == "caption":
        by_id = {e.id: e for e in examples}
        out.update(M.caption_scores([by_id[r["id"]].answers for r in ok],
                                    [r["prediction"] for r in ok]))
        out["exact_match"] = mean("exact")
    elif task == "vqav2":
        out["accuracy"] = mean("accuracy")
        for kind in sorted({r["answer_type"] for r in ok}):
            out[f"accuracy/{kind}"] = mean("accuracy", [r for r in ok if r["answer_type"] == kind])
    elif task in ("vqa", "docvqa"):
        first, second = ("anls", "accuracy") if task == "docvqa" else ("accuracy", "anls")
        out[first], out[second] = mean(first), mean(second)
    elif task == "count":
        out["accuracy"] = mean("accuracy")
    elif task == "detect":
        for t in DET_IOUS:
            out[f"accuracy@{t}"] = float(np.mean([r["iou"] >= t for r in ok]))
        out["miou"] = mean("iou")
    elif task == "segment":
        out["miou"] = mean("iou")
        for t in DET_IOUS:
            out[f"boxacc@{t}"] = float(np.mean([r["box_iou"] >= t for r in ok]))
        out["invalid"] = sum(not r["valid"] for r in ok)
    # The headline first, the counts last.
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != HEADLINE[task],
                                                    kv[0] in ("num", "errors", "unscored"))))


# ---------------------------------------------------------------------------------------------
# Generation


def predict(pg: Any, task: str, examples: Sequence[EvalExample], batch_size: int = 8,
            progress: tqdm | None = None, vqa_style: str = "big_vision", **options: Any
            ) -> Iterator[list[dict]]:
    """Yields, per batch, the rows of `examples` in order: {"id", "prefix", prediction and
    scores} or {"id", "prefix", "error"} for an example that failed (unreadable image, prompt
    too long, ...: the others of its batch are retried one by one). options: `generate`'s."""
    _check_task(task)
    if task == "segment" and getattr(pg, "vae", None) is None:
        raise ValueError("task 'segment' needs the mask VAE (--vae vae-oid.npz)")
    options.setdefault("max_new_tokens", 32)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rows: dict[str, dict] = {}
        ready = []
        for ex in chunk:
            try:
                ready.append((ex, to_rgb_array(ex.image)))
            except (OSError, ValueError) as e:
                rows[ex.id] = _error_row(ex, e)
        groups = [ready] if ready else []
        while groups:
            group = groups.pop()
            try:
                results = pg.generate([a for _, a in group], [ex.prefix for ex, _ in group],
                                      **options)
            except (ValueError, RuntimeError) as e:
                if len(group) == 1:
                    rows[group[0][0].id] = _error_row(group[0][0], e)
                else:  # find the example at fault: the others of the batch still count
                    groups += [[item] for item in group]
                continue
            for (ex, _), res in zip(group, results, strict=True):
                try:
                    rows[ex.id] = {"id": ex.id, "prefix": ex.prefix} | score(
                        task, ex, res.text, res.tokens, pg, vqa_style)
                except (OSError, ValueError, KeyError, IndexError) as e:  # e.g. a bad mask file
                    rows[ex.id] = _error_row(ex, e)
        if progress is not None:
            progress.update(len(chunk))
        yield [rows[ex.id] for ex in chunk]


def _error_row(example: EvalExample, error: Exception) -> dict:
    return {"id": example.id, "prefix": example.prefix,
            "error": f"{type(error).__name__}: {error}"}


def evaluate(pg: Any, task: str, examples: Sequence[EvalExample], batch_size: int = 8,
             progress: bool = False, **options: Any) -> tuple[dict[str, float], list[dict]]:
    """In memory: -> (metrics, rows). What `paligemma finetune` and the demo's training script
    score with."""
    bar = tqdm(total=len(examples), desc=f"eval {task}", unit="ex", disable=not progress,
               dynamic_ncols=True)
    rows = [r for batch in predict(pg, task, examples, batch_size, bar, **options) for r in batch]
    bar.close()
    return aggregate(task, rows, examples), rows


# ---------------------------------------------------------------------------------------------
# The result file, with resume


def _partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial.jsonl")


def check_output(output: str | Path, header: dict) -> dict[str, dict]:
    """Before any work: the rows already done for this evaluation (`header`: format, task,
    source), from a finished result file or an interrupted run's `.partial.jsonl`. Raises if
    the output exists and is not this evaluation's (never overwritten), or cannot be written."""
    output = Path(output)
    if output.is_dir():
        raise ValueError(f"{output}: is a directory; -o takes a .json file path")
    done: dict[str, dict] = {}
    if output.exists():
        try:
            previous = json.loads(output.read_text())
            same = {k: previous.get(k) for k in header} == header
        except (ValueError, UnicodeDecodeError, AttributeError):
            same = False
        if not same:
            raise ValueError(f"{output}: exists and is not the result of this evaluation (same "
                             "task, data and model); choose another -o or remove it")
        done = {r["id"]: r for r in previous["examples"]}
    partial = _partial_path(output)
    if partial.exists():
        lines = partial.read_text().split("\n")
        try:
            same = json.loads(lines[0]) == header
        except ValueError:
            same = False
        if not same:
            raise ValueError(f"{partial}: an interrupted run of another evaluation; remove it or "
                             "choose another -o")
        for line in lines[1:]:
            try:
                row = json.loads(line)
            except ValueError:  # the torn last line of a killed run: its batch is redone
                continue
            done[row["id"]] = row
    output.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(output.parent, os.W_OK):
        raise ValueError(f"{output.parent}: not writable")
    return done


def run(pg: Any, task: str, examples: Sequence[EvalExample], output: str | Path,
        source: dict, batch_size: int = 8, progress: bool = True, **options: Any
        ) -> dict[str, Any]:
    """Evaluates the examples not already in `output` (or its .partial.jsonl), appending each
    batch's rows to the partial file, then writes `output` atomically and removes the partial
    file. source: what identifies the evaluation (data file, model, options); a result file
    of another source is never overwritten. -> the result (also in the file)."""
    _check_task(task)
    output = Path(output)
    header = {"format": FORMAT, "task": task, "source": source}
    done = check_output(output, header)
    todo = [e for e in examples if e.id not in done]
    partial = _partial_path(output)
    if todo:
        fresh = not partial.exists()
        bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc=f"eval {task}",
                   unit="ex", disable=not progress, dynamic_ncols=True)
        with open(partial, "a") as f:
            if fresh:
                f.write(json.dumps(header) + "\n")
            for rows in predict(pg, task, todo, batch_size, bar, **options):
                f.write("".join(json.dumps(r) + "\n" for r in rows))
                f.flush()
                os.fsync(f.fileno())
                done.update((r["id"], r) for r in rows)
        bar.close()
    rows = [done[e.id] for e in examples if e.id in done]
    result = header | {"metrics": aggregate(task, rows, examples), "examples": rows}
    _write_atomic(output, json.dumps(result, indent=1) + "\n")
    if partial.exists():
        partial.unlink()  # ours: its header matched this evaluation
    return result


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def table(task: str, metrics: dict[str, float]) -> str:
    """The metrics as an aligned two-column table; fractions as percentages (CIDEr x100 as the
    papers quote it), IoU means as fractions."""
    lines = [f"{task}"]
    for key, value in metrics.items():
        if key in ("num", "errors", "invalid", "unscored"):
            shown = str(int(value))
        elif key.startswith("miou") or key == "iou":
            shown = f"{value:.4f}"
        else:
            shown = f"{100 * value:.2f}"
            key = f"{key} (x100)" if key == "cider" else f"{key} (%)"
        lines.append(f"  {key:<24} {shown:>10}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# During fine-tuning


def task_of_prompt(prefix: str) -> str | None:
    """The eval task that scores a fine-tuning record, from its prompt's first word: caption /
    describe -> caption, detect -> detect, segment -> None (fine-tuning has no mask VAE),
    anything else (answer, ocr, question, ...) -> vqa (exact match and ANLS)."""
    word = prefix.split(maxsplit=1)[0] if prefix.strip() else ""
    return {"caption": "caption", "describe": "caption", "detect": "detect",
            "segment": None}.get(word, "vqa")


def finetune_evaluator(tokenizer: Any, records: Sequence[Any], batch_size: int = 8,
                       max_new_tokens: int = 32) -> Any:
    """A `finetune(evaluate=...)` callback: generates greedily for the (image, prefix, suffix)
    records, groups them by `task_of_prompt`, and returns each group's metrics as
    {"eval_<task>_<metric>": value} (caption: cider, bleu4, exact_match; vqa: accuracy, anls;
    detect: accuracy@0.5, miou)."""
    from ..api import PaliGemma
    from .datasets import box_from_suffix

    groups: dict[str, list[EvalExample]] = {}
    for n, r in enumerate(records):
        task = task_of_prompt(r.prefix)
        box = box_from_suffix(r.suffix) if task == "detect" else None
        if task is None or (task == "detect" and box is None):
            continue
        groups.setdefault(task, []).append(
            EvalExample(str(n), r.image, r.prefix, answers=[r.suffix], box=box))
    keep = {"caption": ("cider", "bleu4", "exact_match"), "vqa": ("accuracy", "anls"),
            "detect": ("accuracy@0.5", "miou")}

    def callback(model: Any) -> dict[str, float]:
        pg = PaliGemma(model, tokenizer)
        out = {}
        for task, examples in groups.items():
            metrics, _ = evaluate(pg, task, examples, batch_size, max_new_tokens=max_new_tokens)
            out |= {f"eval_{task}_{k}": metrics[k] for k in keep[task] if k in metrics}
        return out

    return callback
