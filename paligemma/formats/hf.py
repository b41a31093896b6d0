"""Our names -> a Hugging Face transformers `PaliGemmaForConditionalGeneration` checkpoint.

Tensor names follow Google's PaliGemma repositories on the Hub (`vision_tower.vision_model.*`,
`multi_modal_projector.linear.*`, `language_model.model.*`; the LM head is tied to the
embedding and not stored), which transformers 4.x and 5.x and the serving stacks load. The
layouts agree with ours (torch Linear (out, in), heads as the slower axis, conv OIHW, RMSNorm
`(1 + weight)`), so the export is a renaming plus one reshape (the position embedding).

What the config must say to reproduce big_vision (and ours), see `hf_config`:
- Gemma 2: `sliding_window: null` and every `layer_types` entry `full_attention` (big_vision has
  no sliding window; transformers' default alternates 4096-token local layers).
- `final_logit_softcapping` as in our config (null for the PaliGemma 2 transfer configs, 30.0
  for the pretraining-style variant), `attn_logit_softcapping` 50.0 for Gemma 2.
- `query_pre_attn_scalar` = head_dim, or width // num_heads for the 27B-style query scaling.
- `hidden_activation` / `hidden_act` `gelu_pytorch_tanh`, `rms_norm_eps` and `layer_norm_eps`
  1e-6.
- `image_token_index` = vocab size (257152), one past the last real token, as Google's `<image>`
  token id, and the embedding padded with zero rows to a multiple of 64 past it (257216 rows, as
  Google's repositories): serving stacks look `<image>` up in the embedding before replacing it.
  transformers replaces it before the embedding lookup, and image features are not scaled by
  sqrt(width) in transformers >= 4.47 either.
- `big_vision`: {"variant": our config's name, "param_dtype": the stored dtype of the official
  weights}, so that reading the export back (`formats.hf_import`) gives the same config whatever
  dtype it holds; transformers keeps unknown keys and ignores them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch

from .. import __version__
from ..config import PaliGemmaConfig
from .dtypes import TORCH_DTYPE_NAMES
from .errors import CheckpointError

BIG_VISION_KEY = "big_vision"
VOCAB_MULTIPLE = 64  # Google pads 257152 tokens + <image> to 257216 = 64 * 4019 rows
_VISION = "vision_tower.vision_model."
_LLM = "language_model.model."


def _renames(config: PaliGemmaConfig) -> list[tuple[str, str]]:
    # Gemma 1's HF layer calls its pre-FFW norm "post_attention_layernorm"; Gemma 2 has both.
    pre_ffw = "pre_feedforward_layernorm" if config.text.post_norms else "post_attention_layernorm"
    return [
        (r"vision\.patch_embed\.", _VISION + "embeddings.patch_embedding."),
        (r"vision\.pos_embedding", _VISION + "embeddings.position_embedding.weight"),
        (r"vision\.blocks\.(\d+)\.norm([12])\.", _VISION + r"encoder.layers.\1.layer_norm\2."),
        (r"vision\.blocks\.(\d+)\.attn\.", _VISION + r"encoder.layers.\1.self_attn."),
        (r"vision\.blocks\.(\d+)\.mlp\.", _VISION + r"encoder.layers.\1.mlp."),
        (r"vision\.norm\.", _VISION + "post_layernorm."),
        (r"projector\.", "multi_modal_projector.linear."),
        (r"decoder\.embedder\.weight", _LLM + "embed_tokens.weight"),
        (r"decoder\.layers\.(\d+)\.attn\.", _LLM + r"layers.\1.self_attn."),
        (r"decoder\.layers\.(\d+)\.mlp\.", _LLM + r"layers.\1.mlp."),
        (
            r"decoder\.layers\.(\d+)\.pre_attention_norm\.scale",
            _LLM + r"layers.\1.input_layernorm.weight",
        ),
        (r"decoder\.layers\.(\d+)\.pre_ffw_norm\.scale", _LLM + rf"layers.\1.{pre_ffw}.weight"),
        (
            r"decoder\.layers\.(\d+)\.post_attention_norm\.scale",
            _LLM + r"layers.\1.post_attention_layernorm.weight",
        ),
        (
            r"decoder\.layers\.(\d+)\.post_ffw_norm\.scale",
            _LLM + r"layers.\1.post_feedforward_layernorm.weight",
        ),
        (r"decoder\.final_norm\.scale", _LLM + "norm.weight"),
    ]


def hf_names(config: PaliGemmaConfig, names: list[str]) -> dict[str, str]:
    """{our name: HF name}; every name must match exactly one rule."""
    rules = [(re.compile(pattern), repl) for pattern, repl in _renames(config)]
    out = {}
    for name in names:
        hits = [p.sub(repl, name, count=1) for p, repl in rules if p.match(name)]
        if len(hits) != 1:
            raise ValueError(f"no unique Hugging Face name for {name!r} ({len(hits)} rules match)")
        out[name] = hits[0]
    return out


def hf_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    """Our tensor (or row chunk of it) in the HF layout: position embedding (1, N, D) -> (N, D)."""
    return t.reshape(-1, t.shape[-1]) if name == "vision.pos_embedding" else t


def hf_shape(name: str, shape: tuple[int, ...], config: PaliGemmaConfig) -> tuple[int, ...]:
    if name == "decoder.embedder.weight":
        return (padded_vocab(config.text.vocab_size), shape[1])
    return (shape[1], shape[2]) if name == "vision.pos_embedding" else shape


def hf_chunks(
    config: PaliGemmaConfig, name: str, chunks: Iterator[torch.Tensor]
) -> Iterator[torch.Tensor]:
    """Our tensor's row chunks in the HF layout; the embedding gets its zero padding rows."""
    for chunk in chunks:
        yield hf_tensor(name, chunk)
    if name == "decoder.embedder.weight":
        rows = padded_vocab(config.text.vocab_size) - config.text.vocab_size
        yield torch.zeros(rows, config.text.width, dtype=chunk.dtype)


def padded_vocab(vocab_size: int) -> int:
    """Embedding rows of the export: room for `<image>` (= vocab_size), rounded up to 64."""
    return -(-(vocab_size + 1) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


GEMMA_SPECIAL_IDS = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}


def hf_config(
    config: PaliGemmaConfig, dtype: torch.dtype, special_ids: dict[str, int] | None = None
) -> dict[str, Any]:
    """config.json for transformers' PaliGemmaForConditionalGeneration. special_ids: pad / eos /
    bos token ids (`*_token_id`) from the model's tokenizer; default Gemma's."""
    special_ids = special_ids or GEMMA_SPECIAL_IDS
    v, t = config.vision, config.text
    if t.post_norms:
        text: dict[str, Any] = {
            "model_type": "gemma2",
            "hidden_activation": "gelu_pytorch_tanh",
            # big_vision scales queries by query_scale = query_pre_attn_scalar ** -0.5.
            "query_pre_attn_scalar": round(t.query_scale**-2),
            "attn_logit_softcapping": t.attn_logits_softcap,
            "final_logit_softcapping": t.final_logits_softcap,
            "sliding_window": None,
            "layer_types": ["full_attention"] * t.depth,
        }
    else:
        plain = (
            t.attn_logits_softcap is None
            and t.final_logits_softcap is None
            and t.query_scale == t.head_dim**-0.5
        )
        if not plain:
            raise CheckpointError(
                "transformers' Gemma 1 has no softcaps or custom query scaling; a config with "
                "them and without post norms cannot be exported"
            )
        text = {"model_type": "gemma", "hidden_act": "gelu_pytorch_tanh"}
    text.update(
        hidden_size=t.width,
        intermediate_size=t.mlp_dim,
        num_hidden_layers=t.depth,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        head_dim=t.head_dim,
        vocab_size=padded_vocab(t.vocab_size),
        rms_norm_eps=1e-6,
        rope_theta=t.rope_max_wavelength,
        max_position_embeddings=8192,
        torch_dtype=TORCH_DTYPE_NAMES[dtype],
    )
    return {
        "architectures": ["PaliGemmaForConditionalGeneration"],
        "model_type": "paligemma",
        "torch_dtype": TORCH_DTYPE_NAMES[dtype],
        "vocab_size": padded_vocab(t.vocab_size),
        "image_token_index": t.vocab_size,
        BIG_VISION_KEY: {"variant": config.name, "param_dtype": t.param_dtype},
        "hidden_size": t.width,
        "projection_dim": t.width,
        **special_ids,
        "tie_word_embeddings": True,
        "text_config": text,
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": v.width,
            "intermediate_size": v.mlp_dim,
            "num_hidden_layers": v.depth,
            "num_attention_heads": v.num_heads,
            "patch_size": v.patch_size,
            "image_size": v.image_size,
            "num_image_tokens": v.num_patches,
            "projection_dim": t.width,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
            "vision_use_head": False,
            "torch_dtype": TORCH_DTYPE_NAMES[dtype],
        },
    }


def hf_readme(config: PaliGemmaConfig, dtype: torch.dtype, has_tokenizer: bool) -> str:
    """README.md of the export: how to load it, what the config sets, the known differences."""
    t = config.text
    tokenizer = (
        "The tokenizer (`tokenizer.model`, `<image>` = token "
        f"{t.vocab_size}) and the image processor are included: "
        "`AutoProcessor.from_pretrained(this_dir)`."
        if has_tokenizer
        else "No tokenizer was given to the converter: copy the model's `tokenizer.model` here "
        "and convert again with `--tokenizer` to get the tokenizer files."
    )
    return f"""# PaliGemma, exported for Hugging Face transformers

Converted by paligemma-convert {__version__} ({config.name or "custom config"}), weights in
{TORCH_DTYPE_NAMES[dtype]}. Load it with
`PaliGemmaForConditionalGeneration.from_pretrained(this_dir)`.
{tokenizer}

Settings in config.json that make transformers compute what big_vision computes:
- no sliding window (`sliding_window: null`, every layer `full_attention`);
- final logit softcap {t.final_logits_softcap} and attention logit softcap
  {t.attn_logits_softcap} (null = none);
- query scaling `query_pre_attn_scalar ** -0.5` with the value in config.json;
- tanh-approximate GELU, RMSNorm / LayerNorm epsilon 1e-6;
- the embedding padded with zero rows to {padded_vocab(t.vocab_size)} so that `<image>`
  ({t.vocab_size}) is inside it.

The processor passes `token_type_ids` (0 for image and prefix, 1 for the suffix) for the
prefix-LM mask; pass them yourself without it. Use `attn_implementation="eager"` for Gemma 2
(the attention softcap needs it). Images are resized bilinearly (`resample: 2`), as big_vision
does; Google's own repositories use bicubic.

Known differences:
- for weights stored in bfloat16, big_vision multiplies text embeddings by sqrt(width) rounded
  to bfloat16 ({t.embed_scale!r} here) even when it computes in float32; transformers rounds it
  only when the model runs in bfloat16. To match big_vision in float32, set
  `model.model.language_model.embed_tokens.embed_scale.fill_({t.embed_scale!r})` after loading
  (transformers >= 5);
- vLLM (0.32) loads this directory, but its PaliGemma attention is not the prefix-LM one (fully
  causal on CPU; only the image tokens bidirectional on GPU), so its outputs differ (see
  docs/convert.md of paligemma-torch).
"""
