"""Per-device weight memory of every official PaliGemma variant under tensor parallelism.

Computed from the official parameter shapes (`parity_tests/data/official_layouts.json`, which
`jax.eval_shape` produced on big_vision's model with the official configs), split as
`paligemma.tensor_parallel` splits them: query heads, MLP columns and vocabulary rows by N; kv
heads by N when their count allows, else one per device; SigLIP, projector and norms replicated.
Each figure is cross-checked against the parameters of the meta-device model that
`tensor_parallel.shard_model` builds for rank 0 (the script fails if they differ).

    python benchmarks/tp_memory.py [--markdown]

bf16 weights (the official PaliGemma 2 storage) in GiB (2^30 bytes); the f32 KV cache (our
default; big_vision's bf16 cache is half) per 1,000 tokens of one sequence, per device.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from paligemma.config import get_config
from paligemma.tensor_parallel import Plan, shard_model

LAYOUTS = Path(__file__).parents[1] / "parity_tests" / "data" / "official_layouts.json"
WORLDS = (1, 2, 4, 8)
FAMILY = {"paligemma-3b": "pg1-3b", "paligemma2-3b": "pg2-3b", "paligemma2-10b": "pg2-10b",
          "paligemma2-28b": "pg2-28b"}


def device_params(shapes: dict[str, list[int]], plan: Plan) -> int:
    """Parameters one device holds, from the official names and shapes."""
    cfg, n = plan.cfg, plan.world
    local_kv = plan.kv_heads[1] - plan.kv_heads[0]
    total = 0
    for name, shape in shapes.items():
        size = math.prod(shape)
        if name == "llm/embedder/input_embedding":
            size = -(-shape[0] // n) * shape[1]  # padded to a multiple of N rows
        elif name.endswith(("q_einsum/w", "qkv_einsum/w", "attn_vec_einsum/w")):
            size //= n  # heads (qkv_einsum: MHA, kv heads == query heads)
        elif name.endswith("kv_einsum/w"):
            size = size // cfg.num_kv_heads * local_kv
        elif name.endswith(("mlp/gating_einsum", "mlp/linear")):
            size //= n
        total += size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args()
    models = json.loads(LAYOUTS.read_text())["models"]
    rows = []
    for name, layout in models.items():
        family, res = name.rsplit("-", 1)
        config = get_config(f"{FAMILY[family]}-{res}")
        cells = []
        for world in WORLDS:
            plan = Plan(config.text, 0, world)
            params = device_params(layout["params"], plan)
            ours = sum(p.numel() for p in shard_model(config, plan).parameters())
            if ours != params:
                raise SystemExit(f"{name} TP={world}: layouts give {params} parameters per "
                                 f"device, shard_model builds {ours}")
            if world == 1 and params != layout["num_params"]:
                raise SystemExit(f"{name}: {params} != num_params {layout['num_params']}")
            local = plan.local_config()
            kv = 2 * local.depth * local.num_kv_heads * local.head_dim * 4 * 1000
            cells.append((params * 2 / 2**30, kv / 2**30))
        rows.append((name, layout["num_params"], cells))
    if args.markdown:
        print("| variant | parameters | " + " | ".join(f"TP={w}" for w in WORLDS) + " |")
        print("|---|---|" + "---|" * len(WORLDS))
        for name, count, cells in rows:
            print(f"| {name} | {count / 1e9:.2f}B | "
                  + " | ".join(f"{w:.2f} GiB (+{kv:.3f})" for w, kv in cells) + " |")
    else:
        print(f"{'variant':<22}{'params':>8}" + "".join(f"{'TP=' + str(w):>18}" for w in WORLDS))
        for name, count, cells in rows:
            print(f"{name:<22}{count / 1e9:>7.2f}B"
                  + "".join(f"{w:>9.2f} GiB+{kv:.3f}" for w, kv in cells))
    print("\nGiB of bf16 weights per device (+ GiB of f32 KV cache per 1,000 tokens of one "
          "sequence); every figure matches the model tensor_parallel.shard_model builds.")


if __name__ == "__main__":
    main()
