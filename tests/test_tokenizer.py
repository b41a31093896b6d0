"""Tokenizer and prompt building with small SentencePiece models trained here.

Shared helpers (`loc_seg_tokenizer`, `gold_tokenizer`) are imported by the other inference tests.
"""

import functools
import io
import tempfile
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from paligemma.tokenizer import LOC_PIECES, SEG_PIECES, Tokenizer

CORPUS = [
    "a cat sitting on a sofa", "two dogs in the park", "caption en", "answer en what is this",
    "detect cat ; dog", "segment the cat", "a red car and a person", "describe en",
]
# Like Gemma: pad 0, eos 1, bos 2, unk 3, "\n" at id 108 and "\n\n" at 109.
GEMMA_LIKE = [f"<unused{i}>" for i in range(104)] + ["\n", "\n\n"]


def _train(path: Path, corpus: list[str], user_symbols: list[str], vocab_size: int) -> Path:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 10), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        user_defined_symbols=user_symbols, add_dummy_prefix=False,
        remove_extra_whitespaces=False, hard_vocab_limit=False, minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return path


@functools.cache
def loc_seg_tokenizer() -> Path:
    """A small tokenizer with all <locNNNN> / <segNNN> pieces (at non-official ids)."""
    path = Path(tempfile.mkdtemp()) / "tokenizer.model"
    return _train(path, CORPUS, GEMMA_LIKE + LOC_PIECES + SEG_PIECES, 1400)


@functools.cache
def gold_tokenizer() -> Path:
    """512 ids, as the gold checkpoints: id i >= 110 is the piece '<wNNN>', so any gold id
    sequence is the encoding of the text of its pieces."""
    path = Path(tempfile.mkdtemp()) / "tokenizer.model"
    user = GEMMA_LIKE + [f"<w{i:03d}>" for i in range(110, 506)]
    _train(path, ["ab ba ab"], user, 512)
    assert Tokenizer(path).vocab_size == 512
    return path


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(loc_seg_tokenizer())


def test_special_ids_match_gemma_layout(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.encode("\n") == [108]


def test_loc_and_seg_ids_come_from_the_tokenizer_pieces(tok):
    assert len(tok.loc_ids) == 1024 and len(tok.seg_ids) == 128
    assert tok.sp.id_to_piece(tok.loc_ids[517]) == "<loc0517>"
    assert tok.sp.id_to_piece(tok.seg_ids[127]) == "<seg127>"
    assert tok.encode("<loc0001><seg002>") == [tok.loc_ids[1], tok.seg_ids[2]]


def test_tokenizer_without_loc_pieces_has_none():
    tok = Tokenizer(gold_tokenizer())
    assert tok.loc_ids is None and tok.seg_ids is None


def test_prompt_is_bos_prefix_separator_then_causal_suffix(tok):
    tokens, mask_ar = tok.prompt("caption en", "a cat")
    prefix, suffix = tok.encode("caption en"), tok.encode("a cat")
    assert tokens == [2, *prefix, 108, *suffix]
    assert mask_ar == [0] * (len(prefix) + 2) + [1] * len(suffix)


def test_separator_is_tokenized_on_its_own(tok):
    # A prefix ending in "\n": together, "\n\n" would be one piece (109), as in Gemma.
    assert tok.encode("ocr\n\n")[-1] == 109
    tokens, _ = tok.prompt("ocr\n")
    assert tokens[-2:] == [108, 108]


def test_batch_is_left_aligned_and_padded(tok):
    tokens, mask_ar, input_mask = tok.batch(["caption en", "ocr"], ["a", ""])
    long, _ = tok.prompt("caption en", "a")
    short, _ = tok.prompt("ocr")
    assert tokens.shape == (2, len(long))
    assert tokens[0].tolist() == long
    assert tokens[1, : len(short)].tolist() == short
    assert not tokens[1, len(short):].any()  # pad id 0
    assert input_mask.sum(1).tolist() == [len(long), len(short)]
    assert torch.all(mask_ar[1, len(short):] == 1)


def test_decode_stops_at_eos(tok):
    ids = tok.encode("a cat")
    assert tok.decode([*ids, tok.eos_id, *tok.encode("dog")]) == "a cat"


def test_missing_and_invalid_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such tokenizer"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_text("not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(bad)
