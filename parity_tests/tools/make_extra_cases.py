"""Generates the extra gold cases in parity_tests/data/ with the official big_vision code.

They reuse the gold generator next to this script (`make_gold.py`, which calls big_vision's own
model, loader and decode functions) with other sizes, dtypes and lengths than its own cases,
so the tests never rely on one particular shape:

- pg2_bf16_noprefix_tiny: Gemma 2 structure, bf16 weights, keys WITHOUT the `params/` prefix,
  MQA with num_heads * head_dim != width, 3 ViT heads of 16, 42 px images (9 image tokens),
  vocab 300.
- mha_f16_27b_scaling_tiny: num_kv_heads == num_heads (one fused `qkv_einsum`), 27B-style
  query scaling (width // heads = 20 != head_dim 12), float16 weights, 5 ViT heads of 8,
  70 px images (25 image tokens).
- pg2_long_1k_tiny: PaliGemma 2 at the 448 px sequence length: 1024 image tokens (64 px images,
  2 px patches) + prompt, about 1040 positions; head_dim 256 as gemma2_2b / gemma2_9b.
- pg2_long_4k_tiny: PaliGemma 2 at the 896 px sequence length: 4096 image tokens (64 px images,
  1 px patches), so every text position and decode step lies past position 4096 (no sliding
  window: big_vision has none); head_dim 128 and gemma2_27b's query scaling.
- pg1_long_1k_tiny: PaliGemma 1 (MQA, no softcaps) with 1024 image tokens and head_dim 256 as
  gemma_2b.

The long cases keep the inputs, zimg, ztxt, every LLM layer's output, text logits and all decode
results, compressed; per-patch ViT stages and the [T, T] masks would take tens of MB.

Usage (needs jax, flax, ml_collections, einops, orbax-checkpoint, absl-py, scipy):
  BIG_VISION_DIR=/path/to/big_vision_parent python parity_tests/tools/make_extra_cases.py \\
      OUT_DIR CASE [CASE ...]
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_gold as mg  # noqa: E402

LONG_CASE_VECTORS = (
    "image", "text", "mask_ar", "input_mask", "prompt_text", "prompt_mask_ar",
    "prompt_input_mask", "zimg", "ztxt", "text_logits", "text_tokens", "prefill_seq_len",
    "prefill_cache_begin", "prefill_cache_end",
)


def save_f16(path, flat, dtype):  # make_gold.py writes f32 or bf16 only
    with open(path, "wb") as f:
        np.savez(f, **{mg.OFFICIAL_KEY_PREFIX + k: np.asarray(v, np.float16)
                       for k, v in flat.items()})


def long_llm(**kw):
    return dict(norm_eps=1e-6, vocab_size=mg.TINY_VOCAB, **kw)


GEMMA2 = dict(final_logits_softcap=30.0, attn_logits_softcap=50.0, post_norms=True)


def configure(case):
    """Sets make_gold's module-level sizes for `case`; returns its spec."""
    if case == "pg2_bf16_noprefix_tiny":
        mg.IMAGE_SIZE = 42
        mg.TINY_IMG.update(width=48, depth=1, mlp_dim=80, num_heads=3)
        mg.TINY_VOCAB = 300
        mg.OFFICIAL_KEY_PREFIX = ""
        mg.TINY_LLM["tiny_x1"] = dict(width=64, depth=2, mlp_dim=96, num_heads=2,
                                      num_kv_heads=1, head_dim=48, norm_eps=1e-6,
                                      vocab_size=300, **GEMMA2)
        return dict(llm_variant="tiny_x1", seed=3, param_dtype="bfloat16", qk_gain=4.5)
    if case == "mha_f16_27b_scaling_tiny":
        mg.IMAGE_SIZE = 70
        mg.TINY_IMG.update(width=40, depth=3, mlp_dim=64, num_heads=5)
        mg.TINY_LLM["tiny_x2"] = dict(width=80, depth=2, mlp_dim=160, num_heads=4,
                                      num_kv_heads=4, head_dim=12, norm_eps=1e-6,
                                      vocab_size=512,
                                      query_pre_attn_norm="rsqrt_emb_per_head",
                                      attn_logits_softcap=50.0, post_norms=True)
        mg.save_official_npz = save_f16
        return dict(llm_variant="tiny_x2", seed=5, param_dtype="float32", qk_gain=3.0)
    if case == "pg2_long_1k_tiny":
        mg.IMAGE_SIZE = 64
        mg.TINY_IMG.update(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=(2, 2))
        mg.TINY_LLM["tiny_long1"] = long_llm(width=64, depth=3, mlp_dim=128, num_heads=4,
                                             num_kv_heads=2, head_dim=256, **GEMMA2)
        return dict(llm_variant="tiny_long1", seed=31, param_dtype="float32", qk_gain=4.5)
    if case == "pg2_long_4k_tiny":
        mg.IMAGE_SIZE = 64
        mg.TINY_IMG.update(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=(1, 1))
        mg.TINY_LLM["tiny_long2"] = long_llm(width=48, depth=2, mlp_dim=96, num_heads=4,
                                             num_kv_heads=2, head_dim=128,
                                             query_pre_attn_norm="rsqrt_emb_per_head",
                                             **GEMMA2)
        return dict(llm_variant="tiny_long2", seed=22, param_dtype="float32", qk_gain=4.5)
    if case == "pg1_long_1k_tiny":
        mg.IMAGE_SIZE = 64
        mg.TINY_IMG.update(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=(2, 2))
        mg.TINY_LLM["tiny_long3"] = long_llm(width=64, depth=2, mlp_dim=128, num_heads=4,
                                             num_kv_heads=1, head_dim=256)
        return dict(llm_variant="tiny_long3", seed=27, param_dtype="float32", qk_gain=3.0)
    sys.exit(f"unknown case {case}")


def keep_long_case_vectors(case_dir):
    """Rewrites vectors.npz (compressed) with the stages small enough to ship."""
    path = os.path.join(case_dir, "vectors.npz")
    with np.load(path, allow_pickle=False) as f:
        keep = {k: f[k] for k in f.files
                if k in LONG_CASE_VECTORS or k.startswith("decode")
                or (k.startswith("llm_layer") and k.endswith("_out")
                    and not k.endswith(("attn_out", "mlp_out")))}
    np.savez_compressed(path, **keep)
    config_path = os.path.join(case_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["vectors"] = {k: v for k, v in config["vectors"].items() if k in keep}
    with open(config_path, "w") as f:
        json.dump(config, f, indent=1)


def main():
    out_dir, cases = sys.argv[1], sys.argv[2:]
    for case in cases:  # one process per case: configure() changes make_gold's globals
        if len(cases) > 1:
            os.spawnv(os.P_WAIT, sys.executable, [sys.executable, __file__, out_dir, case])
            continue
        spec = configure(case)
        mg.CASES.clear()
        mg.CASES[case] = spec
        mg.CASE_DOCS[case] = __doc__.split(f"- {case}: ")[1].split("\n- ")[0].split("\n\n")[0]
        sys.argv = ["make_gold.py", "--out", out_dir, "--only", case]
        mg.main()
        if "_long_" in case:
            keep_long_case_vectors(os.path.join(out_dir, case))


if __name__ == "__main__":
    main()
