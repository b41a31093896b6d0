"""Image loading (modes, EXIF, bad files) and resize parity with jax.image.resize."""

import io

import numpy as np
import PIL.Image
import pytest
import torch

from paligemma.image import open_image, preprocess, to_rgb_array

# jax.image.resize and our resize differ by float rounding only: measured <= 3e-3 on the
# [0, 255] scale, i.e. 2.4e-5 after x/127.5-1.
ATOL_VS_JAX = 1e-4


def fixed_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Noise plus a gradient and a hard edge: uint8 [h, w, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([255 * x / w, 255 * y / h, 255.0 * (x > w // 2)], -1)
    return np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(300, 200), (37, 91), (640, 480), (224, 224)])
def test_resize_matches_jax_bilinear_antialias(shape):
    jax = pytest.importorskip("jax")
    image = fixed_image(*shape)
    ours = preprocess([to_rgb_array(image)], 224)[0].permute(1, 2, 0).numpy()
    ref = jax.image.resize(image.astype(np.float32), (224, 224, 3), "bilinear", antialias=True)
    np.testing.assert_allclose(ours, np.asarray(ref) / 127.5 - 1, atol=ATOL_VS_JAX, rtol=0)


def test_output_range_and_layout():
    x = preprocess([to_rgb_array(fixed_image(50, 70))], 28)
    assert x.shape == (1, 3, 28, 28) and x.dtype == torch.float32
    assert -1 <= float(x.min()) and float(x.max()) <= 1
    white = preprocess([np.full((5, 5, 3), 255.0, np.float32)], 14)
    assert np.allclose(white.numpy(), 1.0)


def test_modes_convert_to_rgb():
    rgb = fixed_image(20, 30)
    pil = PIL.Image.fromarray(rgb)
    np.testing.assert_array_equal(to_rgb_array(pil.convert("RGBA")), rgb)  # alpha dropped
    gray = to_rgb_array(pil.convert("L"))
    assert gray.shape == (20, 30, 3) and np.all(gray[..., 0] == gray[..., 2])
    palette = pil.convert("P")
    np.testing.assert_array_equal(to_rgb_array(palette), np.asarray(palette.convert("RGB")))
    assert to_rgb_array(pil.convert("CMYK")).shape == (20, 30, 3)


def test_sixteen_bit_scales_to_eight_bit_range():
    gray8 = fixed_image(10, 12)[..., 0]
    gray16 = PIL.Image.fromarray(gray8.astype(np.uint16) * 257)  # mode I;16
    assert gray16.mode.startswith("I")
    np.testing.assert_allclose(to_rgb_array(gray16)[..., 1], gray8, atol=1e-3)


def test_exif_orientation_is_applied():
    image = PIL.Image.fromarray(fixed_image(20, 40))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    image.save(buf, "PNG", exif=exif)
    out = to_rgb_array(PIL.Image.open(buf))
    assert out.shape == (40, 20, 3)
    np.testing.assert_array_equal(out, np.asarray(image.transpose(PIL.Image.ROTATE_270)))


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_image(tmp_path / "missing.jpg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        open_image(empty)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not an image"):
        open_image(text)
    truncated = tmp_path / "cut.png"
    PIL.Image.fromarray(fixed_image(64, 64)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot decode"):
        open_image(truncated)
    with pytest.raises(ValueError, match="empty image"):
        to_rgb_array(np.zeros((0, 5, 3), np.uint8))
