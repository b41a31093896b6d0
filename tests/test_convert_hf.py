"""The Hugging Face export, checked against transformers itself (an optional dependency)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from convert.cli import main
from paligemma.config import VARIANTS, PaliGemmaConfig
from paligemma.formats import load_official, save_pretrained
from paligemma.formats.hf import hf_config, hf_names, hf_shape
from paligemma.model import PaliGemmaModel

transformers = pytest.importorskip("transformers")

GOLD = Path(__file__).parents[1] / "parity_tests" / "data"
CONFIGS = Path(__file__).parent / "data" / "configs"
# Measured max |HF - ours| on the gold text logits (|logits| up to 24): 1e-4 (pg1), 7e-4 (pg2).
# These tiny models have large q/k gains that amplify f32 rounding differences; ours vs the
# official JAX outputs differ by as much (5e-4).
TOL = 2e-3


def export(src: Path | str, out: Path, *flags: str | Path) -> transformers.PreTrainedModel:
    """Converts to the HF format and loads it with transformers, in float32."""
    assert main([str(src), "--to", "hf", "-o", str(out), "-q", *map(str, flags)]) == 0
    model, info = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        out, output_loading_info=True, attn_implementation="eager", dtype=torch.float32
    )
    assert not any(info.values()), info  # no missing / unexpected / mismatched weights
    return model.eval()


def gold_inputs(case: str) -> tuple[torch.Tensor, ...]:
    with np.load(GOLD / case / "vectors.npz") as v:
        image = torch.from_numpy(v["image"]).permute(0, 3, 1, 2)
        text, mask_ar = torch.from_numpy(v["text"]).long(), torch.from_numpy(v["mask_ar"]).long()
        return image, text, mask_ar, torch.from_numpy(v["input_mask"]).bool()


def max_logit_diff(hf: torch.nn.Module, ours: PaliGemmaModel, image, text, mask_ar, valid) -> float:
    """Text logits of both models on the same prefix-LM input, at valid positions."""
    n = ours.config.num_image_tokens
    image_ids = torch.full((len(text), n), hf.config.image_token_id)
    # token_type_ids 0 = prefix (bidirectional), 1 = suffix (causal), as mask_ar.
    token_type_ids = torch.cat([torch.zeros_like(image_ids), mask_ar], 1)
    with torch.no_grad():
        expected = ours(image, text, mask_ar)
        got = hf(
            input_ids=torch.cat([image_ids, text], 1),
            pixel_values=image,
            token_type_ids=token_type_ids,
        ).logits[:, n:, : expected.shape[-1]]  # the export's padding rows are never produced
    return float((got - expected)[valid].abs().max())


def fix_embed_scale(hf: torch.nn.Module, config: PaliGemmaConfig) -> None:
    """big_vision's sqrt(width), rounded to the stored weights' dtype (see docs/convert.md)."""
    hf.model.language_model.embed_tokens.embed_scale.fill_(config.text.embed_scale)


@pytest.mark.parametrize("case", ["pg1_tiny", "pg2_tiny", "pg1_tiny_bf16"])
def test_hf_logits_equal_ours(case, tmp_path):
    config = PaliGemmaConfig.load(CONFIGS / f"{case}.json")
    hf = export(GOLD / case / "params.npz", tmp_path / "hf", "--config", CONFIGS / f"{case}.json")
    fix_embed_scale(hf, load_official(GOLD / case / "params.npz", config).config)
    ours = load_official(GOLD / case / "params.npz", config)
    assert max_logit_diff(hf, ours, *gold_inputs(case)) < TOL


def test_bf16_embedding_scale_is_the_one_known_difference(tmp_path):
    # big_vision rounds sqrt(96) to bf16 (9.8125) for bf16 weights; transformers in float32
    # keeps 9.798. Measured: 0.068 on the text logits, the same as the gold
    # text_logits_params_upcast_f32.
    src, config_file = GOLD / "pg1_tiny_bf16" / "params.npz", CONFIGS / "pg1_tiny_bf16.json"
    hf = export(src, tmp_path / "hf", "--config", config_file)
    ours = load_official(src, PaliGemmaConfig.load(config_file))
    assert 0.03 < max_logit_diff(hf, ours, *gold_inputs("pg1_tiny_bf16")) < 0.15


def test_27b_query_scaling_is_exported(tmp_path):
    # Like the 27B (query_pre_attn_norm="rsqrt_emb_per_head"): queries scaled by
    # (width // heads) ** -0.5 = 24 ** -0.5, not head_dim ** -0.5 = 16 ** -0.5.
    config = PaliGemmaConfig.load(CONFIGS / "pg2_tiny.json").replace(
        head_dim=16, query_pre_attn_norm="rsqrt_emb_per_head"
    )
    torch.manual_seed(0)
    ours = PaliGemmaModel(config).eval()
    with torch.no_grad():  # non-trivial norms and a large q so that the scaling matters
        for name, p in ours.named_parameters():
            if name.endswith("scale"):
                p.uniform_(-0.5, 0.5)
            if "q_proj" in name:
                p.mul_(8)
    save_pretrained(ours, tmp_path / "ours")
    hf = export(tmp_path / "ours", tmp_path / "hf")
    assert hf.config.text_config.query_pre_attn_scalar == 24
    image, text, mask_ar, valid = gold_inputs("pg2_tiny")
    assert max_logit_diff(hf, ours, image, text, mask_ar, valid) < TOL
    hf.config.text_config.query_pre_attn_scalar = 16  # the wrong scaling is visible
    for layer in hf.model.language_model.layers:
        layer.self_attn.scaling = 16**-0.5
    assert max_logit_diff(hf, ours, image, text, mask_ar, valid) > 10 * TOL


def test_exported_config_disables_the_sliding_window_and_keeps_softcaps(tmp_path):
    src, config_file = GOLD / "pg2_tiny" / "params.npz", CONFIGS / "pg2_tiny.json"
    text = export(src, tmp_path / "hf", "--config", config_file).config.text_config
    assert text.sliding_window is None
    assert text.layer_types == ["full_attention"] * 4
    assert (text.attn_logit_softcapping, text.final_logit_softcapping) == (50.0, 30.0)
    assert text.query_pre_attn_scalar == 32


def test_registry_settings_survive_transformers_config_parsing():
    # PaliGemma 2 registry configs: no final softcap (transformers' Gemma 2 default is 30).
    text = transformers.PaliGemmaConfig(**hf_config(VARIANTS["pg2-28b-896"], torch.bfloat16))
    text = text.text_config
    assert text.final_logit_softcapping is None and text.attn_logit_softcapping == 50.0
    assert text.sliding_window is None and set(text.layer_types) == {"full_attention"}
    assert text.query_pre_attn_scalar == 144  # 4608 // 32, not head_dim 128


@pytest.mark.parametrize("variant", ["pg1-3b-224", "pg2-3b-448", "pg2-10b-224", "pg2-28b-896"])
def test_every_tensor_lands_on_a_transformers_parameter_of_the_same_shape(variant):
    config = VARIANTS[variant]
    with torch.device("meta"):
        ours = PaliGemmaModel(config).state_dict()
        hf = transformers.PaliGemmaForConditionalGeneration(
            transformers.PaliGemmaConfig(**hf_config(config, torch.bfloat16))
        ).state_dict()
    expected = {_legacy_name(k): tuple(v.shape) for k, v in hf.items() if k != "lm_head.weight"}
    names = hf_names(config, list(ours))
    assert {names[k]: hf_shape(k, tuple(v.shape), config) for k, v in ours.items()} == expected


def _legacy_name(name: str) -> str:
    """transformers >= 5 module names -> the Hub checkpoint names the export writes."""
    for new, old in (
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
    ):
        if name.startswith(new):
            return old + name[len(new) :]
    return name
