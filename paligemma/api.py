"""The user-facing `PaliGemma`: images and text in; text, boxes, masks and attention maps out.

    pg = PaliGemma.from_pretrained("path/to/converted", vae="vae-oid.npz")
    pg.caption("cat.jpg").text
    pg.detect("cat.jpg", "cat ; dog").objects      # [Detection(label, box, mask=None), ...]
    for piece in pg.stream("cat.jpg", "caption en"):
        print(piece, end="")

Every task method takes one image (-> one result) or a list (-> a list, run as one batch), and
the generation options of `generate`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .formats import load_model, open_checkpoint
from .formats.open import TOKENIZER_FILES
from .generate import Sampler, beam_search, generate, make_sampler, record_attention, stream
from .image import ImageLike, load_batch, preprocess
from .model import PaliGemmaModel
from .segmentation import MaskDecoder, load_mask_decoder
from .tasks import Detection, parse_detections, parse_segments, task_prefix
from .tokenizer import Tokenizer

# Gemma 1 and 2 were trained with an 8192-token context: image tokens + prompt + new tokens.
MAX_SEQ_LEN = 8192
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_HUB_FILES = ["*.json", "*.safetensors", "*.model"]  # not the .bin / .npz copies some repos add
Images = ImageLike | Sequence[ImageLike]  # one image -> one result; a list -> a list


@dataclass
class TextResult:
    prompt: str  # the prefix the model saw, e.g. "caption en"
    text: str  # generated text up to eos
    tokens: list[int]  # generated ids up to (excluding) eos


@dataclass
class ObjectsResult(TextResult):
    objects: list[Detection] = field(default_factory=list)  # detect / segment


@dataclass
class Explanation(TextResult):
    pieces: list[str] = field(default_factory=list)  # one per generated token
    # [n_tokens, grid, grid]: attention mass of the query that chose each token on each image
    # patch, averaged over the chosen layers and heads (rows do not sum to 1: the rest of the
    # mass goes to text tokens).
    maps: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))


def check_device(device: torch.device | str) -> None:
    """Raises ValueError naming the device if it is malformed or absent on this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"--device {device!r}: not a torch device; e.g. cpu, cuda, cuda:1"
        ) from None
    backends = {"cuda": torch.cuda, "mps": getattr(torch.backends, "mps", None),
                "xpu": getattr(torch, "xpu", None)}
    if dev.type not in backends:
        return
    backend = backends[dev.type]
    if backend is None or not backend.is_available():
        raise ValueError(
            f"--device {device}: no {dev.type} device on this machine; use --device cpu"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} "
                         "cuda device(s), numbered from 0")


class PaliGemma:
    """A PaliGemmaModel with its tokenizer and (for `segment`) the mask VAE decoder."""

    def __init__(
        self,
        model: PaliGemmaModel,
        tokenizer: Tokenizer,
        vae: MaskDecoder | None = None,
        max_seq_len: int = MAX_SEQ_LEN,
    ):
        if tokenizer.vocab_size != model.config.text.vocab_size:
            raise ValueError(
                f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} ids but the model's "
                f"vocabulary has {model.config.text.vocab_size}: use the tokenizer the "
                "checkpoint was trained with (paligemma_tokenizer.model for official models)"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vae = vae
        self.max_seq_len = max_seq_len

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        tokenizer: str | Path | None = None,
        vae: str | Path | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        quantize: str | None = None,
        tensor_parallel: bool = False,
    ) -> PaliGemma:
        """A checkpoint: our directory, a Hugging Face transformers PaliGemma directory, an
        official `.npz`, or a Hugging Face Hub repo id holding one of the directories (e.g.
        "google/paligemma2-3b-pt-224"; `HF_HUB_OFFLINE=1` reads the local hub cache only).

        tokenizer: SentencePiece file (default: tokenizer.model or paligemma_tokenizer.model
        next to the weights); vae: `vae-oid.npz` or its converted directory (segment only);
        quantize: "int8", "int8-linear", "int4" or "int4-linear" (`quantize.MODES`) quantizes
        each matrix as it is read (dtype is then ignored); a checkpoint written quantized
        (`paligemma-convert --quantize`) needs none. Opened, checked and loaded by
        `formats.load_pretrained`.
        tensor_parallel: load only this rank's shard of the decoder (a converted directory, in
        a torchrun process group: `tensor_parallel.load_tensor_parallel`).
        """
        check_device(device)
        path = Path(name_or_path)
        if not path.exists():
            if not _HUB_ID.match(str(name_or_path)):
                raise FileNotFoundError(f"{path}: no such model directory")
            from huggingface_hub import snapshot_download

            try:
                path = Path(
                    snapshot_download(repo_id=str(name_or_path), allow_patterns=_HUB_FILES)
                )
            except (OSError, ValueError) as e:
                raise FileNotFoundError(
                    f"{name_or_path}: not a local directory and not downloadable from the "
                    f"Hugging Face Hub ({type(e).__name__}: {e})"
                ) from None
        source = open_checkpoint(path)  # a wrong folder is named before anything else is read
        if tokenizer is None:
            if source.tokenizer is None:
                raise FileNotFoundError(
                    f"{path}: no {' or '.join(TOKENIZER_FILES)}; pass the tokenizer file "
                    "(--tokenizer), e.g. the official paligemma_tokenizer.model"
                )
            tokenizer = source.tokenizer
        tok = Tokenizer(tokenizer)
        if tensor_parallel:
            from .tensor_parallel import load_tensor_parallel

            model = load_tensor_parallel(source, dtype=dtype, device=device)
        else:
            model = load_model(source, dtype=dtype, device=device, quantize=quantize)
        return cls(model, tok, load_mask_decoder(vae, device) if vae is not None else None)

    # -- generation ---------------------------------------------------------------------------

    def _prepare(
        self,
        images: Sequence[ImageLike] | torch.Tensor,
        prefixes: Sequence[str],
        suffixes: Sequence[str] | None,
        max_new_tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> pixels [B, 3, R, R], tokens, mask_ar, input_mask [B, T] on the model's device."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens!r}")
        if isinstance(images, torch.Tensor):
            pixels = images
        else:
            pixels = preprocess(images, self.image_size)
        if len(prefixes) == 1 and len(pixels) > 1:
            prefixes = list(prefixes) * len(pixels)
        if len(prefixes) != len(pixels):
            raise ValueError(f"{len(pixels)} images but {len(prefixes)} prompts")
        tokens, mask_ar, input_mask = self.tokenizer.batch(prefixes, suffixes)
        length = self.model.config.num_image_tokens + tokens.shape[1] + max_new_tokens
        if length > self.max_seq_len:
            raise ValueError(
                f"prompt too long: {self.model.config.num_image_tokens} image + "
                f"{tokens.shape[1]} text + {max_new_tokens} new tokens = {length} > "
                f"{self.max_seq_len}, the model's maximum sequence length"
            )
        device = self.model.device
        return (
            pixels.to(device, self.model.dtype),
            tokens.to(device),
            mask_ar.to(device),
            input_mask.to(device),
        )

    def _sampler(self, temperature: float, top_k: int | None, top_p: float | None,
                 seed: int | None) -> Sampler:
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(seed)
        return make_sampler(temperature, top_k, top_p, generator)

    def _until_eos(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        eos = self.tokenizer.eos_id
        return ids[: ids.index(eos)] if eos in ids else ids

    def generate(
        self,
        images: Images | torch.Tensor,
        prompts: str | Sequence[str],
        suffixes: Sequence[str] | None = None,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        num_beams: int = 1,
        seed: int | None = None,
        sampler: Sampler | None = None,
        cache_dtype: torch.dtype | None = None,
    ) -> TextResult | list[TextResult]:
        """Continues `[image tokens] [bos] prompt "\\n" [suffix]` for each image.

        images: one image (path, PIL image, uint8 array) or a list of them (one batch), or an
        already preprocessed float tensor [B, 3, R, R] in [-1, 1]. prompts: the prefix (task
        prompt) for all images or one per image; suffixes: text decoding continues from.
        Greedy by default; temperature / top_k / top_p sample (seed makes it reproducible),
        num_beams > 1 runs beam search; sampler overrides all of them (logits [B, V] ->
        ids [B]). Returns one TextResult per image (a single one for a single image).
        """
        single = not isinstance(images, (list, tuple, torch.Tensor))
        batch = [images] if single else images
        prefixes = [prompts] if isinstance(prompts, str) else list(prompts)
        inputs = self._prepare(batch, prefixes, suffixes, max_new_tokens)
        eos = self.tokenizer.eos_id
        if num_beams > 1:
            out, _ = beam_search(self.model, *inputs, max_new_tokens, num_beams, eos,
                                 cache_dtype, pad_id=self.tokenizer.pad_id)
        else:
            sampler = sampler or self._sampler(temperature, top_k, top_p, seed)
            out, _ = generate(self.model, *inputs, max_new_tokens, sampler, eos, cache_dtype,
                              pad_id=self.tokenizer.pad_id)
        if len(prefixes) == 1:
            prefixes = prefixes * len(out)
        results = []
        for prefix, row in zip(prefixes, out.tolist(), strict=True):
            ids = self._until_eos(row)
            results.append(TextResult(prefix, self.tokenizer.decode(ids), ids))
        return results[0] if single else results

    def stream(
        self,
        image: ImageLike,
        prompt: str,
        suffix: str = "",
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        cache_dtype: torch.dtype | None = None,
    ) -> Iterator[str]:
        """Yields the generated text piece by piece as tokens arrive (one image)."""
        inputs = self._prepare([image], [prompt], [suffix], max_new_tokens)
        sampler = self._sampler(temperature, top_k, top_p, seed)
        ids: list[int] = []
        emitted = ""
        for token, _ in stream(self.model, *inputs, max_new_tokens, sampler,
                               self.tokenizer.eos_id, cache_dtype):
            if int(token[0]) == self.tokenizer.eos_id:
                return
            ids.append(int(token[0]))
            text = self.tokenizer.decode(ids)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                yield text[len(emitted):]
                emitted = text

    # -- tasks --------------------------------------------------------------------------------

    def _task(
        self, task: str, images: Images, text: str | Sequence[str] = "", lang: str = "en",
        **options: Any,
    ) -> TextResult | list[TextResult]:
        return self.generate(images, task_prefix(task, text, lang), **options)

    def caption(
        self, images: Images, lang: str = "en", **options: Any
    ) -> TextResult | list[TextResult]:
        """Short caption (`caption <lang>`)."""
        return self._task("caption", images, lang=lang, **options)

    def describe(
        self, images: Images, lang: str = "en", **options: Any
    ) -> TextResult | list[TextResult]:
        """Longer description (`describe <lang>`)."""
        return self._task("describe", images, lang=lang, **options)

    def ask(self, images: Images, question: str | Sequence[str], lang: str = "en",
            **options: Any) -> TextResult | list[TextResult]:
        """Visual question answering (`answer <lang> <question>`); one question for all
        images or one per image."""
        if isinstance(question, str):
            return self._task("answer", images, question, lang, **options)
        prompts = [task_prefix("answer", q, lang) for q in question]
        return self.generate(images, prompts, **options)

    def ocr(self, images: Images, **options: Any) -> TextResult | list[TextResult]:
        """Text in the image (`ocr`)."""
        return self._task("ocr", images, **options)

    def detect(self, images: Images, objects: str | Sequence[str],
               **options: Any) -> ObjectsResult | list[ObjectsResult]:
        """Boxes of the named objects (`detect cat ; dog`) in original-image pixels."""
        self._require_loc_tokens()
        return self._objects("detect", images, objects, options)

    def segment(self, images: Images, objects: str | Sequence[str],
                **options: Any) -> ObjectsResult | list[ObjectsResult]:
        """Box and full-size boolean mask of the named object (`segment cat`)."""
        self._require_loc_tokens()
        if self.vae is None:
            raise ValueError(
                "segment needs the segmentation VAE weights: pass vae= (CLI: --vae) with "
                "vae-oid.npz or its converted directory"
            )
        return self._objects("segment", images, objects, options)

    def _require_loc_tokens(self) -> None:
        if self.tokenizer.loc_ids is None or self.tokenizer.seg_ids is None:
            raise ValueError(
                f"tokenizer {self.tokenizer.path} has no <locNNNN>/<segNNN> pieces; detect and "
                "segment need the PaliGemma tokenizer"
            )

    def _objects(self, task: str, images: Images, objects: str | Sequence[str],
                 options: dict[str, Any]) -> ObjectsResult | list[ObjectsResult]:
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        pixels, sizes = load_batch(batch, self.image_size)
        results = self.generate(pixels, task_prefix(task, objects), **options)
        out = []
        for (height, width), result in zip(sizes, results, strict=True):
            if task == "detect":
                found = parse_detections(result.text, width, height)
            else:
                found = parse_segments(result.text, width, height, self.vae)
            out.append(ObjectsResult(result.prompt, result.text, result.tokens, found))
        return out[0] if single else out

    # -- attention ----------------------------------------------------------------------------

    def explain(
        self,
        image: ImageLike,
        prompt: str,
        *,
        layers: Sequence[int] | None = None,
        heads: Sequence[int] | None = None,
        max_new_tokens: int = 64,
    ) -> Explanation:
        """Greedy generation, plus the attention of each generated token on the image patches.

        For generated token t the map is the attention of the query that chose it (the last
        prompt token for t = 0, token t - 1 after that), averaged over `layers` and query
        `heads` (indices, negative allowed; default all).
        """
        inputs = self._prepare([image], [prompt], None, max_new_tokens)
        cfg = self.model.config
        with record_attention(self.model) as calls:
            out, _ = generate(self.model, *inputs, max_new_tokens, eos_id=self.tokenizer.eos_id)
        ids = self._until_eos(out[0].tolist())
        layer_idx = list(range(cfg.text.depth)) if layers is None else list(layers)
        head_idx = list(range(cfg.text.num_heads)) if heads is None else list(heads)
        for name, idx, size in (("layer", layer_idx, cfg.text.depth),
                                ("head", head_idx, cfg.text.num_heads)):
            bad = [i for i in idx if not -size <= i < size]
            if bad or not idx:
                raise ValueError(f"{name} indices {bad or idx} out of range for {size} {name}s")
        n_img, grid = cfg.num_image_tokens, cfg.vision.image_size // cfg.vision.patch_size
        # One image, no padding: the image tokens sit in cache slots [0, n_img).
        maps = torch.stack([
            calls[t][0][layer_idx][:, head_idx, :n_img].mean((0, 1)) for t in range(len(ids))
        ]) if ids else torch.zeros(0, n_img)
        pieces = [self.tokenizer.decode([i]) for i in ids]
        return Explanation(prompt, self.tokenizer.decode(ids), ids, pieces,
                           maps.view(-1, grid, grid).cpu().numpy())

    @property
    def image_size(self) -> int:
        return self.model.config.vision.image_size
