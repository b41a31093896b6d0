"""Bad-input battery, images: every bad file is named before the model loads, memory stays one
batch (images are decoded batch by batch), and the decompression-bomb limit says how to raise it.
"""

import PIL.Image
import pytest

import paligemma.api
import paligemma.cli
from paligemma import image


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the model is loaded: the error must come before that."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")
    monkeypatch.setattr(paligemma.cli, "_load", load)


def test_missing_image(refused, model_dir, tmp_path, no_model):
    refused("caption", tmp_path / "nope.jpg", "--model", model_dir,
            says=f"{tmp_path / 'nope.jpg'}: no such file")


def test_empty_file(refused, model_dir, tmp_path, no_model):
    (tmp_path / "empty.jpg").write_bytes(b"")
    refused("caption", tmp_path / "empty.jpg", "--model", model_dir,
            says=f"{tmp_path / 'empty.jpg'}: empty file, not an image")


def test_text_file(refused, model_dir, tmp_path, no_model):
    (tmp_path / "notes.jpg").write_text("hello")
    refused("caption", tmp_path / "notes.jpg", "--model", model_dir,
            says=f"{tmp_path / 'notes.jpg'}: not an image (Pillow cannot identify it)")


def test_folder_given_as_an_image(refused, model_dir, tmp_path, no_model):
    (tmp_path / "album").mkdir()
    refused("caption", tmp_path / "album", "--model", model_dir,
            says=f"{tmp_path / 'album'}: not a file")


def test_bad_image_among_good_ones_is_found_first(refused, model_dir, photo, tmp_path, no_model):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    refused("caption", photo, photo, tmp_path / "bad.png", "--model", model_dir,
            says=f"{tmp_path / 'bad.png'}")


def test_truncated_png_names_the_file(refused, model_dir, photo, tmp_path):
    data = photo.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    refused("caption", tmp_path / "cut.png", "--model", model_dir,
            says=(f"{tmp_path / 'cut.png'}: cannot decode image",))


def test_decompression_bomb_says_how_to_raise_the_limit(refused, model_dir, bomb_png, no_model):
    refused("caption", bomb_png, "--model", model_dir,
            says=(f"{bomb_png}: 20000x20000 = 400000000 pixels is above the decompression-bomb "
                  "limit", "--max-image-pixels N"))


def test_raised_limit_lets_the_bomb_through_to_decoding(refused, model_dir, bomb_png,
                                                        monkeypatch):
    monkeypatch.setattr(image, "MAX_IMAGE_PIXELS", image.MAX_IMAGE_PIXELS)  # restored after
    # Past the limit, this header-only file fails at decoding (a real one would be decoded).
    refused("caption", bomb_png, "--model", model_dir, "--max-image-pixels", 400_000_000,
            says=f"{bomb_png}: cannot decode image")


def test_images_are_decoded_batch_by_batch(model_dir, photo, monkeypatch, capsys):
    events = []
    decode, generate = image.to_rgb_array, paligemma.api.PaliGemma.generate
    monkeypatch.setattr(image, "to_rgb_array",
                        lambda im: events.append("decode") or decode(im))
    monkeypatch.setattr(paligemma.api.PaliGemma, "generate",
                        lambda *a, **k: events.append("generate") or generate(*a, **k))
    assert paligemma.cli.main(["caption", *[str(photo)] * 5, "--model", str(model_dir),
                               "--batch-size", "2", "--max-new-tokens", "1"]) == 0
    capsys.readouterr()
    assert events == ["generate", "decode", "decode"] * 2 + ["generate", "decode"]


def test_open_image_without_decoding_reads_only_the_header(bomb_png, monkeypatch):
    monkeypatch.setattr(image, "MAX_IMAGE_PIXELS", 10**9)
    with image.open_image(bomb_png, decode=False) as opened:  # no 1.2 GB decode
        assert opened.size == (20000, 20000)
    assert PIL.Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's own limit is left as it was
