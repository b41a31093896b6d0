"""The mapping table covers every official layout exactly, checked by shape on the meta device."""

import json
from pathlib import Path

import pytest
import torch

from paligemma.config import VARIANTS, get_config
from paligemma.model import PaliGemmaModel
from paligemma.weights import official_shapes, weight_rules

LAYOUTS = json.loads((Path(__file__).parent / "data" / "official_layouts.json").read_text())
# Release names in layouts.json -> our registry names.
RELEASE_TO_VARIANT = {
    f"paligemma{'2' if fam.startswith('pg2') else ''}-{fam.split('-')[1]}-{res}": f"{fam}-{res}"
    for fam in ("pg1-3b", "pg2-3b", "pg2-10b", "pg2-28b") for res in (224, 448, 896)
}


def test_registry_has_the_12_official_variants():
    assert sorted(VARIANTS) == sorted(RELEASE_TO_VARIANT.values())
    assert sorted(LAYOUTS["models"]) == sorted(RELEASE_TO_VARIANT)


@pytest.mark.parametrize("release", sorted(RELEASE_TO_VARIANT))
def test_mapping_reproduces_official_keys_and_shapes(release):
    expected = {k: tuple(v) for k, v in LAYOUTS["models"][release]["params"].items()}
    assert official_shapes(get_config(RELEASE_TO_VARIANT[release])) == expected


@pytest.mark.parametrize("release", sorted(RELEASE_TO_VARIANT))
def test_param_count_equals_official(release):
    with torch.device("meta"):
        model = PaliGemmaModel(get_config(RELEASE_TO_VARIANT[release]))
    assert sum(p.numel() for p in model.parameters()) == LAYOUTS["models"][release]["num_params"]


@pytest.mark.parametrize("variant", ["pg1-3b-224", "pg2-28b-896"])
def test_every_parameter_is_mapped_exactly_once(variant):
    config = get_config(variant)
    names = []
    for rule in weight_rules(config):
        depth = config.vision.depth if rule.official.startswith("img/") else config.text.depth
        for layer in range(depth) if rule.stacked else [None]:
            names.extend(rule.our_names(layer))
    with torch.device("meta"):
        params = PaliGemmaModel(config).state_dict()
    assert sorted(names) == sorted(params)


def test_pg1_3b_224_param_count_matches_the_release():
    with torch.device("meta"):
        model = PaliGemmaModel(get_config("pg1-3b-224"))
    assert sum(p.numel() for p in model.parameters()) == 2_923_335_408
