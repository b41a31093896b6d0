"""Task prompts (official PaliGemma prefixes) and parsing of detect / segment outputs.

Detection output: per object 4 `<locNNNN>` tokens = y_min, x_min, y_max, x_max on a 0..1023
grid, then the label; objects are separated by " ; ". Segmentation adds 16 `<segNNN>` tokens
after the box. Coordinates: we divide by 1023, as big_vision does both when it encodes boxes
(`round(bbox * 1023)` in `pp/proj/paligemma/segmentation.py`) and when its segmentation
evaluator decodes them (`tokens / 1023`); some third-party parsers divide by 1024 instead
(at most 0.1% of the image size apart). Boxes are returned in pixels of the ORIGINAL image: the
model sees the image squeezed to a square, so normalized coordinates scale by width/height.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from .segmentation import NUM_CODES, MaskDecoder

logger = logging.getLogger("paligemma")

LOC_GRID = 1023  # coordinate = token / 1023 (big_vision's choice, see module docstring)
TASKS = ("caption", "describe", "answer", "question", "ocr", "detect", "segment")

_OBJECT = re.compile(r"\s*((?:<loc\d{4}>)*)((?:<seg\d{3}>)*)(.*)", re.DOTALL)
_NUMBER = re.compile(r"\d+")


def task_prefix(task: str, text: str | Sequence[str] = "", lang: str = "en") -> str:
    """The official prefix of a task.

    caption/describe/question: `"<task> <lang>"`; answer: `"answer <lang> <question>"`; ocr:
    `"ocr"`; detect: `"detect cat ; dog"` (text is "cat ; dog" or ["cat", "dog"]); segment:
    `"segment <thing>"`.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if not isinstance(text, str):
        text = " ; ".join(t.strip() for t in text)
    text = text.strip()
    needs_text = task in ("answer", "detect", "segment")
    if needs_text and not text:
        raise ValueError(f"task {task!r} needs a text (question or object names)")
    if not needs_text and text:
        raise ValueError(f"task {task!r} takes no text, got {text!r}")
    if task in ("caption", "describe", "question"):
        return f"{task} {lang}"
    if task == "answer":
        return f"answer {lang} {text}"
    if task == "ocr":
        return "ocr"
    return f"{task} {text}"


@dataclass
class Detection:
    """One object: label, box (x_min, y_min, x_max, y_max) in original-image pixels, and for
    `segment` a full-size boolean mask [H, W]."""

    label: str
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None

    def to_json(self) -> dict:
        out = {"label": self.label, "box": [round(v, 2) for v in self.box]}
        if self.mask is not None:
            out["mask_area"] = int(self.mask.sum())
        return out


def _parse_objects(
    text: str, with_masks: bool
) -> list[tuple[str, list[int], list[int]]]:
    """text -> [(label, 4 loc values, 16 seg codes or [])]; malformed objects are skipped."""
    objects = []
    for chunk in text.split(";"):
        if not chunk.strip():
            continue
        locs, segs, label = _OBJECT.match(chunk).groups()
        locs = [int(v) for v in _NUMBER.findall(locs)]
        segs = [int(v) for v in _NUMBER.findall(segs)]
        label = label.strip()
        problem = None
        if len(locs) != 4:
            problem = f"expected 4 <loc> tokens, got {len(locs)}"
        elif max(locs) > LOC_GRID:
            problem = f"<loc> value above {LOC_GRID}"
        elif not (locs[2] > locs[0] and locs[3] > locs[1]):
            problem = "empty box (y_max <= y_min or x_max <= x_min)"
        elif with_masks and len(segs) != NUM_CODES:
            problem = f"expected {NUM_CODES} <seg> tokens, got {len(segs)}"
        elif with_masks and max(segs) > 127:
            problem = "<seg> value above 127"
        if problem:
            logger.warning("skipping malformed object %r: %s", chunk.strip(), problem)
            continue
        objects.append((label, locs, segs if with_masks else []))
    if not objects:
        logger.warning("no objects found in model output %r", text)
    return objects


def _to_pixels(locs: list[int], width: int, height: int) -> tuple[float, float, float, float]:
    y0, x0, y1, x1 = (v / LOC_GRID for v in locs)
    return (x0 * width, y0 * height, x1 * width, y1 * height)


def parse_detections(text: str, width: int, height: int) -> list[Detection]:
    """Decoded `detect` output -> objects with boxes in pixels of a width x height image."""
    return [
        Detection(label, _to_pixels(locs, width, height))
        for label, locs, _ in _parse_objects(text, with_masks=False)
    ]


@torch.no_grad()
def parse_segments(
    text: str, width: int, height: int, decoder: MaskDecoder
) -> list[Detection]:
    """Decoded `segment` output -> objects with box and full-size mask [height, width] bool.

    As big_vision's segmentation evaluator: the 64x64 logits are resized (Pillow bilinear) into
    the box truncated to whole pixels, then thresholded at > 0.
    """
    objects = _parse_objects(text, with_masks=True)
    if not objects:
        return []
    device = decoder._vq_vae._embedding.device
    codes = torch.tensor([segs for _, _, segs in objects], device=device)
    logits = decoder(codes).float().cpu().numpy()
    out = []
    for (label, locs, _), logit in zip(objects, logits, strict=True):
        box = _to_pixels(locs, width, height)
        x0, y0, x1, y1 = (int(v) for v in box)
        if x1 <= x0 or y1 <= y0:
            logger.warning("skipping %r: box smaller than a pixel", label)
            continue
        inside = PIL.Image.fromarray(logit).resize((x1 - x0, y1 - y0), PIL.Image.BILINEAR)
        mask = np.zeros((height, width), dtype=bool)
        mask[y0:y1, x0:x1] = np.asarray(inside) > 0
        out.append(Detection(label, box, mask))
    return out
