"""Fixtures shared by several test files."""

import random
from pathlib import Path

import pytest

from paligemma import PaliGemma
from paligemma.config import PaliGemmaConfig
from paligemma.demo import scenes
from paligemma.tokenizer import Tokenizer
from paligemma.weights import load_official

DEMO = Path(__file__).parents[1] / "examples" / "demo_model"


@pytest.fixture(scope="session")
def demo_pg() -> PaliGemma:
    """The shipped demo model (2.1M parameters), loaded straight from its official .npz."""
    config = PaliGemmaConfig.load(DEMO / "config.json")
    model = load_official(DEMO / "paligemma-demo.npz", config)
    return PaliGemma(model, Tokenizer(DEMO / "tokenizer.model"))


def draw_scenes(count: int, seed: int = 0) -> list:
    """`count` synthetic scenes (PIL images) of 1-3 shapes, as the demo model was trained on."""
    rng = random.Random(seed)
    return [scenes.draw_scene(rng, 112).image for _ in range(count)]


@pytest.fixture(scope="session")
def demo_scenes():
    """draw_scenes(count, seed=0) -> list of PIL images."""
    return draw_scenes
