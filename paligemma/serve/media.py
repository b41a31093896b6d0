"""Images in (base64 data URLs only) and pictures out (masks as PNG or COCO RLE, heatmaps).

The server never reads a path or fetches a URL on a client's behalf: an image is accepted only
as `data:image/<type>;base64,<data>`, and its size is checked twice, as encoded bytes before
decoding and as width x height before the pixels are decompressed (so a small PNG that
inflates to gigapixels is refused cheaply).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings

import numpy as np
import PIL.Image

from ..image import to_rgb_array

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # what Pillow may decode for a client
_DATA_URL = re.compile(r"data:(image/[\w.+-]+)?(;[\w=.+-]+)*;base64,", re.ASCII)


class BadInput(ValueError):
    """A client error: the message names the field at fault. `status` is the HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


def decode_image(url: str, max_bytes: int, max_pixels: int, param: str = "image") -> np.ndarray:
    """`data:image/...;base64,...` -> float32 [H, W, 3] in [0, 255] (`image.to_rgb_array`).

    Raises BadInput (400 for a malformed or non-image URL, 413 for one over the limits).
    """
    if not isinstance(url, str):
        raise BadInput(f"{param}: expected a data URL string", param=param)
    match = _DATA_URL.match(url)
    if match is None:
        what = "a URL" if re.match(r"^[a-zA-Z][\w+.-]*://", url) else "not a base64 data URL"
        raise BadInput(
            f"{param}: {what}; send the image inline as 'data:image/png;base64,...' (the "
            "server never fetches URLs or reads files)", param=param)
    payload = url[match.end():]
    if len(payload) > 4 * (-(-max_bytes // 3)) + 4:  # base64 is 4 characters per 3 bytes
        raise BadInput(f"{param}: image larger than the server's limit of {max_bytes} bytes",
                       status=413, param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(f"{param}: invalid base64 data", param=param) from None
    if len(data) > max_bytes:
        raise BadInput(f"{param}: image of {len(data)} bytes is over the server's limit of "
                       f"{max_bytes} bytes", status=413, param=param)
    if not data:
        raise BadInput(f"{param}: empty image data", param=param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            # reads the header only; common formats only (EPS, for one, would run Ghostscript)
            image = PIL.Image.open(io.BytesIO(data), formats=FORMATS)
            if image.width * image.height > max_pixels:
                raise BadInput(
                    f"{param}: {image.width}x{image.height} image is over the server's limit "
                    f"of {max_pixels} pixels", status=413, param=param)
            image.load()
    except BadInput:
        raise
    except (PIL.UnidentifiedImageError, PIL.Image.DecompressionBombWarning,
            PIL.Image.DecompressionBombError):
        raise BadInput(f"{param}: not an image in a format the server reads "
                       f"({', '.join(FORMATS)})", param=param) from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise BadInput(f"{param}: cannot decode the image ({e})", param=param) from None
    try:
        return to_rgb_array(image)
    except ValueError as e:
        raise BadInput(f"{param}: {e}", param=param) from None


def png_data_url(image: PIL.Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_mask(mask: np.ndarray, fmt: str) -> str | dict:
    """bool [H, W] -> a 1-bit PNG data URL ("png"), or COCO's compressed RLE ("rle": {"size":
    [H, W], "counts": str}, what `pycocotools.mask.decode` reads)."""
    if fmt == "png":
        return png_data_url(PIL.Image.fromarray(mask.astype(bool)).convert("1"))
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}
