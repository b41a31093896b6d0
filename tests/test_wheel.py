"""The package as a wheel: built from a copy of the sources, installed into a folder of its own,
`paligemma demo` runs from there with the demo model as package data (no repository lookups).

The full `pip install .` into a fresh virtual environment (which also installs torch) is too
slow for the suite; that was verified by hand."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
DEMO_FILES = ["config.json", "paligemma-demo.npz", "tokenizer.model"]


def test_wheel_ships_the_demo_model_and_the_demo_runs_installed(tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("paligemma", "convert"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
                    src], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("paligemma_torch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert all(f"paligemma/demo/model/{f}" in names for f in DEMO_FILES)
    assert "convert/cli.py" in names and "paligemma/formats/open.py" in names

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True,
                   capture_output=True)
    work = tmp_path / "work"  # not the repository: no parity_tests/ here, no sources on the path
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", "import sys, paligemma.cli; print(paligemma.cli.__file__); "
         "sys.exit(paligemma.cli.main(['demo', '--out', 'out', '--seed', '1']))"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(site))  # the installed copy ran, not the repository
    assert f"{site}/paligemma/demo/model/paligemma-demo.npz" in done.stdout
    assert "parity check skipped" in done.stdout
    assert (work / "out" / "annotated.png").is_file() and (work / "out" / "report.json").is_file()
