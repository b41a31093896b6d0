"""Fixtures shared by several test files: the bad-input battery (`tests/test_bad_*.py`, one
file per component), and the demo model and scenes (scheduler, batch, Ray, serve tests).

Every battery case runs a command (in-process: the console scripts are these `main`s, and
`test_bad_processes.py` checks the real processes once) and asserts three things: the exit
code, one `error: ...` line that names what is at fault (no traceback), and that nothing under
the watched folders was lost, changed or left behind.
"""

from __future__ import annotations

import random
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import PIL.Image
import pytest
from test_api import cat_image, tiny_checkpoint

import paligemma.cli
from paligemma import PaliGemma
from paligemma.demo import scenes
from paligemma.demo.command import DEMO_MODEL

DEMO = DEMO_MODEL


def tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """{path: (size, mtime_ns)} of every file (folders: (0, 0): a lock or temporary created
    and removed changes a folder's mtime, not what it holds) under `roots`, hidden included."""
    found = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            stat = path.lstat()
            plain = path.is_file() or path.is_symlink()
            found[str(path)] = (stat.st_size, stat.st_mtime_ns) if plain else (0, 0)
    return found


Refused = Callable[..., str]


@pytest.fixture
def refused(capsys, tmp_path) -> Refused:
    """refused(*argv, says=..., code=2, main=paligemma.cli.main, watch=(tmp_path,)) runs a
    command that must fail; returns its error line after the checks (module docstring)."""

    def run(*argv: object, says: str | tuple[str, ...], code: int = 2,
            main: Callable[[list[str]], int] = paligemma.cli.main,
            watch: tuple[Path, ...] = ()) -> str:
        roots = (tmp_path, *watch)
        before = tree(*roots)
        try:
            result = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's usage errors exit from parse_args
            result = e.code
        out, err = capsys.readouterr()
        assert result == code, (result, err)
        assert "Traceback" not in err + out, err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, err
        for text in (says,) if isinstance(says, str) else says:
            assert text in errors[0], errors[0]
        assert tree(*roots) == before, "files were lost, changed or left behind"
        return errors[0]

    return run


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """A tiny random converted checkpoint (with tokenizer.model); never written to."""
    return tiny_checkpoint()


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "photo.png"
    PIL.Image.fromarray(cat_image()).save(path)
    return path


@pytest.fixture
def bomb_png(tmp_path) -> Path:
    """A PNG that declares 20000 x 20000 pixels but holds almost no data: a decompression
    bomb's header, cheap to write."""
    return _png_header_only(tmp_path / "bomb.png", 20000, 20000)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


@pytest.fixture
def snapshot() -> Callable[..., dict[str, tuple[int, int]]]:
    """`tree`, for tests that compare folders themselves."""
    return tree


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """The shipped demo model (2.1M parameters) converted, with its tokenizer, as the CLI reads
    it."""
    from paligemma.formats import open_checkpoint, write_ours

    out = tmp_path_factory.mktemp("demo") / "model"
    write_ours(open_checkpoint([DEMO / "paligemma-demo.npz"], config_file=DEMO / "config.json"),
               out, quiet=True)
    shutil.copyfile(DEMO / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def demo_pg(demo_model_dir) -> PaliGemma:
    return PaliGemma.from_pretrained(demo_model_dir)


def draw_scenes(count: int, seed: int = 0) -> list:
    """`count` synthetic scenes (PIL images) of 1-3 shapes, as the demo model was trained on."""
    rng = random.Random(seed)
    return [scenes.draw_scene(rng, 112).image for _ in range(count)]


@pytest.fixture(scope="session")
def demo_scenes():
    """draw_scenes(count, seed=0) -> list of PIL images."""
    return draw_scenes
