"""Old import path of `formats.mapping`, kept because parity_tests/test_layouts.py imports it."""

from .formats.mapping import official_shapes, weight_rules

__all__ = ["official_shapes", "weight_rules"]
