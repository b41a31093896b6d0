"""RoPE angles bit-identical to the official code under jit, positions 0..8191."""

from pathlib import Path

import numpy as np
import pytest
import torch

from paligemma.gemma import rope_radians

RECORDED = Path(__file__).parent / "data" / "rope_angles.npz"


def recorded_angles(head_dim: int) -> np.ndarray:
    """Decodes tools/record_rope_angles.py's file: [8192, head_dim // 2] float32 angles."""
    with np.load(RECORDED, allow_pickle=False) as f:
        ulps = f[f"ulps_{head_dim}"].astype(np.int32)
    fraction = 2.0 * np.arange(head_dim // 2) / head_dim
    positions = np.arange(ulps.shape[0], dtype=np.float64)[:, None]
    reference_point = (positions / 10_000.0**fraction).astype(np.float32)
    return (reference_point.view(np.int32) + ulps).view(np.float32)


@pytest.mark.parametrize("head_dim", [256, 128])
def test_angles_are_bit_identical_to_the_official_jitted_code(head_dim):
    official = recorded_angles(head_dim)
    ours = rope_radians(torch.arange(official.shape[0]), head_dim, 10_000.0).numpy()
    mismatches = np.argwhere(ours.view(np.int32) != official.view(np.int32))
    assert mismatches.size == 0, f"{len(mismatches)} angles differ, first at {mismatches[:3]}"


def test_the_recorded_angles_are_not_the_plain_division():
    """The jit rewrite matters: a division by the f32 power misses many recorded angles."""
    official = recorded_angles(256)
    fraction = torch.arange(128, dtype=torch.float32) * (2.0 / 256)
    divided = (torch.arange(official.shape[0]).float()[:, None] / 10_000.0**fraction).numpy()
    assert np.count_nonzero(divided != official) > 0.1 * official.size
