"""Task metrics, as PaliGemma's official evaluators (big_vision, `evaluators/proj/paligemma/`)
and the toolkits they call define them. Pure functions of strings, boxes and masks; no model.

- Captioning: CIDEr-D and BLEU-4 as the COCO caption toolkit (`pycocoevalcap`) computes them,
  on text tokenized as its PTBTokenizer does (`ptb_tokenize`).
- VQAv2 accuracy: answers normalized (punctuation, number words, articles, contractions), then
  min(#matching humans / 3, 1) averaged over the leave-one-out subsets of the 10 human answers.
- Simple VQA accuracy and ANLS (DocVQA, ST-VQA, ...), as big_vision's `transfers/vqa.py`.
- Counting (TallyQA): exact match after number words -> numerals.
- Boxes: IoU in normalized [0, 1] coordinates; masks: IoU in original-image pixels.

Every definition here was written from the evaluators' behaviour and checked against them
(pycocoevalcap itself for CIDEr-D / BLEU, hand computations from the definitions otherwise):
see tests/test_eval_metrics.py and docs/eval.md.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------
# Captioning: tokenization

# Tokens pycocoevalcap drops after the PTB tokenizer (its PUNCTUATIONS list).
_DROPPED = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!",
                      ",", ":", "-", "--", "...", ";"])
# Brackets come out of the PTB tokenizer as -LRB- ...; -lowerCase then lowercases them, so the
# toolkit's filter (which lists "-LRB-") keeps them: "-lrb-" is a word of the tokenized text.
_PTB_FORMS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-",
              '"': "''"}
# Words the PTB lexer keeps with their final period (the common ones in captions).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr etc vs inc ltd co corp mt ft prof gen sgt capt lt col ave rd blvd "
    "jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri".split())
_CONTRACTION = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_SPECIAL_SPLITS = {"can't": ["ca", "n't"], "won't": ["wo", "n't"], "cannot": ["can", "not"],
                   "gonna": ["gon", "na"], "wanna": ["wan", "na"], "gotta": ["got", "ta"]}
_ELISION = re.compile(r"'(?:em|\d0s)\W*$")  # "'em", "'90s": the apostrophe stays
_TRAILING = (",", ";", ":", "%", '"', "'", "`", ")", "]", "}", "-")
_LEADING = ('"', "'", "`", "(", "[", "{", "$")


def ptb_tokenize(text: str, next_text: str = "") -> str:
    """Caption -> the words pycocoevalcap scores: Stanford PTBTokenizer 3.4.1 with
    `-preserveLines -lowerCase` (what `pycocoevalcap.tokenizer.PTBTokenizer` runs in Java),
    then the toolkit's removal of punctuation tokens.

    A re-implementation of the lexer's rules that matter for captions (contractions split as
    "do n't", "ca n't", "it 's"; punctuation and brackets split off; hyphenated words, decimal
    numbers, "u.s." / "p.m." / common abbreviations kept whole; characters outside the Basic
    Multilingual Plane such as emoji dropped, as the lexer does), so that captioning metrics need
    no Java. tests/test_eval_metrics.py compares it with the Java tokenizer token for token.

    next_text: the caption on the next line of the toolkit's input file (`ptb_tokenize_all`):
    the lexer looks ahead across lines to decide whether a caption's final single-letter
    abbreviation ("plan b.") ends a sentence.
    """
    text = "".join(c for c in text.replace("\n", " ") if ord(c) <= 0xFFFF)
    text = text.replace("&amp;", "&")
    # Separators that split wherever they are: brackets, quotes, ";", runs of "!" and "?",
    # "--", "...", commas that are not digit grouping, "#" before a number.
    text = re.sub(r'([()\[\]{}";]|[!?]+|--|\.\.\.)', r" \1 ", text)
    text = re.sub(r"(?<!\d),|,(?!\d)", " , ", text)
    text = re.sub(r"#(?=\d)", " # ", text)
    chunks = text.lower().split()
    # A final "b." before a capitalized next caption is a sentence end: its period splits.
    sentence_end = next_text.lstrip()[:1].isupper()
    words: list[str] = []
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        words += _split_word(chunk, single_letter=not (sentence_end and last),
                             before_number=not last and chunks[i + 1][:1].isdigit())
    return " ".join(w for w in (_PTB_FORMS.get(w, w) for w in words) if w not in _DROPPED)


def ptb_tokenize_all(texts: Sequence[str]) -> list[str]:
    """`ptb_tokenize` of captions written one per line in this order, as pycocoevalcap writes
    them for the lexer (each caption sees the next one)."""
    return [ptb_tokenize(t, texts[i + 1] if i + 1 < len(texts) else "")
            for i, t in enumerate(texts)]


def _split_word(word: str, single_letter: bool = True, before_number: bool = False
                ) -> list[str]:
    """One whitespace-free chunk -> tokens: leading and trailing punctuation peeled off, then a
    final period and a contraction split. single_letter: whether "b." keeps its period;
    before_number: whether the next chunk is a number ("no. 5" keeps it)."""
    head: list[str] = []
    while len(word) > 1 and word[0] in _LEADING and not _ELISION.match(word):
        head.append(word[0])
        word = word[1:]
    tail: list[str] = []
    while len(word) > 1:
        if word.endswith("..."):
            tail.insert(0, "...")
            word = word[:-3]
        elif word[-1] in _TRAILING:
            tail.insert(0, word[-1])
            word = word[:-1]
        elif word[-1] == "." and not (_keeps_period(word, single_letter)
                                      or before_number and word == "no."):
            tail.insert(0, ".")
            word = word[:-1]
        else:
            break
    core: list[str] = []
    while (m := _CONTRACTION.match(word)) and m.group(1) not in ("'", "o"):  # "i'd've"
        core.insert(0, m.group(2))
        word = m.group(1)
    core = _SPECIAL_SPLITS.get(word, [word]) + core
    return head + [w for w in core if w] + tail


def _keeps_period(word: str, single_letter: bool) -> bool:
    """'u.s.', 'p.m.', 'etc.', 'mr.' (and 'b.' if single_letter) keep their period; 'horse.'
    and '5.' do not."""
    stem = word[:-1]
    letters = r"(?:[a-z]\.)*[a-z]" if single_letter else r"(?:[a-z]\.)+[a-z]"
    return stem in _ABBREVIATIONS or re.fullmatch(letters, stem) is not None


# ---------------------------------------------------------------------------------------------
# Captioning: BLEU and CIDEr-D over tokenized text (words separated by single spaces)


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def bleu(references: Sequence[Sequence[str]], candidates: Sequence[str], max_n: int = 4
         ) -> list[float]:
    """Corpus BLEU-1..max_n of tokenized candidates (one per image) against their references, as
    pycocoevalcap's `Bleu`: clipped n-gram matches and candidate n-grams summed over the corpus,
    the brevity penalty from the summed candidate length and, per image, the reference length
    closest to the candidate's (the shorter on a tie). -> [BLEU-1, ..., BLEU-max_n].

    The toolkit adds 1e-15 to each match count and 1e-9 to each n-gram count (so a corpus with no
    4-gram match scores ~1e-6, not 0): done here too, so that the numbers agree to float
    precision."""
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} reference sets but {len(candidates)} candidates")
    matches, totals = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for refs, cand in zip(references, candidates, strict=True):
        words = cand.split()
        ref_words = [r.split() for r in refs]
        cand_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for n in range(1, max_n + 1):
            counts = _ngrams(words, n)
            best = Counter()  # per n-gram, the most any one reference has
            for r in ref_words:
                best |= _ngrams(r, n)
            matches[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            totals[n - 1] += max(0, len(words) - n + 1)
    tiny, small = 1e-15, 1e-9
    ratio = (cand_len + tiny) / (ref_len + small)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    scores, log_sum = [], 0.0
    for n in range(max_n):
        log_sum += math.log((matches[n] + tiny) / (totals[n] + small))
        scores.append(math.exp(log_sum / (n + 1)) * penalty)
    return scores


def cider_d(references: Sequence[Sequence[str]], candidates: Sequence[str], max_n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D of tokenized candidates (one per image) against their references, as
    pycocoevalcap's `Cider` (which is CIDEr-D). -> (corpus score, per-image scores).

    For n = 1..4, each sentence is a vector of n-gram counts weighted by log(#images / df), df
    the number of images whose references contain the n-gram (the idf comes from the evaluated
    references themselves, so the score depends on the whole set). Per reference: the cosine
    similarity of the candidate's and the reference's vectors with the candidate's weights
    clipped to the reference's, times exp(-delta^2 / (2 sigma^2)) where delta is the difference
    in length (counted as the number of bigrams, as the toolkit does); averaged over n and over
    the references, times 10. The corpus score is the mean over images.
    """
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} reference sets but {len(candidates)} candidates")
    if not candidates:
        raise ValueError("no captions to score")

    def counts(sentence: str) -> list[Counter]:
        words = sentence.split()
        return [_ngrams(words, n) for n in range(1, max_n + 1)]

    ref_counts = [[counts(r) for r in refs] for refs in references]
    df: Counter = Counter()
    for refs in ref_counts:
        df.update({g for ref in refs for per_n in ref for g in per_n})
    log_images = math.log(len(candidates))

    def vectorize(per_n: list[Counter]) -> tuple[list[dict], list[float], int]:
        vecs = [{g: c * (log_images - math.log(max(1.0, df[g]))) for g, c in grams.items()}
                for grams in per_n]
        norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vecs]
        length = sum(per_n[1].values()) if max_n > 1 else 0  # bigrams: the toolkit's "length"
        return vecs, norms, length

    per_image = []
    for cand, refs in zip(candidates, ref_counts, strict=True):
        c_vecs, c_norms, c_len = vectorize(counts(cand))
        total = 0.0
        for ref in refs:
            r_vecs, r_norms, r_len = vectorize(ref)
            penalty = math.exp(-((c_len - r_len) ** 2) / (2 * sigma**2))
            for cv, rv, cn, rn in zip(c_vecs, r_vecs, c_norms, r_norms, strict=True):
                dot = sum(min(w, rv.get(g, 0.0)) * rv.get(g, 0.0) for g, w in cv.items())
                if cn and rn:
                    dot /= cn * rn
                total += dot * penalty / max_n
        per_image.append(10.0 * total / len(refs))
    return float(np.mean(per_image)), per_image


def caption_scores(references: Sequence[Sequence[str]], predictions: Sequence[str]
                   ) -> dict[str, float]:
    """Raw captions -> {"cider": CIDEr-D, "bleu4": BLEU-4} after `ptb_tokenize`, as big_vision's
    COCO caption evaluator (pycocoevalcap scale: the PaliGemma README's "CIDEr 141.92" is 1.4192
    here)."""
    # Tokenized in the toolkit's order: all references image by image, then the predictions.
    flat = ptb_tokenize_all([r for rs in references for r in rs])
    refs, start = [], 0
    for rs in references:
        refs.append(flat[start : start + len(rs)])
        start += len(rs)
    cands = ptb_tokenize_all(predictions)
    return {"cider": cider_d(refs, cands)[0], "bleu4": bleu(refs, cands)[3]}


# ---------------------------------------------------------------------------------------------
# VQA: the VQAv2 answer normalization and accuracy

# The official VQA evaluation's tables (https://visualqa.org/evaluation.html): punctuation,
# articles, number words, and contractions written without their apostrophe.
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
              "@", "`", ",", "?", "!"]
_VQA_ARTICLES = frozenset(["a", "an", "the"])
_VQA_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
# Contractions with one apostrophe, looked up without it ("dont" -> "don't"). The official table
# has no "lets" or "shes" key, and its "Im", "Ive", "Id've" keys are capitalized, so they never
# match the lowercased words: those stay as they are.
_VQA_CONTRACTIONS = {
    w.replace("'", ""): w for w in (
        "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd "
        "he's how'd how'll how's isn't it'd it'll ma'am mightn't might've mustn't must've "
        "needn't not've o'clock oughtn't shan't should've shouldn't somebody'll somebody's "
        "someone'd someone'll someone's something'd something'll that's there'd there're "
        "there's they'd they'll they're they've 'twas wasn't we've weren't what'll what're "
        "what's what've when's where'd where's where've who'd who'll who's who've why'll why're "
        "why's won't would've wouldn't y'all you'd you'll you're you've").split()
}
# Half-written forms the official table also maps ("couldnt've" -> "couldn't've", ...).
_VQA_CONTRACTIONS.update({
    "couldnt've": "couldn't've", "couldn'tve": "couldn't've", "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've", "hed've": "he'd've", "he'dve": "he'd've", "itd've": "it'd've",
    "it'dve": "it'd've", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "shed've": "she'd've", "she'dve": "she'd've",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "thered've": "there'd've", "there'dve": "there'd've", "theyd've": "they'd've",
    "they'dve": "they'd've", "wed've": "we'd've", "we'dve": "we'd've", "whod've": "who'd've",
    "who'dve": "who'd've", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd've": "you'd've",
    "you'dve": "you'd've", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "somebody'd": "somebodyd",  # sic: the official table maps this one backwards
})
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
# The official pattern: meant as "a period not after a digit", written with a lookahead
# "(?!<=\d)" that is always true, so it removes every period not followed by a digit.
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def vqa_punctuation(text: str) -> str:
    """The official `processPunctuation`: each punctuation mark is deleted if it touches a space
    (or the answer has a digit-comma-digit), else replaced by a space; then periods not followed
    by a digit are deleted."""
    glue = _DIGIT_COMMA.search(text) is not None
    out = text
    for p in _VQA_PUNCT:
        out = out.replace(p, "" if glue or f"{p} " in text or f" {p}" in text else " ")
    return _PERIOD.sub("", out)


def vqa_digits_articles(text: str) -> str:
    """The official `processDigitArticle`: lowercase, number words -> digits, articles dropped,
    apostrophe-less contractions restored ("dont" -> "don't")."""
    words = [_VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


def vqa_normalize(text: str) -> str:
    """Whitespace, punctuation, then number words, articles and contractions."""
    return vqa_digits_articles(vqa_punctuation(_strip_space(text)))


def _strip_space(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqav2_accuracy(prediction: str, answers: Sequence[str], style: str = "big_vision") -> float:
    """VQAv2 accuracy of one answer against the human answers (10 in VQAv2): for each answer
    left out, min(#other answers equal to the prediction / 3, 1); the mean of those.

    Normalization, `style`:
    - "big_vision" (PaliGemma's evaluator, `transfers/vqav2.py`): whitespace only when the
      humans all agree; otherwise `vqa_normalize` on the prediction and on every answer.
    - "vqa" (the VQA team's `vqaEval.py`, as the evaluation server): `vqa_normalize` on the
      prediction always; only `vqa_punctuation` on the answers, and only when they disagree.
    """
    if not answers:
        raise ValueError("VQAv2 accuracy needs at least one human answer")
    pred = _strip_space(prediction)
    gts = [_strip_space(a) for a in answers]
    disagree = len(set(gts)) > 1
    if style == "big_vision":
        if disagree:
            pred, gts = vqa_normalize(pred), [vqa_normalize(a) for a in gts]
    elif style == "vqa":
        pred = vqa_normalize(pred)
        if disagree:
            gts = [vqa_punctuation(a) for a in gts]
    else:
        raise ValueError(f"unknown VQAv2 style {style!r}: 'big_vision' or 'vqa'")
    matches = [a == pred for a in gts]
    total = sum(matches)
    return float(np.mean([min(1.0, (total - m) / 3) for m in matches]))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """big_vision's simple VQA accuracy (`transfers/vqa.py`: OK-VQA, A-OKVQA, OCR-VQA, ...): one
    answer: exact match; several: min(#equal answers / 3, 1), no leave-one-out, no
    normalization (the caller lowercases both sides where the task's config says so)."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one answer")
    if len(answers) == 1:
        return float(prediction == answers[0])
    return min(1.0, sum(a == prediction for a in answers) / 3.0)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of characters), O(len(a) len(b));
    answers are short, so a dependency is not worth it."""
    if len(a) < len(b):
        a, b = b, a
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(prediction: str, answers: Sequence[str], theta: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction (DocVQA, ST-VQA), as
    big_vision's `anls_metric`: the best over the answers of 1 - NL if NL < theta else 0, NL =
    edit distance / max(len(answer), len(prediction)); an empty answer scores 1 only against an
    empty prediction. No normalization here: DocVQA's config lowercases both sides first."""
    if not answers:
        raise ValueError("ANLS needs at least one answer")

    def one(target: str) -> float:
        if not target:
            return float(prediction == "")
        nl = levenshtein(target, prediction) / max(len(target), len(prediction))
        return 1.0 - nl if nl < theta else 0.0

    return max(one(a) for a in answers)


# Counting (TallyQA): big_vision's `_number_word_to_numeral`, up to twenty.
_COUNT_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())} | {"none": "0"}


def count_accuracy(prediction: str, answer: str) -> float:
    """TallyQA: 1 if the prediction equals the answer after a whole answer that is a number word
    ("Two", "none") becomes its numeral, else 0 (no other normalization, as big_vision)."""

    def numeral(s: str) -> str:
        return _COUNT_WORDS.get(s.lower(), s)

    return float(numeral(prediction) == numeral(answer))


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1 if the prediction, stripped of surrounding whitespace, equals one of the answers."""
    return float(prediction.strip() in {a.strip() for a in answers})


# ---------------------------------------------------------------------------------------------
# Boxes and masks


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes (y_min, x_min, y_max, x_max), or two (x_min, y_min, x_max, y_max), in any
    one unit; 0 when the union is empty. Inverted boxes have area 0, as in big_vision's
    evaluator."""

    def area(y0: float, x0: float, y1: float, x1: float) -> float:
        return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return inter / union if union > 0 else 0.0


def mask_iou(prediction: np.ndarray, truth: np.ndarray) -> float:
    """IoU of two boolean masks of the same shape [H, W]; 0 when both are empty."""
    if prediction.shape != truth.shape:
        raise ValueError(f"mask shapes differ: {prediction.shape} vs {truth.shape}")
    union = np.logical_or(prediction, truth).sum()
    return float(np.logical_and(prediction, truth).sum() / union) if union else 0.0
