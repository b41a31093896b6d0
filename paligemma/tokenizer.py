"""SentencePiece tokenizer and prompt building, as big_vision's PaliGemma transfer/eval code does.

A prompt is `[bos] + prefix + "\\n"` (the separator tokenized on its own), all with mask_ar 0
(full attention, together with the image tokens), optionally followed by a suffix with mask_ar 1
(causal) that decoding continues from (`transfers/common.py:combine_and_keep_eval`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm
import torch

from .config import PALIGEMMA_VOCAB_SIZE

SEPARATOR = "\n"
NUM_LOC, NUM_SEG = 1024, 128
LOC_PIECES = [f"<loc{i:04d}>" for i in range(NUM_LOC)]
SEG_PIECES = [f"<seg{i:03d}>" for i in range(NUM_SEG)]
# Official ids (big_vision appends the "loc" then "seg" tokensets after Gemma's 256000 pieces).
GEMMA_VOCAB_SIZE = 256_000


class Tokenizer:
    """Wraps a SentencePiece model file, e.g. the official `paligemma_tokenizer.model`.

    `loc_ids` / `seg_ids` are read from the model's own pieces (`<loc0000>`..., `<seg000>`...):
    256000 + i / 257024 + i for the official tokenizer; None when the model lacks them.
    """

    def __init__(self, model_file: str | Path):
        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such tokenizer file")
        self.path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a SentencePiece model ({e})") from None
        self.loc_ids = self._piece_ids(LOC_PIECES)
        self.seg_ids = self._piece_ids(SEG_PIECES)
        if self.vocab_size == PALIGEMMA_VOCAB_SIZE:
            official = (
                list(range(GEMMA_VOCAB_SIZE, GEMMA_VOCAB_SIZE + NUM_LOC)),
                list(range(GEMMA_VOCAB_SIZE + NUM_LOC, PALIGEMMA_VOCAB_SIZE)),
            )
            if (self.loc_ids, self.seg_ids) != official:
                raise ValueError(
                    f"{path}: {PALIGEMMA_VOCAB_SIZE} pieces but <loc>/<seg> are not at their "
                    "official ids 256000.. / 257024..; use the official paligemma_tokenizer.model"
                )

    def _piece_ids(self, pieces: list[str]) -> list[int] | None:
        ids = [self.sp.piece_to_id(p) for p in pieces]
        return None if self.sp.unk_id() in ids else ids

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        # Gemma defines pad = 0; a model without one still needs a filler id (always masked).
        return max(self.sp.pad_id(), 0)

    def encode(self, text: str) -> list[int]:
        """Plain pieces, no bos/eos."""
        return self.sp.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text up to (excluding) the first eos, as big_vision's `to_str(stop_at_eos=True)`."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.sp.decode(ids)

    def prompt(self, prefix: str, suffix: str = "") -> tuple[list[int], list[int]]:
        """(tokens, mask_ar) = ([bos] prefix "\\n" [suffix], [0 ... 0 | 1 ... 1])."""
        tokens = [self.bos_id, *self.encode(prefix), *self.encode(SEPARATOR)]
        mask_ar = [0] * len(tokens)
        if suffix:
            continuation = self.encode(suffix)
            tokens += continuation
            mask_ar += [1] * len(continuation)
        return tokens, mask_ar

    def batch(
        self, prefixes: Sequence[str], suffixes: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-aligned, padded prompts: tokens [B, T] long, mask_ar [B, T] long, input_mask
        [B, T] bool (False on padding, which sits at the end with pad id and mask_ar 1)."""
        suffixes = suffixes if suffixes is not None else [""] * len(prefixes)
        if len(suffixes) != len(prefixes):
            raise ValueError(f"{len(prefixes)} prefixes but {len(suffixes)} suffixes")
        prompts = [self.prompt(p, s) for p, s in zip(prefixes, suffixes, strict=True)]
        length = max(len(t) for t, _ in prompts)
        tokens = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        mask_ar = torch.ones((len(prompts), length), dtype=torch.long)
        input_mask = torch.zeros((len(prompts), length), dtype=torch.bool)
        for row, (t, ar) in enumerate(prompts):
            tokens[row, : len(t)] = torch.tensor(t)
            mask_ar[row, : len(t)] = torch.tensor(ar)
            input_mask[row, : len(t)] = True
        return tokens, mask_ar, input_mask
