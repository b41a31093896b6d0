"""The files besides the weights that transformers' `AutoProcessor` and serving stacks read.

    tokenizer.model            the model's own SentencePiece file, unchanged
    tokenizer_config.json      GemmaTokenizer; bos / eos / pad / unk named by the model's own
                               pieces (the demo model says `<s>`, Google's `<bos>`), `<image>` an
                               added special token at `image_token_index` (= the vocabulary size)
    special_tokens_map.json    the same special tokens
    preprocessor_config.json   SiglipImageProcessor at the model's resolution, mean = std = 0.5
                               ([0, 255] -> [-1, 1]), `image_seq_length` image tokens
    generation_config.json     bos / eos / pad ids

The processor resizes with `resample` 2 (bilinear; PIL and torchvision antialias it when
downscaling), which is what big_vision and we do. Google's repositories say 3 (bicubic), which
differs from ours by up to 0.21 in [-1, 1] pixel values on the demo's 448 -> 112 px scenes
(bilinear: 0.007); docs/convert.md has what that does to outputs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ..config import PaliGemmaConfig
from ..tokenizer import Tokenizer
from .errors import CheckpointError
from .ours import write_json

IMAGE_TOKEN = "<image>"
TOKENIZER_FILE = "tokenizer.model"
RESAMPLE_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR


def special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """{bos_token: piece, ...} from the model's own pieces (Gemma: <bos>, <eos>, <pad>, <unk>)."""
    sp = tokenizer.sp
    ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id(), "unk": sp.unk_id()}
    return {f"{k}_token": sp.id_to_piece(i) for k, i in ids.items() if i >= 0}


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """{bos_token_id, eos_token_id, pad_token_id} for config.json / generation_config.json."""
    return {
        "pad_token_id": tokenizer.pad_id,
        "eos_token_id": tokenizer.eos_id,
        "bos_token_id": tokenizer.bos_id,
    }


def check_tokenizer(tokenizer: Tokenizer, config: PaliGemmaConfig) -> None:
    if tokenizer.vocab_size != config.text.vocab_size:
        raise CheckpointError(
            f"{tokenizer.path}: {tokenizer.vocab_size} pieces but the model's vocabulary has "
            f"{config.text.vocab_size}; pass the tokenizer the checkpoint was trained with"
        )


def write_serving_files(
    directory: Path, config: PaliGemmaConfig, tokenizer: Tokenizer | None
) -> None:
    """Writes the files above into `directory` (the tokenizer ones only with a tokenizer)."""
    v = config.vision
    write_json(
        directory / "preprocessor_config.json",
        {
            "image_processor_type": "SiglipImageProcessor",
            "processor_class": "PaliGemmaProcessor",
            "image_seq_length": config.num_image_tokens,
            "size": {"height": v.image_size, "width": v.image_size},
            "do_resize": True,
            "resample": RESAMPLE_BILINEAR,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "do_convert_rgb": True,
        },
    )
    if tokenizer is None:
        write_json(directory / "generation_config.json", {"_from_model_config": False})
        return
    check_tokenizer(tokenizer, config)
    write_json(directory / "generation_config.json", special_ids(tokenizer))
    shutil.copyfile(tokenizer.path, directory / TOKENIZER_FILE)
    tokens = special_tokens(tokenizer)
    image_token: dict[str, Any] = {
        "content": IMAGE_TOKEN,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }
    write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "GemmaTokenizer",
            **tokens,
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": {str(config.text.vocab_size): image_token},
            "additional_special_tokens": [IMAGE_TOKEN],
            "processor_class": "PaliGemmaProcessor",
        },
    )
    write_json(
        directory / "special_tokens_map.json",
        {**tokens, "additional_special_tokens": [image_token]},
    )
