"""Quantized checkpoints of ours (`paligemma-convert --quantize`): written once through the
formats layer, loaded memory-mapped as stored, and every mismatch refused naming file and key."""

import functools
import json
import shutil
from pathlib import Path

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_api import cat_image, tiny_checkpoint

from convert.cli import main as convert
from paligemma.cli import main
from paligemma.formats import CheckpointError, load_pretrained, save_pretrained
from paligemma.quantize import quantize_

MODES = [("int8", None), ("int8-linear", None), ("int4", 32), ("int4-linear", 64)]


@functools.cache
def quantized(mode: str, group: int | None, root: Path) -> Path:
    out = root / mode
    argv = [str(tiny_checkpoint()), "-o", str(out), "--quantize", mode, "-q"]
    assert convert(argv + (["--group-size", str(group)] if group else [])) == 0
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("quantized")


@pytest.mark.parametrize(("mode", "group"), MODES)
def test_written_checkpoint_loads_as_quantizing_at_load(mode, group, root):
    directory = quantized(mode, group, root)
    config = json.loads((directory / "config.json").read_text())
    assert config["quantization"] == ({"mode": mode, "group_size": group} if group
                                      else {"mode": mode})
    loaded = load_pretrained(directory).state_dict()
    expected = quantize_(load_pretrained(tiny_checkpoint()), mode, group or 128).state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in loaded.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    packed = {t.dtype for t in loaded.values()} & {torch.int8, torch.uint8}
    assert packed == ({torch.uint8} if mode == "int4" else
                      {torch.int8, torch.uint8} if mode == "int4-linear" else {torch.int8})


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_quantized_tensors_stay_memory_mapped(root):
    directory = quantized("int8", None, root)
    model = load_pretrained(directory, quantize="int8")  # the recorded mode may be repeated
    weights = directory / "model.safetensors"
    maps = [line.split() for line in Path("/proc/self/maps").open() if str(weights) in line]
    spans = [tuple(int(a, 16) for a in line[0].split("-")) for line in maps]
    q = model.decoder.layers[0].mlp.up_proj
    for tensor in (q.weight, q.scale):
        assert any(lo <= tensor.data_ptr() < hi for lo, hi in spans)  # not a copy


def test_cli_runs_a_quantized_checkpoint(root, tmp_path, capsys):
    directory = quantized("int4", 32, root)
    image = tmp_path / "cat.png"
    PIL.Image.fromarray(cat_image()).save(image)
    tokenizer = tiny_checkpoint() / "tokenizer.model"  # the converter writes weights only
    assert main(["caption", str(image), "--model", str(directory), "--tokenizer", str(tokenizer),
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}:")


def copy_of(directory: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(directory, tmp_path / "copy"))


def test_a_tensor_of_the_wrong_dtype_is_refused(root, tmp_path):
    directory = copy_of(quantized("int4", 32, root), tmp_path)
    tensors = load_file(directory / "model.safetensors")
    tensors["decoder.layers.1.attn.q_proj.scale"] = tensors[
        "decoder.layers.1.attn.q_proj.scale"].bfloat16()
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: "
                       r"'decoder\.layers\.1\.attn\.q_proj\.scale' has dtype bfloat16, "
                       r"expected float32 .*config\.json records quantization"):
        load_pretrained(directory)


def test_a_packed_tensor_of_the_wrong_shape_is_refused(root, tmp_path):
    directory = copy_of(quantized("int4", 32, root), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["quantization"]["group_size"] = 64  # 32-wide layers: int8 [32, 32] under 64
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: '[^']+\.weight' has shape "
                       r"\[32, 16\], expected \[32, 32\]"):
        load_pretrained(directory)


def test_int8_tensors_without_a_quantization_record_are_refused(root, tmp_path):
    directory = copy_of(quantized("int8", None, root), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    del config["quantization"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has unsupported dtype I8"):
        load_pretrained(directory)


@pytest.mark.parametrize("record", [{"mode": "int3"}, {"mode": "int4"},
                                    {"mode": "int4", "group_size": 48},
                                    {"mode": "int8", "group_size": 32}, "int8"])
def test_a_bad_quantization_record_is_refused(record, root, tmp_path):
    directory = copy_of(quantized("int8", None, root), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["quantization"] = record
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json: invalid 'quantization'"):
        load_pretrained(directory)


def test_what_a_quantized_checkpoint_cannot_do(root, tmp_path):
    directory = quantized("int8", None, root)
    with pytest.raises(CheckpointError, match=r"already quantized \(int8\)"):
        load_pretrained(directory, quantize="int4")
    with pytest.raises(ValueError, match="save_pretrained writes unquantized models"):
        save_pretrained(load_pretrained(directory), tmp_path / "saved")


@pytest.mark.parametrize(("flags", "says"), [
    (["--to", "hf"], "a quantized checkpoint (int8) cannot be written --to hf"),
    (["--to", "npz"], "a quantized checkpoint (int8) cannot be written --to npz"),
    (["--quantize", "int4"], "--quantize cannot apply to an already quantized checkpoint"),
])
def test_converter_refuses_quantized_sources(flags, says, root, tmp_path, refused):
    refused(quantized("int8", None, root), "-o", tmp_path / "out", *flags, main=convert,
            says=says)


@pytest.mark.parametrize(("flags", "says"), [
    (["--quantize", "int8", "--group-size", "32"], "--group-size is for --quantize int4"),
    (["--quantize", "int4", "--to", "hf"], "--quantize writes our format"),
])
def test_converter_quantize_flags(flags, says, tmp_path, refused):
    refused(tiny_checkpoint(), "-o", tmp_path / "out", *flags, main=convert, says=says)
