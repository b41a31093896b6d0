"""Bad-input battery, `paligemma parity`: damaged case folders are named, file and key."""

import shutil
from pathlib import Path

import numpy as np
import pytest

GOLD = Path(__file__).parents[1] / "parity_tests" / "data"


@pytest.fixture
def case(tmp_path) -> Path:
    shutil.copytree(GOLD / "pg1_tiny", tmp_path / "case")
    return tmp_path / "case"


def test_not_a_case_folder(refused, tmp_path):
    refused("parity", tmp_path, says=f"{tmp_path}: not a parity case directory (no params.npz)")


def test_truncated_vectors(refused, case):
    data = (case / "vectors.npz").read_bytes()
    (case / "vectors.npz").write_bytes(data[: len(data) // 3])
    refused("parity", case, says=(f"{case / 'vectors.npz'}: unreadable", "copy it again"))


def test_vectors_missing_an_array(refused, case):
    with np.load(case / "vectors.npz") as f:
        arrays = {k: f[k] for k in f.files if k != "text"}
    np.savez(case / "vectors.npz", **arrays)
    refused("parity", case, says=f"{case}: vectors.npz or config.json has no 'text'")


def test_config_not_json(refused, case):
    (case / "config.json").write_text("{")
    refused("parity", case, says=f"{case / 'config.json'}: not JSON")


def test_truncated_params(refused, case):
    data = (case / "params.npz").read_bytes()
    (case / "params.npz").write_bytes(data[:2000])
    refused("parity", case, says=f"{case / 'params.npz'}")


def test_pickled_vectors_are_refused(refused, case):
    with np.load(case / "vectors.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays["image"] = np.array([{"x": 1}], dtype=object)
    np.savez(case / "vectors.npz", **arrays)
    refused("parity", case, says=(f"{case / 'vectors.npz'}: unreadable", "allow_pickle"))
