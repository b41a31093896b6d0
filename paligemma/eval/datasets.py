"""Evaluation sets: the datasets' own annotation files and the project's JSONL -> EvalExamples.

Formats (picked by `load`, from the file's content):
- the project's JSONL (the fine-tuning colab's records): one object per line with "image", and
  "prefix" (default: the task's prompt over the record's fields, e.g. "answer en {question}")
  and "suffix" (the one answer / reference / `<loc>` box) or "answers" (a list) or "answer";
  an id from "id", "question_id" or "questionId" (default: the line number). The same records
  as a JSON list, or under "data" (DocVQA's own `val_v1.0.json`; TallyQA's JSON list).
  Detect / segment records may give "box" ([y_min, x_min, y_max, x_max] in [0, 1]) and segment
  records "mask" (a PNG, nonzero = inside) instead of a `<loc>` suffix.
- RefCOCO-style JSONL, one record per referring expression: "image", "sentence", "bbox"
  ([x, y, width, height] in pixels, COCO's convention; the image's "width" and "height" if
  given, else read from the image header), and for segment "segmentation" (COCO polygons or
  RLE, decoded with pycocotools as big_vision's RefCOCO builder does) or "mask"; an
  optional "split" ("val", "testA", ...) that `--split` selects.
- COCO captions JSON (`captions_val2014.json`: "images" + "annotations") or Karpathy's
  `dataset_coco.json` ("images" with "sentences" and "split").
- VQAv2: the questions JSON (`v2_OpenEnded_mscoco_val2014_questions.json`) with the
  annotations JSON beside it (`annotations=`; without it, as for test-dev, predictions only),
  images named `COCO_<subtype>_<id:012d>.jpg`.

Images are paths, opened only when their batch runs (memory is bounded by the batch).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from ..image import ImageLike
from ..tasks import LOC_GRID, parse_detections


@dataclass
class EvalExample:
    """One prompt to score. answers: the references (captions) or human answers; box: the true
    box (y_min, x_min, y_max, x_max) in [0, 1]; mask: returns the true mask, bool [H, W] of the
    original image (segment; loaded only when scored); info: extra fields kept in the output
    row (e.g. VQAv2's answer_type)."""

    id: str
    image: ImageLike
    prefix: str
    answers: list[str] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    mask: Callable[[], np.ndarray] | None = None
    info: dict[str, Any] = field(default_factory=dict)


# The official prompts of each task (big_vision's transfer configs): captions "caption en",
# VQAv2 / TallyQA / ST-VQA "answer en {question}", DocVQA the bare question, RefCOCO
# segmentation the bare sentence (the transfer's prompt; mix checkpoints use
# "segment {sentence}" / "detect {sentence}", pass --prompt).
DEFAULT_PROMPTS = {
    "caption": "caption en",
    "vqav2": "answer en {question}",
    "vqa": "answer en {question}",
    "docvqa": "{question}",
    "count": "answer en {question}",
    "detect": "detect {sentence}",
    "segment": "{sentence}",
}


def load(task: str, path: str | Path, image_dir: str | Path | None = None,
         split: str | None = None, annotations: str | Path | None = None,
         prompt: str | None = None) -> list[EvalExample]:
    """The examples of `path` for `task`, in file order; image paths are relative to `image_dir`
    (default: the data file's folder). prompt: a template over the record's fields ({question},
    {sentence}) that replaces the task's default; a JSONL record's own "prefix" wins over both."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    images = Path(image_dir) if image_dir is not None else path.parent
    template = prompt or DEFAULT_PROMPTS[task]
    if path.suffix == ".jsonl":
        examples = _load_records(task, _jsonl_records(path), images, split, template)
    else:
        data = _read_json(path)
        items = data.get("data") if isinstance(data, dict) else data
        if isinstance(items, list):  # DocVQA's {"data": [...]}, TallyQA's [...]
            records = ((f"{path}: record {n}", n, r) for n, r in enumerate(items, 1))
            examples = _load_records(task, records, images, split, template)
        elif isinstance(data, dict) and "questions" in data:
            examples = _load_vqav2(path, data, annotations, images, template)
        elif isinstance(data, dict) and "images" in data:
            examples = _load_coco_captions(path, data, images, split, template)
        else:
            raise ValueError(f"{path}: not a COCO captions, VQAv2 questions or record-list JSON "
                             "(no 'images', 'questions' or 'data' key, not a list); JSONL files "
                             "need the .jsonl suffix")
    if not examples:
        raise ValueError(f"{path}: no examples" + (f" in split {split!r}" if split else ""))
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{path}: example id {dup!r} appears more than once (ids must be "
                         "unique: the output file is resumed by id)")
    return examples


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _fill(template: str, where: str, **fields: Any) -> str:
    try:
        return template.format(**fields)
    except (KeyError, IndexError) as e:
        raise ValueError(f"{where}: prompt {template!r} needs field {e}, the record has "
                         f"{sorted(fields)}") from None


def box_from_suffix(suffix: str) -> tuple[float, float, float, float] | None:
    """'<loc0100><loc0200><loc0300><loc0400> cat' -> (0.0978, 0.196, 0.293, 0.391) (/1023)."""
    found = parse_detections(suffix, 1, 1)
    if not found:
        return None
    x0, y0, x1, y1 = found[0].box
    return (y0, x0, y1, x1)


def _png_mask(path: Path) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        with PIL.Image.open(path) as im:
            array = np.asarray(im)
        return (array[..., 0] if array.ndim == 3 else array) > 0

    return load


def _coco_mask(segmentation: Any, height: int, width: int, where: str) -> Callable[[], np.ndarray]:
    """COCO polygons / RLE -> mask, as pycocotools' `annToMask` (what big_vision's RefCOCO
    builder calls)."""

    def load() -> np.ndarray:
        try:
            from pycocotools import mask as coco_mask
        except ImportError:
            raise ValueError(f"{where}: decoding COCO 'segmentation' needs pycocotools "
                             "(pip install pycocotools), or give a 'mask' PNG") from None
        if isinstance(segmentation, list):  # polygons: one RLE each, merged
            rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
            rle = coco_mask.frPyObjects(segmentation, height, width)
        else:
            rle = segmentation
        return coco_mask.decode(rle).astype(bool)

    return load


def _jsonl_records(path: Path) -> Iterator[tuple[str, int, dict]]:
    """(where, line number, record) of each non-empty line."""
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a JSON object ({e})") from None
            yield f"{path}:{n}", n, record


def _load_records(task: str, records: Iterable[tuple[str, int, Any]], images: Path,
                  split: str | None, template: str) -> list[EvalExample]:
    examples = []
    for where, n, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: not a JSON object")
        if split is not None and record.get("split") != split:
            continue
        try:
            examples.append(_record_example(task, record, images, template, where, n))
        except KeyError as e:
            raise ValueError(f"{where}: missing key {e} (keys: {sorted(record)})") from None
    return examples


def _record_example(task: str, record: dict, images: Path, template: str, where: str, n: int
                   ) -> EvalExample:
    image = images / record["image"]
    ident = str(next((record[k] for k in ("id", "question_id", "questionId") if k in record), n))
    if "bbox" in record:  # RefCOCO-style: COCO pixel box, referring expression
        if "width" in record and "height" in record:
            width, height = int(record["width"]), int(record["height"])
        else:
            with PIL.Image.open(image) as im:  # header only: the size normalizes the box
                width, height = im.size
        x, y, w, h = (float(v) for v in record["bbox"])
        box = (y / height, x / width, (y + h) / height, (x + w) / width)
        mask = None
        if "segmentation" in record:
            mask = _coco_mask(record["segmentation"], height, width, where)
        elif "mask" in record:
            mask = _png_mask(images / record["mask"])
        prefix = record.get("prefix") or _fill(template, where, **record)
        return EvalExample(ident, image, prefix, box=box, mask=mask,
                           info={"sentence": record.get("sentence", "")})
    prefix = record.get("prefix") or _fill(template, where, **record)
    if "answers" in record:
        answers = record["answers"]
    elif "answer" in record:  # TallyQA: one answer, a number
        answers = [str(record["answer"])]
    elif "suffix" in record:
        answers = [record["suffix"]]
    else:  # a test split without answers (DocVQA test): predictions only; or a "box" below
        answers = []
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: 'answers' must be a list of strings")
    box = mask = None
    if task in ("detect", "segment"):
        if "box" in record:
            box = tuple(float(v) for v in record["box"])
            if len(box) != 4:
                raise ValueError(f"{where}: 'box' must be [y_min, x_min, y_max, x_max]")
        else:
            box = box_from_suffix(answers[0]) if answers else None
            if box is None:
                raise ValueError(f"{where}: no box: give 'box' or a suffix starting with four "
                                 f"<locNNNN> tokens (values up to {LOC_GRID})")
        if task == "segment":
            if "mask" not in record:
                raise ValueError(f"{where}: segment records need 'mask' (a PNG path)")
            mask = _png_mask(images / record["mask"])
    return EvalExample(ident, image, prefix, answers=answers, box=box, mask=mask)


def _load_coco_captions(path: Path, data: dict, images: Path, split: str | None,
                        template: str) -> list[EvalExample]:
    entries = data["images"]
    if entries and "sentences" in entries[0]:  # Karpathy's dataset_coco.json
        out = []
        for im in entries:
            if split is not None and im.get("split") != split:
                continue
            folder = images / im["filepath"] if "filepath" in im else images
            out.append(EvalExample(str(im.get("cocoid", im.get("imgid"))),
                                   folder / im["filename"], template,
                                   answers=[s["raw"] for s in im["sentences"]]))
        return out
    if split is not None:
        raise ValueError(f"{path}: --split applies to Karpathy's dataset_coco.json or JSONL "
                         "records with a 'split' field; a COCO captions file is one split")
    refs: dict[Any, list[str]] = {}
    for a in data.get("annotations", []):
        refs.setdefault(a["image_id"], []).append(a["caption"])
    missing = [im["id"] for im in entries if im["id"] not in refs]
    if missing:
        raise ValueError(f"{path}: image id {missing[0]} has no caption in 'annotations'")
    return [EvalExample(str(im["id"]), images / im["file_name"], template,
                        answers=refs[im["id"]]) for im in entries]


def _load_vqav2(path: Path, questions: dict, annotations_path: str | Path | None,
                images: Path, template: str) -> list[EvalExample]:
    """Without annotations (test-dev, test): examples without answers, predictions only."""
    by_id: dict[Any, dict] = {}
    if annotations_path is not None:
        annotations_path = Path(annotations_path)
        if not annotations_path.is_file():
            raise FileNotFoundError(f"{annotations_path}: no such annotations file")
        annotations = _read_json(annotations_path)
        if not isinstance(annotations, dict) or "annotations" not in annotations:
            raise ValueError(f"{annotations_path}: no 'annotations' key: not a VQAv2 "
                             "annotations file")
        by_id = {a["question_id"]: a for a in annotations["annotations"]}
    # test-dev questions are about test2015 images (COCO_test2015_...).
    subtype = questions.get("data_subtype", "val2014").replace("test-dev", "test")
    out = []
    for q in questions["questions"]:
        ann = by_id.get(q["question_id"])
        if annotations_path is not None and ann is None:
            raise ValueError(f"{annotations_path}: no annotation for question_id "
                             f"{q['question_id']} of {path}")
        out.append(EvalExample(
            str(q["question_id"]), images / f"COCO_{subtype}_{q['image_id']:012d}.jpg",
            _fill(template, f"{path}: question {q['question_id']}", **q),
            answers=[a["answer"] for a in ann["answers"]] if ann else [],
            info={"answer_type": ann.get("answer_type", "other"),
                  "question_type": ann.get("question_type", "")} if ann else {}))
    return out
