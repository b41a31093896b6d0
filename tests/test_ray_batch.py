"""`paligemma batch --ray` on a local Ray cluster of 2 CPUs / 2 actors: the output equals the
single-process run item for item, also when an actor is killed mid-run."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from paligemma.cli import main

ray = pytest.importorskip("ray", reason='Ray is not installed (pip install -e ".[ray]")')


@pytest.fixture(scope="module")
def cluster():
    """One local Ray instance for the module (its start-up takes seconds). Its actors do not
    load the C++ kernel: one killed while torch builds it would leave the build's lock file
    behind, and every later loader would wait for it forever."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PALIGEMMA_NO_KERNELS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def job(tmp_path_factory, demo_scenes, demo_model_dir):
    """16 scenes and a missing file in a manifest, and the single-process results."""
    root = tmp_path_factory.mktemp("ray")
    items = []
    for i, image in enumerate(demo_scenes(16, seed=5)):
        image.save(root / f"{i:02d}.png")
        items.append({"id": f"item{i}", "image": f"{i:02d}.png"})
    items.append({"id": "missing", "image": "missing.png"})
    (root / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    args = ["batch", "caption", "--input", str(root / "items.jsonl"), "--model",
            str(demo_model_dir), "--max-batch", "4", "--no-progress"]
    assert main([*args, "--output", str(root / "local.jsonl")]) == 0
    return args, read(root / "local.jsonl")


def read(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows), "an id was written twice"
    return by_id


def ray_run(args: list, out: Path) -> int:
    return main([*args, "--output", str(out), "--ray", "--ray-actors", "2",
                 "--ray-batch-size", "1"])


def map_workers() -> list[int]:
    """PIDs of the Ray Data actor processes (their process title is ray::MapWorker...)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::MapWorker"):
                pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_ray_output_equals_the_single_process_run(cluster, job, tmp_path):
    args, local = job
    assert ray_run(args, tmp_path / "ray.jsonl") == 0
    assert read(tmp_path / "ray.jsonl") == local
    assert "error" in local["missing"]


def test_an_actor_killed_mid_run_loses_nothing(cluster, job, tmp_path):
    args, local = job
    out = tmp_path / "ray.jsonl"
    killed: list[tuple[int, int]] = []  # (pid, rows written when it was killed)

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            written = out.read_text().count("\n") if out.exists() else 0
            workers = map_workers()
            if written >= 2 and workers:
                os.kill(workers[0], signal.SIGKILL)
                killed.append((workers[0], written))
            time.sleep(0.02)

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        assert ray_run(args, out) == 0
    finally:
        thread.join()
    assert killed and killed[0][1] < len(local), "the actor was not killed mid-run"
    assert read(out) == local
