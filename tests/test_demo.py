"""The synthetic scenes (ground truth agrees with the pixels) and `paligemma demo` end to end."""

import json
import random

import numpy as np
import PIL.Image
import PIL.ImageFont
import pytest

from paligemma import cli
from paligemma.annotate import wrap_text
from paligemma.demo import scenes
from paligemma.demo.command import DEMO_MODEL, NPZ


def test_caption_lists_shapes_left_to_right_with_articles():
    image = PIL.Image.new("RGB", (8, 8))
    shapes = [scenes.Shape("star", "orange", (0.1, 0.0, 0.3, 0.2)),
              scenes.Shape("circle", "red", (0.5, 0.4, 0.7, 0.6)),
              scenes.Shape("square", "blue", (0.2, 0.7, 0.4, 0.9))]
    assert scenes.Scene(image, shapes).caption() == (
        "an orange star, a red circle and a blue square")
    assert scenes.Scene(image, shapes[1:]).caption() == "a red circle and a blue square"
    assert scenes.Scene(image, shapes[:1]).caption() == "an orange star"


def test_loc_tokens_use_the_1023_scale():
    assert scenes.loc_tokens((0.0, 0.25, 1.0, 0.5)) == "<loc0000><loc0256><loc1023><loc0512>"


def test_detection_uses_big_vision_format():
    shapes = [scenes.Shape("star", "red", (0.0, 0.25, 1.0, 0.5)),
              scenes.Shape("circle", "blue", (0.5, 0.5, 0.75, 1.0))]
    assert scenes.detection(shapes) == (
        "detect star ; circle",
        "<loc0000><loc0256><loc1023><loc0512> star ; <loc0512><loc0512><loc0767><loc1023> circle")


@pytest.mark.parametrize("seed", range(20))
def test_boxes_and_colors_match_the_pixels(seed):
    scene = scenes.draw_scene(random.Random(seed), 224)
    pixels = np.asarray(scene.image, dtype=np.float32)
    assert 1 <= len(scene.shapes) <= scenes.MAX_SHAPES
    assert len({s.kind for s in scene.shapes}) == len(scene.shapes)
    centers = [(s.box[1] + s.box[3]) / 2 for s in scene.shapes]
    assert centers == sorted(centers)
    for shape in scene.shapes:
        y0, x0, y1, x1 = (round(v * 224) for v in shape.box)
        inside = pixels[(y0 + y1) // 2, (x0 + x1) // 2]  # every shape covers its box center
        assert np.abs(inside - scenes.COLORS[shape.color]).max() <= 45, (shape, inside)
        # The box is tight: a row of pixels through its middle, 3 px beyond each side, is not
        # the shape's color.
        for x in (x0 - 3, x1 + 3):
            if 0 <= x < 224:
                outside = pixels[(y0 + y1) // 2, x]
                assert np.abs(outside - inside).max() > 30, (shape, x)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_draw_scene_draws_the_count_asked_for_or_fewer_if_they_do_not_fit(count):
    counts = [len(scenes.draw_scene(random.Random(seed), 64, count).shapes) for seed in range(10)]
    assert max(counts) == count and min(counts) >= 1


def test_draw_scene_refuses_a_count_out_of_range():
    with pytest.raises(ValueError, match="count must be in"):
        scenes.draw_scene(random.Random(0), 64, scenes.MAX_SHAPES + 1)


def test_patch_labels_mark_the_patches_whose_center_is_in_a_box():
    # 4 x 4 grid, patch centers at 0.125, 0.375, 0.625, 0.875 on each axis.
    shapes = [scenes.Shape("star", "green", (0.1, 0.1, 0.4, 0.4)),  # rows 0-1, columns 0-1
              scenes.Shape("circle", "purple", (0.7, 0.8, 0.95, 0.95))]  # row 3, column 3
    kinds, colors = scenes.patch_labels(scenes.Scene(PIL.Image.new("RGB", (8, 8)), shapes), 4)
    star, circle, none = (scenes.SHAPES.index("star"), scenes.SHAPES.index("circle"),
                          len(scenes.SHAPES))
    assert kinds == [star, star, none, none,
                     star, star, none, none,
                     none, none, none, none,
                     none, none, none, circle]
    green, purple, none = (list(scenes.COLORS).index("green"), list(scenes.COLORS).index("purple"),
                           len(scenes.COLORS))
    assert colors == [green, green, none, none,
                      green, green, none, none,
                      none, none, none, none,
                      none, none, none, purple]


def test_examples_cover_every_task():
    scene = scenes.draw_scene(random.Random(3), 224)
    prefixes = [p for p, _ in scenes.examples(scene)]
    assert prefixes[:2] == ["caption en", "answer en how many shapes are there"]
    kinds = [s.kind for s in scene.shapes]
    assert prefixes[2:] == [p for k in kinds for p in
                            (f"answer en what color is the {k}", f"detect {k}")]


needs_model = pytest.mark.skipif(not (DEMO_MODEL / NPZ).is_file(),
                                 reason="the demo model is not in this checkout")


@needs_model
def test_demo_command_end_to_end(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--seed", "5"]) == 0
    tmp_path = tmp_path / "demo"
    printed = capsys.readouterr().out
    assert "[5/5]" in printed and "PASS" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["parity"]["ok"]
    results = report["results"]
    assert results["caption"]["answer"] and len(results["questions"]) == 2
    assert all(q["answer"] for q in results["questions"])
    # The shipped model's answers are not all right (see paligemma/demo/model/README.md): this
    # checks the path, not the model's quality.
    assert (tmp_path / "model" / "model.safetensors").is_file()
    with PIL.Image.open(tmp_path / "annotated.png") as image:
        assert image.width == 448 and image.height > 448


def test_wrap_text_fits_the_width_and_keeps_every_word():
    font = PIL.ImageFont.load_default(size=18)
    text = "caption: a green triangle, a blue star and an orange circle"
    lines = wrap_text(text, font, 200)
    assert len(lines) > 1 and " ".join(lines) == text
    assert all(font.getlength(line) <= 200 for line in lines)
    assert wrap_text("short", font, 200) == ["short"]
