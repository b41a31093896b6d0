"""Tensor parallelism over 2 gloo processes (torchrun) against one process, on every gold case
(and over 4 on one): greedy tokens identical, logits within 1e-5; each rank holds less than the
whole model.

Every rank computes whole dot products in one process's matmul shapes (see the module
docstring of `paligemma.tensor_parallel`), so at the same number of threads per process (1,
torchrun's default) the logits came out bitwise equal on the Xeon this was written on. The
1e-5 (the issue's bound; |logits| reach 26) leaves room for a BLAS that picks a different
kernel for a GEMM with fewer output columns. The reference runs on 1 thread like each rank:
one process differs from itself between 1 and 2 threads by up to 6.1e-5 (pg1_long_1k_tiny;
MKL splits the K sum of the tall, narrow o_proj GEMM over threads), which is not a property of
the split.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from paligemma.formats import load_official, load_pretrained, save_pretrained
from paligemma.generate import generate
from paligemma.parity import case_config
from paligemma.tensor_parallel import Plan, weight_bytes

DATA = Path(__file__).parents[1] / "parity_tests" / "data"
CASES = sorted(p.name for p in DATA.iterdir() if (p / "vectors.npz").is_file()
               and p.name != "seg_vae")
# Ranks -> cases. 4 ranks on pg2_tiny's 2 kv heads: 2 ranks share each (the q gather and the
# strided o_proj gather, which 2 ranks never take: they split or fully share the kv heads).
WORLDS = {2: CASES, 4: ["pg2_tiny"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(ranks, case): (one-process tokens, logits, weight bytes; split tokens, logits,
    info)}."""
    root = tmp_path_factory.mktemp("tp")
    gold = {}
    for name in CASES:
        with np.load(DATA / name / "vectors.npz") as f:
            vec = {k: torch.from_numpy(f[k]) for k in f.files}
        images = vec["image"].permute(0, 3, 1, 2).contiguous()
        config = case_config(json.loads((DATA / name / "config.json").read_text()),
                             image_size=images.shape[-1])
        case = root / name
        save_pretrained(load_official(DATA / name / "params.npz", config), case / "model")
        save_file({"images": images, "tokens": vec["prompt_text"].long(),
                   "mask_ar": vec["prompt_mask_ar"].long(),
                   "input_mask": vec["prompt_input_mask"].to(torch.uint8),
                   "steps": torch.tensor(vec["decode_tokens"].shape[1])},
                  case / "inputs.safetensors")
        gold[name] = vec["decode_tokens"].long()
    logs, launched = root / "torchrun.log", {}
    with logs.open("w") as out:  # the ranks run while this process computes the reference
        for world, names in WORLDS.items():
            (root / str(world)).mkdir()
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node", str(world), str(Path(__file__).parent / "tp_worker.py"),
                       str(root / str(world)), *(str(root / name) for name in names)]
            launched[world] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    reference = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank
    try:
        for name in CASES:
            model = load_pretrained(root / name / "model")
            inputs = load_file(root / name / "inputs.safetensors")
            tokens, logits = generate(model, inputs["images"], inputs["tokens"],
                                      inputs["mask_ar"], inputs["input_mask"].bool(),
                                      int(inputs["steps"]))
            assert torch.equal(tokens, gold[name])  # the gold greedy decode
            reference[name] = (tokens, logits, weight_bytes(model))
    finally:
        torch.set_num_threads(threads)
        for ranks in launched.values():
            try:
                ranks.wait(timeout=600)
            except subprocess.TimeoutExpired:
                ranks.terminate()  # torchrun passes it on to the ranks
                raise
    assert all(r.returncode == 0 for r in launched.values()), logs.read_text()[-3000:]
    return {(world, name): (*reference[name], load_file(root / str(world) / f"{name}.safetensors"),
                            json.loads((root / str(world) / f"{name}.json").read_text()))
            for world, names in WORLDS.items() for name in names}


RUNS = [(world, name) for world, names in WORLDS.items() for name in names]


@pytest.mark.parametrize("run", RUNS, ids=[f"{w}ranks-{n}" for w, n in RUNS])
def test_ranks_equal_one_process(runs, run):
    tokens, logits, _, split, _ = runs[run]
    assert torch.equal(split["tokens"], tokens)
    torch.testing.assert_close(split["logits"], logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("run", RUNS, ids=[f"{w}ranks-{n}" for w, n in RUNS])
def test_each_rank_holds_less_than_the_model(runs, run):
    _, _, whole, _, info = runs[run]
    assert len(info["rank_weight_bytes"]) == run[0]
    assert all(b < whole for b in info["rank_weight_bytes"]), (info, whole)


def test_kv_heads_split_or_kept_as_their_count_allows():
    from paligemma.config import TextConfig

    gqa = TextConfig(num_heads=16, num_kv_heads=8)  # 10B: 2 query heads per kv head
    assert [Plan(gqa, r, 4).kv_heads for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [Plan(gqa, r, 16).kv_heads for r in (0, 1, 2, 15)] == [(0, 1), (0, 1), (1, 2), (7, 8)]
    assert [Plan(gqa, r, 16).attn_heads for r in (0, 1, 2)] == [(0, 2), (0, 2), (2, 4)]
    assert Plan(gqa, 0, 16).sharing == 2 and Plan(gqa, 0, 4).sharing == 1
    assert Plan(gqa, 1, 4).attn_heads == Plan(gqa, 1, 4).heads == (4, 8)
    mqa = TextConfig(num_heads=8, num_kv_heads=1)  # PaliGemma 1: every rank keeps the kv head
    assert {Plan(mqa, r, 4).kv_heads for r in range(4)} == {(0, 1)}
    assert {Plan(mqa, r, 4).attn_heads for r in range(4)} == {(0, 8)}  # and attends all heads
    with pytest.raises(ValueError, match="3 does not divide num_heads 8"):
        Plan(mqa, 0, 3)
