"""Image loading and preprocessing as the official PaliGemma pipeline does it.

big_vision (`decode|resize(res, antialias=True)|value_range(-1, 1)` and the fine-tuning colab's
`preprocess_image`): RGB, squeezed to a square of the model's resolution (aspect ratio is not
kept) with bilinear interpolation and antialiasing, then x / 127.5 - 1. We resize in float and
do not round back to uint8, as the colab does (the TF pp op casts back to uint8, a difference
below 1/127.5). Unlike TF's `decode_image`, EXIF orientation is applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

ImageLike = str | Path | PIL.Image.Image | np.ndarray

_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# Decompression-bomb limit: larger images are refused before decoding (Pillow's own hard limit;
# a float32 copy of such an image is already 2 GB). CLI: --max-image-pixels.
MAX_IMAGE_PIXELS = 2 * 89_478_485


def open_image(path: str | Path, decode: bool = True) -> PIL.Image.Image:
    """Opens (and unless `decode` is False, decodes) an image file; every failure becomes one
    clear error. Without decoding only the header is read: a cheap check that it opens."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file, not an image")
    pillow_limit = PIL.Image.MAX_IMAGE_PIXELS
    PIL.Image.MAX_IMAGE_PIXELS = None  # checked below, with a message that says what to do
    try:
        image = PIL.Image.open(path)
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(
                f"{path}: {image.width}x{image.height} = {image.width * image.height} pixels is "
                f"above the decompression-bomb limit of {MAX_IMAGE_PIXELS} pixels; if you trust "
                "the file, raise it with --max-image-pixels N (Python: "
                "paligemma.image.MAX_IMAGE_PIXELS = N)"
            )
        if decode:
            image.load()
    except PIL.UnidentifiedImageError:
        raise ValueError(f"{path}: not an image (Pillow cannot identify it)") from None
    except (OSError, SyntaxError) as e:  # truncated or corrupt data
        raise ValueError(f"{path}: cannot decode image ({e})") from None
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = pillow_limit
    return image


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """Any image Pillow opens (a path or a PIL image), an HxW / HxWxC uint8 array, or a float
    [H, W, 3] array in [0, 255] (this function's output, passed through) -> float32 [H, W, 3]
    in [0, 255].

    EXIF orientation is applied; alpha is dropped without compositing (as the colab's
    `image[..., :3]` and TF's `decode_image(channels=3)`); 16-bit images are scaled by 255/65535.
    """
    if isinstance(image, (str, Path)):
        image = open_image(image)
    if isinstance(image, np.ndarray):
        if image.dtype.kind == "f" and image.ndim == 3 and image.shape[-1] == 3:
            if image.size == 0:
                raise ValueError(f"empty image (shape {image.shape})")
            return image.astype(np.float32, copy=False)
        image = _array_to_pil(image)
    if image.width == 0 or image.height == 0:
        raise ValueError(f"empty image ({image.width}x{image.height})")
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "F":
        scale = 255 / 65535 if image.mode != "F" else 1.0
        gray = np.clip(np.asarray(image, dtype=np.float32) * scale, 0, 255)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow wants palette transparency expanded first
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = array[..., :3]
    elif array.ndim != 2:
        raise ValueError(f"image array must be HxW or HxWx3/4, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"empty image (shape {array.shape})")
    if array.dtype != np.uint8:
        raise ValueError(f"image array must be uint8 or float HxWx3, got {array.dtype}")
    return PIL.Image.fromarray(array)


def preprocess(images: Sequence[ImageLike], size: int) -> torch.Tensor:
    """Images (see `to_rgb_array`) -> [B, 3, size, size] float32 in [-1, 1].

    Bilinear with antialias (triangle filter widened by the downscale factor, half-pixel
    centers), which matches `jax.image.resize(..., "bilinear", antialias=True)` and TF's
    `tf.image.resize(..., antialias=True)`.
    """
    return load_batch(images, size)[0]


def load_batch(
    images: Sequence[ImageLike], size: int
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """`preprocess`, plus each image's original (height, width). Images are decoded and resized
    one at a time, so memory holds one full-size image, not the batch's."""
    out, sizes = [], []
    for image in images:
        array = to_rgb_array(image)
        sizes.append(array.shape[:2])
        x = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
        del array
        x = F.interpolate(x, (size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x[0])
    return torch.stack(out) / 127.5 - 1.0, sizes
