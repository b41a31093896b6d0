"""The segmentation mask VQ-VAE checkpoint `vae-oid.npz` (gs://big_vision/paligemma/).

Its keys are already PyTorch-style and unprefixed (reference gotcha 19), so the converter keeps
them exactly: they are the state_dict names of `paligemma.segmentation`. Shapes below are the
decoder and codebook that big_vision's mask decoder reads (conv weights OIHW, transposed-conv
weights (in, out, kh, kw)). The real file also holds the mask encoder (`encoder.*`, used only to
turn masks into tokens); big_vision does not pin its shapes, so those keys are carried over
as they are, unchecked.
"""

from __future__ import annotations

from . import errors
from .errors import CheckpointError
from .npz import OfficialNpz

VARIANT = "vae-oid"
ENCODER_PREFIX = "encoder."


def _conv(name: str, c_out: int, c_in: int, k: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (c_out, c_in, k, k), f"{name}.bias": (c_out,)}


def _conv_transpose(name: str, c_in: int, c_out: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (c_in, c_out, 4, 4), f"{name}.bias": (c_out,)}


def _res_block(name: str, c: int) -> dict[str, tuple[int, ...]]:
    return {
        **_conv(f"{name}.net.0", c, c, 3),
        **_conv(f"{name}.net.2", c, c, 3),
        **_conv(f"{name}.net.4", c, c, 1),
    }


NUM_EMBEDDINGS, EMBEDDING_DIM = 128, 512
SHAPES: dict[str, tuple[int, ...]] = {
    "_vq_vae._embedding": (NUM_EMBEDDINGS, EMBEDDING_DIM),
    **_conv("decoder.0", 128, EMBEDDING_DIM, 1),
    **_res_block("decoder.2", 128),
    **_res_block("decoder.3", 128),
    **_conv_transpose("decoder.4", 128, 128),
    **_conv_transpose("decoder.6", 128, 64),
    **_conv_transpose("decoder.8", 64, 32),
    **_conv_transpose("decoder.10", 32, 16),
    **_conv("decoder.12", 1, 16, 1),
}

CONFIG = {"model_type": VARIANT, "num_embeddings": NUM_EMBEDDINGS, "embedding_dim": EMBEDDING_DIM}


def is_vae(keys: list[str]) -> bool:
    """Whether a checkpoint's keys are the VAE's (it is the only one with a codebook)."""
    return "_vq_vae._embedding" in keys


def check_layout(ckpt: OfficialNpz) -> None:
    """Raises CheckpointError naming the first missing / unexpected key or wrong shape."""
    shapes, where = ckpt.shapes(), ", ".join(map(str, ckpt.paths))
    if not is_vae(list(shapes)):
        raise CheckpointError(f"{where}: no '_vq_vae._embedding' key, not the segmentation VAE")
    found = {k: s for k, s in shapes.items() if not k.startswith(ENCODER_PREFIX)}
    files = {key: info.path for key, info in ckpt.arrays.items()}
    errors.check_layout(f"{where} ({VARIANT})", SHAPES, found, "key", files)
