"""Bad input: each case exits non-zero with one clear line and leaves nothing behind."""

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import paligemma.formats.mapping
import paligemma.formats.open
import paligemma.formats.ours
from convert.cli import main
from paligemma.config import PaliGemmaConfig
from paligemma.formats.errors import CheckpointError
from paligemma.formats.ours import check_finite

GOLD = Path(__file__).parents[1] / "parity_tests" / "data"
CONFIGS = Path(__file__).parent / "data" / "configs"
PG1, PG1_BF16, PG2 = (GOLD / c / "params.npz" for c in ("pg1_tiny", "pg1_tiny_bf16", "pg2_tiny"))
PG1_CONFIG = ("--config", CONFIGS / "pg1_tiny.json")


@pytest.fixture
def fails(tmp_path, capsys):
    """Runs the CLI expecting failure; returns its one-line message. Checks OUT was not made."""

    def run(*args: str | Path, out: Path | None = None) -> str:
        out = out or tmp_path / "out"
        before = sorted(p.name for p in out.parent.iterdir())
        assert main([*map(str, args), "-o", str(out), "-q"]) != 0
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert sorted(p.name for p in out.parent.iterdir()) == before  # no output, no temporaries
        return err

    return run


def gold_arrays(path: Path = PG1) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_missing_file(fails, tmp_path):
    assert f"{tmp_path / 'nope.npz'}: no such file" in fails(tmp_path / "nope.npz", *PG1_CONFIG)


def test_not_a_zip(fails, tmp_path):
    (tmp_path / "params.npz").write_text("not a checkpoint")
    err = fails(tmp_path / "params.npz", *PG1_CONFIG)
    assert f"{tmp_path / 'params.npz'}: not an .npz (zip) file" in err


def test_truncated_archive(fails, tmp_path):
    data = PG1.read_bytes()
    (tmp_path / "params.npz").write_bytes(data[: len(data) // 2])
    err = fails(tmp_path / "params.npz", *PG1_CONFIG)
    assert f"{tmp_path / 'params.npz'}: truncated or corrupt .npz (zip) archive" in err


def test_object_array_is_refused_without_unpickling(fails, tmp_path):
    arrays = gold_arrays()
    arrays["params/llm/final_norm/scale"] = np.array([{"x": 1}], dtype=object)
    np.savez(tmp_path / "params.npz", **arrays)
    err = fails(tmp_path / "params.npz", *PG1_CONFIG)
    assert "'llm/final_norm/scale' is an object (pickled) array" in err
    assert str(tmp_path / "params.npz") in err


def test_missing_key(fails, tmp_path):
    arrays = gold_arrays()
    del arrays["params/llm/final_norm/scale"]
    np.savez(tmp_path / "params.npz", **arrays)
    assert "missing key(s) ['llm/final_norm/scale']" in fails(tmp_path / "params.npz", *PG1_CONFIG)


def test_unexpected_key(fails, tmp_path):
    np.savez(tmp_path / "params.npz", **gold_arrays(), **{"params/llm/extra": np.zeros(3, "f4")})
    assert "unexpected key(s) ['llm/extra']" in fails(tmp_path / "params.npz", *PG1_CONFIG)


def test_wrong_shape(fails, tmp_path):
    arrays = gold_arrays()
    arrays["params/llm/final_norm/scale"] = np.zeros(95, "f4")
    np.savez(tmp_path / "params.npz", **arrays)
    err = fails(tmp_path / "params.npz", *PG1_CONFIG)
    assert f"{tmp_path / 'params.npz'}: 'llm/final_norm/scale' has shape [95], expected [96]" in err


def test_unsupported_dtype(fails, tmp_path):
    arrays = gold_arrays()
    arrays["params/llm/final_norm/scale"] = arrays["params/llm/final_norm/scale"].astype("f8")
    np.savez(tmp_path / "params.npz", **arrays)
    err = fails(tmp_path / "params.npz", *PG1_CONFIG)
    assert "'llm/final_norm/scale' has unsupported dtype '<f8'" in err


def split(src: Path, dst: Path) -> list[Path]:
    """Writes src's img/ and llm/ arrays as two parts."""
    arrays = gold_arrays(src)
    for part in ("img", "llm"):
        np.savez(dst / f"{part}.npz", **{k: v for k, v in arrays.items() if f"/{part}/" in k})
    return [dst / "img.npz", dst / "llm.npz"]


def test_parts_of_checkpoints_in_different_dtypes(fails, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    img, _ = split(PG1, tmp_path / "a")  # float32
    _, llm = split(PG1_BF16, tmp_path / "b")  # bfloat16
    err = fails(img, llm, *PG1_CONFIG)
    assert f"{img} (float32), {llm} (bfloat16) are stored in different dtypes" in err


def test_parts_of_checkpoints_of_different_sizes(fails, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    img, _ = split(PG1, tmp_path / "a")
    _, llm = split(PG2, tmp_path / "b")  # Gemma 2 decoder: more layers, post norms
    err = fails(img, llm, *PG1_CONFIG)
    assert "unexpected key(s) ['llm/layers/post_attention_norm/scale'" in err


def test_the_same_part_twice(fails):
    assert f"{PG1}: key 'img/Transformer/encoder_norm/bias' is also in {PG1}" in fails(
        PG1, PG1, *PG1_CONFIG
    )


def test_byte_split_parts_out_of_order(fails, tmp_path):
    data = PG1.read_bytes()
    (tmp_path / "p0").write_bytes(data[: len(data) // 2])
    (tmp_path / "p1").write_bytes(data[len(data) // 2 :])
    err = fails(tmp_path / "p1", tmp_path / "p0", *PG1_CONFIG)
    assert f"{tmp_path / 'p1'}: truncated .npz (zip) archive: it holds the end of a split" in err
    assert "not the byte-split parts of one .npz either (parts must be given in order" in err


def test_nan_is_refused_by_default_naming_key_and_index(fails, tmp_path):
    arrays = gold_arrays()
    arrays["params/llm/layers/mlp/linear"][2, 5, 7] = np.nan  # layer 2 of the stack
    np.savez(tmp_path / "params.npz", **arrays)
    err = fails(tmp_path / "params.npz", *PG1_CONFIG)
    assert "'llm/layers/mlp/linear' has nan at index [2, 5, 7]: the checkpoint holds NaN" in err


def test_inf_in_a_chunked_array_with_check_finite(fails, tmp_path):
    arrays = gold_arrays(PG1_BF16)
    embedding = arrays["params/llm/embedder/input_embedding"]
    embedding.view(np.uint16)[300, 4] = 0x7F80  # bf16 +inf
    np.savez(tmp_path / "params.npz", **arrays)
    err = fails(
        tmp_path / "params.npz", "--config", CONFIGS / "pg1_tiny_bf16.json", "--check-finite"
    )
    assert "'llm/embedder/input_embedding' has inf at index [300, 4]" in err


def test_nan_is_converted_with_no_check_finite(tmp_path):
    arrays = gold_arrays()
    arrays["params/llm/layers/mlp/linear"][2, 5, 7] = np.nan
    np.savez(tmp_path / "params.npz", **arrays)
    argv = [str(tmp_path / "params.npz"), "--config", str(CONFIGS / "pg1_tiny.json")]
    assert main([*argv, "-o", str(tmp_path / "out"), "-q", "--no-check-finite"]) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_check_finite_finds_each_nan_and_inf_in_each_float_dtype(dtype):
    for bad, shown in ((torch.nan, "nan"), (torch.inf, "inf"), (-torch.inf, "-inf")):
        t = torch.randn(64, 33).to(dtype)
        t[40, 17] = bad
        with pytest.raises(CheckpointError, match=rf"'w' has {shown} at index \[50, 17\]"):
            check_finite(t, "'w'", row_offset=10)
    t[40, 17], t[3, 3] = torch.inf, -torch.inf  # their sum is NaN: still found, the first one
    with pytest.raises(CheckpointError, match=r"has -inf at index \[3, 3\]"):
        check_finite(t, "'w'")


def test_check_finite_passes_finite_weights_whose_sum_overflows():
    # The fast test sums in the stored dtype: 60000 * 4 overflows float16, which must send the
    # check to the exact scan, not refuse the tensor.
    check_finite(torch.full((4,), 60000.0, dtype=torch.float16), "'w'")
    check_finite(torch.full((4,), 3e38).to(torch.bfloat16), "'w'")


def test_unknown_variant_name(fails):
    err = fails(PG1, "--variant", "pg3-1b-224")
    assert "unknown variant 'pg3-1b-224'; known: pg1-3b-224, " in err and "vae-oid" in err


def test_undetectable_variant_names_the_closest_and_why(fails, monkeypatch):
    tiny = {"pg1_tiny": PaliGemmaConfig.load(CONFIGS / "pg1_tiny.json")}
    monkeypatch.setattr(paligemma.formats.mapping, "VARIANTS", tiny)
    monkeypatch.setattr(paligemma.formats.open, "VARIANTS", tiny)
    err = fails(PG2)  # no --variant / --config
    assert "cannot detect the variant from the shapes (candidates: none)" in err
    assert "closest official variant pg1_tiny:" in err


def test_bad_config_file(fails, tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    err = fails(PG1, "--config", tmp_path / "config.json")
    assert f"{tmp_path / 'config.json'}: not a usable config file" in err


def test_disk_full_leaves_nothing(fails, monkeypatch):
    def no_space(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(paligemma.formats.ours.os, "pwrite", no_space)
    err = fails(PG1, *PG1_CONFIG)
    assert "model.safetensors: cannot write the header: No space left on device" in err


def test_disk_full_mid_way_keeps_the_previous_output(fails, tmp_path, monkeypatch):
    pwrite, calls = paligemma.formats.ours.os.pwrite, []

    def fills_up(fd, data, offset):
        calls.append(offset)
        if len(calls) > 10:  # the header and a few tensors made it
            raise OSError(errno.ENOSPC, "No space left on device")
        return pwrite(fd, data, offset)

    assert main([str(PG1), *map(str, PG1_CONFIG), "-o", str(tmp_path / "out"), "-q"]) == 0
    (tmp_path / "out" / "previous.txt").write_text("kept")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    monkeypatch.setattr(paligemma.formats.ours.os, "pwrite", fills_up)
    err = fails(PG1, *PG1_CONFIG, "--force")
    assert "cannot write 'vision.blocks." in err and "No space left on device" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


def test_existing_output_is_refused_without_force(fails, tmp_path):
    (tmp_path / "out").mkdir()
    assert f"{tmp_path / 'out'}: already exists (use --force" in fails(PG1, *PG1_CONFIG)


def test_to_npz_needs_a_converted_directory(fails):
    assert "--to npz reads a converted directory" in fails(PG1, *PG1_CONFIG, "--to", "npz")


def test_corrupt_converted_directory(fails, tmp_path):
    ours = tmp_path / "ours"
    assert main([str(PG1), *map(str, PG1_CONFIG), "-o", str(ours), "-q"]) == 0
    data = (ours / "model.safetensors").read_bytes()
    (ours / "model.safetensors").write_bytes(data[:1000])
    err = fails(ours, out=tmp_path / "back.npz")
    assert f"{ours / 'model.safetensors'}: not a readable safetensors file" in err


def test_converted_directory_with_a_missing_tensor(fails, tmp_path):
    ours = tmp_path / "ours"
    assert main([str(PG1), *map(str, PG1_CONFIG), "-o", str(ours), "-q"]) == 0
    config = json.loads((ours / "config.json").read_text())
    config["text"]["depth"] = 4  # the weights have 3 layers
    (ours / "config.json").write_text(json.dumps(config))
    err = fails(ours, out=tmp_path / "back.npz")
    assert f"{ours}: missing tensor(s) ['decoder.layers.3." in err


def test_vae_has_no_hf_export(fails):
    assert "vae-oid has no transformers equivalent" in fails(
        GOLD / "seg_vae" / "params.npz", "--to", "hf"
    )


def test_vae_with_a_wrong_shape(fails, tmp_path):
    shutil.copy(GOLD / "seg_vae" / "params.npz", tmp_path / "vae.npz")
    arrays = gold_arrays(tmp_path / "vae.npz")
    arrays["decoder.0.bias"] = np.zeros(127, "f4")
    np.savez(tmp_path / "vae.npz", **arrays)
    err = fails(tmp_path / "vae.npz", "--variant", "vae-oid")
    assert f"{tmp_path / 'vae.npz'}: 'decoder.0.bias' has shape [127], expected [128]" in err
