"""The PyTorch mask VAE decoder against big_vision's (parity_tests/data/seg_vae)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from paligemma.parity import VAE_STAGES, vae_stage_outputs
from paligemma.segmentation import load_mask_decoder

CASE = Path(__file__).parents[1] / "parity_tests" / "data" / "seg_vae"
ATOL = 1e-4  # f32 convolutions in a different order; measured 6e-6


@pytest.fixture(scope="module")
def gold() -> dict[str, np.ndarray]:
    with np.load(CASE / "vectors.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def decoder():
    return load_mask_decoder(CASE / "params.npz")


def test_parameter_names_are_the_official_keys(decoder):
    with np.load(CASE / "params.npz") as f:
        assert sorted(decoder.state_dict()) == sorted(f.files)


def test_masks_match_big_vision(decoder, gold):
    with torch.no_grad():
        masks = decoder(torch.from_numpy(gold["codes"]).long())
    np.testing.assert_allclose(masks.numpy(), gold["masks"][..., 0], atol=ATOL, rtol=0)


def test_every_decoder_stage_matches(decoder, gold):
    seen = vae_stage_outputs(decoder, torch.from_numpy(gold["codes"][:1]).long())
    for name in VAE_STAGES:
        np.testing.assert_allclose(seen[name].numpy(), gold[f"ex0_out_{name}"], atol=ATOL,
                                   rtol=0, err_msg=name)


def test_converted_directory_loads_the_same(decoder, gold, tmp_path):
    save_file({k: v.contiguous() for k, v in decoder.state_dict().items()},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vae-oid"}))
    codes = torch.from_numpy(gold["codes"]).long()
    with torch.no_grad():
        torch.testing.assert_close(load_mask_decoder(tmp_path)(codes), decoder(codes),
                                   atol=0, rtol=0)


def test_wrong_files_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_mask_decoder(tmp_path / "missing.npz")
    other = tmp_path / "other.npz"
    np.savez(other, w=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="not the segmentation VAE"):
        load_mask_decoder(other)
