"""Fixtures shared by several test files."""

import random
import shutil
from pathlib import Path

import pytest

from paligemma import PaliGemma
from paligemma.demo import scenes

DEMO = Path(__file__).parents[1] / "examples" / "demo_model"


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    """The shipped demo model (2.1M parameters) converted, with its tokenizer, as the CLI reads
    it."""
    from convert import open_source, write_ours

    out = tmp_path_factory.mktemp("demo") / "model"
    write_ours(open_source([DEMO / "paligemma-demo.npz"], config_file=DEMO / "config.json"),
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
