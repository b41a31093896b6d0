#!/usr/bin/env python3
"""Gold reference data for PaliGemma 1 / 2, computed by the OFFICIAL big_vision JAX code.

Usage:
  BIG_VISION_DIR=<checkout of google-research/big_vision> python make_gold.py [--out DIR]

Writes into DIR (default: the folder holding this script):
  layouts.json              full-size official .npz key layouts (via jax.eval_shape) + hparams
  <case>/params.npz         tiny checkpoint in the official .npz layout
  <case>/vectors.npz        inputs and outputs computed by big_vision
  <case>/config.json        exact configs of the case + self-consistency checks

Nothing from big_vision is copied here: its modules are imported and called. The only
monkeypatch is `gemma.get_config`, extended with tiny variants of the official structures.
Everything is deterministic (fixed seeds, CPU).
"""

import argparse
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import os
import sys
import types

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

# ----------------------------------------------------------------------------------------
# Import big_vision (without tensorflow).
# ----------------------------------------------------------------------------------------


def import_big_vision(bv_dir):
  """Imports the big_vision modules we call, stubbing the TF bits they import."""
  # flax.io probes for tensorflow at import time: import it *before* installing the stub
  # so that flax keeps its native (non-TF) file backend.
  import flax.training.checkpoints  # noqa: F401  pylint: disable=unused-import

  if "tensorflow" not in sys.modules:
    # big_vision only needs tensorflow.io.gfile for file IO (local files suffice here).
    tf = types.ModuleType("tensorflow")
    tf_io = types.ModuleType("tensorflow.io")
    gfile = types.ModuleType("tensorflow.io.gfile")
    gfile.GFile = open
    gfile.exists = os.path.exists
    gfile.makedirs = functools.partial(os.makedirs, exist_ok=True)
    tf.io, tf_io.gfile = tf_io, gfile
    # einops probes sys.modules["tensorflow"].Tensor/Variable to dispatch on array types.
    tf.Tensor = type("Tensor", (), {})
    tf.Variable = type("Variable", (), {})
    sys.modules.update({"tensorflow": tf, "tensorflow.io": tf_io, "tensorflow.io.gfile": gfile})

  sys.path.insert(0, os.path.abspath(bv_dir))
  mods = types.SimpleNamespace()
  mods.u = importlib.import_module("big_vision.utils")
  mods.paligemma = importlib.import_module("big_vision.models.proj.paligemma.paligemma")
  mods.gemma_bv = importlib.import_module("big_vision.models.proj.paligemma.gemma_bv")
  mods.gemma = importlib.import_module("big_vision.models.ppp.gemma")
  mods.vit = importlib.import_module("big_vision.models.vit")
  mods.predict_fns = importlib.import_module("big_vision.trainers.proj.paligemma.predict_fns")
  mods.registry = importlib.import_module("big_vision.pp.registry")
  # The segmentation evaluator module also imports the (TF-heavy) evaluator framework and
  # tokenizer, used only by its Evaluator class; stub those two so the mask decoder imports.
  for name in ("big_vision.evaluators.common", "big_vision.pp.tokenizer"):
    sys.modules.setdefault(name, types.ModuleType(name))
  mods.seg = importlib.import_module(
      "big_vision.evaluators.proj.paligemma.transfers.segmentation")
  return mods


def source_digest(bv_dir):
  """sha256 of the big_vision files the results depend on (provenance without paths)."""
  files = [
      "big_vision/models/proj/paligemma/paligemma.py",
      "big_vision/models/proj/paligemma/gemma_bv.py",
      "big_vision/models/ppp/gemma.py",
      "big_vision/models/vit.py",
      "big_vision/utils.py",
      "big_vision/trainers/proj/paligemma/predict_fns.py",
      "big_vision/evaluators/proj/paligemma/transfers/segmentation.py",
  ]
  return {f: hashlib.sha256(open(os.path.join(bv_dir, f), "rb").read()).hexdigest()
          for f in files}


# ----------------------------------------------------------------------------------------
# Official configs (from configs/proj/paligemma/{README.md, finetune_paligemma.ipynb,
# transfers/*.py}).
# ----------------------------------------------------------------------------------------

PALIGEMMA_VOCAB = 256_000 + 1024 + 128  # Gemma vocab + <locXXXX> + <segXXX> = 257152
OFFICIAL_IMG = dict(variant="So400m/14", pool_type="none", scan=True)
OFFICIAL_MODELS = {
    # name: (family, llm variant, release file name pattern, big_vision vanity name)
    "paligemma-3b": ("PaliGemma 1", "gemma_2b", "paligemma-3b-pt-{res}.npz (.f16/.bf16 too)",
                     "pt_{res}"),
    "paligemma2-3b": ("PaliGemma 2", "gemma2_2b", "paligemma2-3b-pt-{res}.b16.npz",
                      "pt_3b_{res}"),
    "paligemma2-10b": ("PaliGemma 2", "gemma2_9b", "paligemma2-10b-pt-{res}.b16.npz",
                       "pt_10b_{res}"),
    "paligemma2-28b": ("PaliGemma 2", "gemma2_27b", "paligemma2-28b-pt-{res}.b16.npz",
                       "pt_28b_{res}"),
}
RESOLUTIONS = (224, 448, 896)
# Official .npz files nest everything under a top-level "params" entry; big_vision's
# utils.load_params() strips it ("Checkpoint with optax state") and also accepts files
# without it (e.g. what the fine-tuning colab's npsave() writes).
OFFICIAL_KEY_PREFIX = "params/"


def official_model_config(llm_variant):
  llm = dict(variant=llm_variant, vocab_size=PALIGEMMA_VOCAB, dropout=0.0)
  if llm_variant.startswith("gemma2"):
    # transfers/forkme.py and finetune_paligemma.ipynb: "Better for transfer."
    llm["final_logits_softcap"] = 0.0
  return dict(img=dict(OFFICIAL_IMG), llm=llm)


# ----------------------------------------------------------------------------------------
# Tiny variants with the same structure as the real ones.
# ----------------------------------------------------------------------------------------

TINY_VOCAB = 512
PAD, EOS, BOS, SEP = 0, 1, 2, 108  # Gemma ids of <pad>, <eos>, <bos>, "\n"
IMAGE_SIZE = 56                    # 4x4 patches of 14px -> 16 image tokens
BATCH = 2
DECODE_STEPS = 10

# ViT: So400m/14 structure (learned posemb, pool_type none, scanned blocks, linear head).
TINY_IMG = dict(width=64, depth=2, mlp_dim=128, num_heads=4, patch_size=(14, 14),
                posemb="learn", pool_type="none", scan=True)

# Registered into gemma.get_config next to the official variants.
TINY_LLM = {
    # gemma_2b structure: multi-query attention (1 kv head), no softcaps, no post norms.
    "tiny_gemma_2b": dict(width=96, depth=3, mlp_dim=128, num_heads=4, num_kv_heads=1,
                          head_dim=24, norm_eps=1e-6, vocab_size=TINY_VOCAB),
    # gemma2_2b structure: GQA, attn softcap 50, final softcap 30, post norms, and
    # num_heads * head_dim != width (2B: 8*256=2048 vs 2304; here 4*32=128 vs 96).
    "tiny_gemma2_2b": dict(width=96, depth=4, mlp_dim=128, num_heads=4, num_kv_heads=2,
                           head_dim=32, norm_eps=1e-6, vocab_size=TINY_VOCAB,
                           final_logits_softcap=30.0, attn_logits_softcap=50.0,
                           post_norms=True),
    # gemma2_27b structure: as above, but queries scaled by (width // num_heads)**-0.5
    # != head_dim**-0.5 (27B: 144**-0.5 vs 128**-0.5; here 24**-0.5 vs 16**-0.5).
    "tiny_gemma2_27b": dict(width=96, depth=4, mlp_dim=128, num_heads=4, num_kv_heads=2,
                            head_dim=16, norm_eps=1e-6, vocab_size=TINY_VOCAB,
                            query_pre_attn_norm="rsqrt_emb_per_head",
                            final_logits_softcap=30.0, attn_logits_softcap=50.0,
                            post_norms=True),
}

# Seeds were picked so that every greedy decode step has a top1-top2 logit margin > 0.1.
CASES = {
    "pg1_tiny": dict(llm_variant="tiny_gemma_2b", seed=7, param_dtype="float32",
                     qk_gain=3.0),
    "pg1_tiny_bf16": dict(llm_variant="tiny_gemma_2b", seed=7, param_dtype="bfloat16",
                          qk_gain=3.0),
    "pg2_tiny": dict(llm_variant="tiny_gemma2_2b", seed=2, param_dtype="float32",
                     qk_gain=4.5),
    "pg2_27b_like_tiny": dict(llm_variant="tiny_gemma2_27b", seed=12, param_dtype="float32",
                              qk_gain=4.5),
}


def install_tiny_variants(gemma, ml_collections):
  official_get_config = gemma.get_config

  def get_config(variant):
    if variant in TINY_LLM:
      return ml_collections.ConfigDict(dict(variant=variant, scan=True,
                                            remat_policy="nothing_saveable",
                                            **TINY_LLM[variant]))
    return official_get_config(variant)

  gemma.get_config = get_config


def tiny_model_config(llm_variant, **llm_overrides):
  llm = dict(variant=llm_variant, vocab_size=TINY_VOCAB, dropout=0.0, cache_dtype=None)
  llm.update(llm_overrides)
  return dict(img=dict(TINY_IMG), llm=llm)


# ----------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------


def dtype_name(dt):
  return np.dtype(dt).name


def flat_names(bv, tree):
  """'/'-joined names exactly as big_vision.utils flattens (and saves) a pytree."""
  return dict(bv.u.tree_flatten_with_names(tree)[0])


def abstract_params(bv, model, image_size, text_len=8):
  import jax
  import jax.numpy as jnp
  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  text = jax.ShapeDtypeStruct((1, text_len), jnp.int32)
  variables = jax.eval_shape(
      lambda i, t: model.init(jax.random.PRNGKey(0), i, t, jnp.zeros_like(t)), image, text)
  return variables["params"]


def random_leaf(name, shape, rng, qk_gain):
  """Deterministic random values for one parameter (non-trivial scales/biases on purpose)."""
  normal = lambda std: rng.standard_normal(shape) * std  # noqa: E731
  fan_in = lambda *axes: float(np.prod([shape[a] for a in axes]))  # noqa: E731
  if name == "img/embedding/kernel":              # (ph, pw, 3, W)
    return normal(fan_in(0, 1, 2) ** -0.5)
  if name == "img/pos_embedding":                 # (1, N, W)
    return normal(0.5)
  if name.startswith("img/") and name.endswith("/scale"):   # LayerNorm: x * scale + bias
    return 1.0 + normal(0.2)
  if name.startswith("img/") and ("LayerNorm" in name or "encoder_norm" in name):
    return normal(0.2)
  if name.endswith("/bias"):
    return normal(0.1)
  if "MultiHeadDotProductAttention_0/out/kernel" in name:  # (L, H, hd, W)
    return normal(fan_in(-3, -2) ** -0.5)
  if "MultiHeadDotProductAttention_0" in name or "MlpBlock_0" in name:  # (L, in, ...)
    axis = -3 if "MultiHead" in name else -2
    return normal(fan_in(axis) ** -0.5)
  if name == "img/head/kernel":                   # (W, E)
    return normal(2.0 * fan_in(0) ** -0.5)
  # LLM: residual stream dominated by the layers (not by the token's own embedding), so that
  # greedy decoding does not just copy its input; softcaps see logits of O(10-50).
  if name == "llm/embedder/input_embedding":      # (V, E)
    return normal(0.15)
  if name == "llm/final_norm/scale":              # RMSNorm: x * (1 + scale)
    return 3.0 + normal(0.5)
  if name.startswith("llm/layers/post_"):         # gemma2 post_attention/post_ffw norms
    return 1.0 + normal(0.3)
  if name.startswith("llm/") and name.endswith("/scale"):
    return normal(0.3)
  if name == "llm/layers/attn/q_einsum/w":        # (L, N, E, H)
    return normal(qk_gain * fan_in(-2) ** -0.5)
  if name == "llm/layers/attn/kv_einsum/w":       # (L, 2, K, E, H): [:,0]=k, [:,1]=v
    w = normal(fan_in(-2) ** -0.5)
    w[:, 0] *= qk_gain
    w[:, 1] *= 2.0
    return w
  if name == "llm/layers/attn/qkv_einsum/w":      # (L, 3, N, E, H) (only when K == N)
    w = normal(fan_in(-2) ** -0.5)
    w[:, :2] *= qk_gain
    w[:, 2] *= 2.0
    return w
  if name == "llm/layers/attn/attn_vec_einsum/w":  # (L, N, H, E)
    return normal(2.0 * fan_in(-3, -2) ** -0.5)
  if name == "llm/layers/mlp/gating_einsum":      # (L, 2, E, F): [:,0]=gate, [:,1]=up
    return normal(fan_in(-2) ** -0.5)
  if name == "llm/layers/mlp/linear":             # (L, F, E)
    return normal(3.0 * fan_in(-2) ** -0.5)
  raise ValueError(f"no init rule for {name} {shape}")


def random_params(bv, abstract, seed, qk_gain):
  rng = np.random.default_rng(seed)
  flat = flat_names(bv, abstract)
  values = {k: random_leaf(k, flat[k].shape, rng, qk_gain).astype(np.float32)
            for k in sorted(flat)}
  return values  # flat {name: float32 array}


def save_official_npz(path, flat_params, dtype):
  """Writes {'params/<name>': array} like the released checkpoints (np.savez).

  bfloat16 arrays are handed to numpy as ml_dtypes.bfloat16, which np.save stores with
  descr '|V2' (void); big_vision.utils.recover_dtype views them back as bfloat16.
  """
  import jax.numpy as jnp
  out = {}
  for k, v in flat_params.items():
    v = np.asarray(v, np.float32)
    if dtype == "bfloat16":
      v = np.asarray(jnp.asarray(v).astype(jnp.bfloat16))
    out[OFFICIAL_KEY_PREFIX + k] = v
  with open(path, "wb") as f:
    np.savez(f, **out)


def unstack_llm_layers(params):
  """Scanned llm params (layers/<leaf>[L, ...]) -> python-loop layout (layers/<i>/<leaf>)."""
  import jax
  params = jax.tree.map(lambda x: x, params)
  stacked = params["llm"].pop("layers")
  depth = jax.tree.leaves(stacked)[0].shape[0]
  params["llm"]["layers"] = {str(i): jax.tree.map(lambda x, i=i: x[i], stacked)
                             for i in range(depth)}
  return params


def maxdiff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ----------------------------------------------------------------------------------------
# layouts.json
# ----------------------------------------------------------------------------------------


def llm_hparams(bv, variant):
  """Hyper-parameters of an official gemma variant as big_vision uses them (facts only)."""
  gemma, gemma_bv, nn = bv.gemma, bv.gemma_bv, bv.nn
  cfg = gemma.get_config(variant).to_dict()
  model_defaults = {f.name: f.default for f in dataclasses.fields(gemma.Model)
                    if f.default is not dataclasses.MISSING}
  bv_defaults = {f.name: f.default for f in dataclasses.fields(gemma_bv.Model)
                 if f.default is not dataclasses.MISSING}
  get = lambda k: cfg.get(k, model_defaults.get(k))  # noqa: E731
  width, heads, kv, hd = cfg["width"], cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim"]
  qnorm = get("query_pre_attn_norm")
  q_scale_den = {"rsqrt_head_dim": hd, "rsqrt_emb_per_head": width // heads}[qnorm]
  rope_default = inspect.signature(gemma._apply_rope).parameters["max_wavelength"].default
  assert "1e-06" in inspect.getsource(gemma.RMSNorm)  # eps is hard-coded there
  import jax.numpy as jnp
  embed_scale = float(np.sqrt(width))
  return dict(
      width=width, depth=cfg["depth"], mlp_dim=cfg["mlp_dim"], num_heads=heads,
      num_kv_heads=kv, head_dim=hd,
      attention_type=("MHA (qkv_einsum)" if kv == heads else
                      "MQA (q_einsum + kv_einsum)" if kv == 1 else
                      "GQA (q_einsum + kv_einsum)"),
      query_heads_per_kv_head=heads // kv,
      gemma_vocab_size=cfg["vocab_size"], paligemma_vocab_size=PALIGEMMA_VOCAB,
      query_pre_attn_norm=qnorm,
      query_scale=f"q *= {q_scale_den}**-0.5 (after RoPE)", query_scale_value=q_scale_den ** -0.5,
      attn_logits_softcap=get("attn_logits_softcap") or None,
      final_logits_softcap_variant_default=get("final_logits_softcap") or None,
      final_logits_softcap_paligemma_transfer_configs=(0.0 if variant.startswith("gemma2")
                                                       else None),
      post_norms=bool(get("post_norms")),
      sliding_window=None,
      sliding_window_note=("big_vision's gemma.py does NOT implement Gemma-2 local sliding "
                           "attention: every layer attends globally (see its module "
                           "docstring). Gemma 2 itself alternates local(4096)/global layers."
                           if variant.startswith("gemma2") else "not used by Gemma 1"),
      rope_max_wavelength=rope_default,
      rope_layout="rotate-half: x = [x1, x2] halves of head_dim; "
                  "[x1*cos - x2*sin, x2*cos + x1*sin]; timescale = wavelength**(2i/head_dim)",
      norm="RMSNorm: x * rsqrt(mean(x**2, -1) + 1e-6) * (1 + scale)",
      norm_eps_config=cfg["norm_eps"], norm_eps_effective=1e-6,
      mlp="GeGLU: (gelu(x @ gating_einsum[0]) * (x @ gating_einsum[1])) @ linear",
      gelu_approximate=inspect.signature(nn.gelu).parameters["approximate"].default,
      embedding_scale=f"text token embeddings *= sqrt(width) = {embed_scale}, computed in the "
                      "embedding table's dtype (image embeddings are NOT scaled)",
      embedding_scale_value=embed_scale,
      embedding_scale_value_if_bf16_params=float(jnp.asarray(embed_scale).astype(jnp.bfloat16)),
      tied_embeddings=True,
      attention_mask_fill=-2.3819763e38,
      activation_dtype=model_defaults["embed_dtype"],
      kv_cache_dtype_default_gemma_bv=bv_defaults["cache_dtype"],
      scan_layers=True,
  )


def vit_hparams(bv, res):
  vit, nn = bv.vit, bv.nn
  d = vit.decode_variant(OFFICIAL_IMG["variant"])
  defaults = {f.name: f.default for f in dataclasses.fields(vit._Model)
              if f.default is not dataclasses.MISSING}
  patch = d["patch_size"][0]
  return dict(
      variant=OFFICIAL_IMG["variant"], width=d["width"], depth=d["depth"],
      mlp_dim=d["mlp_dim"], num_heads=d["num_heads"], head_dim=d["width"] // d["num_heads"],
      patch_size=patch, image_size=res, num_image_tokens=(res // patch) ** 2,
      posemb=defaults["posemb"], pool_type=OFFICIAL_IMG["pool_type"],
      scan_layers=OFFICIAL_IMG["scan"],
      layernorm_eps=nn.LayerNorm.__dataclass_fields__["epsilon"].default,
      gelu_approximate=inspect.signature(nn.gelu).parameters["approximate"].default,
      attention="pre-LN MHA with q/k/v/out biases, scale head_dim**-0.5",
      head="Dense(vit width -> llm width) with bias on every token (img/head); "
           "its output is zimg, fed to the LLM without any rescaling",
      input="NHWC float32 in [-1, 1]",
  )


def build_layouts(bv, digest):
  import ml_collections
  layouts = dict(
      description="Parameter layouts of the official PaliGemma checkpoints, obtained with "
                  "jax.eval_shape on big_vision's paligemma.Model with the official configs.",
      big_vision_sources_sha256=digest,
      key_prefix=OFFICIAL_KEY_PREFIX,
      key_prefix_note=(
          "Keys are the '/'-joined pytree paths of big_vision.utils.tree_flatten_with_names "
          "(sorted dict keys, scan-stacked layers). Released .npz files nest them under a "
          "top-level 'params' entry, i.e. 'params/img/...', 'params/llm/...'; "
          "big_vision.utils.load_params() strips it, and equally accepts files without "
          "the prefix (what big_vision's colab npsave() writes for fine-tuned params)."),
      dtype_note=(
          "Shapes/dtypes below are big_vision's init dtypes (float32). Released files: "
          "PaliGemma 1: float32 (.npz), float16 (.f16.npz), bfloat16 (.bf16.npz); "
          "PaliGemma 2: bfloat16 (.b16.npz, big_vision vanity name pt_<size>_<res>.bf16.npz). "
          "bfloat16 arrays are stored by numpy as void dtype '|V2' and must be viewed as "
          "bfloat16 (big_vision.utils.recover_dtype)."),
      models={}, hparams={}, official_model_configs={})
  for name, (family, llm_variant, file_pattern, vanity) in OFFICIAL_MODELS.items():
    layouts["hparams"][llm_variant] = llm_hparams(bv, llm_variant)
    cfg = official_model_config(llm_variant)
    layouts["official_model_configs"][name] = cfg
    for res in RESOLUTIONS:
      model = bv.paligemma.Model(**ml_collections.FrozenConfigDict(cfg))
      flat = flat_names(bv, abstract_params(bv, model, res))
      params = {OFFICIAL_KEY_PREFIX + k: dict(shape=list(v.shape), dtype=dtype_name(v.dtype))
                for k, v in sorted(flat.items())}
      layouts["models"][f"{name}-{res}"] = dict(
          family=family, llm_variant=llm_variant, image_size=res,
          num_image_tokens=(res // 14) ** 2, release_file=file_pattern.format(res=res),
          big_vision_vanity_name=vanity.format(res=res), model_config=cfg,
          num_params=int(sum(np.prod(v["shape"]) for v in params.values())),
          params=params)
  layouts["hparams"]["vit_So400m/14"] = {
      k: v for k, v in vit_hparams(bv, 224).items() if k not in ("image_size",
                                                               "num_image_tokens")}
  layouts["hparams"]["vit_So400m/14"]["num_image_tokens"] = {
      str(r): (r // 14) ** 2 for r in RESOLUTIONS}
  layouts["tokens"] = dict(
      pad=0, eos=1, bos=2, vocab_size=PALIGEMMA_VOCAB,
      loc_tokens="<loc0000>..<loc1023> = ids 256000..257023",
      seg_tokens="<seg000>..<seg127> = ids 257024..257151",
      note="big_vision appends the 'loc' then 'seg' tokensets (pp/tokenizer.py) after Gemma's "
           "256000 pieces; prompts are [bos] prefix '\\n' (mask_ar 0) then suffix (mask_ar 1).")
  layouts["vae_oid"] = vae_layout(bv)
  return layouts


# ----------------------------------------------------------------------------------------
# Segmentation VQ-VAE (vae-oid.npz): decoder layout and values.
# ----------------------------------------------------------------------------------------

VAE_CODEBOOK = (128, 512)  # (num codes, embedding dim). 128 = number of <segXXX> tokens;
                           # 512 is the real file's embedding dim (not fixed by big_vision).


def vae_key_map(bv):
  """{flax param path: (official key, torch-side shape)} derived from segmentation.py."""
  import jax
  import jax.numpy as jnp

  class Recorder(dict):
    """Hands out 4-d marker arrays so we can see which key lands where."""

    def __missing__(self, key):
      self[key] = np.full((1, 1, 1, 1), len(self), np.float32)
      return self[key]

  rec = Recorder()
  tree = bv.seg._get_params(rec)
  marker_to_key = {float(v.reshape(-1)[0]): k for k, v in rec.items()}
  flax_shapes = jax.eval_shape(
      lambda q: bv.seg.Decoder().init(jax.random.PRNGKey(0), q),
      jax.ShapeDtypeStruct((1, 4, 4, VAE_CODEBOOK[1]), jnp.float32))["params"]
  flax_shapes = flat_names(bv, flax_shapes)
  flax_shapes["_embeddings"] = jax.ShapeDtypeStruct(VAE_CODEBOOK, jnp.float32)
  out = {}
  for path, marker in flat_names(bv, tree).items():
    key = marker_to_key[float(np.asarray(marker).reshape(-1)[0])]
    shape = tuple(flax_shapes[path].shape)
    if path.endswith("kernel"):   # flax = transpose(torch, (2, 3, 1, 0)); invert it
      shape = (shape[3], shape[2], shape[0], shape[1])
    out[path] = (key, shape)
  return out


def vae_layout(bv):
  kmap = vae_key_map(bv)
  return dict(
      description=(
          "Segmentation mask VQ-VAE checkpoint 'vae-oid.npz' (gs://big_vision/paligemma/), "
          "PyTorch-style flat keys (no prefix). Listed: the keys big_vision's mask decoder "
          "(evaluators/proj/paligemma/transfers/segmentation.py) reads, with the shapes its "
          "Decoder implies for a 512-d codebook. Conv weights are OIHW (torch Conv2d); "
          "ConvTranspose weights are (in, out, kh, kw) (torch ConvTranspose2d). The real file "
          "also holds the mask *encoder* ('encoder.{0,2,4,6}', 'encoder.{8,9}.net.{0,2,4}', "
          "'encoder.10' .weight/.bias; used by pp/proj/paligemma/segmentation.py) whose shapes "
          "big_vision's code does not pin down; they are omitted here."),
      dtype="float32 (assumed; not stated in big_vision)",
      params={key: dict(shape=list(shape), dtype="float32", flax_path=path)
              for path, (key, shape) in sorted(kmap.items(), key=lambda kv: kv[1][0])},
      decoder=dict(
          input="int32 codes [B, 16] in [0, 127] (= <segNNN> token - <seg000>)",
          quantized="codebook[codes] reshaped row-major to [B, 4, 4, 512] (NHWC)",
          layers=["Conv 1x1 512->128, relu", "2 x ResBlock(3x3, relu, 3x3, relu, 1x1) + skip",
                  "4 x (ConvTranspose 4x4 stride 2 (torch padding=1; flax padding=2, "
                  "transpose_kernel=True), relu), channels 128,64,32,16",
                  "Conv 1x1 16->1"],
          output="float32 [B, 64, 64, 1], no final activation; the evaluator resizes to the "
                 "box and thresholds at > 0.0"),
  )


def make_seg_case(bv, out_dir, seed=7):
  os.makedirs(out_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  ckpt = {}
  for path, (key, shape) in sorted(vae_key_map(bv).items(), key=lambda kv: kv[1][0]):
    if key == "_vq_vae._embedding":
      std = 1.0
    elif key.endswith(".bias"):
      std = 0.05
    else:  # fan-in of a conv (OIHW: in = axis 1) / transposed conv ((in, out, kh, kw))
      fan_in = shape[1] * shape[2] * shape[3] if "ConvTranspose" not in path else \
          shape[0] * shape[2] * shape[3] / 4  # stride 2: each output sees 1/4 of the taps
      std = 1.3 * fan_in ** -0.5
    # Values on a coarse grid (multiples of std/8) so that the compressed file stays small.
    q = np.clip(np.round(rng.standard_normal(shape) * 8), -31, 31)
    ckpt[key] = (q * (std / 8)).astype(np.float32)
  params_path = os.path.join(out_dir, "params.npz")
  np.savez_compressed(params_path, **ckpt)

  codes = rng.integers(0, 128, size=(4, 16)).astype(np.int32)
  codes[0, 0], codes[0, -1] = 0, 127
  reconstruct = bv.seg.get_reconstruct_masks(os.path.abspath(params_path))
  masks = np.asarray(reconstruct(codes))
  params = bv.seg._get_params(dict(np.load(params_path)))
  quantized = bv.seg._quantized_values_from_codebook_indices(codes, params["_embeddings"])
  _, state = bv.seg.Decoder().apply({"params": params}, quantized,
                                    capture_intermediates=True, mutable=["intermediates"])
  vectors = dict(codes=codes, quantized=np.asarray(quantized), masks=masks)
  # Outputs of the Decoder's top-level layers (before the following relu), example 0 only.
  for mod, v in sorted(state["intermediates"].items()):
    if mod != "__call__":
      vectors["ex0_out_" + mod] = np.asarray(v["__call__"][0][:1])
  decoder_out = np.asarray(state["intermediates"]["__call__"][0])
  np.savez(os.path.join(out_dir, "vectors.npz"), **vectors)
  cfg = dict(case="seg_vae", seed=seed, params_file_format=(
      "np.savez_compressed, PyTorch-style keys exactly as vae-oid.npz (decoder + codebook "
      "only), float32; values lie on a coarse grid so the file compresses"),
             codebook_shape=list(VAE_CODEBOOK),
             vectors={k: f"{dtype_name(v.dtype)}{list(v.shape)}" for k, v in vectors.items()},
             checks=dict(masks_vs_decoder_apply_maxdiff=maxdiff(masks, decoder_out),
                         mask_positive_fraction=float((masks > 0).mean())))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg, f, indent=1)
  return cfg


# ----------------------------------------------------------------------------------------
# Tiny PaliGemma cases.
# ----------------------------------------------------------------------------------------


def make_inputs(seed):
  """Image batch + two text batches (forward / decode prompt); row 1 padded at the end."""
  rng = np.random.default_rng(1000 + seed)
  image = rng.uniform(-1, 1, size=(BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  tok = lambda n: rng.integers(3, TINY_VOCAB, size=n).tolist()  # noqa: E731

  def row(prefix, suffix, length, eos):
    # big_vision pp (transfers/common.py): [bos prefix sep] mask_ar 0, suffix mask_ar 1,
    # padding: token 0, mask_ar 1, input_mask 0.
    t = [BOS] + prefix + [SEP]
    m = [0] * len(t)
    s = suffix + ([EOS] if eos else [])
    t, m = t + s, m + [1] * len(s)
    n = len(t)
    return (t + [PAD] * (length - n), m + [1] * (length - n), [1] * n + [0] * (length - n))

  fwd = [row(tok(6), tok(3), 12, eos=True), row(tok(3), tok(2), 12, eos=True)]
  # Decode prompts: row 0 ends in a (causal) partial suffix to continue from, row 1 is the
  # usual eval prompt [bos prefix sep] + padding.
  prm = [row(tok(6), tok(2), 10, eos=False), row(tok(3), [], 10, eos=False)]
  pack = lambda rows, i, dt: np.array([r[i] for r in rows], dt)  # noqa: E731
  return dict(
      image=image,
      text=pack(fwd, 0, np.int32), mask_ar=pack(fwd, 1, np.int32),
      input_mask=pack(fwd, 2, bool),
      prompt_text=pack(prm, 0, np.int32), prompt_mask_ar=pack(prm, 1, np.int32),
      prompt_input_mask=pack(prm, 2, bool))


class Runner:
  """Jitted calls of one paligemma.Model config through big_vision's own entry points."""

  def __init__(self, bv, cfg):
    import jax
    import ml_collections
    self.bv, self.cfg = bv, ml_collections.FrozenConfigDict(cfg)
    self.model = bv.paligemma.Model(**self.cfg)
    model, pf = self.model, bv.predict_fns
    self.forward = jax.jit(lambda p, i, t, m: model.apply({"params": p}, i, t, m))
    self.embed = jax.jit(lambda p, i, t, im, m: model.apply(
        {"params": p}, i, t, input_mask=im, mask_ar=m, method=model.embed_image_and_text))
    self.prefill = jax.jit(functools.partial(pf._prefill_cache, model=model),
                           static_argnames=("max_decode_len",))
    self.extend = jax.jit(functools.partial(pf._extend_cache, model=model))

  def greedy_decode(self, params, inp, steps):
    """prefill_cache + extend_cache, exactly as predict_fns._decode_with_logp, keeping logits."""
    import jax.numpy as jnp
    greedy = self.bv.registry.Registry.lookup("paligemma_sampler.greedy")
    batch = dict(image=inp["image"], text=inp["prompt_text"], mask_ar=inp["prompt_mask_ar"],
                 mask_input=inp["prompt_input_mask"])
    logits, cache = self.prefill(params, batch, max_decode_len=steps)
    self.prefill_state = {k: np.asarray(cache["llm"][k])
                          for k in ("seq_len", "cache_begin", "cache_end")}
    all_logits, all_tokens = [], []
    for i in range(steps):
      tokens = greedy(logits=logits, rng=None)          # [B, 1]
      all_logits.append(np.asarray(logits[:, 0]))
      all_tokens.append(np.asarray(tokens[:, 0]))
      if i + 1 < steps:
        logits, cache = self.extend(params, cache, jnp.asarray(tokens))
    cache_size = int(cache["llm"]["layers"]["attn"]["k_cache"].shape[2])
    kv_dtype = dtype_name(cache["llm"]["layers"]["attn"]["k_cache"].dtype)
    return (np.stack(all_tokens, 1).astype(np.int32), np.stack(all_logits, 1), cache_size,
            kv_dtype)

  def official_decode(self, params, inp, steps):
    """predict_fns._decode end to end (greedy), eos disabled so all steps run."""
    import jax
    batch = dict(image=inp["image"], text=inp["prompt_text"], mask_ar=inp["prompt_mask_ar"],
                 mask_input=inp["prompt_input_mask"], _mask=np.ones([BATCH], bool))
    tokens = self.bv.predict_fns._decode(
        {"params": params}, batch, model=self.model, devices=jax.devices()[:1],
        max_decode_len=steps, eos_token=-1)
    return np.asarray(tokens)


def make_case(bv, name, spec, out_dir, f32_reference=None):
  import jax
  import jax.numpy as jnp
  import ml_collections
  os.makedirs(out_dir, exist_ok=True)
  cfg = tiny_model_config(spec["llm_variant"])
  runner = Runner(bv, cfg)

  # 1. Random params (scan-stacked tree from eval_shape), saved in the official layout.
  abstract = abstract_params(bv, runner.model, IMAGE_SIZE)
  flat = random_params(bv, abstract, spec["seed"], spec["qk_gain"])
  params_path = os.path.join(out_dir, "params.npz")
  save_official_npz(params_path, flat, spec["param_dtype"])

  # 2. Load them back through big_vision's own loader (what a real checkpoint goes through).
  params = bv.paligemma.load(None, os.path.abspath(params_path),
                             ml_collections.FrozenConfigDict(cfg))
  params = jax.tree.map(jnp.asarray, params)
  stored = np.load(params_path)
  loaded_dtypes = {dtype_name(x.dtype) for x in jax.tree.leaves(params)}

  inp = make_inputs(spec["seed"])
  vec = dict(inp)

  # 3. Forward: Model.__call__(image, text, mask_ar) -> text logits + out dict.
  text_logits, out = runner.forward(params, inp["image"], inp["text"], inp["mask_ar"])
  n_img = out["img/zimg"].shape[1]
  vec.update(
      zimg=out["img/zimg"], img_stem=out["img/stem"], img_with_posemb=out["img/with_posemb"],
      img_encoded=out["img/encoded"], ztxt=out["llm/ztxt"], attn_mask=out["attn_mask"],
      llm_encoded=out["llm/encoded"], llm_pre_logits=out["llm/pre_logits"],
      llm_logits_before_final_softcap=out["llm/logits_pre_norm"], llm_logits=out["llm/logits"],
      text_logits=text_logits, text_tokens=out["text_tokens"])
  for blk, acts in sorted(out["img/encoder"].items()):   # block00, block01, ...
    i = int(blk[len("block"):])
    for k, v in acts.items():
      vec[f"img_block{i}_{k.replace('+', 'plus_')}"] = v

  # 4. Per-layer LLM activations: same params, python-loop (scan=False) variant of the
  #    same model, flax capture_intermediates on gemma.Block / Attention / FeedForward.
  cfg_loop = tiny_model_config(spec["llm_variant"], scan=False, remat_policy="none")
  model_loop = bv.paligemma.Model(**ml_collections.FrozenConfigDict(cfg_loop))
  g = bv.gemma
  keep = lambda mdl, method: isinstance(mdl, (g.Block, g.Attention, g.FeedForward))  # noqa
  (logits_loop, _), state = jax.jit(lambda p, i, t, m: model_loop.apply(
      {"params": p}, i, t, m, capture_intermediates=keep, mutable=["intermediates"]))(
          unstack_llm_layers(params), inp["image"], inp["text"], inp["mask_ar"])
  layers = state["intermediates"]["llm"]["layers"]
  depth = len(layers)
  for i in range(depth):
    vec[f"llm_layer{i}_out"] = layers[str(i)]["__call__"][0][0]  # Block returns (x, scan_arg)
    vec[f"llm_layer{i}_attn_out"] = layers[str(i)]["attn"]["__call__"][0]
    vec[f"llm_layer{i}_mlp_out"] = layers[str(i)]["mlp"]["__call__"][0]

  # 5. Greedy decode through prefill_cache / extend_cache; f32 KV cache (cache_dtype=None)
  #    and gemma_bv's default bfloat16 KV cache.
  tokens, dec_logits, cache_size, kv_dtype = runner.greedy_decode(params, inp, DECODE_STEPS)
  official_tokens = runner.official_decode(params, inp, DECODE_STEPS)
  runner_bf16 = Runner(bv, tiny_model_config(spec["llm_variant"], cache_dtype="bfloat16"))
  tokens16, dec_logits16, _, kv_dtype16 = runner_bf16.greedy_decode(params, inp, DECODE_STEPS)
  (x, im, mar), _ = runner.embed(params, inp["image"], inp["prompt_text"],
                                 inp["prompt_input_mask"], inp["prompt_mask_ar"])
  vec.update(
      prompt_attn_mask=bv.paligemma.make_attn_mask(im, mar),
      prefill_seq_len=runner.prefill_state["seq_len"],
      prefill_cache_begin=runner.prefill_state["cache_begin"],
      prefill_cache_end=runner.prefill_state["cache_end"],
      decode_tokens=tokens, decode_logits=dec_logits,
      decode_bf16cache_tokens=tokens16, decode_bf16cache_logits=dec_logits16)

  checks = {}
  # Consistency: prefill logits == Model.__call__ logits at the last valid prompt token.
  pl, _ = runner.forward(params, inp["image"], inp["prompt_text"], inp["prompt_mask_ar"])
  last = inp["prompt_input_mask"].sum(1) - 1
  checks["prefill_vs_call_last_valid_logits_maxdiff"] = maxdiff(
      dec_logits[:, 0], np.asarray(pl)[np.arange(BATCH), last])
  checks["official_predict_fns_decode_tokens_equal"] = bool(
      np.array_equal(official_tokens, tokens))
  top2 = np.sort(dec_logits, axis=-1)[..., -2:]
  checks["decode_min_top1_top2_logit_margin"] = float((top2[..., 1] - top2[..., 0]).min())
  checks["bf16_vs_f32_kv_cache_step0_logits_maxdiff"] = maxdiff(dec_logits[:, 0],
                                                                dec_logits16[:, 0])
  checks["bf16_vs_f32_kv_cache_decode_logits_maxdiff"] = maxdiff(dec_logits, dec_logits16)
  checks["bf16_vs_f32_kv_cache_tokens_equal"] = bool(np.array_equal(tokens, tokens16))
  checks["scan_vs_loop_llm_encoded_maxdiff"] = maxdiff(
      out["llm/encoded"], vec[f"llm_layer{depth - 1}_out"])
  checks["scan_vs_loop_text_logits_maxdiff"] = maxdiff(text_logits, logits_loop)
  checks["text_logits_vs_llm_logits_before_final_softcap_maxdiff"] = maxdiff(
      text_logits, out["llm/logits_pre_norm"][:, n_img:])
  checks["text_logits_vs_llm_logits_maxdiff"] = maxdiff(text_logits, out["llm/logits"][:, n_img:])
  checks["text_logits_absmax"] = float(np.abs(np.asarray(text_logits)).max())
  checks["n_image_tokens"] = int(n_img)

  llm_cfg = bv.gemma.get_config(spec["llm_variant"]).to_dict()
  if llm_cfg.get("final_logits_softcap"):
    # PaliGemma 2 transfer configs set final_logits_softcap=0.0: record that decode too.
    r0 = Runner(bv, tiny_model_config(spec["llm_variant"], final_logits_softcap=0.0))
    t0, l0, _, _ = r0.greedy_decode(params, inp, DECODE_STEPS)
    vec.update(decode_final_softcap0_tokens=t0, decode_final_softcap0_logits=l0)
    checks["final_softcap0_tokens_equal"] = bool(np.array_equal(t0, tokens))
  if llm_cfg.get("attn_logits_softcap"):
    r1 = Runner(bv, tiny_model_config(spec["llm_variant"], attn_logits_softcap=0.0))
    checks["attn_softcap_effect_on_text_logits_maxdiff"] = maxdiff(
        text_logits, r1.forward(params, inp["image"], inp["text"], inp["mask_ar"])[0])
  if llm_cfg.get("query_pre_attn_norm") == "rsqrt_emb_per_head":
    alt = dict(llm_cfg, query_pre_attn_norm="rsqrt_head_dim")
    TINY_LLM["_tmp_rsqrt_head_dim"] = {k: v for k, v in alt.items()
                                       if k not in ("variant", "scan", "remat_policy")}
    r2 = Runner(bv, tiny_model_config("_tmp_rsqrt_head_dim"))
    checks["query_scaling_effect_on_text_logits_maxdiff"] = maxdiff(
        text_logits, r2.forward(params, inp["image"], inp["text"], inp["mask_ar"])[0])
    del TINY_LLM["_tmp_rsqrt_head_dim"]
  if f32_reference is not None:
    ref = np.load(os.path.join(f32_reference, "vectors.npz"))
    checks["vs_f32_case_text_logits_maxdiff"] = maxdiff(text_logits, ref["text_logits"])
    checks["vs_f32_case_zimg_maxdiff"] = maxdiff(out["img/zimg"], ref["zimg"])
    checks["vs_f32_case_ztxt_maxdiff"] = maxdiff(out["llm/ztxt"], ref["ztxt"])
    # Same bf16 weights upcast to float32 before running: isolates big_vision's bf16 math.
    up = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    tl_up, out_up = runner.forward(up, inp["image"], inp["text"], inp["mask_ar"])
    vec.update(text_logits_params_upcast_f32=tl_up, ztxt_params_upcast_f32=out_up["llm/ztxt"])
    checks["bf16_params_vs_upcast_f32_params_zimg_maxdiff"] = maxdiff(
        out["img/zimg"], out_up["img/zimg"])
    checks["bf16_params_vs_upcast_f32_params_text_logits_maxdiff"] = maxdiff(text_logits, tl_up)
    checks["bf16_params_vs_upcast_f32_params_ztxt_maxdiff"] = maxdiff(
        out["llm/ztxt"], out_up["llm/ztxt"])

  vec = {k: np.asarray(v) for k, v in vec.items()}
  np.savez(os.path.join(out_dir, "vectors.npz"), **vec)

  config = dict(
      case=name, description=CASE_DOCS[name], seed=spec["seed"],
      model_config=cfg,
      llm_variant_config=llm_cfg,
      params_file=dict(format="np.savez, keys 'params/<name>' (official layout)",
                       dtype=spec["param_dtype"],
                       stored_numpy_dtypes=sorted({str(stored[k].dtype) for k in stored.files}),
                       dtypes_after_big_vision_load=sorted(loaded_dtypes),
                       num_keys=len(stored.files)),
      tokens=dict(pad=PAD, eos=EOS, bos=BOS, sep=SEP, vocab_size=TINY_VOCAB),
      image_size=IMAGE_SIZE, batch=BATCH, num_image_tokens=int(n_img),
      decode=dict(steps=DECODE_STEPS, sampler="greedy (argmax)", cache_size=cache_size,
                  cache_size_formula="num_image_tokens + prompt_len + steps",
                  kv_cache_dtype_decode_tokens=kv_dtype,
                  kv_cache_dtype_decode_bf16cache_tokens=kv_dtype16),
      checks=checks,
      vectors={k: f"{dtype_name(v.dtype)}{list(v.shape)}" for k, v in sorted(vec.items())},
  )
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist")
              else list(o) if isinstance(o, tuple) else str(o))
  return config


CASE_DOCS = {
    "pg1_tiny": "PaliGemma 1 structure (gemma_2b: MQA, no softcaps, no post norms), float32.",
    "pg1_tiny_bf16": "pg1_tiny's weights rounded to bfloat16 and stored as bfloat16 (|V2).",
    "pg2_tiny": "PaliGemma 2 structure (gemma2_2b: GQA, attn softcap 50, final softcap 30, "
                "post norms).",
    "pg2_27b_like_tiny": "pg2_tiny structure with gemma2_27b's query scaling "
                         "(width // num_heads)**-0.5 and num_heads*head_dim != width.",
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                      help="output folder (default: the folder of this script)")
  parser.add_argument("--only", nargs="*", default=None,
                      help="subset of: layouts " + " ".join(CASES) + " seg_vae")
  args = parser.parse_args()
  todo = set(args.only) if args.only else {"layouts", *CASES, "seg_vae"}
  bv_dir = os.environ.get("BIG_VISION_DIR")
  if not bv_dir or not os.path.isdir(os.path.join(bv_dir, "big_vision")):
    sys.exit("Set BIG_VISION_DIR to a checkout of google-research/big_vision "
             "(the folder that contains big_vision/).")

  bv = import_big_vision(bv_dir)
  import flax.linen as nn
  import ml_collections
  bv.nn = nn
  install_tiny_variants(bv.gemma, ml_collections)

  os.makedirs(args.out, exist_ok=True)
  digest = source_digest(bv_dir)
  if "layouts" in todo:
    print("layouts.json ...", flush=True)
    layouts = build_layouts(bv, digest)
    with open(os.path.join(args.out, "layouts.json"), "w") as f:
      json.dump(layouts, f, indent=1)

  for name, spec in CASES.items():
    if name not in todo:
      continue
    print(f"{name} ...", flush=True)
    ref = os.path.join(args.out, "pg1_tiny") if name == "pg1_tiny_bf16" else None
    cfg = make_case(bv, name, spec, os.path.join(args.out, name), f32_reference=ref)
    print(json.dumps(cfg["checks"], indent=1), flush=True)
  if "seg_vae" in todo:
    print("seg_vae ...", flush=True)
    cfg = make_seg_case(bv, os.path.join(args.out, "seg_vae"))
    print(json.dumps(cfg["checks"], indent=1), flush=True)


if __name__ == "__main__":
  main()
