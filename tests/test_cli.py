"""`paligemma` command line, run in-process on a tiny checkpoint."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from test_api import SEG_CODES, cat_image, scripted, tiny_checkpoint
from test_tokenizer import gold_tokenizer

import paligemma.api
from paligemma.cli import main
from paligemma.tokenizer import Tokenizer

VAE = Path(__file__).parents[1] / "parity_tests" / "data" / "seg_vae" / "params.npz"


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("images") / "cat.png"
    PIL.Image.fromarray(cat_image()).save(path)
    return path


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def script_output(monkeypatch):
    """Makes greedy decoding emit the given text (the checkpoint is random)."""
    def use(text: str) -> None:
        sampler = scripted(text, Tokenizer(tiny_checkpoint() / "tokenizer.model"))
        monkeypatch.setattr(paligemma.api, "make_sampler", lambda *a: sampler)
    return use


def test_caption_prints_one_line_per_image(capsys, image):
    code, out, err = run(capsys, "caption", image, image, "--model", tiny_checkpoint(),
                         "--max-new-tokens", "4", "--batch-size", "1")
    assert code == 0 and err == ""
    assert [line.split(":")[0] for line in out.splitlines()] == [str(image)] * 2


def test_matmul_precision_is_set_before_the_command_runs(capsys, image, monkeypatch):
    import torch

    from paligemma import dispatch

    chosen = []
    monkeypatch.setattr(dispatch, "set_matmul_precision", chosen.append)
    code, out, _ = run(capsys, "caption", image, "--model", tiny_checkpoint(),
                       "--max-new-tokens", "2", "--matmul-precision", "medium")
    assert code == 0 and out.startswith(str(image)) and chosen == ["medium"]
    assert torch.get_float32_matmul_precision() == "highest"  # the stand-in set nothing


def test_json_output(capsys, image):
    code, out, _ = run(capsys, "ask", image, "-q", "what is it?", "--model", tiny_checkpoint(),
                       "--max-new-tokens", "3", "--json")
    (record,) = json.loads(out)
    assert code == 0 and record["image"] == str(image)
    assert record["prompt"] == "answer en what is it?" and isinstance(record["text"], str)


def test_detect_with_json_and_annotation(capsys, image, tmp_path, script_output):
    script_output("<loc0200><loc0300><loc0800><loc0700> cat")
    out_png = tmp_path / "new_folder" / "boxes.png"  # created on the way
    code, out, _ = run(capsys, "detect", image, "--objects", "cat ; dog", "--model",
                       tiny_checkpoint(), "--json", "--annotate", out_png)
    (record,) = json.loads(out)
    assert code == 0 and record["prompt"] == "detect cat ; dog"
    assert record["objects"] == [{"label": "cat", "box": [35.19, 17.6, 82.11, 70.38]}]
    drawn = np.asarray(PIL.Image.open(out_png))
    assert drawn.shape == (90, 120, 3)
    assert (drawn != cat_image()).any(axis=-1)[17:71, 35].mean() > 0.9  # the box's left edge


def test_segment_prints_box_and_mask_area(capsys, image, tmp_path, script_output):
    codes = "".join(f"<seg{c:03d}>" for c in SEG_CODES)
    script_output(f"<loc0200><loc0300><loc0800><loc0700>{codes} cat")
    out_png = tmp_path / "mask.png"
    code, out, _ = run(capsys, "segment", image, "--object", "cat", "--model", tiny_checkpoint(),
                       "--vae", VAE, "--annotate", out_png)
    assert code == 0 and "1 object(s)" in out and "mask:" in out and out_png.is_file()


def test_explain_writes_a_heatmap(capsys, image, tmp_path):
    out_png = tmp_path / "heat.png"
    code, out, _ = run(capsys, "explain", image, "--prompt", "caption en", "--model",
                       tiny_checkpoint(), "-o", out_png, "--max-new-tokens", "3",
                       "--layers=-1", "--heads", "0:2")
    assert code == 0 and "wrote" in out
    assert PIL.Image.open(out_png).size[0] == 4 * 256


@pytest.mark.parametrize("make_args, message", [
    (lambda d, i: ["caption", d / "missing.jpg"], "no such file"),
    (lambda d, i: ["caption", d / "notes.txt"], "not an image"),
    (lambda d, i: ["caption", d / "empty.png"], "empty file"),
    (lambda d, i: ["ask", i, "-q", "why " * 9000], "prompt too long"),
    (lambda d, i: ["caption", i, "--tokenizer", gold_tokenizer()],
     "has 512 ids but the model's vocabulary has 1400"),
    (lambda d, i: ["caption", i, "--model", d / "nope"], "no such model directory"),
    (lambda d, i: ["explain", i, "--prompt", "ocr", "-o", d / "x.png", "--layers", "a"],
     "bad index list"),
])
def test_user_errors_exit_2_with_one_message(capsys, image, tmp_path, make_args, message):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    args = make_args(tmp_path, image)
    if "--model" not in args:
        args += ["--model", tiny_checkpoint()]
    code, out, err = run(capsys, *args)
    assert code == 2 and message in err
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("args", [["count", "x.jpg"], ["segment", "x.jpg", "--object", "cat",
                                                       "--model", "m"]])
def test_unknown_task_and_missing_vae_are_usage_errors(capsys, args):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "invalid choice: 'count'" in err or "required: --vae" in err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["detect", "--help"])
    assert "example:\n  paligemma detect" in capsys.readouterr().out
