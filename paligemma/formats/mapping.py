"""The official big_vision parameter layout <-> our module parameters.

`weight_rules(config)` is the single mapping table: each row names one official array, the
module parameter(s) it becomes, and the reshape that turns one into the other. Every loader and
writer of the official layout (`formats.open`, `formats.writers`) reads this table; nothing else
renames official weights.

Official layouts (gotcha 2 of the reference notes):
- Layers are scan-stacked: `img/Transformer/encoderblock/...` and `llm/layers/...` carry a
  leading layer axis; rows marked `stacked` map slice i to our parameter with `{i}` = i.
- flax Dense kernels are (in, out); torch Linear weights are (out, in): transposed.
- Attention einsums keep the head axis separate; torch Linear flattens it (heads * head_dim)
  with the head index as the slower-moving axis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import VARIANTS, PaliGemmaConfig
from ..model import PaliGemmaModel
from .dtypes import TORCH_DTYPE_NAMES
from .errors import CheckpointError, check_layout
from .npz import OfficialNpz


@dataclass(frozen=True)
class Transform:
    """to_ours: official array -> our tensor(s); to_official: the exact inverse."""

    to_ours: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    to_official: Callable[..., torch.Tensor]


IDENTITY = Transform(lambda w: (w,), lambda w: w)
# flax Dense kernel (in, out) <-> torch Linear weight (out, in).
DENSE = Transform(lambda w: (w.T,), lambda w: w.T)
# flax Conv kernel HWIO (kh, kw, in, out) <-> torch Conv2d weight OIHW.
CONV = Transform(lambda w: (w.permute(3, 2, 0, 1),), lambda w: w.permute(2, 3, 1, 0))


def vit_qkv_kernel(heads: int) -> Transform:
    """(D, heads, head_dim) <-> Linear weight (heads * head_dim, D)."""
    return Transform(
        lambda w: (w.reshape(w.shape[0], -1).T,), lambda w: w.T.reshape(w.shape[1], heads, -1)
    )


def vit_qkv_bias(heads: int) -> Transform:
    """(heads, head_dim) <-> (heads * head_dim,)."""
    return Transform(lambda b: (b.reshape(-1),), lambda b: b.reshape(heads, -1))


def vit_out_kernel(heads: int) -> Transform:
    """(heads, head_dim, D) <-> Linear weight (D, heads * head_dim)."""
    return Transform(
        lambda w: (w.reshape(-1, w.shape[-1]).T,), lambda w: w.T.reshape(heads, -1, w.shape[0])
    )


def _einsum_in(w: torch.Tensor) -> torch.Tensor:
    """gemma (heads, D, head_dim) -> Linear weight (heads * head_dim, D)."""
    return w.transpose(1, 2).reshape(-1, w.shape[1])


def _einsum_in_inverse(w: torch.Tensor, heads: int) -> torch.Tensor:
    return w.reshape(heads, -1, w.shape[1]).transpose(1, 2)


def einsum_in(heads: int) -> Transform:
    """`q_einsum/w` (N, D, H)."""
    return Transform(lambda w: (_einsum_in(w),), lambda w: _einsum_in_inverse(w, heads))


def einsum_in_stacked(heads: int) -> Transform:
    """`kv_einsum/w` (2, K, D, H) -> k, v; `qkv_einsum/w` (3, N, D, H) -> q, k, v."""
    return Transform(
        lambda w: tuple(_einsum_in(p) for p in w.unbind(0)),
        lambda *ws: torch.stack([_einsum_in_inverse(p, heads) for p in ws]),
    )


def einsum_out(heads: int) -> Transform:
    """`attn_vec_einsum/w` (N, H, D) <-> Linear weight (D, N * H)."""
    return Transform(
        lambda w: (w.reshape(-1, w.shape[-1]).T,), lambda w: w.T.reshape(heads, -1, w.shape[0])
    )


# `gating_einsum` (2, D, F): [0] is the gate (through gelu), [1] the up projection.
GATING = Transform(lambda w: (w[0].T, w[1].T), lambda gate, up: torch.stack([gate.T, up.T]))


@dataclass(frozen=True)
class WeightRule:
    official: str  # big_vision name without the "params/" prefix
    ours: tuple[str, ...]  # PaliGemmaModel.state_dict() names; "{i}" is the layer index if stacked
    stacked: bool
    transform: Transform

    def our_names(self, layer: int | None = None) -> tuple[str, ...]:
        return tuple(n.format(i=layer) for n in self.ours)


def weight_rules(config: PaliGemmaConfig) -> list[WeightRule]:
    v, t = config.vision, config.text
    blk, mha = (
        "img/Transformer/encoderblock/",
        "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/",
    )
    vb, lb = "vision.blocks.{i}.", "decoder.layers.{i}."
    if t.num_kv_heads == t.num_heads:  # gemma.py then uses one fused qkv einsum
        qkv = [
            (
                "llm/layers/attn/qkv_einsum/w",
                (lb + "attn.q_proj.weight", lb + "attn.k_proj.weight", lb + "attn.v_proj.weight"),
                einsum_in_stacked(t.num_heads),
            )
        ]
    else:
        qkv = [
            ("llm/layers/attn/q_einsum/w", (lb + "attn.q_proj.weight",), einsum_in(t.num_heads)),
            (
                "llm/layers/attn/kv_einsum/w",
                (lb + "attn.k_proj.weight", lb + "attn.v_proj.weight"),
                einsum_in_stacked(t.num_kv_heads),
            ),
        ]
    post_norms = [
        ("llm/layers/post_attention_norm/scale", (lb + "post_attention_norm.scale",), IDENTITY),
        ("llm/layers/post_ffw_norm/scale", (lb + "post_ffw_norm.scale",), IDENTITY),
    ]
    # (official name, our names, transform); stacked rows are those with "{i}" in our names.
    table = [
        ("img/embedding/kernel", ("vision.patch_embed.weight",), CONV),
        ("img/embedding/bias", ("vision.patch_embed.bias",), IDENTITY),
        ("img/pos_embedding", ("vision.pos_embedding",), IDENTITY),
        (blk + "LayerNorm_0/scale", (vb + "norm1.weight",), IDENTITY),
        (blk + "LayerNorm_0/bias", (vb + "norm1.bias",), IDENTITY),
        (mha + "query/kernel", (vb + "attn.q_proj.weight",), vit_qkv_kernel(v.num_heads)),
        (mha + "query/bias", (vb + "attn.q_proj.bias",), vit_qkv_bias(v.num_heads)),
        (mha + "key/kernel", (vb + "attn.k_proj.weight",), vit_qkv_kernel(v.num_heads)),
        (mha + "key/bias", (vb + "attn.k_proj.bias",), vit_qkv_bias(v.num_heads)),
        (mha + "value/kernel", (vb + "attn.v_proj.weight",), vit_qkv_kernel(v.num_heads)),
        (mha + "value/bias", (vb + "attn.v_proj.bias",), vit_qkv_bias(v.num_heads)),
        (mha + "out/kernel", (vb + "attn.out_proj.weight",), vit_out_kernel(v.num_heads)),
        (mha + "out/bias", (vb + "attn.out_proj.bias",), IDENTITY),
        (blk + "LayerNorm_1/scale", (vb + "norm2.weight",), IDENTITY),
        (blk + "LayerNorm_1/bias", (vb + "norm2.bias",), IDENTITY),
        (blk + "MlpBlock_0/Dense_0/kernel", (vb + "mlp.fc1.weight",), DENSE),
        (blk + "MlpBlock_0/Dense_0/bias", (vb + "mlp.fc1.bias",), IDENTITY),
        (blk + "MlpBlock_0/Dense_1/kernel", (vb + "mlp.fc2.weight",), DENSE),
        (blk + "MlpBlock_0/Dense_1/bias", (vb + "mlp.fc2.bias",), IDENTITY),
        ("img/Transformer/encoder_norm/scale", ("vision.norm.weight",), IDENTITY),
        ("img/Transformer/encoder_norm/bias", ("vision.norm.bias",), IDENTITY),
        ("img/head/kernel", ("projector.weight",), DENSE),
        ("img/head/bias", ("projector.bias",), IDENTITY),
        ("llm/embedder/input_embedding", ("decoder.embedder.weight",), IDENTITY),
        ("llm/layers/pre_attention_norm/scale", (lb + "pre_attention_norm.scale",), IDENTITY),
        *qkv,
        (
            "llm/layers/attn/attn_vec_einsum/w",
            (lb + "attn.o_proj.weight",),
            einsum_out(t.num_heads),
        ),
        ("llm/layers/pre_ffw_norm/scale", (lb + "pre_ffw_norm.scale",), IDENTITY),
        (
            "llm/layers/mlp/gating_einsum",
            (lb + "mlp.gate_proj.weight", lb + "mlp.up_proj.weight"),
            GATING,
        ),
        ("llm/layers/mlp/linear", (lb + "mlp.down_proj.weight",), DENSE),
        *(post_norms if t.post_norms else []),
        ("llm/final_norm/scale", ("decoder.final_norm.scale",), IDENTITY),
    ]
    return [WeightRule(name, ours, "{i}" in ours[0], tf) for name, ours, tf in table]


def _depth(rule: WeightRule, config: PaliGemmaConfig) -> int:
    return config.vision.depth if rule.official.startswith("img/") else config.text.depth


def to_official(
    rule: WeightRule, state: dict[str, torch.Tensor], config: PaliGemmaConfig
) -> torch.Tensor:
    """Our tensors for one rule -> the official array (layers stacked on axis 0)."""
    if not rule.stacked:
        return rule.transform.to_official(*(state[n] for n in rule.our_names()))
    return torch.stack(
        [
            rule.transform.to_official(*(state[n] for n in rule.our_names(i)))
            for i in range(_depth(rule, config))
        ]
    )


def to_ours(rule: WeightRule, array: torch.Tensor) -> dict[str, torch.Tensor]:
    """One official array -> {our name: tensor}."""
    if not rule.stacked:
        return dict(zip(rule.our_names(), rule.transform.to_ours(array), strict=True))
    out = {}
    for i, layer in enumerate(array.unbind(0)):
        out.update(zip(rule.our_names(i), rule.transform.to_ours(layer), strict=True))
    return out


def official_shapes(config: PaliGemmaConfig) -> dict[str, tuple[int, ...]]:
    """Every official key and its shape for `config`, derived on the meta device."""
    with torch.device("meta"):
        state = PaliGemmaModel(config).state_dict()
    return {r.official: tuple(to_official(r, state, config).shape) for r in weight_rules(config)}


def detect_variants(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Registry variants whose official layout has exactly these keys and shapes."""
    return [name for name, cfg in VARIANTS.items() if official_shapes(cfg) == shapes]


def check_official_layout(ckpt: OfficialNpz, config: PaliGemmaConfig) -> None:
    """Raises CheckpointError naming the first missing / unexpected key or wrong shape."""
    where = ", ".join(str(p) for p in ckpt.paths)
    files = {key: info.path for key, info in ckpt.arrays.items()}
    check_layout(where, official_shapes(config), ckpt.shapes(), "key", files)


def resolve_config(ckpt: OfficialNpz, config: PaliGemmaConfig | str | None) -> PaliGemmaConfig:
    """The config to load `ckpt` with: given, named, or detected from the shapes.

    `param_dtype` always comes from the file (it decides how big_vision rounds sqrt(width)).
    """
    if isinstance(config, str):
        config = VARIANTS[config] if config in VARIANTS else PaliGemmaConfig.load(config)
    if config is None:
        candidates = detect_variants(ckpt.shapes())
        if len(candidates) != 1:
            raise CheckpointError(
                f"{', '.join(map(str, ckpt.paths))}: cannot detect the variant from the shapes "
                f"(candidates: {candidates or 'none'}); pass a variant name or a config"
            )
        config = VARIANTS[candidates[0]]
    embedding = ckpt.arrays.get("llm/embedder/input_embedding")
    if embedding is not None:
        config = config.replace(param_dtype=TORCH_DTYPE_NAMES[embedding.dtype])
    return config

