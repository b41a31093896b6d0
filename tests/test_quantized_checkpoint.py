"""Quantized checkpoints of ours (`paligemma-convert --quantize`): written once through the
formats layer, loaded memory-mapped as stored, and every mismatch refused naming file and key."""

import functools
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_api import cat_image, tiny_checkpoint

from convert.cli import main as convert
from paligemma import int4
from paligemma.cli import main
from paligemma.formats import (
    CheckpointError,
    load_model,
    load_pretrained,
    open_checkpoint,
    save_pretrained,
    write_ours,
)
from paligemma.quantize import Quantization, quantize_

MODES = [("int8", None), ("int8-linear", None), ("int4", 32), ("int4-linear", 64)]


@functools.cache
def quantized(mode: str, group: int | None, root: Path) -> Path:
    out = root / (f"{mode}-{group}" if group else mode)
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
    assert config["quantization"] == ({"mode": mode, "group_size": group, "int4_layout": 2}
                                      if group else {"mode": mode})
    loaded = load_pretrained(directory).state_dict()
    expected = quantize_(load_pretrained(tiny_checkpoint()), mode, group or 128).state_dict()
    assert loaded.keys() == expected.keys()
    for name, tensor in loaded.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    packed = {t.dtype for t in loaded.values()} & {torch.int8, torch.uint8}
    # int4: the embedding's 1400 rows are not whole blocks of 16 (int8); int4-linear at 64:
    # the 32-wide layers are not whole groups (int8).
    assert packed == ({torch.int8, torch.uint8} if mode.startswith("int4") else {torch.int8})
    if mode == "int4":
        assert loaded["decoder.embedder.weight"].dtype == torch.int8


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
                                    {"mode": "int8", "group_size": 32}, "int8",
                                    {"mode": "int4", "group_size": 32, "int4_layout": 3},
                                    {"mode": "int8", "int4_layout": 2}])
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


# ---------------------------------------------------------------------------------------------
# The first int4 layout (checkpoints written before "int4_layout" was recorded)


def to_layout_1(weight: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed int4 matrix as the first layout stored it (the inverse of int4.from_layout_1):
    rows one after another, per run of 32 columns byte j = column j | column j + 16 << 4, and
    (scale, offset) by row."""
    codes = int4.unpack(weight)
    n, k = codes.shape
    runs = codes.view(n, k // 32, 2, 16)
    return (runs[:, :, 0] | runs[:, :, 1] << 4).reshape(n, k // 2), int4.row_scales(scale)


def layout_1_int4(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 of any height in the first layout (rows quantize independently: padded to whole
    blocks, quantized, the padding dropped)."""
    n = weight.shape[0]
    padded = torch.cat([weight, weight.new_zeros(-n % int4.BLOCK_ROWS, weight.shape[1])])
    packed, scale = to_layout_1(*int4.quantize_int4(padded, group))
    return packed[:n], scale[:n]


def as_layout_1(directory: Path, out: Path) -> Path:
    """A copy of a checkpoint written now, as the first int4 layout wrote it."""
    out = Path(shutil.copytree(directory, out))
    tensors = load_file(out / "model.safetensors")
    for name, tensor in list(tensors.items()):
        if tensor.dtype == torch.uint8:
            scale = name.removesuffix(".weight") + ".scale"
            tensors[name], tensors[scale] = to_layout_1(tensor, tensors[scale])
    save_file(tensors, out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    del config["quantization"]["int4_layout"]
    (out / "config.json").write_text(json.dumps(config))
    return out


def logits(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 28, 28, generator=generator) * 2 - 1
    tokens = torch.randint(0, model.config.text.vocab_size, (2, 5), generator=generator)
    with torch.no_grad():
        return model(images, tokens, torch.zeros_like(tokens))


def test_to_layout_1_inverts_from_layout_1():
    weight, scale = int4.quantize_int4(torch.randn(32, 64, generator=torch.Generator()
                                                   .manual_seed(0)), 32)
    old_weight, old_scale = to_layout_1(weight, scale)
    assert not torch.equal(old_weight, weight) and not torch.equal(old_scale, scale)
    new_weight, new_scale = int4.from_layout_1(old_weight, old_scale)
    assert torch.equal(new_weight, weight) and torch.equal(new_scale, scale)


# int4-linear at 32: every Linear packed; at 64 the 32-wide ones are int8, unchanged by layouts.
@pytest.mark.parametrize(("mode", "group"), [("int4-linear", 32), ("int4-linear", 64)])
@pytest.mark.parametrize("order", ["stored", "reversed"])  # scale after / before its weight
def test_a_layout_1_checkpoint_loads_converted(mode, group, order, root, tmp_path, caplog):
    current = quantized(mode, group, root)
    old = as_layout_1(current, tmp_path / "old")
    assert load_file(old / "model.safetensors").keys() == load_file(
        current / "model.safetensors").keys()
    source = open_checkpoint(old)
    assert source.quantization == Quantization(mode, group, int4_layout=1)
    if order == "reversed":
        source.specs = dict(reversed(source.specs.items()))
    with caplog.at_level(logging.WARNING, logger="paligemma"):
        model = load_model(source)
    warnings = [r.getMessage() for r in caplog.records if r.name == "paligemma"]
    assert len(warnings) == 1 and "first int4 layout" in warnings[0], warnings
    assert "converted in memory on every load" in warnings[0]
    assert "paligemma-convert" in warnings[0] and "--quantize" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="paligemma"):
        expected = load_pretrained(current)
    assert not caplog.records  # the current layout loads without a word
    state, want = model.state_dict(), expected.state_dict()
    assert state.keys() == want.keys()
    assert any(t.dtype == torch.uint8 for t in state.values())
    for name, tensor in state.items():
        assert tensor.dtype == want[name].dtype and torch.equal(tensor, want[name]), name
    assert torch.equal(logits(model), logits(expected))


def test_a_layout_1_matrix_of_rows_not_in_blocks_is_refused(root, tmp_path):
    # The first layout packed the int4 embedding's 1400 rows (no blocks then); now it is int8.
    old = as_layout_1(quantized("int4", 32, root), tmp_path / "old")
    tensors = load_file(old / "model.safetensors")
    embedding = load_file(tiny_checkpoint() / "model.safetensors")["decoder.embedder.weight"]
    tensors["decoder.embedder.weight"], tensors["decoder.embedder.scale"] = layout_1_int4(
        embedding, 32)
    save_file(tensors, old / "model.safetensors")
    with pytest.raises(CheckpointError, match=(
            r"model\.safetensors: 'decoder\.embedder\.weight' is packed int4 with N = 1400 "
            r"rows, not a multiple of 16: the checkpoint was written with the first int4 "
            r"layout .* cannot be converted .* re-quantize from the unquantized checkpoint "
            r"with paligemma-convert SRC -o OUT --quantize int4")):
        load_pretrained(old)


def in_pieces(t: torch.Tensor, heights: tuple[int, ...] = (5, 16, 27)) -> Iterator[torch.Tensor]:
    """t along axis 0 in pieces of `heights` in turn (the last one: what is left)."""
    start = 0
    for i in range(len(t)):
        if start >= len(t):
            return
        yield t[start : start + heights[i % len(heights)]]
        start += heights[i % len(heights)]


@pytest.mark.parametrize(("mode", "group"), [("int4", 32), ("int4-linear", 64), ("int8", None)])
def test_source_pieces_of_any_height_write_as_one_piece(mode, group, root, tmp_path,
                                                        monkeypatch):
    source = open_checkpoint(tiny_checkpoint())
    whole = source.tensors

    def tensors(progress):
        for name, chunks in whole(progress):
            tensor = torch.cat(list(chunks))
            yield name, in_pieces(tensor) if tensor.dim() else iter([tensor])

    heights = []
    quantize_int4 = int4.quantize_int4

    def spy(weight, group_size):
        heights.append(weight.shape[0])
        return quantize_int4(weight, group_size)

    monkeypatch.setattr(source, "tensors", tensors)
    monkeypatch.setattr(int4, "quantize_int4", spy)
    out = tmp_path / "out"
    write_ours(source, out, quiet=True, quantization=Quantization(mode, group or 128))
    written = load_file(out / "model.safetensors")
    expected = load_file(quantized(mode, group, root) / "model.safetensors")
    assert written.keys() == expected.keys()
    for name, tensor in written.items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    # int4 pieces are whole blocks, never more than a source piece (memory stays bounded).
    assert all(h % int4.BLOCK_ROWS == 0 and 0 < h <= 27 for h in heights), heights
    assert (16 in heights) == mode.startswith("int4")  # leftovers completed from the next piece


def test_the_writer_writes_only_the_current_int4_layout(tmp_path):
    with pytest.raises(ValueError, match="written in int4 layout 2, not 1"):
        write_ours(open_checkpoint(tiny_checkpoint()), tmp_path / "out", quiet=True,
                   quantization=Quantization("int4", 32, int4_layout=1))
    assert not (tmp_path / "out").exists()
