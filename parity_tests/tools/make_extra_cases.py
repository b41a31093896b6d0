"""Generates the extra gold cases in parity_tests/data/ with the official big_vision code.

They reuse the shared gold generator (`make_gold.py`, which calls big_vision's own model,
loader and decode functions) with other sizes and dtypes than the shared cases, so the tests
never rely on one particular shape:

- pg2_bf16_noprefix_tiny: Gemma 2 structure, bf16 weights, keys WITHOUT the `params/` prefix,
  MQA with num_heads * head_dim != width, 3 ViT heads of 16, 42 px images (9 image tokens),
  vocab 300.
- mha_f16_27b_scaling_tiny: num_kv_heads == num_heads (one fused `qkv_einsum`), 27B-style
  query scaling (width // heads = 20 != head_dim 12), float16 weights, 5 ViT heads of 8,
  70 px images (25 image tokens).

Usage (needs jax, flax, ml_collections, einops, orbax-checkpoint, absl-py, scipy, pillow):
  BIG_VISION_DIR=/path/to/big_vision_parent python parity_tests/tools/make_extra_cases.py \\
      /path/to/make_gold_dir OUT_DIR CASE
"""

import sys

import numpy as np

gold_dir, out_dir, case = sys.argv[1:4]
sys.path.insert(0, gold_dir)
import make_gold as mg  # noqa: E402

if case == "pg2_bf16_noprefix_tiny":
    mg.IMAGE_SIZE = 42
    mg.TINY_IMG.update(width=48, depth=1, mlp_dim=80, num_heads=3)
    mg.TINY_VOCAB = 300
    mg.OFFICIAL_KEY_PREFIX = ""
    mg.TINY_LLM["tiny_x1"] = dict(width=64, depth=2, mlp_dim=96, num_heads=2, num_kv_heads=1,
                                  head_dim=48, norm_eps=1e-6, vocab_size=300,
                                  final_logits_softcap=30.0, attn_logits_softcap=50.0,
                                  post_norms=True)
    spec = dict(llm_variant="tiny_x1", seed=3, param_dtype="bfloat16", qk_gain=4.5)
elif case == "mha_f16_27b_scaling_tiny":
    mg.IMAGE_SIZE = 70
    mg.TINY_IMG.update(width=40, depth=3, mlp_dim=64, num_heads=5)
    mg.TINY_LLM["tiny_x2"] = dict(width=80, depth=2, mlp_dim=160, num_heads=4, num_kv_heads=4,
                                  head_dim=12, norm_eps=1e-6, vocab_size=512,
                                  query_pre_attn_norm="rsqrt_emb_per_head",
                                  attn_logits_softcap=50.0, post_norms=True)
    spec = dict(llm_variant="tiny_x2", seed=5, param_dtype="float32", qk_gain=3.0)

    def save_f16(path, flat, dtype):  # make_gold.py writes f32 or bf16 only
        with open(path, "wb") as f:
            np.savez(f, **{mg.OFFICIAL_KEY_PREFIX + k: np.asarray(v, np.float16)
                           for k, v in flat.items()})

    mg.save_official_npz = save_f16
else:
    sys.exit(f"unknown case {case}")
mg.CASES.clear()
mg.CASES[case] = spec
mg.CASE_DOCS[case] = __doc__.split(f"- {case}: ")[1].split("\n- ")[0].split("\n\n")[0]
sys.argv = ["make_gold.py", "--out", out_dir, "--only", case]
mg.main()
