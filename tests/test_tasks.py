"""Task prefixes and parsing of detect / segment outputs."""

import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from paligemma.segmentation import load_mask_decoder
from paligemma.tasks import parse_detections, parse_segments, task_prefix

SEG_CASE = Path(__file__).parents[1] / "parity_tests" / "data" / "seg_vae"


def locs(*values: int) -> str:
    return "".join(f"<loc{v:04d}>" for v in values)


def segs(codes) -> str:
    return "".join(f"<seg{int(c):03d}>" for c in codes)


@pytest.mark.parametrize("task, text, lang, prefix", [
    ("caption", "", "en", "caption en"),
    ("describe", "", "de", "describe de"),
    ("answer", "what is this?", "en", "answer en what is this?"),
    ("question", "", "fr", "question fr"),
    ("ocr", "", "en", "ocr"),
    ("detect", "cat ; dog", "en", "detect cat ; dog"),
    ("detect", ["cat", " dog "], "en", "detect cat ; dog"),
    ("segment", "the left cat", "en", "segment the left cat"),
])
def test_official_prefixes(task, text, lang, prefix):
    assert task_prefix(task, text, lang) == prefix


def test_task_errors():
    with pytest.raises(ValueError, match="unknown task 'count'"):
        task_prefix("count")
    with pytest.raises(ValueError, match="needs a text"):
        task_prefix("detect", "")
    with pytest.raises(ValueError, match="takes no text"):
        task_prefix("ocr", "hello")


def test_boxes_are_in_original_pixels_on_a_1023_grid():
    text = (f"{locs(0, 1023, 1023, 0)} x ; {locs(102, 205, 511, 818)} a cat ; "
            f"{locs(0, 0, 1023, 1023)} dog")
    found = parse_detections(text, width=640, height=480)
    assert [d.label for d in found] == ["a cat", "dog"]  # the first box is empty: skipped
    np.testing.assert_allclose(found[0].box, (205 / 1023 * 640, 102 / 1023 * 480,
                                              818 / 1023 * 640, 511 / 1023 * 480))
    assert found[1].box == (0.0, 0.0, 640.0, 480.0)


@pytest.mark.parametrize("text, problem", [
    (f"{locs(1, 2)} cat", "expected 4 <loc> tokens, got 2"),
    (f"{locs(1, 2, 3, 4, 5)} cat", "expected 4 <loc> tokens, got 5"),
    (f"{locs(500, 10, 100, 20)} cat", "empty box"),
    ("<loc2000><loc0001><loc2100><loc0009> cat", "above 1023"),
    ("just some words", "expected 4 <loc> tokens, got 0"),
])
def test_malformed_objects_are_skipped_with_a_warning(text, problem, caplog):
    with caplog.at_level(logging.WARNING, logger="paligemma"):
        good = f"{locs(10, 10, 20, 20)} ok"
        found = parse_detections(f"{text} ; {good}", 100, 100)
    assert [d.label for d in found] == ["ok"]
    assert problem in caplog.text


def test_no_objects_is_an_empty_list(caplog):
    with caplog.at_level(logging.WARNING, logger="paligemma"):
        assert parse_detections("", 10, 10) == []
    assert "no objects" in caplog.text


@pytest.fixture(scope="module")
def vae():
    return load_mask_decoder(SEG_CASE / "params.npz")


def test_segment_mask_follows_the_big_vision_evaluator(vae):
    with np.load(SEG_CASE / "vectors.npz") as f:
        codes, gold64 = f["codes"][0], f["masks"][0, ..., 0]
    width, height = 400, 300
    box = (100, 200, 700, 900)  # y0, x0, y1, x1 on the 1023 grid
    (found,) = parse_segments(f"{locs(*box)}{segs(codes)} cat", width, height, vae)
    # The evaluator: int() pixel box, Pillow bilinear resize of the 64x64 logits, > 0.
    y0, x0, y1, x1 = (int(v / 1023 * s) for v, s in zip(box, (height, width) * 2, strict=True))
    inside = np.asarray(PIL.Image.fromarray(gold64).resize((x1 - x0, y1 - y0),
                                                           PIL.Image.BILINEAR)) > 0
    expected = np.zeros((height, width), bool)
    expected[y0:y1, x0:x1] = inside
    assert found.label == "cat" and found.mask.shape == (height, width)
    assert 0.2 < found.mask[y0:y1, x0:x1].mean() < 0.8  # a real mask, neither empty nor full
    # Our decoder's logits differ from big_vision's by ~6e-6: allow pixels that straddle 0.
    assert (found.mask != expected).sum() <= 5


def test_segment_needs_16_seg_tokens(vae, caplog):
    with caplog.at_level(logging.WARNING, logger="paligemma"):
        found = parse_segments(f"{locs(1, 1, 500, 500)}{segs(range(15))} cat", 50, 50, vae)
    assert found == [] and "expected 16 <seg> tokens, got 15" in caplog.text
