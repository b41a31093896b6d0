"""Bad-input battery, fine-tuning: every record and image is checked before the first step
(errors name file:line), run folders and exports are never overwritten unasked, `--resume`
refuses a changed run, and an interruption or a full disk keeps the last good checkpoint."""

import errno
import json
import shutil
from pathlib import Path

import PIL.Image
import pytest
from test_finetune import examples, tiny_model

import paligemma.finetune
from paligemma import cli
from paligemma.finetune import save_model
from paligemma.tokenizer import Tokenizer

FAST = ("--steps", "3", "--batch-size", "2", "--lr", "1e-2", "--warmup-steps", "1")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from test_tokenizer import loc_seg_tokenizer

    tok = Tokenizer(loc_seg_tokenizer())
    folder = tmp_path_factory.mktemp("base")
    save_model(tiny_model(tok), tok, folder / "model")
    save_model(tiny_model(tok, seed=1), tok, folder / "other")
    return folder


def make_data(folder: Path) -> Path:
    """folder/train.jsonl with 4 records and their images."""
    folder.mkdir()
    lines = []
    for i, ex in enumerate(examples()):
        PIL.Image.fromarray(ex.image).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prefix": ex.prefix, "suffix": ex.suffix}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


@pytest.fixture
def data(tmp_path) -> Path:
    return make_data(tmp_path / "data")


def finetune(refused, base, train, out, *extra, says, model="model"):
    return refused("finetune", "--model", base / model, "--train", train, "-o", out, *FAST,
                   *extra, says=says, watch=(base,))


def edit_line(path: Path, n: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[n - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def no_model(monkeypatch):
    import paligemma.api

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")
    monkeypatch.setattr(paligemma.api.PaliGemma, "from_pretrained", load)


@pytest.mark.parametrize(("line", "says"), [
    ('{"image": "0.png", "prefix": 5, "suffix": "x"}', "'prefix' must be a string, got 5"),
    ('{"image": "0.png", "prefix": "caption en"}', "no 'suffix'"),
    ('{"image": "", "prefix": "a", "suffix": "b"}', "'image' must be a non-empty string"),
    ('["0.png", "caption en", "x"]', "expected an object"),
    ('{"image": "0.png", "prefix": "caption en", ', "not JSON"),
])
def test_bad_record_names_file_and_line_before_loading(refused, base, data, tmp_path, line,
                                                       says, no_model):
    edit_line(data, 3, line)
    finetune(refused, base, data, tmp_path / "run", says=(f"{data}:3: ", says))


def test_missing_image_on_the_last_line_is_found_before_step_one(refused, base, data,
                                                                 tmp_path):
    (data.parent / "3.png").unlink()
    finetune(refused, base, data, tmp_path / "run",
             says=f"{data}:4: {data.parent / '3.png'}: no such file")


def test_corrupt_image_is_found_before_step_one(refused, base, data, tmp_path):
    (data.parent / "2.png").write_bytes((data.parent / "2.png").read_bytes()[:60])
    finetune(refused, base, data, tmp_path / "run", says=f"{data}:3: {data.parent / '2.png'}")


def test_decompression_bomb_in_the_data(refused, base, data, tmp_path, bomb_png):
    edit_line(data, 2, json.dumps({"image": str(bomb_png), "prefix": "a", "suffix": "b"}))
    finetune(refused, base, data, tmp_path / "run",
             says=(f"{data}:2: ", "decompression-bomb limit"))


def test_bad_eval_file_is_checked_too(refused, base, data, tmp_path):
    bad = data.parent / "val.jsonl"
    bad.write_text('{"image": "nope.png", "prefix": "a", "suffix": "b"}\n')
    finetune(refused, base, data, tmp_path / "run", "--eval", bad,
             says=f"{bad}:1: {data.parent / 'nope.png'}: no such file")


def test_empty_training_file(refused, base, data, tmp_path, no_model):
    data.write_text("\n\n")
    finetune(refused, base, data, tmp_path / "run", says=f"{data}: no records")


def test_missing_image_folder(refused, base, data, tmp_path, no_model):
    finetune(refused, base, data, tmp_path / "run", "--image-dir", tmp_path / "imgs",
             says=f"{tmp_path / 'imgs'}: no such image folder (--image-dir)")


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--batch-size", "0", "batch_size (--batch-size): expected an integer >= 1, got 0"),
    ("--lr", "-1", "lr (--lr): expected a number > 0, got -1.0"),
    ("--warmup-steps", "-5", "warmup_steps (--warmup-steps): expected an integer >= 0, got -5"),
    ("--mode", "half", "argument --mode: invalid choice: 'half'"),
])
def test_bad_training_settings_name_the_flag(refused, base, data, tmp_path, flag, value, says,
                                             no_model):
    finetune(refused, base, data, tmp_path / "run", flag, value, says=says)


def test_unrelated_output_folder_is_refused_even_with_force(refused, base, data, tmp_path,
                                                            no_model):
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "draft.tex").write_text("x")
    finetune(refused, base, data, tmp_path / "thesis", "--force",
             says="is not written by this command, not a previous fine-tuning run folder")


def test_export_onto_a_file_it_did_not_write_is_refused_before_training(refused, base, data,
                                                                        tmp_path, no_model):
    official = tmp_path / "paligemma-3b.npz"
    shutil.copy(Path(__file__).parents[1] / "parity_tests/data/pg1_tiny/params.npz", official)
    finetune(refused, base, data, tmp_path / "run", "--export-npz", official, "--force",
             says=f"{official}: exists and is not written by this command")


@pytest.fixture(scope="module")
def finished(base, tmp_path_factory) -> Path:
    """A folder with data/ and run/: a finished 3-step run with a checkpoint every step."""
    folder = tmp_path_factory.mktemp("finished")
    train = make_data(folder / "data")
    assert cli.main(["finetune", "--model", str(base / "model"), "--train", str(train), "-o",
                     str(folder / "run"), *FAST, "--save-every", "1"]) == 0
    return folder


@pytest.fixture
def previous_run(finished, tmp_path, capsys) -> Path:
    """A copy of `finished`'s run folder; its data is `data` (tmp_path/data/train.jsonl)."""
    shutil.copytree(finished / "run", tmp_path / "run")
    capsys.readouterr()
    return tmp_path / "run"


def test_rerun_into_a_previous_run_needs_force(refused, base, data, previous_run):
    finetune(refused, base, data, previous_run,
             says=f"{previous_run}: already exists (use --force to replace a previous "
             "fine-tuning run folder)")


@pytest.mark.parametrize(("change", "says"), [
    (("--batch-size", "1"), "batch_size was 2, now 1"),
    (("--lr", "0.5"), "lr was 0.01, now 0.5"),
    (("--steps", "6"), "steps was 3, now 6"),  # the cosine schedule ends elsewhere
    (("--mode", "lora"), "mode was 'full', now 'lora'"),
])
def test_resume_refuses_changed_settings(refused, base, data, previous_run, change, says):
    # The later flag wins: FAST's own value is overridden by `change`.
    finetune(refused, base, data, previous_run, "--resume", *change,
             says=(f"{previous_run / 'checkpoint'}: cannot resume: ", says))


def test_resume_refuses_changed_data(refused, base, data, previous_run):
    edit_line(data, 1, json.dumps({"image": "0.png", "prefix": "caption en", "suffix": "new"}))
    finetune(refused, base, data, previous_run, "--resume",
             says="cannot resume: the training data (--train / --image-dir) changed")


def test_resume_refuses_another_base_model(refused, base, data, previous_run):
    finetune(refused, base, data, previous_run, "--resume", model="other",
             says="cannot resume: the base model (--model) differs")


def test_resume_without_a_run(refused, base, data, tmp_path):
    finetune(refused, base, data, tmp_path / "nothing", "--resume",
             says=f"{tmp_path / 'nothing'}: no fine-tuning run with a checkpoint/ to resume")


def test_interruption_saves_a_checkpoint_to_resume_from(base, data, tmp_path, monkeypatch,
                                                        capsys):
    losses, calls = paligemma.finetune.example_losses, []

    def interrupted_in_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return losses(*args, **kwargs)

    monkeypatch.setattr(paligemma.finetune, "example_losses", interrupted_in_step_2)
    argv = ["finetune", "--model", str(base / "model"), "--train", str(data), "-o",
            str(tmp_path / "run"), *FAST]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted: saved the state after step 1" in err and "Traceback" not in err
    state = json.loads((tmp_path / "run/checkpoint/state.json").read_text())
    assert state["step"] == 1
    monkeypatch.setattr(paligemma.finetune, "example_losses", losses)
    assert cli.main([*argv, "--resume"]) == 0
    steps = [json.loads(x)["step"]
             for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_disk_full_while_saving_keeps_the_last_checkpoint(refused, base, data, tmp_path,
                                                          monkeypatch, snapshot):
    save, calls = paligemma.finetune.save_file, []

    def fills_up(tensors, path):
        calls.append(path)
        if len(calls) > 2:  # the step-1 checkpoint (2 files) made it
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(tensors, path)

    monkeypatch.setattr(paligemma.finetune, "save_file", fills_up)
    code = cli.main(["finetune", "--model", str(base / "model"), "--train", str(data), "-o",
                     str(tmp_path / "run"), *FAST, "--save-every", "1"])
    assert code == 2
    state = json.loads((tmp_path / "run/checkpoint/state.json").read_text())
    assert state["step"] == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoint", "manifest.json", "metrics.jsonl"]  # no temporaries, no half checkpoint
