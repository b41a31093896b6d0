"""Image loading and preprocessing as the official PaliGemma pipeline does it.

big_vision (`decode|resize(res, antialias=True)|value_range(-1, 1)` and the fine-tuning colab's
`preprocess_image`): RGB, squeezed to a square of the model's resolution (aspect ratio is not
kept) with bilinear interpolation and antialiasing, then x / 127.5 - 1. We resize in float and
do not round back to uint8, as the colab does (the TF pp op casts back to uint8, a difference
below 1/127.5). Unlike TF's `decode_image`, EXIF orientation is applied.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

ImageLike = str | Path | PIL.Image.Image | np.ndarray

_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def open_image(path: str | Path) -> PIL.Image.Image:
    """Opens and decodes an image file; every failure becomes one clear error."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file, not an image")
    try:
        image = PIL.Image.open(path)
        image.load()
    except PIL.UnidentifiedImageError:
        raise ValueError(f"{path}: not an image (Pillow cannot identify it)") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ValueError(f"{path}: cannot decode image ({e})") from None
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


def preprocess(images: list[np.ndarray], size: int) -> torch.Tensor:
    """float32 [H, W, 3] arrays in [0, 255] -> [B, 3, size, size] float32 in [-1, 1].

    Bilinear with antialias (triangle filter widened by the downscale factor, half-pixel
    centers), which matches `jax.image.resize(..., "bilinear", antialias=True)` and TF's
    `tf.image.resize(..., antialias=True)`.
    """
    out = []
    for array in images:
        x = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None]
        x = F.interpolate(x, (size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x[0])
    return torch.stack(out) / 127.5 - 1.0
