"""A Hugging Face transformers PaliGemma directory -> our names, shapes and config.

Reads what `PaliGemmaForConditionalGeneration` checkpoints hold: `config.json` (model_type
"paligemma", `text_config` gemma / gemma2, `vision_config` siglip) and safetensors weights, one
file or shards with `model.safetensors.index.json`, in float32, bfloat16 or float16. Three
weight-name schemes are in use, all accepted (see `canonical_name`):

    Google's repositories (transformers 4.x)  vision_tower.vision_model.*  language_model.model.*
    transformers 5.x, in memory               model.vision_tower.*         model.language_model.*
    transformers 5.x, save_pretrained         vision_tower.*               language_model.model.*

The vocabulary is padded (Google: 257216 rows for 257152 tokens, `<image>` = 257152 inside it);
rows from `image_token_index` on are never looked up by PaliGemma (image tokens are replaced by
image features) nor produced by the tokenizer, so they are dropped: our vocabulary is
min(rows, image_token_index). The model computes what transformers computes with that config,
except that, as big_vision, there is no sliding window (Gemma 2 configs default to 4096-token
windows on alternate layers: the two differ only past 4096 tokens, i.e. on 896 px inputs).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ..config import VARIANTS, PaliGemmaConfig, TextConfig, VisionConfig
from ..model import PaliGemmaModel
from .dtypes import TORCH_DTYPE_NAMES
from .errors import CheckpointError, check_layout
from .hf import BIG_VISION_KEY, hf_names, hf_shape

_VISION, _LLM = "vision_tower.vision_model.", "language_model.model."
LM_HEAD = "lm_head.weight"  # tied to the embedding in every PaliGemma; not a weight of ours
EMBEDDING = _LLM + "embed_tokens.weight"
# SigLIP's attention-pooling head: transformers builds it when `vision_use_head` is true, but
# PaliGemma reads the encoder's last hidden state, so the head never contributes.
_UNUSED_PREFIX = _VISION + "head."
# transformers' defaults for what Google's config.json files leave out (GemmaConfig,
# Gemma2Config, SiglipVisionConfig, PaliGemmaConfig; tests compare them with the installed ones).
TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": {"head_dim": 256, "rope_theta": 10_000.0, "rms_norm_eps": 1e-6},
    "gemma2": {
        "head_dim": 256,
        "rope_theta": 10_000.0,
        "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
    },
}
VISION_DEFAULTS: dict[str, Any] = {"patch_size": 16, "image_size": 224, "layer_norm_eps": 1e-6}
IMAGE_TOKEN_INDEX_DEFAULT = 256_000
_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_fast", "gelu_new")  # the same tanh approximation


def is_hf_config(raw: dict[str, Any]) -> bool:
    """Whether a config.json is a transformers PaliGemma one (ours has `vision` / `text`)."""
    return raw.get("model_type") == "paligemma" and "text_config" in raw


def canonical_name(name: str) -> str:
    """Any transformers scheme's tensor name -> the name in Google's repositories."""
    for prefix in ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model."):
        if name.startswith(prefix):
            name = name.removeprefix("model.")
            if name.startswith("language_model.") and not name.startswith(_LLM):
                name = _LLM + name.removeprefix("language_model.")
            break
    if name.startswith("vision_tower.") and not name.startswith(_VISION):
        name = _VISION + name.removeprefix("vision_tower.")
    return LM_HEAD if name == "language_model.lm_head.weight" else name


def config_from_hf(
    raw: dict[str, Any], embedding: tuple[tuple[int, ...], torch.dtype], where: Path
) -> PaliGemmaConfig:
    """Our config for a transformers PaliGemma config.json; `embedding` is the stored
    embedding's (shape, dtype). Raises CheckpointError naming the setting we cannot run."""
    t, v = dict(raw.get("text_config") or {}), dict(raw.get("vision_config") or {})
    kind = t.get("model_type", "gemma")
    if kind not in TEXT_DEFAULTS:
        raise CheckpointError(f"{where}: text_config.model_type {kind!r} is not gemma or gemma2")
    t = {**TEXT_DEFAULTS[kind], **{k: x for k, x in t.items() if x is not None or k in (
        "attn_logit_softcapping", "final_logit_softcapping")}}
    v = {**VISION_DEFAULTS, **v}
    rope = t.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", t.get("rope_theta"))
    if rope.get("rope_type", "default") != "default" or t.get("rope_scaling"):
        scaling = rope or t.get("rope_scaling")
        raise CheckpointError(f"{where}: RoPE scaling {scaling} is not supported")
    for key, value in (
        ("text_config.hidden_activation", t.get("hidden_activation") or t.get("hidden_act")),
        ("vision_config.hidden_act", v.get("hidden_act")),
    ):
        if value is not None and value not in _TANH_GELUS:
            raise CheckpointError(f"{where}: {key} {value!r}; PaliGemma uses gelu_pytorch_tanh")
    for key, value in (("text_config.rms_norm_eps", t["rms_norm_eps"]),
                       ("vision_config.layer_norm_eps", v["layer_norm_eps"])):
        if value != 1e-6:
            raise CheckpointError(f"{where}: {key} {value}; PaliGemma uses 1e-6")
    if raw.get("tie_word_embeddings", t.get("tie_word_embeddings", True)) is False:
        raise CheckpointError(f"{where}: tie_word_embeddings is false; PaliGemma ties its LM head")
    width, heads, head_dim = t["hidden_size"], t["num_attention_heads"], t["head_dim"]
    if kind == "gemma2":
        scalar = t["query_pre_attn_scalar"]
        if scalar == head_dim:
            query = "rsqrt_head_dim"
        elif scalar == width // heads:
            query = "rsqrt_emb_per_head"
        else:
            raise CheckpointError(
                f"{where}: query_pre_attn_scalar {scalar} is neither head_dim {head_dim} nor "
                f"hidden_size // num_attention_heads {width // heads}"
            )
        caps = (t["attn_logit_softcapping"], t["final_logit_softcapping"])
    else:
        query, caps = "rsqrt_head_dim", (None, None)
    rows, dtype = embedding
    ours_export = raw.get(BIG_VISION_KEY) or {}  # what our export (formats.hf) records
    if t.get("vocab_size", rows[0]) != rows[0]:
        raise CheckpointError(
            f"{where}: text_config.vocab_size {t['vocab_size']}, but the embedding has "
            f"{rows[0]} rows"
        )
    image_token = raw.get("image_token_index", raw.get("image_token_id", IMAGE_TOKEN_INDEX_DEFAULT))
    projection = raw.get("projection_dim", v.get("projection_dim", width))
    if projection != width:
        raise CheckpointError(f"{where}: projection_dim {projection} != text hidden_size {width}")
    try:
        config = PaliGemmaConfig(
            VisionConfig(
                width=v["hidden_size"],
                depth=v["num_hidden_layers"],
                mlp_dim=v["intermediate_size"],
                num_heads=v["num_attention_heads"],
                patch_size=v["patch_size"],
                image_size=v["image_size"],
            ),
            TextConfig(
                width=width,
                depth=t["num_hidden_layers"],
                mlp_dim=t["intermediate_size"],
                num_heads=heads,
                num_kv_heads=t.get("num_key_value_heads", heads),
                head_dim=head_dim,
                vocab_size=min(rows[0], image_token),
                attn_logits_softcap=caps[0],
                final_logits_softcap=caps[1],
                post_norms=kind == "gemma2",
                query_pre_attn_norm=query,
                rope_max_wavelength=float(rope_theta),
                param_dtype=ours_export.get("param_dtype", TORCH_DTYPE_NAMES[dtype]),
            ),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: unusable PaliGemma config: {type(e).__name__} {e}") from e
    name = ours_export.get("variant") or _variant_name(config)
    return PaliGemmaConfig(config.vision, config.text, name)


def _variant_name(config: PaliGemmaConfig) -> str | None:
    """The registry variant `config` is, whatever dtype its weights are stored in."""
    for name, variant in VARIANTS.items():
        text = dataclasses.replace(config.text, param_dtype=variant.text.param_dtype)
        if (variant.vision, variant.text) == (config.vision, text):
            return name
    return None


def our_names(
    config: PaliGemmaConfig, stored: dict[str, tuple[tuple[int, ...], torch.dtype]], where: Path
) -> dict[str, str]:
    """{stored name: our name} for every tensor we load; checks names and shapes.

    The tied LM head and SigLIP's unused pooling head are left out; anything else missing,
    unexpected or of the wrong shape raises CheckpointError naming it.
    """
    with torch.device("meta"):
        ours = {k: tuple(t.shape) for k, t in PaliGemmaModel(config).state_dict().items()}
    to_hf = hf_names(config, list(ours))
    from_hf = {hf: name for name, hf in to_hf.items()}
    canonical = {}  # Google's name -> stored name, for what we load
    for name in stored:
        key = canonical_name(name)
        if key in canonical:
            raise CheckpointError(f"{where}: {name!r} is {canonical[key]!r} stored again")
        if key != LM_HEAD and not key.startswith(_UNUSED_PREFIX):
            canonical[key] = name
    expected = {to_hf[n]: hf_shape(n, shape, config) for n, shape in ours.items()}
    found = {key: stored[name][0] for key, name in canonical.items()}
    if EMBEDDING in found:  # padded rows: only the width has to agree
        expected[EMBEDDING] = (found[EMBEDDING][0], expected[EMBEDDING][1])
    check_layout(where, expected, found)
    return {name: from_hf[key] for key, name in canonical.items()}


def from_hf_tensor(our_name: str, t: torch.Tensor, config: PaliGemmaConfig) -> torch.Tensor:
    """A stored tensor in our layout: the position embedding gets its batch axis back, the
    embedding loses its padding rows (a view: nothing is copied)."""
    if our_name == "vision.pos_embedding":
        return t.reshape(1, *t.shape)
    if our_name == "decoder.embedder.weight":
        return t[: config.text.vocab_size]
    return t
