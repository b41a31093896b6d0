"""int8 loading paths, the quantization record and the `--quantize` CLI flag (numerics:
tests/test_perf_paths.py)."""

import gc
from pathlib import Path

import PIL.Image
import pytest
import torch
from test_api import cat_image, tiny_checkpoint

from paligemma import int4
from paligemma.cli import main
from paligemma.formats import load_pretrained
from paligemma.layers import Linear
from paligemma.quantize import Quantization, quantize_


@pytest.mark.parametrize("mode", ["int8", "int8-linear"])
def test_load_quantized_equals_quantizing_the_loaded_model(mode):
    directory = tiny_checkpoint()
    streamed = load_pretrained(directory, quantize=mode).state_dict()
    in_place = quantize_(load_pretrained(directory), mode).state_dict()
    assert streamed.keys() == in_place.keys()
    assert any(name.endswith(".scale") and name.startswith("decoder.layers") for name in streamed)
    for name, tensor in streamed.items():
        assert tensor.dtype == in_place[name].dtype and torch.equal(tensor, in_place[name]), name


def test_int8_linear_keeps_the_tied_embedding_as_stored():
    directory = tiny_checkpoint()
    stored = load_pretrained(directory).decoder.embedder.weight
    model = load_pretrained(directory, quantize="int8-linear")
    assert model.decoder.embedder.scale is None
    assert torch.equal(model.decoder.embedder.weight, stored)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight.dtype == torch.int8 for m in linears)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="int8-linear"):
        load_pretrained(tiny_checkpoint(), quantize="int3")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_quantize_unmaps_the_checkpoint_file():
    directory = tiny_checkpoint()

    def mapped() -> bool:
        return any(str(directory) in line for line in Path("/proc/self/maps").open())

    model = load_pretrained(directory)
    assert mapped()  # load_pretrained memory-maps the safetensors file
    quantize_(model)
    gc.collect()
    assert not mapped()  # the float parameters left were copied, the mapping is gone


def test_cli_quantize_flag(capsys, tmp_path):
    image = tmp_path / "cat.png"
    PIL.Image.fromarray(cat_image()).save(image)
    code = main(["caption", str(image), "--model", str(tiny_checkpoint()), "--quantize", "int8",
                 "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 0 and err == "" and out.startswith(f"{image}:")


def test_the_record_carries_the_int4_layout():
    assert int4.LAYOUT == 2
    new = Quantization("int4", 32)
    assert new.int4_layout == int4.LAYOUT
    assert new.to_dict() == {"mode": "int4", "group_size": 32, "int4_layout": 2}
    assert Quantization.from_dict(new.to_dict()) == new
    # Checkpoints written before the layout was recorded are layout 1.
    old = Quantization.from_dict({"mode": "int4-linear", "group_size": 64})
    assert old == Quantization("int4-linear", 64, int4_layout=1)
    assert old.to_dict() == {"mode": "int4-linear", "group_size": 64, "int4_layout": 1}
    assert Quantization("int8").to_dict() == {"mode": "int8"}  # int8 has no layout to record


@pytest.mark.parametrize(("record", "says"), [
    ({"mode": "int4", "group_size": 32, "int4_layout": 3},
     r"int4_layout must be one of \(1, 2\), got 3"),
    ({"mode": "int4", "group_size": 32, "int4_layout": 0}, "int4_layout must be one of"),
    ({"mode": "int4", "group_size": 32, "int4_layout": "2"},
     r"int4_layout must be one of \(1, 2\), got '2'"),
    ({"mode": "int4", "group_size": 32, "int4_layout": True}, "int4_layout must be one of"),
    ({"mode": "int4", "group_size": 32, "int4_layout": None}, "int4_layout must be one of"),
    ({"mode": "int8", "int4_layout": 2}, "int4_layout is for int4 modes, not int8"),
    ({"mode": "int8-linear", "int4_layout": 1}, "int4_layout is for int4 modes, not int8-linear"),
    ({"mode": "int4", "group_size": 32, "layout": 2}, "expected"),
])
def test_a_bad_int4_layout_is_refused(record, says):
    with pytest.raises(ValueError, match=says):
        Quantization.from_dict(record)


def test_quantization_refuses_an_unknown_int4_layout():
    with pytest.raises(ValueError, match=r"int4_layout must be one of \(1, 2\), got 3"):
        Quantization("int4", 128, 3)
