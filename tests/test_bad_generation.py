"""Bad-input battery, prompts and generation options: each refused with one line naming the
flag or value, and NaN logits are an error, never an empty answer."""

import pytest
import torch

from paligemma import PaliGemma
from paligemma.generate import NonFiniteLogits, check_logits


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--max-new-tokens", "0", "argument --max-new-tokens: must be at least 1, got 0"),
    ("--batch-size", "0", "argument --batch-size: must be at least 1, got 0"),
    ("--beams", "-2", "argument --beams: must be at least 1, got -2"),
    ("--top-k", "0", "argument --top-k: must be at least 1, got 0"),
    ("--batch-size", "many", "argument --batch-size: expected a whole number, got 'many'"),
    ("--dtype", "int4", "argument --dtype: invalid choice: 'int4'"),
    ("--max-image-pixels", "0", "argument --max-image-pixels: must be at least 1, got 0"),
])
def test_bad_option_values_are_named(refused, model_dir, photo, flag, value, says):
    refused("caption", photo, "--model", model_dir, flag, value, says=says)


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--top-p", "1.5", "top_p must be in (0, 1], got 1.5"),
    ("--temperature", "-1", "temperature must be >= 0, got -1.0"),
])
def test_bad_sampling_values_are_named(refused, model_dir, photo, flag, value, says):
    refused("caption", photo, "--model", model_dir, flag, value, says=says)


def test_unknown_command(refused):
    refused("summarize", "x.jpg", says="argument command: invalid choice: 'summarize'")


def test_missing_required_flag(refused, photo):
    refused("ask", photo, "--model", "m", says="the following arguments are required: -q")


def test_prompt_longer_than_the_context(model_dir, photo):
    pg = PaliGemma.from_pretrained(model_dir)
    pg.max_seq_len = 20
    with pytest.raises(ValueError, match=r"prompt too long: \d+ image \+ \d+ text \+ 30 new"):
        pg.generate(photo, "caption en", max_new_tokens=30)


def test_zero_new_tokens_from_python(model_dir, photo):
    pg = PaliGemma.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        pg.caption(photo, max_new_tokens=0)


def test_nan_logits_raise_instead_of_an_empty_answer(model_dir, photo):
    pg = PaliGemma.from_pretrained(model_dir)
    with torch.no_grad():
        pg.model.decoder.final_norm.scale[0] = torch.nan  # past the load-time check
    with pytest.raises(NonFiniteLogits, match=r"generation step 0: the logits of batch row"):
        pg.caption(photo)
    with pytest.raises(NonFiniteLogits, match="generation step 0"):
        pg.caption(photo, num_beams=2)


@pytest.mark.parametrize(("layers", "says"), [
    ("1-3", "bad index list '1-3': use e.g. 'all', '0,2,-1' or '4:8'"),
    ("99", "layer indices [99] out of range for"),
])
def test_explain_bad_layer_selection(refused, model_dir, photo, tmp_path, layers, says):
    refused("explain", photo, "--prompt", "caption en", "--model", model_dir,
            "-o", tmp_path / "heat.png", f"--layers={layers}", "--max-new-tokens", "2", says=says)


def test_segment_without_a_vae_is_explained(model_dir, photo):
    pg = PaliGemma.from_pretrained(model_dir)
    pg.vae = None
    with pytest.raises(ValueError, match="segment needs the segmentation VAE weights"):
        pg.segment(photo, "cat")


def test_debug_shows_the_traceback_then_the_line(model_dir, tmp_path, capsys):
    import paligemma.cli

    assert paligemma.cli.main(["caption", str(tmp_path / "x.jpg"), "--model", str(model_dir),
                               "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith(f"error: {tmp_path / 'x.jpg'}: no such file\n")


@pytest.mark.parametrize("bad", [torch.inf, -torch.inf, torch.nan])
def test_a_non_finite_logit_names_its_row(bad):
    logits = torch.randn(3, 1000)
    logits[1, 17] = bad
    with pytest.raises(NonFiniteLogits, match=r"step 4: the logits of batch row\(s\) \[1\]"):
        check_logits(logits, 4)


def test_opposite_infinities_in_one_row_are_caught():
    logits = torch.randn(2, 1000)
    logits[0, 3], logits[0, 9] = torch.inf, -torch.inf
    with pytest.raises(NonFiniteLogits, match=r"\[0\]"):
        check_logits(logits, 0)


def test_finite_logits_whose_sum_overflows_are_not_an_error():
    logits = torch.zeros(2, 1000)
    logits[:, :4] = 3e38
    check_logits(logits, 0)
