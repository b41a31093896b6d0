"""Model configurations: dataclasses plus a registry of the 12 official PaliGemma variants.

Hyper-parameters follow big_vision (`models/vit.py` So400m/14, `models/ppp/gemma.py`
gemma_2b / gemma2_2b / gemma2_9b / gemma2_27b) and the official PaliGemma transfer configs.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

PALIGEMMA_VOCAB_SIZE = 256_000 + 1024 + 128  # Gemma pieces + <locNNNN> + <segNNN>


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP ViT (big_vision `vit.py`, learned posemb, no CLS token, `pool_type="none"`)."""

    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224

    def __post_init__(self) -> None:
        check_fields(self, lambda name: f"vision.{name}")
        _require(
            self.width % self.num_heads == 0,
            f"vision width {self.width} is not divisible by num_heads {self.num_heads}",
        )
        _require(
            self.image_size % self.patch_size == 0,
            f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}",
        )

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class TextConfig:
    """Gemma 1 / Gemma 2 decoder as big_vision's `gemma.py` runs it (no sliding window)."""

    width: int = 2048
    depth: int = 18
    mlp_dim: int = 16384
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    vocab_size: int = PALIGEMMA_VOCAB_SIZE
    attn_logits_softcap: float | None = None
    final_logits_softcap: float | None = None
    post_norms: bool = False
    # "rsqrt_head_dim": q *= head_dim**-0.5; "rsqrt_emb_per_head": q *= (width//num_heads)**-0.5
    # (gemma2_27b).
    query_pre_attn_norm: str = "rsqrt_head_dim"
    rope_max_wavelength: float = 10_000.0
    # dtype the official parameters were stored in. big_vision multiplies text embeddings by
    # sqrt(width) cast to the embedding table's dtype, so bf16 weights use a bf16-rounded
    # constant (48.0 stays 48.0, 59.87 becomes 59.75) even though all other math is f32.
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_fields(self, lambda name: f"text.{name}", above_zero=("rope_max_wavelength",))
        # The official configs spell "no softcap" as 0.0; keep a single spelling.
        for name in ("attn_logits_softcap", "final_logits_softcap"):
            if not getattr(self, name):
                object.__setattr__(self, name, None)
        _require(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}",
        )
        _require(self.head_dim % 2 == 0, f"head_dim {self.head_dim} must be even for RoPE")
        _require(
            self.query_pre_attn_norm in ("rsqrt_head_dim", "rsqrt_emb_per_head"),
            f"unknown query_pre_attn_norm {self.query_pre_attn_norm!r}",
        )
        _require(
            self.param_dtype in ("float32", "bfloat16", "float16"),
            f"unknown param_dtype {self.param_dtype!r}",
        )

    @property
    def query_scale(self) -> float:
        if self.query_pre_attn_norm == "rsqrt_emb_per_head":
            return (self.width // self.num_heads) ** -0.5
        return self.head_dim**-0.5

    @property
    def param_math_dtype(self) -> torch.dtype | None:
        """dtype of the two ops big_vision runs in the parameters' dtype, if it rounds them.

        `embedding * sqrt(width)` and RMSNorm's `1 + scale` are computed in the parameter dtype.
        Under jit, XLA keeps bf16 results in f32 (excess precision) but rounds f16 ones, so
        only f16 checkpoints round (measured against big_vision on CPU).
        """
        return torch.float16 if self.param_dtype == "float16" else None

    @property
    def embed_scale(self) -> float:
        """sqrt(width), rounded to `param_dtype` as big_vision does."""
        dtype = getattr(torch, self.param_dtype)
        return float(torch.tensor(math.sqrt(self.width), dtype=torch.float64).to(dtype))


@dataclass(frozen=True)
class PaliGemmaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    name: str | None = None

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    def replace(self, **text_or_vision: Any) -> PaliGemmaConfig:
        """Copy with some fields changed, e.g. `cfg.replace(final_logits_softcap=None)`."""
        text = {k: v for k, v in text_or_vision.items() if k in _field_names(TextConfig)}
        vision = {k: v for k, v in text_or_vision.items() if k in _field_names(VisionConfig)}
        unknown = set(text_or_vision) - set(text) - set(vision)
        _require(not unknown, f"unknown config fields {sorted(unknown)}")
        return PaliGemmaConfig(
            dataclasses.replace(self.vision, **vision),
            dataclasses.replace(self.text, **text),
            self.name,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PaliGemmaConfig:
        _require(isinstance(d, dict), f"expected a JSON object, got {type(d).__name__}")
        for part in ("vision", "text"):
            value = d.get(part, {})
            _require(isinstance(value, dict), f"{part}: expected an object, got {value!r}")
        name = d.get("name")
        _require(name is None or isinstance(name, str), f"name: expected a string, got {name!r}")
        for part, typ in (("vision", VisionConfig), ("text", TextConfig)):
            unknown = set(d.get(part, {})) - _field_names(typ)
            _require(not unknown, f"unknown {part} config fields {sorted(unknown)}")
        return cls(
            VisionConfig(**d.get("vision", {})), TextConfig(**d.get("text", {})), d.get("name")
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> PaliGemmaConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def check_fields(config: Any, label: Callable[[str], str], minimum: dict[str, float] | None = None,
                 above_zero: tuple[str, ...] = (), int_min: int = 1) -> None:
    """Checks a dataclass's values against its annotations: int, float (an int is fine), bool or
    str, `| None` allowing None; numbers finite and >= their minimum (`minimum[name]`, else
    `int_min` for ints and 0 for floats; > it for names in `above_zero`). Raises ValueError
    naming `label(field)` and the value."""
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), f.type.split(" |")[0]
        if value is None and "None" in f.type:
            continue
        if kind in ("int", "float"):
            low = (minimum or {}).get(f.name, int_min if kind == "int" else 0)
            strict = f.name in above_zero
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and (kind == "float" or isinstance(value, int)) and math.isfinite(value)
                  and (value > low if strict else value >= low))
            number = "an integer" if kind == "int" else "a number"
            want = f"{number} {'>' if strict else '>='} {low}"
        elif kind == "bool":
            ok, want = isinstance(value, bool), "true or false"
        else:
            ok, want = isinstance(value, str), "a string"
        _require(ok, f"{label(f.name)}: expected {want}, got {value!r}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# Gemma decoders used by PaliGemma (big_vision gemma.get_config). PaliGemma 2 checkpoints are
# released and fine-tuned with final_logits_softcap=0.0 ("Better for transfer", forkme.py),
# so the registry leaves the final softcap off; the attention softcap (50) stays.
GEMMA_DECODERS = {
    "gemma_2b": TextConfig(
        width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256
    ),
    "gemma2_2b": TextConfig(
        width=2304,
        depth=26,
        mlp_dim=9216,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        attn_logits_softcap=50.0,
        post_norms=True,
    ),
    "gemma2_9b": TextConfig(
        width=3584,
        depth=42,
        mlp_dim=14336,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        attn_logits_softcap=50.0,
        post_norms=True,
    ),
    "gemma2_27b": TextConfig(
        width=4608,
        depth=46,
        mlp_dim=36864,
        num_heads=32,
        num_kv_heads=16,
        head_dim=128,
        attn_logits_softcap=50.0,
        post_norms=True,
        query_pre_attn_norm="rsqrt_emb_per_head",
    ),
}
_FAMILIES = {
    "pg1-3b": "gemma_2b",
    "pg2-3b": "gemma2_2b",
    "pg2-10b": "gemma2_9b",
    "pg2-28b": "gemma2_27b",
}
RESOLUTIONS = (224, 448, 896)

VARIANTS: dict[str, PaliGemmaConfig] = {
    f"{family}-{res}": PaliGemmaConfig(
        VisionConfig(image_size=res), GEMMA_DECODERS[gemma], name=f"{family}-{res}"
    )
    for family, gemma in _FAMILIES.items()
    for res in RESOLUTIONS
}


def get_config(name: str) -> PaliGemmaConfig:
    """Config of an official variant, e.g. `get_config("pg2-10b-448")`."""
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[name]
