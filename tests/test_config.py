import math

import pytest

from paligemma.config import PaliGemmaConfig, TextConfig, get_config


@pytest.mark.parametrize("variant, f32, bf16", [
    # bf16 values from the reference notes (big_vision: sqrt(width).astype(bfloat16)).
    ("pg1-3b-224", math.sqrt(2048), 45.25),
    ("pg2-3b-224", 48.0, 48.0),
    ("pg2-10b-224", math.sqrt(3584), 59.75),
    ("pg2-28b-224", math.sqrt(4608), 68.0),
])
def test_embed_scale_is_rounded_to_the_checkpoint_dtype(variant, f32, bf16):
    cfg = get_config(variant)
    assert cfg.text.embed_scale == pytest.approx(f32, rel=1e-7)
    assert cfg.replace(param_dtype="bfloat16").text.embed_scale == bf16


def test_query_scale_27b_uses_width_per_head():
    assert get_config("pg2-28b-224").text.query_scale == 144 ** -0.5
    assert get_config("pg2-10b-224").text.query_scale == 256 ** -0.5


def test_zero_softcap_means_none():
    assert TextConfig(final_logits_softcap=0.0).final_logits_softcap is None


def test_round_trip_through_json(tmp_path):
    cfg = get_config("pg2-10b-448").replace(param_dtype="bfloat16")
    cfg.save(tmp_path / "c.json")
    assert PaliGemmaConfig.load(tmp_path / "c.json") == cfg


def test_unknown_fields_are_named():
    with pytest.raises(ValueError, match="sliding_window"):
        PaliGemmaConfig.from_dict({"text": {"sliding_window": 4096}})
    with pytest.raises(ValueError, match="num_kv_heads"):
        TextConfig(num_heads=8, num_kv_heads=3)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(KeyError, match="pg2-3b-224"):
        get_config("pg3-1b")
