"""Every gold case, computed by the official JAX code, through the real loading code."""

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from paligemma.parity import VAE_STAGES, run_case

REQUIRED_STAGES = {"zimg", "text_logits", "decode_logits", "decode_tokens"}


def test_case_passes_every_stage(case_dir):
    report = run_case(case_dir)
    failed = [(s.name, s.max_abs_err, s.tol) for s in report.stages if not s.ok]
    assert report.ok and not failed, failed
    assert REQUIRED_STAGES <= {s.name for s in report.stages}


def _rewrite_npz(src, dst, rename=lambda k: k, change=lambda k, a: a):
    """Copies an npz member by member (raw arrays, bf16 |V2 untouched)."""
    with np.load(src, allow_pickle=False) as f:
        np.savez(dst, **{rename(k): change(k, f[k]) for k in f.files})


def _copy_case(case_dir, tmp_path, **rewrite):
    for name in ("config.json", "vectors.npz"):
        (tmp_path / name).write_bytes((case_dir / name).read_bytes())
    _rewrite_npz(case_dir / "params.npz", tmp_path / "params.npz", **rewrite)
    return tmp_path


def test_keys_without_params_prefix_load_the_same(short_case_dir, tmp_path):
    case = _copy_case(short_case_dir, tmp_path, rename=lambda k: k.removeprefix("params/"))
    with zipfile.ZipFile(case / "params.npz") as z:
        assert not any(n.startswith("params/") for n in z.namelist())
    assert run_case(case).ok


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "paligemma", "parity", *map(str, args)],
                          capture_output=True, text=True)


def test_cli_writes_json_and_exits_0(short_case_dir, tmp_path):
    out = _run_cli(short_case_dir, "--json", tmp_path / "r.json")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] is True and report["case"] == short_case_dir.name
    assert REQUIRED_STAGES <= {s["name"] for s in report["stages"]}
    assert all(set(s) >= {"name", "max_abs_err", "tol", "ok"} for s in report["stages"])
    assert "text_logits" in out.stdout and "PASS" in out.stdout


def test_cli_checks_the_mask_vae_case(tmp_path):
    out = _run_cli(Path(__file__).parent / "data" / "seg_vae", "--json", tmp_path / "r.json")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] is True and report["case"] == "seg_vae"
    assert {s["name"] for s in report["stages"]} == {*VAE_STAGES, "masks"}


def test_cli_exits_1_when_a_weight_is_off(tmp_path):
    key = "params/llm/final_norm/scale"
    case = _copy_case(Path(__file__).parent / "data" / "pg1_tiny", tmp_path,
                      change=lambda k, a: a + np.float32(1e-2) if k == key else a)
    out = _run_cli(case, "--json", tmp_path / "r.json")
    assert out.returncode == 1
    stages = {s["name"]: s for s in json.loads((tmp_path / "r.json").read_text())["stages"]}
    assert stages["zimg"]["ok"] and not stages["text_logits"]["ok"]


def test_cli_rejects_a_directory_that_is_not_a_case(tmp_path):
    out = _run_cli(tmp_path)
    assert out.returncode == 2 and "not a parity case directory" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("flag", ["--help"])
def test_cli_help_explains_case_directories(flag):
    out = _run_cli(flag)
    assert out.returncode == 0 and "params.npz" in out.stdout and "vectors.npz" in out.stdout
