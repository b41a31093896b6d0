"""Tensor parallelism over 2 gloo processes (torchrun) against one process, on every gold case:
greedy tokens identical, logits within float32 noise; each rank holds less than the whole model.

The logit tolerance: adding a row-parallel layer's two partial sums is a different float32
summation order than one GEMM. On the short cases (|logits| up to 26) one process differs from
itself by up to 3.4e-5 between its two matmul paths (C++ decode kernel vs PyTorch,
PALIGEMMA_NO_KERNELS=1); 2 ranks differ from one process by 8e-6 to 9.3e-5 (pg1_long_1k_tiny).
2e-4 (under 1e-5 of the logit range) bounds both with room.
"""

import json
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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{case: (one-process tokens, logits, weight bytes; 2-rank tokens, logits, info)}."""
    root = tmp_path_factory.mktemp("tp")
    reference = {}
    for name in CASES:
        with np.load(DATA / name / "vectors.npz") as f:
            vec = {k: torch.from_numpy(f[k]) for k in f.files}
        images = vec["image"].permute(0, 3, 1, 2).contiguous()
        config = case_config(json.loads((DATA / name / "config.json").read_text()),
                             image_size=images.shape[-1])
        case = root / name
        save_pretrained(load_official(DATA / name / "params.npz", config), case / "model")
        inputs = {"images": images, "tokens": vec["prompt_text"].long(),
                  "mask_ar": vec["prompt_mask_ar"].long(),
                  "input_mask": vec["prompt_input_mask"].to(torch.uint8),
                  "steps": torch.tensor(vec["decode_tokens"].shape[1])}
        save_file(inputs, case / "inputs.safetensors")
        model = load_pretrained(case / "model")
        tokens, logits = generate(model, images, inputs["tokens"], inputs["mask_ar"],
                                  inputs["input_mask"].bool(), int(inputs["steps"]))
        assert torch.equal(tokens, vec["decode_tokens"].long())  # the gold greedy decode
        reference[name] = (tokens, logits, weight_bytes(model))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(Path(__file__).parent / "tp_worker.py"), str(root),
               *(str(root / name) for name in CASES)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: (*reference[name], load_file(root / f"{name}.safetensors"),
                   json.loads((root / f"{name}.json").read_text()))
            for name in CASES}


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_one_process(runs, case):
    tokens, logits, _, split, _ = runs[case]
    assert torch.equal(split["tokens"], tokens)
    torch.testing.assert_close(split["logits"], logits, atol=2e-4, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_each_rank_holds_less_than_the_model(runs, case):
    _, _, whole, _, info = runs[case]
    assert len(info["rank_weight_bytes"]) == 2
    assert all(b < whole for b in info["rank_weight_bytes"]), (info, whole)


def test_kv_heads_split_or_kept_as_their_count_allows():
    from paligemma.config import TextConfig

    gqa = TextConfig(num_heads=16, num_kv_heads=8)  # 10B: 2 query heads per kv head
    assert [Plan(gqa, r, 4).kv_heads for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [Plan(gqa, r, 16).kv_heads for r in (0, 1, 2, 15)] == [(0, 1), (0, 1), (1, 2), (7, 8)]
    mqa = TextConfig(num_heads=8, num_kv_heads=1)  # PaliGemma 1: every rank keeps the kv head
    assert {Plan(mqa, r, 4).kv_heads for r in range(4)} == {(0, 1)}
    with pytest.raises(ValueError, match="3 does not divide num_heads 8"):
        Plan(mqa, 0, 3)
