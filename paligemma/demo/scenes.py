"""Synthetic scenes for the demo model: 1-3 colored shapes on varied backgrounds, drawn with Pillow,
with the ground truth of every task the demo model learns.

Each scene has distinct shape kinds (so "the circle" is unambiguous), listed left to right (the
order captions use). Boxes are normalized (y_min, x_min, y_max, x_max) in [0, 1], big_vision's
order; `loc_tokens` puts them on the 1024-value `<locNNNN>` grid as big_vision does
(round(v * 1023), decoded by `paligemma.tasks` as token / 1023).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import PIL.ImageDraw

from ..api import PaliGemma
from ..eval.datasets import EvalExample, box_from_suffix
from ..eval.runner import evaluate
from ..tasks import LOC_GRID

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
COLOR_JITTER = 20  # per channel, so that colors are ranges rather than exact values
MAX_SHAPES = 3
MIN_CENTER_GAP = 0.1
# Side of a shape's square, as a fraction of the image: at least MIN_SIDE (34 px, two 16 px
# patches, in the demo model's 112 px input: smaller shapes made its circles and squares hard to
# tell apart), at most MAX_SIDE_ALONE alone in a scene and MAX_SIDE beside other shapes.
MIN_SIDE, MAX_SIDE_ALONE, MAX_SIDE = 0.3, 0.5, 0.36


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    box: tuple[float, float, float, float]  # y_min, x_min, y_max, x_max in [0, 1]


@dataclass
class Scene:
    image: PIL.Image.Image
    shapes: list[Shape]  # left to right by box center

    def caption(self) -> str:
        """'a red circle', 'a red circle and an orange star', 'a red circle, a ... and a ...'."""
        names = [f"{'an' if s.color[0] in 'aeiou' else 'a'} {s.color} {s.kind}"
                 for s in self.shapes]
        return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]

    def shape(self, kind: str) -> Shape:
        return next(s for s in self.shapes if s.kind == kind)


def loc_tokens(box: tuple[float, float, float, float]) -> str:
    """Normalized (y_min, x_min, y_max, x_max) -> '<loc0123><loc0045><loc0456><loc0300>'."""
    return "".join(f"<loc{round(v * LOC_GRID):04d}>" for v in box)


def detection(shapes: Sequence[Shape]) -> tuple[str, str]:
    """('detect circle ; star', '<loc..>x4 circle ; <loc..>x4 star'): big_vision's format."""
    return ("detect " + " ; ".join(s.kind for s in shapes),
            " ; ".join(f"{loc_tokens(s.box)} {s.kind}" for s in shapes))


def examples(scene: Scene) -> list[tuple[str, str]]:
    """Every (prefix, suffix) pair of a scene with one object per question, with the official
    task prefixes."""
    pairs = [("caption en", scene.caption()),
             ("answer en how many shapes are there", str(len(scene.shapes)))]
    for s in scene.shapes:
        pairs.append((f"answer en what color is the {s.kind}", s.color))
        pairs.append(detection([s]))
    return pairs


def patch_labels(scene: Scene, grid: int) -> tuple[list[int], list[int]]:
    """What is under each patch of a `grid` x `grid` split of the image, row by row: the index
    in SHAPES of the kind of shape whose box holds the patch center (len(SHAPES) for none, the
    background), and the index in COLORS of its color (len(COLORS) for none). Boxes never
    overlap, so a patch has one label. -> kinds [grid^2], colors [grid^2]."""
    kinds, colors = [len(SHAPES)] * grid**2, [len(COLORS)] * grid**2
    for shape in scene.shapes:
        y0, x0, y1, x1 = shape.box
        kind, color = SHAPES.index(shape.kind), list(COLORS).index(shape.color)
        for row in range(grid):
            for col in range(grid):
                if y0 <= (row + 0.5) / grid <= y1 and x0 <= (col + 0.5) / grid <= x1:
                    kinds[row * grid + col], colors[row * grid + col] = kind, color
    return kinds, colors


def draw_scene(rng: random.Random, size: int = 224, count: int | None = None) -> Scene:
    """A random scene of `size` x `size` pixels: background, then `count` non-overlapping shapes
    (default: 1 to MAX_SHAPES, uniformly). A shape that finds no free spot is left out: about
    one draw of 3 shapes in 5 ends with fewer."""
    if count is not None and not 1 <= count <= MAX_SHAPES:
        raise ValueError(f"count must be in [1, {MAX_SHAPES}], got {count}")
    image = _background(rng, size)
    draw = PIL.ImageDraw.Draw(image)
    count = rng.randint(1, MAX_SHAPES) if count is None else count
    kinds = rng.sample(SHAPES, count)
    shapes: list[Shape] = []
    boxes: list[tuple[float, float, float, float]] = []
    for kind in kinds:
        square = _place(rng, boxes, max_side=MAX_SIDE_ALONE if count == 1 else MAX_SIDE)
        if square is None:
            continue
        boxes.append(square)
        color = rng.choice(list(COLORS))
        fill = tuple(min(255, max(0, c + rng.randint(-COLOR_JITTER, COLOR_JITTER)))
                     for c in COLORS[color])
        points = _outline(kind, square, size)
        if kind == "circle":
            draw.ellipse(_bounds(points), fill=fill)
        elif kind == "square":
            draw.rectangle(_bounds(points), fill=fill)
        else:
            draw.polygon(points, fill=fill)
        x_min, y_min, x_max, y_max = _bounds(points)
        shapes.append(Shape(kind, color, (y_min / size, x_min / size, y_max / size, x_max / size)))
    shapes.sort(key=lambda s: s.box[1] + s.box[3])
    return Scene(image, shapes)


def _place(rng: random.Random, boxes: list[tuple[float, ...]], max_side: float
           ) -> tuple[float, float, float, float] | None:
    """A square (y0, x0, y1, x1) apart from `boxes`, or None if 100 tries fail.

    Apart: no overlap (with a margin), and horizontal centers at least MIN_CENTER_GAP apart so
    that the left-to-right order of a caption is never a near tie.
    """
    for _ in range(100):
        side = rng.uniform(MIN_SIDE, max_side)
        y0, x0 = rng.uniform(0.02, 0.98 - side), rng.uniform(0.02, 0.98 - side)
        square = (y0, x0, y0 + side, x0 + side)
        if all(_apart(square, other) for other in boxes):
            return square
    return None


def _apart(a: tuple[float, ...], b: tuple[float, ...], margin: float = 0.03) -> bool:
    disjoint = (a[2] + margin < b[0] or b[2] + margin < a[0] or
                a[3] + margin < b[1] or b[3] + margin < a[1])
    return disjoint and abs(a[1] + a[3] - b[1] - b[3]) / 2 >= MIN_CENTER_GAP


def _outline(kind: str, square: tuple[float, float, float, float], size: int
             ) -> list[tuple[float, float]]:
    """Pixel (x, y) points of a shape inscribed in `square` (circle: its bounding corners)."""
    y0, x0, y1, x1 = (v * size for v in square)
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if kind in ("circle", "square"):
        return [(x0, y0), (x1, y1)]
    if kind == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    # A five-pointed star, point up, inner radius 0.45 of the outer one.
    return [(cx + rad * math.sin(a), cy - rad * math.cos(a))
            for i in range(10)
            for a, rad in [(i * math.pi / 5, r if i % 2 == 0 else 0.45 * r)]]


def _bounds(points: list[tuple[float, float]]) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def _background(rng: random.Random, size: int) -> PIL.Image.Image:
    """A low-saturation background: solid or a linear gradient between two tones, with noise."""

    def tone() -> np.ndarray:
        gray = rng.choice([rng.uniform(190, 250), rng.uniform(110, 150), rng.uniform(25, 70)])
        return np.array([gray + rng.uniform(-18, 18) for _ in range(3)], np.float32)

    a, b = tone(), tone() if rng.random() < 0.6 else None
    ramp = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    if b is None:
        pixels = a
    elif rng.random() < 0.5:
        pixels = a + (b - a) * ramp  # top to bottom
    else:
        pixels = a + (b - a) * ramp.transpose(1, 0, 2)
    # float32 throughout: the noise is most of the cost of drawing a scene.
    sigma = rng.uniform(0, 8)
    noise = np.random.default_rng(rng.getrandbits(32)).standard_normal((size, size, 3), np.float32)
    return PIL.Image.fromarray(np.clip(pixels + sigma * noise, 0, 255).astype(np.uint8), "RGB")


HELD_OUT_SEED = 10**9  # scene seeds of the held-out set start here, far from training seeds
RENDER_SIZE = 224  # scenes are drawn at this size; the demo model sees them resized to 112 px
# The demo model's held-out tasks, each scored by `paligemma eval TASK`: caption (exact match of
# `caption en`), vqa (every color and count question), detect (`detect <kind>` per shape).
EVAL_TASKS = ("caption", "vqa", "detect")


def held_out(count: int) -> list[Scene]:
    """The held-out scenes the demo model's card is measured on (seeds HELD_OUT_SEED + i)."""
    return [draw_scene(random.Random(HELD_OUT_SEED + i), RENDER_SIZE) for i in range(count)]


def eval_records(scenes: Sequence[Scene]) -> dict[str, list[tuple[int, str, str]]]:
    """Per task of EVAL_TASKS, the (scene index, prefix, suffix) of every example: the pairs of
    `examples(scene)`, caption first, then the count question, then per shape its color
    question and its detection."""
    out: dict[str, list[tuple[int, str, str]]] = {task: [] for task in EVAL_TASKS}
    for i, scene in enumerate(scenes):
        for prefix, suffix in examples(scene):
            task = prefix.split()[0].replace("answer", "vqa")
            out[task].append((i, prefix, suffix))
    return out


def score(pg: PaliGemma, scenes: Sequence[Scene], batch_size: int = 32) -> dict[str, float]:
    """Held-out scores of a model on scenes, greedy decoding, by `paligemma eval`'s code:
    caption: exact match of `caption en`; vqa: accuracy (exact match) over every color and
    count question; detection: mean IoU of the first box `detect <kind>` returns (0 if none),
    over all shapes."""
    scores = {}
    for task, records in eval_records(scenes).items():
        examples = [EvalExample(str(n), scenes[i].image, prefix, answers=[suffix],
                                box=box_from_suffix(suffix) if task == "detect" else None)
                    for n, (i, prefix, suffix) in enumerate(records)]
        metrics, _ = evaluate(pg, task, examples, batch_size, max_new_tokens=24)
        scores[task] = metrics
    return {"caption": scores["caption"]["exact_match"], "vqa": scores["vqa"]["accuracy"],
            "detection": scores["detect"]["miou"]}
