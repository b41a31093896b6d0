"""Bad-input battery, converter: overwrite protection, interruption and stale temporaries,
config values, messages that name the right thing. (Bad checkpoints themselves: see
test_convert_errors.py, part of the same battery.)"""

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import paligemma.formats.ours
from convert.cli import main
from paligemma import outputs

GOLD = Path(__file__).parents[1] / "parity_tests" / "data"
CONFIG = Path(__file__).parent / "data" / "configs" / "pg1_tiny.json"


@pytest.fixture
def src(tmp_path) -> Path:
    """A copy of the tiny official checkpoint, in its own folder with the user's other files."""
    folder = tmp_path / "downloads"
    folder.mkdir()
    shutil.copy(GOLD / "pg1_tiny" / "params.npz", folder / "params.npz")
    (folder / "notes.txt").write_text("keep me")
    return folder / "params.npz"


@pytest.fixture
def converted(tmp_path, src) -> Path:
    assert main([str(src), "--config", str(CONFIG), "-o", str(tmp_path / "ours"), "-q"]) == 0
    return tmp_path / "ours"


def convert(refused, *argv, says):
    return refused(*argv, "-q", says=says, main=main)


def test_force_into_the_folder_that_holds_the_source(refused, src):
    convert(refused, src, "--config", CONFIG, "-o", src.parent, "--force",
            says=f"{src.parent}: holds the input {src}")


def test_force_into_an_unrelated_folder(refused, src, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    convert(refused, src, "--config", CONFIG, "-o", tmp_path / "photos", "--force",
            says="exists and is not written by this command, not a previous converted "
            "checkpoint folder")


def test_to_npz_force_onto_the_official_download(refused, converted, src):
    convert(refused, converted, "--to", "npz", "-o", src, "--force",
            says=f"{src}: exists and is not written by this command, not a previous exported")


def test_to_hf_force_into_its_own_source_folder(refused, converted):
    convert(refused, converted, "--to", "hf", "-o", converted, "--force",
            says=f"{converted}: holds the input")


def test_to_hf_force_onto_another_kind(refused, src, converted, tmp_path):
    convert(refused, src, "--config", CONFIG, "--to", "hf", "-o", converted, "--force",
            says="exists and is a converted checkpoint folder, not a previous transformers")


def test_to_npz_force_replaces_its_own_export(converted, tmp_path):
    out = tmp_path / "back.npz"
    assert main([str(converted), "-o", str(out), "-q"]) == 0
    out.write_bytes(out.read_bytes())  # same content, new mtime
    assert main([str(converted), "-o", str(out), "-q", "--force"]) == 0
    assert outputs.kind_of(out) == "npz"


def test_transformers_folder_without_weights_as_source(refused, tmp_path):
    """A transformers folder is read as one (issue 17); without weights it names what is missing."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["X"], "text_config": {}}))
    convert(refused, hf, "--to", "npz", "-o", tmp_path / "x.npz",
            says=f"{hf}: no model.safetensors or model.safetensors.index.json")


def test_config_value_of_the_wrong_type(refused, src, tmp_path):
    config = json.loads(CONFIG.read_text())
    config["vision"]["width"] = "128"
    (tmp_path / "c.json").write_text(json.dumps(config))
    convert(refused, src, "--config", tmp_path / "c.json", "-o", tmp_path / "o",
            says=(f"{tmp_path / 'c.json'}: not a usable config file",
                  "vision.width: expected an integer >= 1, got '128'"))


def test_bad_shard_size(refused, src, tmp_path):
    convert(refused, src, "-o", tmp_path / "o", "--max-shard-size", "0",
            says="argument --max-shard-size: not a size: '0'")


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_npz_error_prints_no_stray_zipfile_traceback(converted, tmp_path, monkeypatch, capfd):
    def broken(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(paligemma.formats.ours, "split_rows", broken)
    assert main([str(converted), "-o", str(tmp_path / "back.npz"), "-q"]) == 2
    gc.collect()  # ZipFile.__del__ used to print "Exception ignored ..." here
    err = capfd.readouterr().err
    assert err.startswith("error: ") and "No space left on device" in err
    assert "Exception ignored" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloads", "ours"]


def test_variant_is_reported(src, tmp_path, capsys):
    assert main([str(src), "--config", str(CONFIG), "-o", str(tmp_path / "o")]) == 0
    assert "variant: pg1_tiny (given)" in capsys.readouterr().err


def test_sigterm_mid_conversion_removes_the_temporary(refused, src, tmp_path, monkeypatch):
    write = paligemma.formats.ours.SafetensorsWriter.write

    def terminated(self, *args):
        os.kill(os.getpid(), signal.SIGTERM)
        return write(self, *args)
    monkeypatch.setattr(paligemma.formats.ours.SafetensorsWriter, "write", terminated)
    before = sorted(os.listdir(tmp_path))
    assert main([str(src), "--config", str(CONFIG), "-o", str(tmp_path / "o"), "-q"]) == 143
    assert sorted(os.listdir(tmp_path)) == before


def test_a_live_writer_blocks_a_second_one(refused, src, tmp_path):
    (tmp_path / ".o.lock").write_text(str(os.getppid()))  # pytest's parent: alive
    convert(refused, src, "--config", CONFIG, "-o", tmp_path / "o",
            says=f"{tmp_path / 'o'}: process {os.getppid()} is writing it right now")


def test_leftovers_of_a_killed_conversion_are_removed_next_time(src, tmp_path, capsys):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    leftover = tmp_path / f".o.{child.pid}.1234abcd.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 4096)
    assert main([str(src), "--config", str(CONFIG), "-o", str(tmp_path / "o"), "-q"]) == 0
    assert f"warning: removed {leftover}, left behind by process {child.pid}" in (
        capsys.readouterr().err)
    assert not leftover.exists() and (tmp_path / "o" / "model.safetensors").is_file()
