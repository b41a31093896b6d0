"""Records big_vision's RoPE angles, as its jitted code computes them, into rope_angles.npz.

The official `gemma._apply_rope` is called under `jax.jit` (as big_vision runs the model) with
`jnp.sin` and `jnp.cos` seen by that module replaced by the identity, and x = [1, 0] halves:
its output halves are then `1 * a - 0 * a` and `0 * a + 1 * a`, exactly the angles `a` that the
compiled graph feeds to sin and cos. Positions 0..8191, for every head_dim of the official
variants (256: gemma_2b, gemma2_2b, gemma2_9b; 128: gemma2_27b).

Stored losslessly and small: for each head_dim, `ulps_{head_dim}` int8 [8192, head_dim // 2] =
(bits of the recorded f32 angle) - (bits of f32(position / 10000 ** (2 i / head_dim)) computed
in float64 by numpy). Decode with `recorded_angles()` in parity_tests/test_rope.py.

Usage (needs jax, flax, ml_collections, einops, absl-py):
  BIG_VISION_DIR=/path/to/big_vision_parent python parity_tests/tools/record_rope_angles.py OUT.npz
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_gold as mg  # noqa: E402

HEAD_DIMS = (256, 128)
NUM_POSITIONS = 8192
MAX_WAVELENGTH = 10_000


def division_in_float64(head_dim):
    """[NUM_POSITIONS, head_dim // 2] float32: the encoding's reference point, not a model."""
    fraction = 2.0 * np.arange(head_dim // 2) / head_dim
    positions = np.arange(NUM_POSITIONS, dtype=np.float64)[:, None]
    return (positions / MAX_WAVELENGTH ** fraction).astype(np.float32)


def main():
    out = sys.argv[1]
    bv = mg.import_big_vision(os.environ["BIG_VISION_DIR"])
    import jax
    import jax.numpy as jnp

    class IdentityTrig:
        sin = staticmethod(lambda a: a)
        cos = staticmethod(lambda a: a)

        def __getattr__(self, name):
            return getattr(jnp, name)

    bv.gemma.jnp = IdentityTrig()
    apply_rope = jax.jit(lambda x, p: bv.gemma._apply_rope(x, positions=p))
    arrays = {}
    for head_dim in HEAD_DIMS:
        half = head_dim // 2
        x = jnp.concatenate([jnp.ones((1, NUM_POSITIONS, 1, half)),
                             jnp.zeros((1, NUM_POSITIONS, 1, half))], axis=-1)
        positions = jnp.arange(NUM_POSITIONS, dtype=jnp.int32)[None]
        rotated = np.asarray(apply_rope(x, positions))[0, :, 0]
        angles = rotated[:, :half]
        assert np.array_equal(angles, rotated[:, half:])
        ulps = angles.view(np.int32) - division_in_float64(head_dim).view(np.int32)
        assert np.abs(ulps).max() <= 127
        arrays[f"ulps_{head_dim}"] = ulps.astype(np.int8)
        print(f"head_dim {head_dim}: {np.count_nonzero(ulps)} of {ulps.size} angles differ "
              "from the float64 division", flush=True)
    np.savez_compressed(out, **arrays)


if __name__ == "__main__":
    main()
