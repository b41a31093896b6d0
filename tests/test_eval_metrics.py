"""Task metrics against the references: pycocoevalcap (CIDEr-D, BLEU, and its Java PTB
tokenizer), hand computations from the official definitions (VQAv2, ANLS, TallyQA), numpy
(mask IoU)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from paligemma.eval import metrics as M

DATA = Path(__file__).parent / "data" / "eval"
needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="pycocoevalcap's PTBTokenizer runs Java (.ci/run installs "
                                "a JRE)")

# Captions that exercise the PTB lexer's rules (contractions, brackets, abbreviations, numbers,
# quotes, repeated punctuation, emoji).
TRICKY = [
    "The cat's toy isn't here; it's \"gone\".", "Two dogs (brown and white) play!",
    "Mr. Smith at 5 p.m. with his dog...", "People at the U.S. embassy -- waiting.",
    "A sign that says 1/2 off & more * stars [here] {there}.", "A  plate   of food: rice, etc.",
    "It costs $5.00 or 10% less.", "Kids' toys and the boys' room.", "'quoted' and `ticks`",
    "An emoji \U0001F600 and caf\u00e9 na\u00efve.", "I'm you're we've they'll she'd",
    "A man can't won't don't shouldn't cannot gonna wanna.", "1,000 people at 5:30 pm",
    "yes!! what?!", "fish &amp; chips", "team #1 vs #tag", "I'd've done it", "Plan B.",
    "A black-and-white photo of a 1950's car, 3.5 m long.", "good-bye. A cat's- toy",
    "A clock at 10 o'clock.", "A man--in a hat", "Two people ... standing",
    # A final single letter keeps its period unless the next line starts with a capital.
    "a sign near the p.", "the p. sign", "A sign near the p.", "The x. Y", "plan b.",
    "Mr. and Dr. Smith on St. Patrick's day, Jan. 5", "A cat in the sun.", "A No. 5 bus",
    "the '90s and 'em", "the U.S.A. flag at 7 a.m.", "The dogs' bowls.", "Ain't it",
]


@pytest.fixture(scope="module")
def captions() -> tuple[list[list[str]], list[str]]:
    """The fixture set: 20 images, 5 references each (written for these tests, COCO style)."""
    coco = json.loads((DATA / "captions_fixture.json").read_text())
    preds = {p["image_id"]: p["caption"]
             for p in json.loads((DATA / "captions_fixture_preds.json").read_text())}
    refs = {}
    for a in coco["annotations"]:
        refs.setdefault(a["image_id"], []).append(a["caption"])
    ids = sorted(preds)
    return [refs[i] for i in ids], [preds[i] for i in ids]


@pytest.fixture(scope="module")
def java_tokenized(captions) -> tuple[list[list[str]], list[str], dict[int, list[str]]]:
    """The fixture (and TRICKY) through pycocoevalcap's own PTBTokenizer (Java)."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs, preds = captions
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in r] for i, r in enumerate(refs)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    tricky = tok.tokenize({i: [{"caption": c}] for i, c in enumerate(TRICKY)})
    return [gts[i] for i in range(len(refs))], [res[i][0] for i in range(len(preds))], tricky


# -- captioning ---------------------------------------------------------------------------------


@needs_java
def test_ptb_tokenize_equals_the_java_tokenizer(captions, java_tokenized):
    refs, preds = captions
    java_refs, java_preds, java_tricky = java_tokenized
    # Each set goes to the lexer as one file, a caption per line, in this order.
    flat = M.ptb_tokenize_all([c for r in refs for c in r])
    assert flat == [c for r in java_refs for c in r]
    assert M.ptb_tokenize_all(preds) == java_preds
    assert M.ptb_tokenize_all(TRICKY) == [java_tricky[i][0] for i in range(len(TRICKY))]


def test_cider_d_and_bleu_equal_pycocoevalcap_on_the_same_tokens(captions):
    """The scorers alone (no Java): same tokenized input -> same numbers."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    refs, preds = captions
    refs = [M.ptb_tokenize_all(r) for r in refs]
    preds = M.ptb_tokenize_all(preds)
    gts = dict(enumerate(refs))
    res = {i: [p] for i, p in enumerate(preds)}
    ref_cider, ref_per_image = Cider().compute_score(gts, res)
    ref_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, per_image = M.cider_d(refs, preds)
    np.testing.assert_allclose(cider, ref_cider, rtol=1e-12, atol=0)
    np.testing.assert_allclose(per_image, ref_per_image, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(M.bleu(refs, preds), ref_bleu, rtol=1e-12, atol=0)
    # Also where predictions share little with references (BLEU-4 near 0, the toolkit's 1e-15
    # smoothing): the reversed pairing.
    res = {i: [p] for i, p in enumerate(reversed(preds))}
    np.testing.assert_allclose(M.bleu(refs, preds[::-1]),
                               Bleu(4).compute_score(gts, res, verbose=0)[0], rtol=1e-9)
    np.testing.assert_allclose(M.cider_d(refs, preds[::-1])[0], Cider().compute_score(gts, res)[0],
                               rtol=1e-12)


@needs_java
def test_caption_scores_equal_the_toolkit_end_to_end(captions):
    """Raw captions: ours (Python tokenizer) vs big_vision's recipe (Java PTBTokenizer, then
    Cider and Bleu(4))."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs, preds = captions
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in r] for i, r in enumerate(refs)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(preds)})
    ours = M.caption_scores(refs, preds)
    np.testing.assert_allclose(ours["cider"], Cider().compute_score(gts, res)[0], rtol=1e-12)
    np.testing.assert_allclose(ours["bleu4"], Bleu(4).compute_score(gts, res, verbose=0)[0][3],
                               rtol=1e-12)


def test_caption_scores_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="2 reference sets but 1 candidates"):
        M.cider_d([["a b"], ["c d"]], ["a b"])


# -- VQA ------------------------------------------------------------------------------------------


def test_vqa_normalize_follows_the_official_rules():
    # Punctuation touching a space is deleted ("cat, dog" -> "cat dog"); elsewhere it becomes a
    # space ("black-white" -> "black white"); a digit-comma-digit deletes every mark
    # ("1,000" -> "1000"); a period not before a digit goes ("yes." -> "yes", "3.5" stays).
    assert M.vqa_normalize("the cat, a dog") == "cat dog"
    assert M.vqa_normalize("black-white") == "black white"
    assert M.vqa_normalize("1,000") == "1000"
    assert M.vqa_normalize("Yes.") == "yes"
    assert M.vqa_normalize("3.5") == "3.5"
    # Number words to digits, articles out, contractions restored.
    assert M.vqa_normalize("Two") == "2"
    assert M.vqa_normalize("none") == "0"
    assert M.vqa_normalize("a dog") == "dog"
    assert M.vqa_normalize("dont know") == "don't know"
    # The official table's capitalized keys ("Im") never match lowercased words.
    assert M.vqa_normalize("im here") == "im here"


def test_vqav2_accuracy_leave_one_out_by_hand():
    # 10 answers, prediction "2" matched by k of them. Leaving out a matching answer leaves
    # k - 1 matches, leaving out another leaves k: acc = (k * min(1, (k-1)/3) + (10 - k) *
    # min(1, k/3)) / 10.
    # k = 1: (1 * 0 + 9 * 1/3) / 10 = 0.3
    assert M.vqav2_accuracy("2", ["2"] + ["3"] * 9) == pytest.approx(0.3)
    # k = 2: (2 * 1/3 + 8 * 2/3) / 10 = 6/10 = 0.6
    assert M.vqav2_accuracy("2", ["2"] * 2 + ["3"] * 8) == pytest.approx(0.6)
    # k = 3: (3 * 2/3 + 7 * 1) / 10 = 0.9
    assert M.vqav2_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    # k = 4: (4 * 1 + 6 * 1) / 10 = 1
    assert M.vqav2_accuracy("2", ["2"] * 4 + ["3"] * 6) == pytest.approx(1.0)
    # k = 0: 0
    assert M.vqav2_accuracy("4", ["2"] * 4 + ["3"] * 6) == 0.0


def test_vqav2_accuracy_normalizes_only_when_humans_disagree():
    # big_vision: answers disagree -> both sides normalized: "Two" -> "2", "2." -> "2"; then
    # 3 of 10 answers equal "2": (3 * 2/3 + 7 * 1) / 10 = 0.9.
    answers = ["2", "2.", "two", "3", "3", "3", "3", "3", "3", "3"]
    assert M.vqav2_accuracy("Two", answers) == pytest.approx(0.9)
    # All ten say "2": no normalization at all, so "two" matches none (big_vision) ...
    assert M.vqav2_accuracy("two", ["2"] * 10) == 0.0
    # ... while the VQA team's vqaEval.py normalizes the prediction always -> "2": 10 matches,
    # every leave-one-out subset has 9 >= 3: 1.0.
    assert M.vqav2_accuracy("two", ["2"] * 10, style="vqa") == 1.0
    # vqaEval.py applies only the punctuation step to disagreeing answers: "two" stays "two",
    # so with the prediction normalized to "2", the matches are "2" and "2." (-> "2"): k = 2,
    # (2 * 1/3 + 8 * 2/3) / 10 = 0.6.
    assert M.vqav2_accuracy("Two", answers, style="vqa") == pytest.approx(0.6)
    # Whitespace is always stripped (tabs and newlines become spaces first).
    assert M.vqav2_accuracy(" yes\n", ["yes"] * 10) == 1.0


def test_vqa_accuracy_simple():
    # One answer: exact match, case-sensitive (big_vision lowercases only where configured).
    assert M.vqa_accuracy("Paris", ["Paris"]) == 1.0
    assert M.vqa_accuracy("paris", ["Paris"]) == 0.0
    # Several: min(#equal / 3, 1), no leave-one-out: 2 of 5 equal -> 2/3; 4 of 5 -> 1.
    assert M.vqa_accuracy("a", ["a", "a", "b", "c", "d"]) == pytest.approx(2 / 3)
    assert M.vqa_accuracy("a", ["a", "a", "a", "a", "d"]) == 1.0


def test_anls_by_hand():
    # "helo" vs "hello": distance 1, max length 5, NL = 0.2 < 0.5 -> 1 - 0.2 = 0.8.
    assert M.anls("helo", ["hello"]) == pytest.approx(0.8)
    # Best over the answers: vs "help": distance 1 ("o" -> "p"), NL = 1/4 -> 0.75; vs "helo"
    # exact -> 1.
    assert M.anls("helo", ["help", "helo"]) == 1.0
    # NL = 0.5 is not < 0.5 -> 0: "ab" vs "cb" distance 1, max length 2.
    assert M.anls("ab", ["cb"]) == 0.0
    # Just under the threshold: "abcd" vs "abxy": distance 2, length 4, NL 0.5 -> 0; "abcde" vs
    # "abxye": distance 2, length 5, NL 0.4 -> 0.6.
    assert M.anls("abcd", ["abxy"]) == 0.0
    assert M.anls("abcde", ["abxye"]) == pytest.approx(0.6)
    # Empty answer: 1 only for an empty prediction.
    assert M.anls("", [""]) == 1.0
    assert M.anls("x", [""]) == 0.0
    # Empty prediction vs non-empty answer: distance = len, NL = 1 -> 0.
    assert M.anls("", ["abc"]) == 0.0
    # Case matters (DocVQA lowercases both sides before, in the task).
    assert M.anls("ABC", ["abc"]) == 0.0


def test_levenshtein_by_hand():
    assert M.levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert M.levenshtein("", "abc") == 3
    assert M.levenshtein("flaw", "lawn") == 2  # -f, +n


def test_count_accuracy_converts_number_words():
    assert M.count_accuracy("Three", "3") == 1.0
    assert M.count_accuracy("none", "0") == 1.0
    assert M.count_accuracy("twenty", "20") == 1.0
    assert M.count_accuracy("3 cats", "3") == 0.0  # no other normalization
    assert M.count_accuracy("4", "3") == 0.0


# -- boxes and masks --------------------------------------------------------------------------


def test_box_iou_by_hand():
    # (y0, x0, y1, x1): [0, 0.5] x [0, 0.5] vs [0.25, 0.75] x [0.25, 0.75]: intersection
    # 0.25^2 = 0.0625, union 2 * 0.25 - 0.0625 = 0.4375 -> 1/7.
    assert M.box_iou((0, 0, 0.5, 0.5), (0.25, 0.25, 0.75, 0.75)) == pytest.approx(1 / 7)
    assert M.box_iou((0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)) == 0.0
    assert M.box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_mask_iou_equals_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.random((37, 53)) > 0.5, rng.random((37, 53)) > 0.3
    expected = np.sum(a & b) / np.sum(a | b)
    assert M.mask_iou(a, b) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="mask shapes differ"):
        M.mask_iou(a, b[:, :5])
