"""Stage-by-stage comparison of our model with outputs recorded from the official JAX code.

A case directory (the format of the project's gold cases, written by big_vision's own code):
  params.npz    the checkpoint in the official layout (f32 / f16 / bf16 as |V2, with or
                without the `params/` prefix)
  config.json   `model_config` (big_vision's Model config), `llm_variant_config` (the Gemma
                variant's hyper-parameters), token ids, decode settings
  vectors.npz   inputs (`image` NHWC in [-1, 1], `text`/`mask_ar`/`input_mask`, the decode
                prompt `prompt_*`) and the official outputs: per-stage activations, logits,
                greedy decode tokens and logits with an f32 and a bf16 KV cache.
Every size is read from these files.

A mask-VAE case (`seg_vae`: params.npz in vae-oid.npz's layout; vectors.npz with `codes`, the
official `masks` and per-module outputs `ex0_out_<module>` of the first example) compares
`segmentation.MaskDecoder` instead.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import GEMMA_DECODERS, PaliGemmaConfig, TextConfig, VisionConfig
from .formats import load_official
from .gemma import softcap
from .generate import generate
from .model import PaliGemmaModel, make_attn_mask
from .segmentation import MaskDecoder, load_mask_decoder

# Max-abs tolerances. f32 math on either side; the independent float64 re-implementation of the
# reference notes lands within 4e-6 on zimg and 2e-3 on logits.
TOL_ZIMG = 1e-4
TOL_HIDDEN = 5e-3
TOL_LOGITS = 5e-3
# A bf16 KV cache rounds keys/values to 8 mantissa bits, so an f32 difference of 1e-6 before
# rounding can flip a rounding step. Measured on the gold cases: perturbing our keys/values by
# 1e-6 (relative) before rounding moves bf16-cache logits by up to 0.15, and the bf16 cache
# itself moves them by 0.9-1.6 from the f32 cache. Tokens stay exact.
TOL_BF16_CACHE_LOGITS = 0.5
TOL_VAE = 1e-4  # f32 convolutions summed in another order; measured 6e-6
# big_vision's mask decoder module -> index in our `MaskDecoder.decoder` (outputs before the
# following relu).
VAE_STAGES = {
    "Conv_0": 0, "ResBlock_0": 2, "ResBlock_1": 3, "ConvTranspose_0": 4,
    "ConvTranspose_1": 6, "ConvTranspose_2": 8, "ConvTranspose_3": 10, "Conv_1": 12,
}

SOFTCAP_NOTE = (
    "official logits are pre-softcap here (big_vision skips the final softcap in "
    "__call__ and prefill); compared after applying it"
)


@dataclass
class Stage:
    name: str
    shape: list[int]
    max_abs_err: float
    tol: float
    ok: bool
    note: str = ""


@dataclass
class Report:
    case: str
    ok: bool
    stages: list[Stage]

    def to_json(self) -> dict[str, Any]:
        return {"case": self.case, "ok": self.ok, "stages": [asdict(s) for s in self.stages]}

    def table(self) -> str:
        rows = [("stage", "shape", "max_abs_err", "tol", "ok")]
        rows += [
            (
                s.name,
                "x".join(map(str, s.shape)),
                f"{s.max_abs_err:.3g}",
                f"{s.tol:g}",
                "ok" if s.ok else "FAIL",
            )
            for s in self.stages
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        notes = sorted({f"  * {s.name.split('[')[0]}: {s.note}" for s in self.stages if s.note})
        verdict = (
            f"{self.case}: {'PASS' if self.ok else 'FAIL'} "
            f"({sum(s.ok for s in self.stages)}/{len(self.stages)} stages ok)"
        )
        return "\n".join(lines + (["notes:"] + notes if notes else []) + [verdict])


def case_config(case: dict[str, Any], image_size: int) -> PaliGemmaConfig:
    """Our config from a case's config.json (big_vision model config + Gemma variant dict)."""
    img, llm = case["model_config"]["img"], case["model_config"]["llm"]
    patch = img.get("patch_size", 14)
    patch = patch if isinstance(patch, int) else patch[0]
    variant = {**case.get("llm_variant_config", {}), **llm}  # model config overrides the variant
    base = GEMMA_DECODERS.get(variant.get("variant", ""), TextConfig())
    fields = (
        "width",
        "depth",
        "mlp_dim",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "vocab_size",
        "attn_logits_softcap",
        "final_logits_softcap",
        "post_norms",
        "query_pre_attn_norm",
    )
    text = {f: variant[f] for f in fields if f in variant}
    return PaliGemmaConfig(
        VisionConfig(
            width=img["width"],
            depth=img["depth"],
            mlp_dim=img["mlp_dim"],
            num_heads=img["num_heads"],
            patch_size=patch,
            image_size=image_size,
        ),
        TextConfig(**{**asdict(base), **text}),
        name=case.get("case"),
    )


class _Capture:
    """Forward hooks that record module outputs (or inputs) by stage name."""

    def __init__(self) -> None:
        self.values: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []

    def output(
        self,
        name: str,
        module: torch.nn.Module,
        fn: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    ) -> None:
        self.handles.append(
            module.register_forward_hook(
                lambda m, args, out: self.values.__setitem__(name, fn(out))
            )
        )

    def input(self, name: str, module: torch.nn.Module) -> None:
        self.handles.append(
            module.register_forward_pre_hook(lambda m, args: self.values.__setitem__(name, args[0]))
        )

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _capture_forward(
    model: PaliGemmaModel, images: torch.Tensor, text: torch.Tensor, mask_ar: torch.Tensor
) -> dict[str, torch.Tensor]:
    cap = _Capture()
    vision, decoder = model.vision, model.decoder
    cap.output("img_stem", vision.patch_embed, lambda t: t.permute(0, 2, 3, 1))  # NCHW -> NHWC
    for i, blk in enumerate(vision.blocks):
        if i == 0:
            cap.input("img_with_posemb", blk)
        cap.output(f"img_block{i}_sa", blk.attn)
        cap.input(f"img_block{i}_plus_sa", blk.norm2)
        cap.output(f"img_block{i}_mlp", blk.mlp)
        cap.output(f"img_block{i}_plus_mlp", blk)
    cap.output("img_encoded", vision.norm)
    cap.output("zimg", model.projector)
    for i, layer in enumerate(decoder.layers):
        cap.output(f"llm_layer{i}_attn_out", layer.attn)
        cap.output(f"llm_layer{i}_mlp_out", layer.mlp)
        cap.output(f"llm_layer{i}_out", layer)
    cap.input("llm_encoded", decoder.final_norm)
    cap.output("llm_pre_logits", decoder.final_norm)
    try:
        with torch.no_grad():
            text_logits = model(images, text, mask_ar)
            values = dict(cap.values)
            values["ztxt"] = decoder.embed_tokens(text)
            values["llm_logits"] = decoder.logits(values["llm_pre_logits"])
    finally:
        cap.remove()
    values["text_logits"] = text_logits
    return values


def _stage(
    name: str, ours: torch.Tensor, ref: torch.Tensor, tol: float, note: str = "",
    exact: bool = False,
) -> Stage:
    """Max-abs error of `ours` against the official `ref` (exact: count of mismatches)."""
    if tuple(ours.shape) != tuple(ref.shape):
        raise ValueError(
            f"stage {name}: our shape {list(ours.shape)} != official {list(ref.shape)}"
        )
    if exact:  # integers / booleans: count mismatches
        err = float((ours.long() != ref.long()).sum())
    else:
        err = float((ours.double() - ref.double()).abs().max()) if ours.numel() else 0.0
    return Stage(name, list(ref.shape), err, tol, bool(err <= tol), note)


def run_case(case_dir: str | Path) -> Report:
    case_dir = Path(case_dir)
    for name in ("params.npz", "vectors.npz", "config.json"):
        if not (case_dir / name).is_file():
            raise FileNotFoundError(f"{case_dir}: not a parity case directory (no {name})")
    try:
        case = json.loads((case_dir / "config.json").read_text())
    except ValueError as e:
        raise ValueError(f"{case_dir / 'config.json'}: not JSON ({e})") from None
    try:
        with np.load(case_dir / "vectors.npz", allow_pickle=False) as f:
            vec = {k: torch.from_numpy(f[k]) for k in f.files}
    except (OSError, ValueError, TypeError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"{case_dir / 'vectors.npz'}: unreadable ({e}); the case directory "
                         "is damaged, copy it again") from None
    try:
        if "codes" in vec:
            return _run_vae_case(case_dir, case, vec)
        return _run_model_case(case_dir, case, vec)
    except KeyError as e:
        raise ValueError(f"{case_dir}: vectors.npz or config.json has no {e.args[0]!r}, which "
                         "this case needs; the case directory is incomplete") from None


def _run_model_case(case_dir: Path, case: dict[str, Any], vec: dict[str, torch.Tensor]
                    ) -> Report:
    images = vec["image"].permute(0, 3, 1, 2)  # NHWC -> NCHW
    config = case_config(case, image_size=images.shape[-1])
    model = load_official(case_dir / "params.npz", config)
    cap_final = config.text.final_logits_softcap
    stages: list[Stage] = []

    def compare(
        name: str,
        ours: torch.Tensor,
        ref: torch.Tensor,
        tol: float,
        note: str = "",
        exact: bool = False,
    ) -> None:
        stages.append(_stage(name, ours, ref, tol, note, exact))

    # Forward (Model.__call__): every recorded activation, in order.
    acts = _capture_forward(model, images, vec["text"].long(), vec["mask_ar"].long())
    n_img = acts["zimg"].shape[1]
    full_ar = torch.cat(
        [torch.zeros(images.shape[0], n_img, dtype=torch.long), vec["mask_ar"].long()], 1
    )
    if "attn_mask" in vec:
        compare(
            "attn_mask",
            make_attn_mask(torch.ones_like(full_ar, dtype=torch.bool), full_ar),
            vec["attn_mask"],
            0,
            "mismatching entries",
            exact=True,
        )
    for name, ours in acts.items():
        if name in vec and name not in ("text_logits", "llm_logits"):
            compare(name, ours, vec[name], TOL_ZIMG if name == "zimg" else TOL_HIDDEN)
    if "llm_logits" in vec:
        compare("llm_logits", acts["llm_logits"], vec["llm_logits"], TOL_LOGITS)
    valid = vec["input_mask"].bool()
    compare(
        "text_logits",
        acts["text_logits"][valid],
        softcap(vec["text_logits"][valid], cap_final),
        TOL_LOGITS,
        (SOFTCAP_NOTE if cap_final else "") + " (valid positions only)",
    )

    # Greedy decode: prefill_cache + extend_cache.
    prompt = (
        vec["prompt_text"].long(),
        vec["prompt_mask_ar"].long(),
        vec["prompt_input_mask"].bool(),
    )
    steps = vec["decode_tokens"].shape[1]
    lengths = prompt[2].sum(1) + n_img
    if "prefill_cache_begin" in vec:
        p = n_img + prompt[0].shape[1]
        compare(
            "prefill_cache_begin",
            p - lengths,
            vec["prefill_cache_begin"],
            0,
            "right-alignment offsets",
            exact=True,
        )
    if "prompt_attn_mask" in vec:
        valid_p = torch.cat([torch.ones(len(lengths), n_img, dtype=torch.bool), prompt[2]], 1)
        ar_p = torch.cat([torch.zeros(len(lengths), n_img, dtype=torch.long), prompt[1]], 1)
        compare(
            "prompt_attn_mask",
            make_attn_mask(valid_p, ar_p),
            vec["prompt_attn_mask"],
            0,
            "mismatching entries",
            exact=True,
        )

    def decode_stages(
        suffix: str,
        m: PaliGemmaModel,
        cache_dtype: torch.dtype | None,
        cap: float | None,
        tol: float,
        note: str,
    ) -> None:
        tokens, logits = generate(m, images, *prompt, max_new_tokens=steps, cache_dtype=cache_dtype)
        ref_logits = vec[f"decode{suffix}_logits"].clone()
        ref_logits[:, 0] = softcap(ref_logits[:, 0], cap)
        softcap_note = "; step 0 " + SOFTCAP_NOTE if cap else ""
        compare(f"decode{suffix}_logits", logits, ref_logits, tol, note + softcap_note)
        compare(
            f"decode{suffix}_tokens",
            tokens,
            vec[f"decode{suffix}_tokens"],
            0,
            "mismatching tokens",
            exact=True,
        )

    main_cache = case.get("decode", {}).get("kv_cache_dtype_decode_tokens", "float32")
    decode_stages(
        "",
        model,
        getattr(torch, main_cache),
        cap_final,
        TOL_LOGITS if main_cache == "float32" else TOL_BF16_CACHE_LOGITS,
        f"{main_cache} KV cache",
    )
    if "decode_bf16cache_logits" in vec:
        decode_stages(
            "_bf16cache",
            model,
            torch.bfloat16,
            cap_final,
            TOL_BF16_CACHE_LOGITS,
            "bf16 KV cache (big_vision's default), prefill attends to rounded K/V",
        )
    if "decode_final_softcap0_logits" in vec:
        model0 = load_official(case_dir / "params.npz", config.replace(final_logits_softcap=None))
        decode_stages(
            "_final_softcap0",
            model0,
            torch.float32,
            None,
            TOL_LOGITS,
            "final_logits_softcap=0.0 as in the PaliGemma 2 transfer configs",
        )
    return Report(case.get("case", case_dir.name), all(s.ok for s in stages), stages)


def vae_stage_outputs(decoder: MaskDecoder, codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """codes [B, 16] -> each VAE_STAGES module's output, NHWC as big_vision records them."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        decoder.decoder[i].register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, out.permute(0, 2, 3, 1))
        )
        for name, i in VAE_STAGES.items()
    ]
    try:
        with torch.no_grad():
            decoder(codes)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _run_vae_case(case_dir: Path, case: dict[str, Any], vec: dict[str, torch.Tensor]) -> Report:
    """Mask VAE decoder: every module output of the first example, then all masks."""
    decoder = load_mask_decoder(case_dir / "params.npz")
    codes = vec["codes"].long()
    seen = vae_stage_outputs(decoder, codes[:1])
    with torch.no_grad():
        masks = decoder(codes)
    stages = [_stage(name, seen[name], vec[f"ex0_out_{name}"], TOL_VAE) for name in VAE_STAGES]
    stages.append(_stage("masks", masks, vec["masks"][..., 0], TOL_VAE))
    return Report(case.get("case", case_dir.name), all(s.ok for s in stages), stages)
