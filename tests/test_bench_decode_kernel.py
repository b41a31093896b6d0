"""benchmarks/decode_kernel.py times the matrices one decode step really reads."""

import torch

from benchmarks.decode_kernel import random_weights, step_shapes
from paligemma.config import VARIANTS
from paligemma.layers import Linear
from paligemma.model import PaliGemmaModel


def test_step_shapes_are_the_decoders_matrices_in_order():
    with torch.device("meta"):
        decoder = PaliGemmaModel(VARIANTS["pg1-3b-224"]).decoder
    linears = [tuple(m.weight.shape) for m in decoder.modules() if isinstance(m, Linear)]
    embedding = tuple(decoder.embedder.weight.shape)
    assert step_shapes("pg1-3b-224") == linears + [embedding]


def test_random_weights_have_the_stored_layouts():
    g = torch.Generator().manual_seed(0)
    w, s = random_weights("int4", 32, 256, g)
    assert (w.dtype, w.shape, s.shape) == (torch.uint8, (32, 128), (32, 2, 2))
    w, s = random_weights("int8", 32, 256, g)
    assert (w.dtype, w.shape, s.shape) == (torch.int8, (32, 256), (32,))
