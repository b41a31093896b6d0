"""`paligemma eval`: data formats, the runner (batching, error rows, resume, atomic output), the
segmentation evaluator, the CLI, and the demo model's held-out scores through it."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from test_tokenizer import loc_seg_tokenizer

from paligemma.api import TextResult
from paligemma.cli import main
from paligemma.demo import scenes
from paligemma.eval import datasets, runner
from paligemma.eval.datasets import EvalExample
from paligemma.segmentation import load_mask_decoder
from paligemma.tokenizer import Tokenizer

REPO = Path(__file__).parents[1]
SEG_VAE = REPO / "parity_tests" / "data" / "seg_vae" / "params.npz"


class FakeModel:
    """Stands in for PaliGemma: answers[prefix] for each prompt; counts prompts seen; raises
    KeyboardInterrupt when `stop_after` prompts have been answered (an interruption)."""

    def __init__(self, answers: dict[str, str], stop_after: int | None = None):
        self.answers, self.stop_after, self.seen = answers, stop_after, []

    def generate(self, images, prompts, **options):
        if self.stop_after is not None and len(self.seen) >= self.stop_after:
            raise KeyboardInterrupt
        self.seen += prompts
        return [TextResult(p, self.answers[p], []) for p in prompts]


def write_images(folder: Path, names: list[str]) -> None:
    for name in names:
        PIL.Image.new("RGB", (20, 10), (200, 30, 30)).save(folder / name)


@pytest.fixture
def vqa_jsonl(tmp_path: Path) -> Path:
    write_images(tmp_path, ["a.png", "b.png"])
    lines = [{"image": "a.png" if i % 2 else "b.png", "prefix": f"answer en q{i}",
              "suffix": str(i)} for i in range(10)]
    path = tmp_path / "vqa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def answers_for(n: int, wrong: set[int] = frozenset()) -> dict[str, str]:
    return {f"answer en q{i}": "x" if i in wrong else str(i) for i in range(n)}


# -- data formats ----------------------------------------------------------------------------


def test_coco_captions_json(tmp_path: Path):
    coco = {"images": [{"id": 7, "file_name": "x.jpg"}, {"id": 9, "file_name": "y.jpg"}],
            "annotations": [{"image_id": 9, "caption": "b"}, {"image_id": 7, "caption": "a1"},
                            {"image_id": 7, "caption": "a2"}]}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(coco))
    examples = datasets.load("caption", path, image_dir="/imgs")
    assert [(e.id, str(e.image), e.prefix, e.answers) for e in examples] == [
        ("7", "/imgs/x.jpg", "caption en", ["a1", "a2"]), ("9", "/imgs/y.jpg", "caption en", ["b"])]


def test_karpathy_split(tmp_path: Path):
    karpathy = {"images": [
        {"filepath": "val2014", "filename": "a.jpg", "split": "test", "cocoid": 1,
         "sentences": [{"raw": "A cat."}]},
        {"filepath": "train2014", "filename": "b.jpg", "split": "train", "cocoid": 2,
         "sentences": [{"raw": "A dog."}]}]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(karpathy))
    [example] = datasets.load("caption", path, image_dir=tmp_path, split="test")
    assert (example.id, example.image, example.answers) == ("1", tmp_path / "val2014" / "a.jpg",
                                                           ["A cat."])


def test_vqav2_questions_and_annotations(tmp_path: Path):
    questions = {"data_subtype": "val2014", "questions": [
        {"image_id": 42, "question": "What is it?", "question_id": 420}]}
    annotations = {"annotations": [{"question_id": 420, "image_id": 42, "answer_type": "other",
                                    "question_type": "what is",
                                    "answers": [{"answer": "cat", "answer_id": i + 1}
                                                for i in range(10)]}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    [example] = datasets.load("vqav2", tmp_path / "q.json", image_dir="/coco",
                              annotations=tmp_path / "a.json")
    assert str(example.image) == "/coco/COCO_val2014_000000000042.jpg"
    assert example.prefix == "answer en What is it?"
    assert example.answers == ["cat"] * 10 and example.info["answer_type"] == "other"
    # No annotations (test-dev): predictions only, for the evaluation server.
    [test_dev] = datasets.load("vqav2", tmp_path / "q.json")
    assert test_dev.answers == []
    row = {"id": "420", **runner.score("vqav2", test_dev, "cat", [], None)}
    assert row == {"id": "420", "prediction": "cat"}
    assert runner.aggregate("vqav2", [row], [test_dev]) == {"num": 0, "errors": 0,
                                                            "unscored": 1}
    (tmp_path / "td.json").write_text(json.dumps(dict(questions, data_subtype="test-dev2015")))
    [td] = datasets.load("vqav2", tmp_path / "td.json", image_dir="/coco")
    assert str(td.image) == "/coco/COCO_test2015_000000000042.jpg"


def test_docvqa_and_tallyqa_json(tmp_path: Path):
    """DocVQA's own {"data": [...]} (prompt: the bare question) and TallyQA's JSON list (a
    numeric "answer")."""
    docvqa = {"dataset_name": "docvqa", "data": [
        {"questionId": 49153, "question": "What is the value?", "image": "documents/p_81.png",
         "answers": ["0.28", "0.28 per 1000"], "data_split": "val"}]}
    (tmp_path / "val_v1.0.json").write_text(json.dumps(docvqa))
    [doc] = datasets.load("docvqa", tmp_path / "val_v1.0.json")
    assert (doc.id, doc.prefix, doc.image, doc.answers) == (
        "49153", "What is the value?", tmp_path / "documents/p_81.png", ["0.28", "0.28 per 1000"])
    tally = [{"image": "val2014/COCO_val2014_000000000001.jpg", "answer": 2, "question_id": 7,
              "question": "How many dogs?", "issimple": True}]
    (tmp_path / "test.json").write_text(json.dumps(tally))
    [count] = datasets.load("count", tmp_path / "test.json")
    assert (count.id, count.prefix, count.answers) == ("7", "answer en How many dogs?", ["2"])
    # DocVQA's test split has no answers: predictions only, counted as unscored.
    del docvqa["data"][0]["answers"]
    (tmp_path / "test_v1.0.json").write_text(json.dumps(docvqa))
    [unanswered] = datasets.load("docvqa", tmp_path / "test_v1.0.json")
    row = {"id": unanswered.id, **runner.score("docvqa", unanswered, "0.28", [], None)}
    assert runner.aggregate("docvqa", [row], [unanswered]) == {"num": 0, "errors": 0,
                                                               "unscored": 1}


def test_vqav2_aggregate_by_answer_type():
    # Three questions, ten answers each; accuracies by the leave-one-out rule: "yes" given by
    # 10 -> 1; "2" by 1 -> 0.3; "red" by 2 -> 0.6. Overall (1 + 0.3 + 0.6) / 3; per type:
    # yes/no 1, number 0.3, other 0.6.
    examples = [EvalExample("1", "-", "q", ["yes"] * 10, info={"answer_type": "yes/no"}),
                EvalExample("2", "-", "q", ["2"] + ["3"] * 9, info={"answer_type": "number"}),
                EvalExample("3", "-", "q", ["red"] * 2 + ["blue"] * 8,
                            info={"answer_type": "other"})]
    rows = [{"id": e.id, **runner.score("vqav2", e, p, [], None)}
            for e, p in zip(examples, ["yes", "2", "red"], strict=True)]
    metrics = runner.aggregate("vqav2", rows, examples)
    assert metrics["accuracy"] == pytest.approx(1.9 / 3)
    assert metrics["accuracy/yes/no"] == 1.0
    assert metrics["accuracy/number"] == pytest.approx(0.3)
    assert metrics["accuracy/other"] == pytest.approx(0.6)


def test_refcoco_records_with_polygons(tmp_path: Path):
    """A COCO polygon decodes as pycocotools' annToMask (what big_vision's RefCOCO builder
    calls); the box is COCO's [x, y, w, h] in pixels, normalized by the image size."""
    from pycocotools import mask as coco_mask

    PIL.Image.new("RGB", (40, 20)).save(tmp_path / "im.png")
    polygon = [[4.0, 2.0, 30.0, 2.0, 30.0, 15.0, 4.0, 15.0]]
    record = {"image": "im.png", "sentence": "the red one", "bbox": [4, 2, 26, 13],
              "segmentation": polygon, "split": "val"}
    other = dict(record, split="testA")
    path = tmp_path / "refs.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps(other) + "\n")
    [example] = datasets.load("segment", path, split="val")
    assert example.prefix == "the red one"  # the RefCOCO transfer's prompt: the bare sentence
    assert example.box == pytest.approx((2 / 20, 4 / 40, 15 / 20, 30 / 40))
    expected = coco_mask.decode(coco_mask.merge(coco_mask.frPyObjects(polygon, 20, 40)))
    np.testing.assert_array_equal(example.mask(), expected.astype(bool))
    [mix] = datasets.load("segment", path, split="val", prompt="segment {sentence}")
    assert mix.prefix == "segment the red one"


def test_jsonl_detect_box_from_loc_suffix(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"image": "x.png", "prefix": "detect cat",
                                "suffix": "<loc0000><loc0100><loc1023><loc0400> cat"}) + "\n")
    [example] = datasets.load("detect", path)
    assert example.box == pytest.approx((0.0, 100 / 1023, 1.0, 400 / 1023))


def test_bad_records_name_the_line(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "a.png", "prefix": "caption en", "suffix": "x"}\n{"image": 1\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a JSON object"):
        datasets.load("caption", path)
    path.write_text('{"image": "a.png", "prefix": "detect cat"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: no box: give 'box' or a suffix"):
        datasets.load("detect", path)
    path.write_text('{"image": "a.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: prompt 'answer en \{question\}' "
                       "needs field 'question'"):
        datasets.load("vqa", path)
    record = '{"id": 1, "image": "a", "prefix": "p", "suffix": "x"}\n'
    path.write_text(record * 2)
    with pytest.raises(ValueError, match="example id '1' appears more than once"):
        datasets.load("vqa", path)


# -- runner ------------------------------------------------------------------------------------


def test_run_writes_rows_and_metrics(vqa_jsonl: Path, tmp_path: Path):
    examples = datasets.load("vqa", vqa_jsonl)
    out = tmp_path / "res.json"
    result = runner.run(FakeModel(answers_for(10, wrong={3})), "vqa", examples, out,
                        {"data": "x"}, batch_size=4, progress=False)
    assert json.loads(out.read_text()) == result
    assert result["metrics"]["accuracy"] == pytest.approx(0.9)  # 9 of 10 exact
    assert result["metrics"]["num"] == 10 and result["metrics"]["errors"] == 0
    assert [r["id"] for r in result["examples"]] == [str(i) for i in range(1, 11)]
    assert not (tmp_path / "res.json.partial.jsonl").exists()


def test_bad_image_is_an_error_row(vqa_jsonl: Path, tmp_path: Path):
    examples = datasets.load("vqa", vqa_jsonl)
    examples[2].image = tmp_path / "missing.png"
    fake = FakeModel(answers_for(10))
    result = runner.run(fake, "vqa", examples, tmp_path / "r.json", {}, batch_size=4,
                        progress=False)
    assert "missing.png" in result["examples"][2]["error"]
    assert result["metrics"] == {"accuracy": 1.0, "num": 9, "errors": 1, "anls": 1.0}
    assert len(fake.seen) == 9


def test_interrupted_run_resumes_without_repeats_or_losses(vqa_jsonl: Path, tmp_path: Path):
    examples = datasets.load("vqa", vqa_jsonl)
    out = tmp_path / "res.json"
    first = FakeModel(answers_for(10), stop_after=6)  # batches of 3: two done, then killed
    with pytest.raises(KeyboardInterrupt):
        runner.run(first, "vqa", examples, out, {"data": "x"}, batch_size=3, progress=False)
    assert not out.exists()
    partial = tmp_path / "res.json.partial.jsonl"
    with open(partial, "a") as f:
        f.write('{"id": "7", "pred')  # a torn line, as a kill in mid-write leaves
    second = FakeModel(answers_for(10))
    result = runner.run(second, "vqa", examples, out, {"data": "x"}, batch_size=3,
                        progress=False)
    assert first.seen == [f"answer en q{i}" for i in range(6)]
    assert second.seen == [f"answer en q{i}" for i in range(6, 10)]
    assert [r["id"] for r in result["examples"]] == [e.id for e in examples]
    assert result["metrics"]["num"] == 10 and not partial.exists()
    # Run again on the finished file: nothing left to generate, same result.
    third = FakeModel(answers_for(10))
    assert runner.run(third, "vqa", examples, out, {"data": "x"}, progress=False) == result
    assert third.seen == []


def test_foreign_output_is_never_overwritten(vqa_jsonl: Path, tmp_path: Path):
    examples = datasets.load("vqa", vqa_jsonl)
    out = tmp_path / "res.json"
    out.write_text('{"mine": 1}')
    with pytest.raises(ValueError, match="exists and is not the result of this evaluation"):
        runner.run(FakeModel(answers_for(10)), "vqa", examples, out, {}, progress=False)
    assert out.read_text() == '{"mine": 1}'
    out.unlink()
    runner.run(FakeModel(answers_for(10)), "vqa", examples, out, {"data": "a"}, progress=False)
    with pytest.raises(ValueError, match="not the result of this evaluation"):
        runner.run(FakeModel(answers_for(10)), "vqa", examples, out, {"data": "b"},
                   progress=False)


def test_segmentation_as_big_vision(tmp_path: Path):
    """Output tokens -> box / 1023, mask = VAE logits resized into the box truncated to pixels,
    > 0; IoU with the true full-size mask recomputed here with numpy; invalid outputs score 0."""
    tok = Tokenizer(loc_seg_tokenizer())
    vae = load_mask_decoder(SEG_VAE)
    locs, codes = [100, 200, 700, 900], [5, 17, 0, 127, 3, 3, 64, 90, 1, 2, 8, 44, 100, 7, 9, 11]
    tokens = [tok.loc_ids[v] for v in locs] + [tok.seg_ids[c] for c in codes]
    h, w = 60, 80
    truth = np.zeros((h, w), bool)
    truth[10:40, 20:70] = True
    example = EvalExample("0", "unused.png", "cat", box=(0.1, 0.2, 0.7, 0.9),
                          mask=lambda: truth)
    pg = SimpleNamespace(tokenizer=tok, vae=vae)
    row = runner.score("segment", example, "", tokens, pg)
    y0, x0, y1, x1 = int(100 / 1023 * h), int(200 / 1023 * w), int(700 / 1023 * h), \
        int(900 / 1023 * w)
    with torch.no_grad():
        logits = vae(torch.tensor([codes]))[0].numpy()
    inside = np.asarray(PIL.Image.fromarray(logits).resize((x1 - x0, y1 - y0),
                                                           PIL.Image.BILINEAR)) > 0
    predicted = np.zeros((h, w), bool)
    predicted[y0:y1, x0:x1] = inside
    expected = (predicted & truth).sum() / (predicted | truth).sum()
    assert row["valid"] and row["iou"] == pytest.approx(expected, abs=1e-12)
    # box IoU: (0.0978, 0.1955, 0.6843, 0.8798) vs (0.1, 0.2, 0.7, 0.9), by hand below.
    b = [v / 1023 for v in locs]
    inter = (min(b[2], 0.7) - max(b[0], 0.1)) * (min(b[3], 0.9) - max(b[1], 0.2))
    union = (b[2] - b[0]) * (b[3] - b[1]) + 0.6 * 0.7 - inter
    assert row["box_iou"] == pytest.approx(inter / union)
    # Inverted box, or too few tokens: invalid, IoU 0.
    flipped = [tok.loc_ids[v] for v in (700, 200, 100, 900)] + tokens[4:]
    assert runner.score("segment", example, "", flipped, pg)["valid"] is False
    assert runner.score("segment", example, "", tokens[:19], pg)["iou"] == 0.0
    metrics = runner.aggregate("segment", [
        {"id": "0", **row}, {"id": "1", **runner.score("segment", example, "", flipped, pg)}],
        [example])
    assert metrics["miou"] == pytest.approx(expected / 2) and metrics["invalid"] == 1


# -- CLI and the demo model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory) -> Path:
    from paligemma.formats import open_checkpoint, write_ours

    demo = REPO / "paligemma" / "demo" / "model"
    out = tmp_path_factory.mktemp("demo") / "model"
    write_ours(open_checkpoint(demo / "paligemma-demo.npz", config_file=demo / "config.json"),
               out, quiet=True)
    (out / "tokenizer.model").write_bytes((demo / "tokenizer.model").read_bytes())
    return out


def test_cli_eval_on_demo_held_out_scenes(demo_model: Path, tmp_path: Path, capsys):
    """The demo model on 4 held-out scenes through `paligemma eval`: the scores equal exact
    match / IoU worked out here from the same generations."""
    held = scenes.held_out(4)
    records = scenes.eval_records(held)
    (tmp_path / "images").mkdir()
    for i, scene in enumerate(held):
        scene.image.save(tmp_path / "images" / f"{i}.png")
    lines = [json.dumps({"image": f"images/{i}.png", "prefix": p, "suffix": s})
             for i, p, s in records["detect"]]
    (tmp_path / "detect.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "detect.json"
    assert main(["eval", "detect", "--model", str(demo_model), "--data",
                 str(tmp_path / "detect.jsonl"), "-o", str(out), "--quiet",
                 "--max-new-tokens", "24"]) == 0
    printed = capsys.readouterr().out
    assert "accuracy@0.5 (%)" in printed and "miou" in printed
    result = json.loads(out.read_text())
    from paligemma import PaliGemma

    pg = PaliGemma.from_pretrained(demo_model)
    ious = []
    for i, prefix, suffix in records["detect"]:
        text = pg.generate(held[i].image, prefix, max_new_tokens=24).text
        got = [int(v) / 1023 for v in text[: 4 * 9].replace("<loc", " ").replace(">", "").split()]
        true = [int(v) / 1023 for v in suffix[: 4 * 9].replace("<loc", " ").replace(">", "")
                .split()]
        inter = (max(0, min(got[2], true[2]) - max(got[0], true[0]))
                 * max(0, min(got[3], true[3]) - max(got[1], true[1])))
        union = ((got[2] - got[0]) * (got[3] - got[1]) + (true[2] - true[0]) * (true[3] - true[1])
                 - inter)
        ious.append(inter / union)
    assert result["metrics"]["miou"] == pytest.approx(np.mean(ious), abs=1e-6)
    assert result["metrics"]["accuracy@0.5"] == pytest.approx(np.mean(np.array(ious) >= 0.5))


def test_cli_interrupt_then_resume(vqa_jsonl: Path, tmp_path: Path, monkeypatch, capsys):
    """Ctrl-C in `paligemma eval`: exit 130 and a one-line hint; the same command continues."""
    from paligemma.api import PaliGemma

    fakes = iter([FakeModel(answers_for(10), stop_after=4), FakeModel(answers_for(10))])
    used = []
    monkeypatch.setattr(PaliGemma, "from_pretrained",
                        classmethod(lambda cls, *a, **k: used.append(next(fakes)) or used[-1]))
    argv = ["eval", "vqa", "--model", "m", "--data", str(vqa_jsonl), "-o",
            str(tmp_path / "r.json"), "--batch-size", "2", "--quiet"]
    assert main(argv) == 130
    assert "run the same command again to continue" in capsys.readouterr().err
    assert main(argv) == 0
    assert used[0].seen + used[1].seen == [f"answer en q{i}" for i in range(10)]
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["num"] == 10


def test_cli_eval_errors_are_one_line(tmp_path: Path, capsys):
    assert main(["eval", "vqa", "--model", str(tmp_path), "--data",
                 str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: no such data file" in capsys.readouterr().err


def test_finetune_evaluator_reports_task_metrics(demo_model: Path):
    """`paligemma finetune --eval`'s callback: records grouped by prompt, scored."""
    from paligemma import PaliGemma
    from paligemma.eval.runner import finetune_evaluator
    from paligemma.finetune import Example

    pg = PaliGemma.from_pretrained(demo_model)
    scene = scenes.draw_scene(random.Random(scenes.HELD_OUT_SEED), scenes.RENDER_SIZE)
    records = [Example(scene.image, p, s) for p, s in scenes.examples(scene)]
    metrics = finetune_evaluator(pg.tokenizer, records, max_new_tokens=24)(pg.model)
    assert set(metrics) == {"eval_caption_cider", "eval_caption_bleu4", "eval_caption_exact_match",
                            "eval_vqa_accuracy", "eval_vqa_anls", "eval_detect_accuracy@0.5",
                            "eval_detect_miou"}
    caption = pg.caption(scene.image, max_new_tokens=24).text
    assert metrics["eval_caption_exact_match"] == float(caption == scene.caption())
