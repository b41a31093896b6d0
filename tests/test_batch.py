"""`paligemma batch`: rows equal one-by-one generation, error rows, resume without loss or
repeats after a crash or SIGTERM, manifests."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from paligemma.batch import Item, Job, Results, process, read_items, run_batch
from paligemma.cli import main


@pytest.fixture(scope="module")
def folder(tmp_path_factory, demo_scenes):
    """12 scenes (3 in a subfolder), one corrupt file, one non-image file."""
    root = tmp_path_factory.mktemp("images")
    (root / "sub").mkdir()
    for i, image in enumerate(demo_scenes(12, seed=3)):
        image.save(root / ("sub" if i % 4 == 0 else "") / f"{i:02d}.png")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.txt").write_text("not an image, not an item")
    return root


def rows_by_id(path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows), "an id was written twice"
    return by_id


def cli(*args) -> int:
    return main(["batch", *map(str, args), "--no-progress"])


@pytest.fixture(scope="module")
def reference(folder, demo_model_dir, tmp_path_factory):
    """The uninterrupted run of `batch caption` on the folder."""
    out = tmp_path_factory.mktemp("ref") / "captions.jsonl"
    assert cli("caption", "--input", folder, "--output", out, "--model", demo_model_dir,
               "--max-batch", "4") == 0
    return rows_by_id(out)


def test_rows_equal_captioning_each_image_alone_and_bad_files_are_error_rows(
        reference, folder, demo_pg):
    assert sorted(reference) == sorted(i.id for i in read_items(folder))
    assert "sub/00.png" in reference and "notes.txt" not in reference
    assert "cannot" in reference["corrupt.jpg"]["error"] or \
        "not an image" in reference["corrupt.jpg"]["error"]
    for item_id, row in reference.items():
        if "error" not in row:
            assert row["text"] == demo_pg.caption(folder / item_id).text, item_id
            assert row["prompt"] == "caption en" and row["finish_reason"] == "eos"


def test_resume_after_a_crash_mid_write_loses_and_repeats_nothing(
        reference, folder, demo_model_dir, tmp_path):
    out = tmp_path / "captions.jsonl"
    lines = [json.dumps(reference[k]) for k in sorted(reference)[:5]]
    out.write_text("\n".join(lines) + "\n" + lines[-1][:20])  # the 6th row cut short
    assert cli("caption", "--input", folder, "--output", out, "--model", demo_model_dir) == 0
    assert rows_by_id(out) == reference


def test_sigterm_stops_cleanly_and_a_rerun_completes(reference, folder, demo_model_dir, tmp_path):
    out = tmp_path / "captions.jsonl"
    command = [sys.executable, "-m", "paligemma", "batch", "caption", "--input", str(folder),
               "--output", str(out), "--model", str(demo_model_dir), "--max-batch", "1",
               "--no-progress"]
    # One row at a time, slowed down, so that the signal lands mid-run.
    env = {**os.environ, "PALIGEMMA_NO_KERNELS": "1", "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    while job.poll() is None and (not out.exists() or out.read_text().count("\n") < 2):
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130, err
    assert "rerun the same command to resume" in err
    written = rows_by_id(out)
    assert 2 <= len(written) < len(reference)
    assert cli("caption", "--input", folder, "--output", out, "--model", demo_model_dir) == 0
    assert rows_by_id(out) == reference


def test_manifest_items_carry_their_own_question_and_id(folder, demo_pg, tmp_path):
    manifest = tmp_path / "items.jsonl"
    rows = [{"id": "a", "image": str(folder / "01.png"), "question": "how many shapes are there"},
            {"image": str(folder / "02.png")},  # --question applies, id = the path
            {"id": "gone", "image": "missing.png"}]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "answers.jsonl"
    job = Job("ask", "what color is the circle")
    run_batch(lambda items: process(demo_pg, job, items, max_batch=2), manifest, out, False)
    got = rows_by_id(out)
    assert got["a"]["text"] == demo_pg.ask(folder / "01.png", "how many shapes are there").text
    assert got[str(folder / "02.png")]["prompt"] == "answer en what color is the circle"
    assert "no such file" in got["gone"]["error"]


def test_seeded_sampling_does_not_depend_on_the_batch(folder, demo_pg):
    items = [i for i in read_items(folder) if i.id != "corrupt.jpg"][:6]
    job = Job("caption", temperature=1.0, seed=7)
    one = {r["id"]: r for r in process(demo_pg, job, items, max_batch=1)}
    four = {r["id"]: r for r in process(demo_pg, job, items, max_batch=4)}
    assert one == four


@pytest.mark.parametrize("content, message", [
    ('{"image": "a.png"}\nnot json\n', "line 2: not JSON"),
    ('{"img": "a.png"}\n', 'line 1: expected an object with an "image" path'),
])
def test_bad_manifest_lines_are_named(tmp_path, content, message):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(content)
    with pytest.raises(ValueError, match=message):
        list(read_items(manifest))


def test_an_output_that_is_not_a_results_file_is_refused(tmp_path):
    out = tmp_path / "notes.jsonl"
    out.write_text("my notes\n")
    with pytest.raises(ValueError, match="line 1: not a row of a paligemma batch"):
        Results(out)
    assert out.read_text() == "my notes\n"
    with pytest.raises(ValueError, match="is a folder"):
        Results(tmp_path)


def test_ask_without_a_question_is_an_error_row():
    with pytest.raises(ValueError, match="no 'question' and no --question"):
        Job("ask").prompt(Item("x", "x.png"))


def test_a_failed_start_leaves_no_output(folder, tmp_path):
    out = tmp_path / "out.jsonl"
    assert cli("caption", "--input", folder, "--output", out, "--model", tmp_path / "none") == 2
    assert cli("caption", "--input", tmp_path / "none", "--output", out, "--model", folder) == 2
    assert not out.exists()
