"""benchmarks/bench_gpu.py (and its bench_gpu.sh wrapper) on the CPU with a tiny model, so that a
lent GPU is spent measuring: every configuration runs and the JSON has bench_inference.py's
shape. No timings are checked. The torch.compile path of `hf/bfloat16` takes about 90 s to
compile on 2 CPU cores; it runs only with PALIGEMMA_TEST_COMPILE=1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
pytest.importorskip("transformers")

import bench_gpu  # noqa: E402

ARGS = ["--device", "cpu", "--tiny", "--steps", "3", "--repeats", "1", "--batches", "1,2",
        "--threads", "1"]


def check(path: Path, configs: tuple[str, ...]) -> None:
    report = json.loads(path.read_text())
    assert {"machine", "threads", "model", "bandwidth_gbs", "floors_ms", "results"} <= set(report)
    assert report["machine"]["device"] == "cpu" and report["model"] == "pg1-tiny"
    assert set(report["results"]) == set(configs)
    for name, figures in report["results"].items():
        assert "error" not in figures, (name, figures)
        for key in ("prefill_b1_ms", "decode_b1_ms", "prefill_b2_ms", "decode_b2_ms"):
            assert figures[key] > 0, (name, key)


def test_every_configuration_runs_on_cpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert bench_gpu.main([*ARGS, "--no-compile", "--json", str(out)]) == 0
    check(out, bench_gpu.CONFIGS)
    assert "ours/theirs" in capsys.readouterr().out


def test_the_wrapper_refuses_a_missing_device_in_one_line(tmp_path):
    if bench_gpu.torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the wrapper would measure it")
    run = subprocess.run([str(ROOT / "benchmarks" / "bench_gpu.sh"), "--json",
                          str(tmp_path / "x.json")], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable})
    assert run.returncode == 2 and run.stderr.strip().endswith("pass --device cpu for a dry run)")


@pytest.mark.skipif(os.environ.get("PALIGEMMA_TEST_COMPILE") != "1",
                    reason="torch.compile on CPU takes ~90 s: set PALIGEMMA_TEST_COMPILE=1")
def test_compiled_static_cache_configuration_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    assert bench_gpu.main([*ARGS, "--only", "hf/bfloat16", "--json", str(out)]) == 0
    check(out, ("hf/bfloat16",))
