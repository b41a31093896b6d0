"""Bad-input battery, output targets (every writer goes through `paligemma.outputs`): nothing
that a command did not create is replaced, targets are checked before the long work, a failed
or interrupted write leaves nothing, stale temporaries of dead processes are cleaned up, and
two writers of one target cannot both succeed."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

import paligemma.cli
from paligemma import outputs
from paligemma.demo import command as demo

GOLD = Path(__file__).parents[1] / "parity_tests" / "data"


@pytest.fixture
def no_model(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output target was checked")
    monkeypatch.setattr(paligemma.cli, "_load", load)


@pytest.fixture
def dead_pid() -> int:
    """The PID of a process that has finished."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def marked_png(path: Path) -> Path:
    PIL.Image.new("RGB", (4, 4)).save(path, pnginfo=outputs.png_info())
    return path


# -- the writers refuse what they did not create, before the long work ---------------------


def test_annotate_refuses_an_existing_file_before_loading(refused, model_dir, photo, tmp_path,
                                                          no_model):
    (tmp_path / "boxes.png").write_bytes(b"someone's file")
    refused("detect", photo, "--objects", "cat", "--model", model_dir,
            "--annotate", tmp_path / "boxes.png",
            says=f"{tmp_path / 'boxes.png'}: already exists (use --force")


def test_annotate_force_refuses_a_photo_it_did_not_write(refused, model_dir, photo, no_model):
    refused("detect", photo, "--objects", "cat", "--model", model_dir, "--annotate", photo,
            "--force", says=(f"{photo}: exists and is not written by this command",
                             "--force only replaces those"))


def test_annotate_under_a_file_fails_early(refused, model_dir, photo, no_model):
    refused("detect", photo, "--objects", "cat", "--model", model_dir,
            "--annotate", photo / "boxes.png", says=f"{photo} is a file, not a folder")


def test_annotate_force_replaces_its_own_png(model_dir, photo, tmp_path, capsys):
    out = marked_png(tmp_path / "boxes.png")
    assert paligemma.cli.main(["detect", str(photo), "--objects", "cat", "--model",
                               str(model_dir), "--annotate", str(out), "--force",
                               "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    with PIL.Image.open(out) as written:
        assert written.size == (120, 90) and outputs.kind_of(out) == "png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boxes.png", "photo.png"]


def test_explain_refuses_an_existing_output_before_loading(refused, model_dir, photo, tmp_path,
                                                           no_model):
    (tmp_path / "heat.png").write_bytes(b"x")
    refused("explain", photo, "--prompt", "caption en", "--model", model_dir,
            "-o", tmp_path / "heat.png", says=f"{tmp_path / 'heat.png'}: already exists")


def test_parity_json_refuses_before_running(refused, tmp_path, monkeypatch):
    monkeypatch.setattr(paligemma.cli, "run_case", lambda d: pytest.fail("ran the case"))
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    refused("parity", GOLD / "pg1_tiny", "--json", tmp_path / "notes.json", "--force",
            says="is not written by this command, not a previous parity JSON report")


def test_parity_json_force_replaces_a_previous_report(tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"case": "old", "ok": True, "stages": []}))
    assert paligemma.cli.main(["parity", str(GOLD / "seg_vae"), "--json", str(report),
                               "--force"]) == 0
    capsys.readouterr()
    assert json.loads(report.read_text())["case"].endswith("seg_vae")


def test_demo_refuses_a_folder_that_is_not_a_demo_output(refused, tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "thesis.tex").write_text("years of work")
    refused("demo", "--out", tmp_path / "work", "--force",
            says="exists and is not written by this command, not a previous demo output folder")


def test_demo_refuses_its_previous_output_without_force(refused, tmp_path):
    (tmp_path / "demo").mkdir()
    outputs.mark(tmp_path / "demo", "demo")
    refused("demo", "--out", tmp_path / "demo", says="already exists (use --force to replace "
            "a previous demo output folder)")


def test_demo_failure_leaves_nothing(refused, tmp_path, monkeypatch):
    def fail(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(demo.scenes, "draw_scene", fail)
    refused("demo", "--out", tmp_path / "demo", "--no-parity", says="No space left on device")


# -- the shared module ---------------------------------------------------------------------


def test_error_inside_atomic_leaves_the_target_untouched(tmp_path, snapshot):
    target = tmp_path / "model"
    target.mkdir()
    outputs.mark(target, "checkpoint")
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError), outputs.atomic(target, "checkpoint", force=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")
    assert snapshot(tmp_path) == before


def test_failure_removes_the_folders_made_for_the_output(tmp_path):
    with pytest.raises(OSError), outputs.atomic(tmp_path / "a" / "b" / "m", "checkpoint"):
        raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_inside_atomic_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), outputs.atomic(tmp_path / "a.npz", "npz") as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_source_inside_the_target_is_refused_even_with_force(tmp_path):
    (tmp_path / "ckpt").mkdir()
    outputs.mark(tmp_path / "ckpt", "checkpoint")
    with pytest.raises(outputs.OutputError, match="holds the input"):
        outputs.check(tmp_path / "ckpt", "checkpoint", True, sources=[tmp_path / "ckpt" / "x"])


def test_symlink_target_is_not_followed(tmp_path):
    (tmp_path / "real").mkdir()
    outputs.mark(tmp_path / "real", "checkpoint")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(outputs.OutputError, match="not a previous converted checkpoint"):
        outputs.check(tmp_path / "link", "checkpoint", force=True)


def test_a_second_writer_of_the_same_target_fails(tmp_path):
    with outputs.atomic(tmp_path / "a.png", "png") as tmp:
        with pytest.raises(outputs.OutputError, match=f"process {os.getpid()} is writing it"):
            with outputs.atomic(tmp_path / "a.png", "png"):
                pass
        tmp.write_bytes(b"done")
    assert (tmp_path / "a.png").read_bytes() == b"done"


def test_the_later_of_two_overlapping_writers_fails(tmp_path):
    # Both checked before either wrote (e.g. two long conversions): the second to finish
    # finds the first's output under the lock.
    outputs.check(tmp_path / "out", "checkpoint")
    with outputs.atomic(tmp_path / "out", "checkpoint"):
        pass
    with pytest.raises(outputs.OutputError, match="already exists"):
        with outputs.atomic(tmp_path / "out", "checkpoint"):
            pass


def test_stale_temporaries_and_lock_of_a_dead_process_are_removed(tmp_path, dead_pid, caplog):
    stale = tmp_path / f".out.{dead_pid}.0badc0de.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / ".out.lock").write_text(str(dead_pid))
    with caplog.at_level(logging.WARNING, "paligemma"), outputs.atomic(tmp_path / "out",
                                                                       "checkpoint"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert f"left behind by process {dead_pid} (no longer running)" in caplog.text
    assert str(stale) in caplog.text


def test_temporaries_of_a_live_process_are_kept(tmp_path):
    live = tmp_path / f".out.{os.getppid()}.0badc0de.tmp"
    live.mkdir()
    assert outputs.remove_stale(tmp_path / "out") == []
    assert live.is_dir()


def test_previous_outputs_are_recognised_by_their_mark(tmp_path):
    PIL.Image.new("RGB", (2, 2)).save(tmp_path / "photo.png")
    (tmp_path / "r.json").write_text(json.dumps([{"case": "c", "stages": []}]))
    shutil.copy(GOLD / "pg1_tiny" / "params.npz", tmp_path / "official.npz")
    assert outputs.kind_of(marked_png(tmp_path / "ours.png")) == "png"
    assert outputs.kind_of(tmp_path / "photo.png") is None
    assert outputs.kind_of(tmp_path / "official.npz") is None
    assert outputs.kind_of(tmp_path / "r.json") == "parity-report"
    assert outputs.kind_of(tmp_path) is None


def test_sigterm_inside_the_guard_is_an_interruption(tmp_path, capsys):
    from paligemma import guard

    def work(args):
        with outputs.atomic(tmp_path / "out", "checkpoint") as tmp:
            (tmp / "part").write_bytes(b"x")
            os.kill(os.getpid(), signal.SIGTERM)
        return 0

    previous = signal.getsignal(signal.SIGTERM)
    assert guard.run(work, None) == 143
    assert "interrupted (SIGTERM)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is previous  # restored
