"""The Hugging Face export, checked against transformers itself (an optional dependency)."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from convert.cli import main
from paligemma import PaliGemma
from paligemma.config import VARIANTS, PaliGemmaConfig
from paligemma.formats import CheckpointError, load_official, load_pretrained, save_pretrained
from paligemma.formats.hf import hf_config, hf_names, hf_shape
from paligemma.formats.hf_import import (
    IMAGE_TOKEN_INDEX_DEFAULT,
    TEXT_DEFAULTS,
    VISION_DEFAULTS,
)
from paligemma.formats.ours import load_state_dict
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


# ---------------------------------------------------------------------------------------------
# Hugging Face in: transformers checkpoints built from random configs, imported.

DEMO_TOKENIZER = Path(__file__).parents[1] / "paligemma" / "demo" / "model" / "tokenizer.model"
VOCAB, ROWS = 1280, 1344  # the demo tokenizer's pieces; rows padded past <image> = 1280
# Measured max |transformers - ours| on the logits of these random models (|logits| up to 6):
# 2.2e-6 (PG1), 1.8e-6 (PG2) in float32, every naming scheme; bf16 weights 1.9e-6 / 3.0e-6
# once transformers uses big_vision's rounded sqrt(width) (5.4e-4 / 6.6e-4 without). The
# tolerance leaves margin for other CPUs and BLAS libraries.
IMPORT_TOL = 1e-4


def random_hf_model(kind: str, seed: int = 0) -> transformers.PaliGemmaForConditionalGeneration:
    """A tiny PaliGemma 1 (gemma) or 2 (gemma2) as transformers builds it, random weights."""
    text = {"model_type": kind, "hidden_size": 32, "intermediate_size": 64, "head_dim": 8,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "vocab_size": ROWS}
    if kind == "gemma2":  # left as Google's configs leave them: transformers' defaults apply
        text.update(query_pre_attn_scalar=8)
    config = transformers.PaliGemmaConfig(
        text_config=text,
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 16,
                       "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "patch_size": 4, "image_size": 16, "projection_dim": 32,
                       "vision_use_head": False},
        image_token_index=VOCAB, projection_dim=32, hidden_size=32,
    )
    torch.manual_seed(seed)
    model = transformers.PaliGemmaForConditionalGeneration(config)
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases, moderate activations
            p.uniform_(-0.5, 0.5) if p.dim() == 1 else p.normal_(0, 0.2)
    model.config._attn_implementation = "eager"
    return model.eval()


def random_inputs(model, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """images [2, 3, 16, 16], text [2, 9] (5 prefix tokens, 4 suffix), mask_ar."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    text = torch.randint(3, VOCAB, (2, 9), generator=g)
    mask_ar = torch.tensor([[0] * 5 + [1] * 4] * 2)
    return image, text, mask_ar, torch.ones(2, 9, dtype=torch.bool)


def save_hf(model, directory: Path, scheme: str, dtype: torch.dtype = torch.float32) -> Path:
    """Writes `model` as transformers would: `save_pretrained` (5.x on disk), Google's
    repositories' names (4.x), or the 5.x in-memory names; sharded with an index."""
    model = model.to(dtype)
    if scheme == "save_pretrained":
        model.save_pretrained(directory, max_shard_size="100KB")
    else:
        from huggingface_hub import save_torch_state_dict

        state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        if scheme == "4.x":
            state = {_legacy_name(k): v for k, v in state.items()}
        directory.mkdir(parents=True)
        save_torch_state_dict(state, directory, max_shard_size="100KB")
        model.config.save_pretrained(directory)
    assert (directory / "model.safetensors.index.json").is_file()
    model.to(torch.float32)
    return directory


@pytest.mark.parametrize("kind", ["gemma", "gemma2"])
@pytest.mark.parametrize("scheme", ["save_pretrained", "4.x", "5.x"])
def test_hf_checkpoints_import_with_transformers_logits(kind, scheme, tmp_path):
    hf = random_hf_model(kind)
    directory = save_hf(hf, tmp_path / "hf", scheme)
    reloaded = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32
    ).eval()  # transformers reads this naming too: the file is a real transformers checkpoint
    ours = load_pretrained(directory)
    assert ours.config.text.vocab_size == VOCAB and ours.config.text.post_norms == (
        kind == "gemma2")
    inputs = random_inputs(hf)
    assert max_logit_diff(reloaded, ours, *inputs) < IMPORT_TOL
    assert max_logit_diff(hf, ours, *inputs) < IMPORT_TOL


def test_bf16_hf_checkpoint_imports(tmp_path):
    hf = random_hf_model("gemma2")
    directory = save_hf(hf, tmp_path / "hf", "save_pretrained", torch.bfloat16)
    ours = load_pretrained(directory, dtype=torch.float32)
    assert ours.config.text.param_dtype == "bfloat16"  # as an official bf16 checkpoint
    theirs = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        directory, attn_implementation="eager", dtype=torch.float32
    ).eval()
    fix_embed_scale(theirs, ours.config)  # the one known difference (big_vision's rounding)
    assert max_logit_diff(theirs, ours, *random_inputs(hf)) < IMPORT_TOL


def test_convert_cli_reads_hf_and_writes_the_same_tensors(tmp_path):
    directory = save_hf(random_hf_model("gemma"), tmp_path / "hf", "4.x")
    assert main([str(directory), "-o", str(tmp_path / "ours"), "-q"]) == 0
    direct, converted = load_pretrained(directory), load_pretrained(tmp_path / "ours")
    assert converted.config == direct.config
    for name, tensor in direct.state_dict().items():
        assert torch.equal(converted.state_dict()[name], tensor), name


@pytest.mark.parametrize("case", ["pg1_tiny", "pg2_tiny", "pg1_tiny_bf16"])
def test_ours_to_hf_to_ours_is_bit_exact(case, tmp_path):
    config = CONFIGS / f"{case}.json"
    assert main([str(GOLD / case / "params.npz"), "--config", str(config), "-o",
                 str(tmp_path / "ours"), "-q"]) == 0
    assert main([str(tmp_path / "ours"), "--to", "hf", "-o", str(tmp_path / "hf"), "-q"]) == 0
    assert main([str(tmp_path / "hf"), "-o", str(tmp_path / "back"), "-q"]) == 0
    before, after = load_state_dict(tmp_path / "ours"), load_state_dict(tmp_path / "back")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert tensor.dtype == after[name].dtype and torch.equal(tensor, after[name]), name
    assert PaliGemmaConfig.load(tmp_path / "back" / "config.json") == PaliGemmaConfig.load(
        tmp_path / "ours" / "config.json")


def test_hub_id_loads_offline_from_the_local_hub_cache(tmp_path):
    # The cache layout huggingface_hub documents (and reads): models--{org}--{name}/ with
    # blobs/, refs/main holding the commit, snapshots/{commit}/ the files.
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--google--tiny-paligemma" / "snapshots" / commit
    save_hf(random_hf_model("gemma2"), snapshot, "4.x")
    shutil.copyfile(DEMO_TOKENIZER, snapshot / "tokenizer.model")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    assert constants.REPO_ID_SEPARATOR == "--"
    script = ("import torch; from paligemma import PaliGemma; "
              "pg = PaliGemma.from_pretrained('google/tiny-paligemma'); "
              "print(pg.model.config.text.vocab_size, pg.generate(torch.zeros(1, 3, 16, 16), "
              "['caption en'], max_new_tokens=4)[0].tokens)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    local = PaliGemma.from_pretrained(snapshot)
    expected = local.generate(torch.zeros(1, 3, 16, 16), ["caption en"], max_new_tokens=4)
    assert done.stdout.split()[0] == str(VOCAB)
    assert done.stdout.strip().endswith(str(expected[0].tokens))


def test_defaults_for_unset_config_fields_are_transformers_own():
    for kind, defaults in TEXT_DEFAULTS.items():
        config = transformers.AutoConfig.for_model(kind)
        for key, value in defaults.items():
            got = config.rope_parameters["rope_theta"] if key == "rope_theta" else getattr(
                config, key)
            assert got == value, (kind, key)
    vision = transformers.SiglipVisionConfig()
    assert {k: getattr(vision, k) for k in VISION_DEFAULTS} == VISION_DEFAULTS
    assert transformers.PaliGemmaConfig().image_token_index == IMAGE_TOKEN_INDEX_DEFAULT


def test_unsupported_hf_settings_are_named(tmp_path):
    directory = save_hf(random_hf_model("gemma"), tmp_path / "hf", "save_pretrained")
    raw = json.loads((directory / "config.json").read_text())
    raw["text_config"]["hidden_act"] = "relu"
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="text_config.hidden_activation 'relu'"):
        load_pretrained(directory)
    assert main([str(directory), "-o", str(tmp_path / "out"), "-q"]) == 1


# ---------------------------------------------------------------------------------------------
# An export that serves: what AutoProcessor and serving stacks read.

DEMO = Path(__file__).parents[1] / "paligemma" / "demo" / "model"


def test_export_serves_the_demo_model_through_the_processor(tmp_path):
    from paligemma.demo import scenes

    npz, config = DEMO / "paligemma-demo.npz", DEMO / "config.json"
    # The tokenizer next to the .npz is found and exported with the weights.
    assert main([str(npz), "--config", str(config), "--to", "hf", "-o", str(tmp_path / "hf"),
                 "-q"]) == 0
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["image_token_index"] == VOCAB < exported["text_config"]["vocab_size"] == ROWS
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "hf")
    assert processor.image_token_id == VOCAB and processor.tokenizer.bos_token == "<s>"
    hf = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        tmp_path / "hf", dtype=torch.float32).eval()
    assert main([str(npz), "--config", str(config), "-o", str(tmp_path / "ours"), "-q"]) == 0
    pg = PaliGemma.from_pretrained(tmp_path / "ours", tokenizer=DEMO / "tokenizer.model")
    n = pg.model.config.num_image_tokens
    for seed in (1, 2):  # drawn at the model's 112 px: no resize, so the pixels agree exactly
        scene = scenes.draw_scene(random.Random(seed), pg.model.config.vision.image_size)
        kind = scene.shapes[0].kind
        for prompt in ["caption en", f"answer en what color is the {kind}", f"detect {kind}"]:
            inputs = processor(images=scene.image, text="<image>" + prompt, return_tensors="pt")
            assert inputs.input_ids[0, n:].tolist() == pg.tokenizer.batch([prompt])[0][0].tolist()
            with torch.no_grad():
                out = hf.generate(**inputs, max_new_tokens=16, do_sample=False)
            theirs = out[0, inputs.input_ids.shape[1]:].tolist()
            eos = pg.tokenizer.eos_id
            theirs = theirs[: theirs.index(eos)] if eos in theirs else theirs
            assert theirs == pg.generate(scene.image, prompt, max_new_tokens=16).tokens, prompt


def test_export_without_a_tokenizer_says_so(tmp_path, capsys):
    src = GOLD / "pg2_tiny" / "params.npz"
    assert main([str(src), "--config", str(CONFIGS / "pg2_tiny.json"), "--to", "hf", "-o",
                 str(tmp_path / "hf")]) == 0
    assert "has no tokenizer files" in capsys.readouterr().err
    assert not (tmp_path / "hf" / "tokenizer_config.json").exists()
    assert (tmp_path / "hf" / "preprocessor_config.json").is_file()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_config_as_transformers_writes_it_imports_as_that_variant(variant):
    from paligemma.formats.hf import padded_vocab
    from paligemma.formats.hf_import import config_from_hf

    config = VARIANTS[variant]
    raw = hf_config(config, torch.bfloat16)
    del raw["big_vision"]  # as in Google's repositories: the variant is found from the shapes
    written = transformers.PaliGemmaConfig(**raw).to_dict()  # what save_pretrained would write
    rows = (padded_vocab(config.text.vocab_size), config.text.width)
    got = config_from_hf(written, (rows, torch.bfloat16), Path("config.json"))
    assert got == config.replace(param_dtype="bfloat16") and got.name == variant
