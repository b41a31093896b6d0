"""Bad-input battery, model folders (`--model`, `--tokenizer`, `--vae`, `--device`): each
refused with one line naming the file, key or value, before any generation."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

GOLD = Path(__file__).parents[1] / "parity_tests" / "data"


@pytest.fixture
def broken(tmp_path, model_dir):
    """A copy of the tiny checkpoint to damage: broken(config=..., tensor=...) -> its folder."""

    def make(edit_config=None, edit_tensors=None) -> Path:
        copy = tmp_path / "model"
        shutil.copytree(model_dir, copy)
        if edit_config:
            config = json.loads((copy / "config.json").read_text())
            edit_config(config)
            (copy / "config.json").write_text(json.dumps(config))
        if edit_tensors:
            tensors = load_file(copy / "model.safetensors")
            edit_tensors(tensors)
            save_file(tensors, copy / "model.safetensors")
        return copy

    return make


def caption(refused, model, photo, *extra, says):
    return refused("caption", photo, "--model", model, *extra, says=says)


def test_no_such_folder(refused, photo, tmp_path):
    caption(refused, tmp_path / "pg2-3b", photo, says=f"{tmp_path / 'pg2-3b'}: no such model")


@pytest.mark.parametrize(("edit", "says"), [
    (lambda c: c["vision"].update(width="128"), "vision.width: expected an integer >= 1, "
     "got '128'"),
    (lambda c: c["vision"].update(image_size=-224), "vision.image_size: expected an "
     "integer >= 1, got -224"),
    (lambda c: c["text"].update(post_norms="yes"), "text.post_norms: expected true or false"),
    (lambda c: c["text"].update(rope_max_wavelength=0), "text.rope_max_wavelength: expected a "
     "number > 0, got 0"),
    (lambda c: c["text"].update(colour=1), "unknown text config fields ['colour']"),
    (lambda c: c.update(text=[1, 2]), "text: expected an object, got [1, 2]"),
    # config.json says VAE: the folder is checked as one, and its PaliGemma tensors do not fit.
    (lambda c: c.update(model_type="vae-oid"), "missing tensor(s) ['_vq_vae._embedding'"),
])
def test_config_values_are_checked_by_type_and_range(refused, broken, photo, edit, says):
    model = broken(edit_config=edit)
    caption(refused, model, photo, says=(str(model), says))


def test_config_not_json(refused, broken, photo):
    model = broken()
    (model / "config.json").write_text("{'width': 1")
    caption(refused, model, photo, says=f"{model / 'config.json'}: unreadable")


def test_transformers_folder_without_weights(refused, tmp_path, photo):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["PaliGemmaForConditional"
                                                 "Generation"], "text_config": {}}))
    (hf / "tokenizer.model").write_bytes(b"")
    caption(refused, hf, photo, says=f"{hf}: no model.safetensors or model.safetensors.index.json")


def test_missing_tokenizer(refused, broken, photo):
    model = broken()
    (model / "tokenizer.model").unlink()
    caption(refused, model, photo, says=f"{model}: no tokenizer.model or paligemma_tokenizer"
            ".model; pass the tokenizer file (--tokenizer)")


def test_truncated_weights(refused, broken, photo):
    model = broken()
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[:100])
    caption(refused, model, photo, says=f"{model / 'model.safetensors'}: not a readable "
            "safetensors file")


def test_missing_tensor(refused, broken, photo):
    model = broken(edit_tensors=lambda t: t.pop("projector.weight"))
    caption(refused, model, photo, says=f"{model}: missing tensor(s) ['projector.weight']")


def test_nan_weights_are_refused_at_load(refused, broken, photo):
    def poison(tensors):
        tensors["projector.weight"][1, 2] = torch.nan
    model = broken(edit_tensors=poison)
    caption(refused, model, photo, says=f"{model / 'model.safetensors'}: 'projector.weight' has "
            "nan at index [1, 2]")


def test_nan_weights_are_refused_by_the_int8_loader_too(refused, broken, photo):
    def poison(tensors):
        tensors["projector.weight"][0, 0] = torch.inf
    model = broken(edit_tensors=poison)
    caption(refused, model, photo, "--quantize", "int8", says="'projector.weight' has inf")


def test_wrong_tokenizer(refused, model_dir, photo):
    from test_tokenizer import gold_tokenizer
    caption(refused, model_dir, photo, "--tokenizer", gold_tokenizer(),
            says="ids but the model's vocabulary has")


@pytest.mark.parametrize(("device", "says"), [
    ("cuda", "--device cuda: no cuda device on this machine; use --device cpu"),
    ("gpu0", "--device 'gpu0': not a torch device"),
])
def test_unavailable_or_malformed_device(refused, model_dir, photo, device, says):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    caption(refused, model_dir, photo, "--device", device, says=says)


def test_paligemma_npz_given_as_vae(refused, model_dir, photo):
    refused("segment", photo, "--object", "cat", "--model", model_dir,
            "--vae", GOLD / "pg1_tiny_bf16" / "params.npz",
            says="no '_vq_vae._embedding' key, not the segmentation VAE")


def test_missing_vae(refused, model_dir, photo, tmp_path):
    refused("segment", photo, "--object", "cat", "--model", model_dir,
            "--vae", tmp_path / "vae-oid.npz", says="no such VAE file or directory")


def test_nan_in_the_vae_is_refused(refused, model_dir, photo, tmp_path):
    import numpy as np

    with np.load(GOLD / "seg_vae" / "params.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays["decoder.0.bias"][3] = np.nan
    np.savez(tmp_path / "vae.npz", **arrays)
    refused("segment", photo, "--object", "cat", "--model", model_dir, "--vae",
            tmp_path / "vae.npz", says=f"{tmp_path / 'vae.npz'}: 'decoder.0.bias' has nan at "
            "index [3]")
