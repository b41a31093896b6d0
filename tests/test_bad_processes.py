"""Bad-input battery, real processes: what the console scripts do (exit code, one line, no
traceback), SIGTERM handled as Ctrl-C, and a SIGKILLed conversion's leftovers cleaned up by the
next run. The rest of the battery calls the same `main` functions in-process."""

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
GOLD = ROOT / "parity_tests" / "data"
CONFIG = ROOT / "tests" / "data" / "configs" / "pg1_tiny.json"
# A conversion that stops inside its first tensor until killed.
SLOW_CONVERT = """
import sys, time
import paligemma.formats.ours as c
def write(self, name, chunks):
    print("writing", flush=True)
    time.sleep(60)
c.SafetensorsWriter.write = write
from convert.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run(*argv: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_paligemma_bad_image_is_one_line(tmp_path):
    result = run("-m", "paligemma", "caption", tmp_path / "nope.jpg", "--model", tmp_path)
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path / 'nope.jpg'}: no such file\n"


def test_converter_bad_source_is_one_line(tmp_path):
    (tmp_path / "x.npz").write_text("not a zip")
    result = run("-m", "convert", tmp_path / "x.npz", "--variant", "pg1-3b-224", "-o",
                 tmp_path / "out", "-q")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'x.npz'}: not an .npz (zip) file")


def start_slow_conversion(out: Path) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_CONVERT, str(GOLD / "pg1_tiny" / "params.npz"), "--config",
         str(CONFIG), "-o", str(out), "-q"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline() == "writing\n"  # the temporary output exists now
    return child


def test_sigterm_removes_the_temporary(tmp_path):
    child = start_slow_conversion(tmp_path / "out")
    assert len(list(tmp_path.iterdir())) == 2  # .out.PID.*.tmp and .out.lock
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM
    assert err == "interrupted (SIGTERM): stopped; unfinished output removed\n"
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leftovers_are_removed_by_the_next_run(tmp_path):
    child = start_slow_conversion(tmp_path / "out")
    child.kill()
    child.communicate(timeout=60)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left[1] == ".out.lock" and left[0].startswith(f".out.{child.pid}.")
    result = run("-m", "convert", GOLD / "pg1_tiny" / "params.npz", "--config", CONFIG, "-o",
                 tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(f"left behind by process {child.pid} (no longer running)") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")
