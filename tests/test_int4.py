"""int4 weights (paligemma/int4.py): the packed layout, quantization error, and every matmul
path (C++ kernel, dequantizing GEMM, PyTorch fallback) against a float64 reference. No timings."""

import pytest
import torch

from paligemma import dispatch, int4, layers
from paligemma.demo.command import DEMO_MODEL
from paligemma.formats import load_model, open_checkpoint
from paligemma.layers import Embedding, Linear, dequantize, linear
from paligemma.quantize import quantize_, quantize_weight


@pytest.fixture(params=["kernel", "pytorch"])
def path(request, monkeypatch):
    """Runs a test with the C++ kernels (where they build here: decode and dequantization) and
    with PyTorch ops only."""
    if request.param == "kernel":
        if not dispatch.plan().kernel:
            pytest.skip("the C++ kernels do not build on this machine")
    else:
        monkeypatch.setenv("PALIGEMMA_DISABLE", "kernel")
        dispatch.replan()
    yield request.param
    monkeypatch.undo()
    dispatch.replan()


def test_layout_puts_the_words_of_16_rows_side_by_side():
    seed = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (32, 24), dtype=torch.uint8, generator=seed)
    packed = int4.pack(codes)
    assert packed.shape == (32, 12)
    flat = packed.view(-1)
    for n in range(32):
        block, r = divmod(n, 16)
        for c in range(3):  # word c: columns 8c .. 8c + 7
            for j in range(4):
                byte = int(flat[block * 16 * 12 + 64 * c + 4 * r + j])
                assert byte & 15 == int(codes[n, 8 * c + 2 * j])
                assert byte >> 4 == int(codes[n, 8 * c + 2 * j + 1])
    assert torch.equal(int4.unpack(packed), codes)


def test_scales_come_in_the_same_blocks():
    by_row = torch.randn(32, 3, 2)
    blocked = int4.block_scales(by_row).view(2, 3, 2, 16)  # [block, group, scale/offset, row]
    for n in range(32):
        for g in range(3):
            for i in range(2):
                assert blocked[n // 16, g, i, n % 16] == by_row[n, g, i]
    assert torch.equal(int4.row_scales(int4.block_scales(by_row)), by_row)


def test_rows_reads_single_rows_of_the_blocks():
    packed, scale = int4.quantize_int4(torch.randn(48, 64), 32)
    index = torch.tensor([0, 17, 47, 17, 5])
    codes, pairs = int4.rows(packed, scale, index)
    assert torch.equal(codes, int4.unpack(packed)[index])
    assert torch.equal(pairs, int4.row_scales(scale)[index])


def test_the_first_layout_converts_to_the_same_codes_and_scales():
    seed = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8, generator=seed)
    by_row = torch.rand(32, 2, 2)
    runs = codes.view(32, 2, 2, 16)  # layout 1: per run of 32 columns, byte j = j | (j + 16) << 4
    layout_1 = (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(32, 32)
    packed, scale = int4.from_layout_1(layout_1, by_row)
    assert torch.equal(int4.unpack(packed), codes)
    assert torch.equal(int4.row_scales(scale), by_row)


@pytest.mark.parametrize("group", int4.GROUP_SIZES)
def test_quantization_error_is_half_a_step(group, path):
    torch.manual_seed(0)
    w = torch.randn(48, 512) * torch.rand(48, 1) * 3
    w[0, :group] = 0.25  # a constant group: exact
    packed, scale = int4.quantize_int4(w.bfloat16(), group)
    assert packed.shape == (48, 256) and scale.shape == (48, 512 // group, 2)
    restored = int4.dequantize(packed, scale)
    step = int4.row_scales(scale)[..., 0].repeat_interleave(group, 1)
    assert ((restored - w.bfloat16().float()).abs() <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert torch.equal(restored[0, :group], w[0, :group])


def reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 x @ W.T, W dequantized from the codes independently of int4.dequantize."""
    groups, by_row = scale.shape[1], int4.row_scales(scale).double()
    q = int4.unpack(packed).double().view(packed.shape[0], groups, -1)
    w = (q * by_row[..., :1] + by_row[..., 1:]).view(packed.shape[0], -1)
    return x.double() @ w.T


def x_rounding_bound(x, packed, scale):
    """How far the decode kernel's x @ w.T may be from float64's: it rounds x [M, K] to int8
    steps of its group's largest |x| / 127, each element by at most half a step, and each
    product carries that times |w| -> [M, N] (plus 0.1% for the f32 sums)."""
    w = dequantize(packed, scale).double()
    group = w.shape[1] // scale.shape[1]
    w_sums = w.abs().view(w.shape[0], -1, group).sum(-1)  # [N, groups]
    half_steps = x.double().abs().view(x.shape[0], -1, group).amax(-1) / 127 / 2  # [M, groups]
    return half_steps @ w_sums.T * 1.001


@pytest.mark.parametrize("rows", [1, 3, 4, 8, 9, 40])
def test_linear_matches_float64(rows, path):
    torch.manual_seed(rows)
    packed, scale = int4.quantize_int4(torch.randn(80, 256), 64)
    x, bias = torch.randn(2, rows, 256), torch.randn(80)
    y = linear(x, packed, bias, scale)
    expected = reference(x.view(-1, 256), packed, scale).view(2, rows, 80) + bias.double()
    assert y.dtype == torch.float32 and y.shape == (2, rows, 80)
    error = (y.double() - expected).abs()
    f32_sums = 2e-5 * expected.abs().max()
    if path == "kernel" and 2 * rows <= int4.GEMV_MAX_ROWS:
        bound = x_rounding_bound(x.view(-1, 256), packed, scale).view(2, rows, 80)
        assert (error <= bound + f32_sums).all()
        return
    # The int8 tiles ("amx-int8") round x to int16 steps per row (2^-16 of its largest |x|);
    # the other GEMM paths are f32 throughout.
    tiles = dispatch.plan().paths[torch.uint8, False]
    tolerance = 2e-4 if path == "kernel" and tiles == "amx-int8" else 2e-5
    assert error.max() <= tolerance * expected.abs().max()


def test_dequantizing_gemm_takes_whole_blocks_across_pieces(path, monkeypatch):
    """Pieces of 3 rows' worth of f32 are rounded up to one block of 16: 80 rows, 5 pieces."""
    monkeypatch.setattr(layers, "CHUNK_BYTES", 3 * 4 * 128)
    torch.manual_seed(0)
    packed, scale = int4.quantize_int4(torch.randn(80, 128), 32)
    x = torch.randn(int4.GEMV_MAX_ROWS + 1, 128)
    expected = reference(x, packed, scale)
    error = (linear(x, packed, None, scale).double() - expected).abs().max()
    assert error <= 2e-5 * expected.abs().max()


def test_gradients_flow_through_the_dequantized_weights():
    packed, scale = int4.quantize_int4(torch.randn(32, 64), 32)
    x = torch.randn(3, 64, requires_grad=True)
    linear(x, packed, None, scale).sum().backward()
    assert torch.allclose(x.grad, dequantize(packed, scale).sum(0).expand(3, -1), atol=1e-5)


def test_embedding_rows_and_tied_output(path):
    torch.manual_seed(0)
    table = Embedding(96, 64)
    table.weight = torch.nn.Parameter(table.weight.detach(), requires_grad=False)
    quantize_(table, "int4", group_size=32)
    assert table.weight.dtype == torch.uint8
    full = dequantize(table.weight, table.scale)
    tokens = torch.tensor([[3, 95, 0], [7, 7, 50]])
    assert torch.equal(table(tokens), full[tokens])
    x = torch.randn(2, 64)
    error = (table.attend(x).double() - x.double() @ full.double().T).abs()
    if path == "kernel":  # two rows: the decode kernel
        assert (error <= x_rounding_bound(x, table.weight, table.scale) + 1e-5).all()
    else:
        assert error.max() <= 1e-4


def test_widths_that_are_not_a_multiple_of_the_group_fall_back_to_int8():
    layer = Linear(48, 16)
    weight, scale = quantize_weight(layer.weight.detach(), "int4", 32)
    assert weight.dtype == torch.int8 and scale.shape == (16,)
    with pytest.raises(ValueError, match="group size"):
        quantize_weight(layer.weight.detach(), "int4", 48)


def test_heights_that_are_not_whole_blocks_fall_back_to_int8():
    weight, scale = quantize_weight(torch.randn(24, 64), "int4", 32)
    assert weight.dtype == torch.int8 and scale.shape == (24,)
    with pytest.raises(ValueError, match="multiple of 16"):
        int4.quantize_int4(torch.randn(24, 64), 32)


def test_demo_model_int4_at_load_equals_quantizing_in_place():
    def source():
        return open_checkpoint(DEMO_MODEL / "paligemma-demo.npz",
                               config_file=DEMO_MODEL / "config.json")

    streamed = load_model(source(), quantize="int4")
    in_place = quantize_(load_model(source()), "int4").state_dict()
    packed = [m for m in streamed.modules() if getattr(m, "weight", None) is not None
              and m.weight.dtype == torch.uint8]
    # The demo's widths (128, 512) are multiples of 128: every Linear and the embedding.
    assert len(packed) == sum(isinstance(m, (Linear, Embedding)) for m in streamed.modules())
    for name, tensor in streamed.state_dict().items():
        assert tensor.dtype == in_place[name].dtype and torch.equal(tensor, in_place[name]), name
