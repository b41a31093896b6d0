"""Fine-tuning on (image, prefix, suffix) records, with the official PaliGemma recipe's loss.

Data: the format of the official fine-tuning colab, a JSONL file of
`{"image": "relative/or/absolute.jpg", "prefix": "caption en", "suffix": "a cat"}` records.
Each example becomes `[bos] prefix "\\n" suffix [eos]` with mask_ar 0 on `[bos] prefix "\\n"`
(full attention, with the image) and 1 on `suffix [eos]` (causal); as big_vision's transfer
code, the model reads tokens[:-1] and is scored on tokens[1:], and the loss counts only the
suffix and eos targets: per example, the mean over its suffix tokens; then the batch mean.

Training: full, frozen image encoder (SigLIP and projector fixed) or LoRA on the decoder (all
else frozen); AdamW with linear warmup and cosine decay to zero; gradient accumulation, clipping,
checkpointing (activation recomputation), bf16 autocast; periodic evaluation; checkpoints
(trainable parameters, optimizer moments, step: safetensors + JSON) that `resume` continues from
exactly; at the end the LoRA weights are merged and the model is saved in our checkpoint format,
from which `export_npz` writes the official `.npz` through the reverse converter.

    model = load_pretrained("pg2-3b-224"); tok = Tokenizer("pg2-3b-224/tokenizer.model")
    finetune(model, tok, JsonlDataset("train.jsonl"), FinetuneConfig(steps=500, mode="lora"),
             out_dir="run1", eval_data=JsonlDataset("val.jsonl"))
    export_npz("run1/model", "finetuned.npz")
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from . import outputs
from .config import check_fields
from .formats import open_checkpoint, write_npz
from .formats import ours as ckpt
from .guard import message as guard_message
from .image import ImageLike, open_image, preprocess
from .lora import add_lora, merge_lora
from .model import PaliGemmaModel
from .tokenizer import Tokenizer

MODES = ("full", "frozen-image", "lora")
CHECKPOINT_DIR = "checkpoint"  # under out_dir: the latest training state, replaced atomically
MODEL_DIR = "model"  # under out_dir: the final (merged) model, our checkpoint format
METRICS_FILE = "metrics.jsonl"
AUX_PREFIX = "aux."  # names of the auxiliary objective's parameters in training checkpoints


_MINIMUM = {"steps": 1, "batch_size": 1, "grad_accum": 1, "lora_rank": 1, "max_len": 2,
            "eval_batches": 1}
# Fields that change what is trained; a resumed run must keep them (the rest only change
# reporting and speed).
_RUN_FIELDS_FREE = ("eval_every", "eval_batches", "save_every", "num_workers")


@dataclass(frozen=True)
class FinetuneConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 16  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-5
    warmup_steps: int = 50  # linear from 0, then cosine to 0 at `steps`
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    mode: str = "full"  # one of MODES
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    grad_checkpointing: bool = False
    bf16: bool = False  # autocast matmuls to bfloat16 (weights stay in their dtype)
    max_len: int | None = None  # truncate text (prefix + suffix + eos) to this many tokens
    eval_every: int = 0  # steps between evaluations (0: only at the end, if eval data)
    eval_batches: int | None = None  # limit evaluation to this many batches
    save_every: int = 100  # steps between checkpoints (0: only at the end and on interruption)
    num_workers: int = 0  # DataLoader workers
    seed: int = 0
    loc_sigma: float = 0.0  # > 0: Gaussian soft targets over <loc> bins (see example_losses)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        check_fields(self, lambda name: f"{name} (--{name.replace('_', '-')})", _MINIMUM,
                     above_zero=("lr", "lora_alpha", "max_grad_norm"), int_min=0)
        if self.lora_dropout >= 1:
            raise ValueError(f"lora_dropout must be below 1, got {self.lora_dropout}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based): warmup, then cosine to 0."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class Example:
    image: ImageLike  # path, PIL image or array
    prefix: str
    suffix: str
    aux: Sequence[float] | None = None  # targets of an auxiliary objective (finetune's `aux`)


class JsonlDataset(Dataset):
    """Records of the official fine-tuning colab: one JSON object per line with "image" (a path
    relative to `image_dir`, default the JSONL file's folder), "prefix" and "suffix" (strings).

    Every record is checked when the file is read, naming `file:line`; `check_images` checks
    that every image opens."""

    def __init__(self, path: str | Path, image_dir: str | Path | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such JSONL file")
        self.image_dir = Path(image_dir) if image_dir is not None else self.path.parent
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"{self.image_dir}: no such image folder (--image-dir)")
        self.examples: list[Example] = []
        self.lines: list[int] = []
        try:
            text = self.path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: not UTF-8 text ({e})") from None
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                self.examples.append(self._example(line, n))
                self.lines.append(n)
        if not self.examples:
            raise ValueError(f"{self.path}: no records")

    def _example(self, line: str, n: int) -> Example:
        where = f"{self.path}:{n}"
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: not JSON ({e}): {line[:60]!r}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected an object {{\"image\", \"prefix\", \"suffix\"}}, "
                             f"got {line[:60]!r}")
        for key in ("image", "prefix", "suffix"):
            if key not in record:
                raise ValueError(f"{where}: no {key!r} (records are {{\"image\", \"prefix\", "
                                 "\"suffix\"}})")
            if not isinstance(record[key], str) or key == "image" and not record[key]:
                what = "a non-empty string (a path)" if key == "image" else "a string"
                raise ValueError(f"{where}: {key!r} must be {what}, got {record[key]!r}")
        return Example(self.image_dir / record["image"], record["prefix"], record["suffix"])

    def check_images(self, size: int = 224, progress: bool = True) -> None:
        """Opens and decodes every image (JPEGs at reduced scale, near `size`): a bad file is
        reported as `file:line` before training starts, not when a batch reaches it."""
        for n, example in zip(self.lines, tqdm(self.examples, desc=f"checking {self.path.name}",
                                                disable=not progress, leave=False), strict=True):
            try:
                with open_image(example.image, decode=False) as image:  # errors name the file
                    try:
                        image.draft("RGB", (size, size))
                        image.load()
                    except (OSError, SyntaxError) as e:
                        raise ValueError(f"{example.image}: cannot decode image ({e})") from None
            except (OSError, ValueError) as e:
                raise ValueError(f"{self.path}:{n}: {guard_message(e)}") from None

    @property
    def fingerprint(self) -> str:
        """sha256 of the records and of each image's size in bytes (a cheap stat, not a read):
        what `--resume` compares. Moving the data elsewhere keeps it."""
        digest = hashlib.sha256(self.path.read_bytes())
        for example in self.examples:
            digest.update(str(Path(example.image).stat().st_size).encode())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def encode_example(tokenizer: Tokenizer, prefix: str, suffix: str) -> tuple[list[int], ...]:
    """-> (tokens, mask_ar, mask_loss) of `[bos] prefix "\\n" suffix [eos]`.

    mask_ar is 0 on `[bos] prefix "\\n"` and 1 on `suffix [eos]`; mask_loss is 1 exactly on
    `suffix [eos]` (big_vision's transfer / colab `tokenize`).
    """
    tokens, mask_ar = tokenizer.prompt(prefix, suffix)
    tokens, mask_ar = [*tokens, tokenizer.eos_id], [*mask_ar, 1]
    return tokens, mask_ar, list(mask_ar)


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, R, R] in [-1, 1]
    tokens: torch.Tensor  # [B, T] long, padded at the end with the pad id
    mask_ar: torch.Tensor  # [B, T] long: 0 prefix (full attention), 1 suffix and padding
    mask_loss: torch.Tensor  # [B, T] long: 1 on suffix and eos
    input_mask: torch.Tensor  # [B, T] bool: False on padding
    aux: torch.Tensor | None = None  # [B, K] float: the examples' `aux` targets, if they have any

    def to(self, device: torch.device) -> Batch:
        return Batch(*(None if t is None else t.to(device)
                       for t in (getattr(self, f.name) for f in dataclasses.fields(self))))


def collate(
    examples: Sequence[Example], tokenizer: Tokenizer, image_size: int, max_len: int | None = None
) -> Batch:
    """Preprocesses images and encodes/pads texts (to the longest, at most max_len)."""
    with_aux = [e.aux is not None for e in examples]
    if any(with_aux) and not all(with_aux):
        raise ValueError("either every example of a batch has `aux` targets or none has")
    images = preprocess([e.image for e in examples], image_size)
    encoded = [encode_example(tokenizer, e.prefix, e.suffix) for e in examples]
    if max_len is not None:
        encoded = [tuple(seq[:max_len] for seq in enc) for enc in encoded]
    length = max(len(tokens) for tokens, _, _ in encoded)
    batch = torch.full((len(examples), length), tokenizer.pad_id, dtype=torch.long)
    mask_ar = torch.ones_like(batch)
    mask_loss = torch.zeros_like(batch)
    input_mask = torch.zeros_like(batch, dtype=torch.bool)
    for row, (tokens, ar, loss) in enumerate(encoded):
        n = len(tokens)
        batch[row, :n], mask_ar[row, :n] = torch.tensor(tokens), torch.tensor(ar)
        mask_loss[row, :n], input_mask[row, :n] = torch.tensor(loss), True
    aux = torch.tensor([e.aux for e in examples], dtype=torch.float32) if all(with_aux) else None
    return Batch(images, batch, mask_ar, mask_loss, input_mask, aux)


def sample_order(n: int, seed: int) -> Iterator[int]:
    """Endless example indices: a fresh permutation of range(n) per epoch, fixed by the seed."""
    for epoch in itertools.count():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        yield from torch.randperm(n, generator=generator).tolist()


# ---------------------------------------------------------------------------------------------
# Model set-up


def example_losses(
    model: PaliGemmaModel, batch: Batch, loc_ids: Sequence[int] | None = None,
    loc_sigma: float = 0.0,
) -> torch.Tensor:
    """Per-example loss [B]: mean NLL of the suffix and eos tokens (targets shifted by one).

    With `loc_ids` (the `<loc0000>`.. `<loc1023>` ids, in order) and `loc_sigma` > 0, a target
    that is a `<loc>` token is scored instead by cross-entropy against a Gaussian over the loc
    bins centred on it (standard deviation `loc_sigma` bins): off-by-a-few coordinates cost
    little, which turns the 1024-way classification into something close to regression. Not
    part of the official recipe; opt in (FinetuneConfig.loc_sigma) e.g. to learn detection
    from scratch.
    """
    logits = model(
        batch.images, batch.tokens[:, :-1], batch.mask_ar[:, :-1], batch.input_mask[:, :-1]
    )
    targets, mask = batch.tokens[:, 1:], batch.mask_loss[:, 1:].float()
    if loc_ids is None or loc_sigma <= 0:
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, T-1]
        return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)
    log_probs = F.log_softmax(logits.float(), dim=-1)  # [B, T-1, V]
    nll = -log_probs.gather(-1, targets[..., None])[..., 0]
    ids = torch.tensor(loc_ids, device=targets.device)
    bin_of = torch.full((log_probs.shape[-1],), -1, device=targets.device)
    bin_of[ids] = torch.arange(len(ids), device=targets.device)
    bins = bin_of[targets]  # [B, T-1]: loc bin of each target, -1 for other tokens
    where = bins >= 0
    offsets = torch.arange(len(ids), device=targets.device) - bins[where][:, None]
    soft = torch.softmax(-0.5 * (offsets / loc_sigma) ** 2, dim=-1)  # [N, n_loc], rows sum to 1
    nll[where] = -(soft * log_probs[where][:, ids]).sum(-1)
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)


@torch.no_grad()
def init_weights(model: PaliGemmaModel, seed: int = 0) -> None:
    """Random initialization for training from scratch (the modules' own init is only a
    placeholder for loading weights): LeCun-normal kernels (flax's Dense default), zero
    biases, unit LayerNorms, zero RMSNorm scales (gain 1), position and token embeddings
    N(0, 1/width) as big_vision's ViT posemb, so that scaled token embeddings have unit size
    and the tied logits start at unit scale."""
    generator = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("pos_embedding") or name.endswith("embedder.weight"):
            p.normal_(0, p.shape[-1] ** -0.5, generator=generator)
        elif p.dim() >= 2:
            fan_in = p[0].numel()  # Linear (out, in) and Conv2d (out, in, kh, kw)
            p.normal_(0, fan_in**-0.5, generator=generator)
        elif name.endswith(".scale") or name.endswith("bias"):
            p.zero_()
        else:  # LayerNorm weights
            p.fill_(1.0)


def prepare_model(model: PaliGemmaModel, config: FinetuneConfig) -> list[str]:
    """Freezes / adds LoRA per `config.mode` and enables gradient checkpointing, in place.
    Returns the names of the trainable parameters."""
    if config.mode == "lora":
        model.requires_grad_(False)
        add_lora(model.decoder, config.lora_rank, config.lora_alpha, config.lora_dropout)
    else:
        model.requires_grad_(True)
        if config.mode == "frozen-image":
            model.vision.requires_grad_(False)
            model.projector.requires_grad_(False)
    if config.grad_checkpointing:
        for block in [*model.vision.blocks, *model.decoder.layers]:
            # Recompute each block's activations in the backward pass instead of storing them.
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return list(trainable_parameters(model))


# ---------------------------------------------------------------------------------------------
# Checkpoints


def trainable_parameters(
    model: PaliGemmaModel, aux: torch.nn.Module | None = None
) -> dict[str, torch.nn.Parameter]:
    """What the optimizer updates, by name: the model's trainable parameters, then those of
    the auxiliary objective (if any) under `aux.`."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if aux is not None:
        named.update({f"{AUX_PREFIX}{n}": p for n, p in aux.named_parameters()})
    return named


def save_training_state(
    directory: Path, model: PaliGemmaModel, optimizer: torch.optim.Optimizer, step: int,
    config: FinetuneConfig, aux: torch.nn.Module | None = None,
    fingerprints: dict[str, str] | None = None,
) -> None:
    """`directory` (replaced atomically): trainable.safetensors, optimizer.safetensors (AdamW
    moments per parameter index), state.json (step, config, param groups, names, and the
    `fingerprints` of the data and base model that `check_resume` compares)."""
    trainable = {n: p.detach() for n, p in trainable_parameters(model, aux).items()}
    opt = optimizer.state_dict()
    moments = {f"{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items()}
    state = {
        "step": step,
        "config": dataclasses.asdict(config),
        "param_groups": opt["param_groups"],
        "trainable": list(trainable),
        "rng_state": torch.get_rng_state().tolist(),
        "fingerprints": fingerprints or {},
    }
    with outputs.atomic(directory, "training-state", force=True) as tmp:
        save_file({k: v.contiguous() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        save_file({k: v.contiguous() for k, v in moments.items()}, tmp / "optimizer.safetensors")
        ckpt.write_json(tmp / "state.json", state)


def check_resume(directory: Path, config: FinetuneConfig, fingerprints: dict[str, str]) -> None:
    """Raises ValueError naming every setting, the data or the base model that differs from
    what the run in `directory` was started with: resuming would silently train another run."""
    state = ckpt.read_json(directory / "state.json")
    saved = state.get("config", {})
    changed = [f"{k} was {saved[k]!r}, now {v!r}" for k, v in dataclasses.asdict(config).items()
               if k in saved and k not in _RUN_FIELDS_FREE and saved[k] != v]
    what = {"data": "the training data (--train / --image-dir) changed",
            "model": "the base model (--model) differs"}
    for key, value in state.get("fingerprints", {}).items():
        if fingerprints.get(key) not in (None, value):
            changed.append(what.get(key, f"{key} changed"))
    if changed:
        raise ValueError(
            f"{directory}: cannot resume: {'; '.join(changed)}. Resume with what the run was "
            "started with, or start a new run in another folder"
        )


def model_fingerprint(model: PaliGemmaModel) -> str:
    """sha256 of the config and of a strided sample of every weight: tells base models apart
    without reading all of them."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 16)][:16].float().cpu()
        digest.update(f"{name}{list(p.shape)}{sample.tolist()}".encode())
    return digest.hexdigest()


def load_training_state(
    directory: Path, model: PaliGemmaModel, optimizer: torch.optim.Optimizer,
    aux: torch.nn.Module | None = None,
) -> int:
    """Restores what `save_training_state` wrote into a prepared model; returns the step."""
    state = ckpt.read_json(directory / "state.json")
    if list(trainable_parameters(model, aux)) != state["trainable"]:
        raise ValueError(
            f"{directory}: its trainable parameters differ from this run's "
            "(resume with the same mode, base model and auxiliary objective)"
        )
    saved = load_file(directory / "trainable.safetensors")
    model.load_state_dict({k: v for k, v in saved.items() if not k.startswith(AUX_PREFIX)},
                          strict=False)
    if aux is not None:
        aux.load_state_dict({k.removeprefix(AUX_PREFIX): v for k, v in saved.items()
                             if k.startswith(AUX_PREFIX)})
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(directory / "optimizer.safetensors").items():
        index, name = key.split(".", 1)
        moments.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": moments, "param_groups": state["param_groups"]})
    torch.set_rng_state(torch.tensor(state["rng_state"], dtype=torch.uint8))
    return int(state["step"])


# ---------------------------------------------------------------------------------------------
# Training and evaluation


@torch.no_grad()
def evaluate_loss(
    model: PaliGemmaModel, loader: DataLoader, max_batches: int | None = None, bf16: bool = False
) -> float:
    """Mean per-example suffix loss over (at most max_batches of) an evaluation loader."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in itertools.islice(loader, max_batches):
        with _autocast(model, bf16):
            losses = example_losses(model, batch.to(model.device))
        total, count = total + float(losses.sum()), count + len(losses)
    model.train(was_training)
    return total / max(1, count)


def finetune(
    model: PaliGemmaModel,
    tokenizer: Tokenizer,
    train_data: Dataset,
    config: FinetuneConfig,
    out_dir: str | Path | None = None,
    eval_data: Dataset | None = None,
    evaluate: Callable[[PaliGemmaModel], dict[str, float]] | None = None,
    resume: bool = False,
    progress: bool = True,
    aux: torch.nn.Module | None = None,
    force: bool = False,
) -> PaliGemmaModel:
    """Trains `model` in place on Examples and returns it, LoRA merged.

    out_dir: the run folder, where checkpoints (`checkpoint/`, every `save_every` steps, at the
    end and on interruption), `metrics.jsonl` and the final model (`model/`, with
    `tokenizer.model`) go; None keeps nothing on disk. It must not exist, unless `resume`
    (continue from its checkpoint: the same data, base model and settings, else ValueError
    naming what changed) or `force` (replace a previous run folder; anything else is refused).
    eval_data: examples whose loss is reported every `eval_every` steps and at the end;
    evaluate: an extra callback (model -> {metric: value}) run at the same times, e.g.
    generation scores. Datasets with a `check_images` method (JsonlDataset) have every image
    checked before the first step. aux: an auxiliary objective, a module called as
    `aux(model, batch)` right after the model's forward pass of a training batch, returning a
    per-example loss [B] that is added to the suffix loss; it can read activations that its
    forward hooks captured, and targets from `batch.aux` (the examples' `aux`). Its parameters
    are trained and checkpointed with the model's, never exported, and evaluation losses
    leave it out.
    """
    if tokenizer.vocab_size != model.config.text.vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.vocab_size} ids, the model {model.config.text.vocab_size}"
        )
    for data in (train_data, eval_data):
        if hasattr(data, "check_images"):
            data.check_images(model.config.vision.image_size, progress)
    fingerprints = {"model": model_fingerprint(model)}
    if hasattr(train_data, "fingerprint"):
        fingerprints["data"] = train_data.fingerprint
    if out_dir is None:
        return _train(model, tokenizer, train_data, config, None, eval_data, evaluate, 0,
                      progress, aux, fingerprints)
    out = Path(out_dir)
    with outputs.locked(out):  # one writer per run folder
        if resume:
            if not (out / CHECKPOINT_DIR / "state.json").is_file():
                raise FileNotFoundError(f"{out}: no fine-tuning run with a {CHECKPOINT_DIR}/ "
                                        "to resume from")
            check_resume(out / CHECKPOINT_DIR, config, fingerprints)
            for folder, kind in ((out, "finetune-run"), (out / CHECKPOINT_DIR, "training-state")):
                if outputs.kind_of(folder) is None:  # a run started before folders were marked
                    outputs.mark(folder, kind)
        else:
            outputs.check(out, "finetune-run", force)
            if out.exists():  # a previous run folder, and force: replaced
                shutil.rmtree(out)
            out.mkdir(parents=True)
            outputs.mark(out, "finetune-run")
        return _train(model, tokenizer, train_data, config, out, eval_data, evaluate, resume,
                      progress, aux, fingerprints)


def _train(
    model: PaliGemmaModel, tokenizer: Tokenizer, train_data: Dataset, config: FinetuneConfig,
    out: Path | None, eval_data: Dataset | None, evaluate: Callable | None, resume: bool,
    progress: bool, aux: torch.nn.Module | None, fingerprints: dict[str, str],
) -> PaliGemmaModel:
    prepare_model(model, config)
    model.train()
    if aux is not None:
        aux.to(model.device).train()
    params = list(trainable_parameters(model, aux).values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    make_batch = functools.partial(
        collate, tokenizer=tokenizer, image_size=model.config.vision.image_size,
        max_len=config.max_len,
    )
    step = 0
    if resume and out is not None:
        step = load_training_state(out / CHECKPOINT_DIR, model, optimizer, aux)
        _truncate_metrics(out / METRICS_FILE, step)  # steps after the checkpoint are redone
    per_step = config.batch_size * config.grad_accum
    order = itertools.islice(sample_order(len(train_data), config.seed), step * per_step, None)
    batches = _chunks(order, config.batch_size)
    loader = DataLoader(train_data, batch_sampler=batches, collate_fn=make_batch,
                        num_workers=config.num_workers)
    eval_loader = None
    if eval_data is not None:
        eval_loader = DataLoader(eval_data, batch_size=config.batch_size, collate_fn=make_batch,
                                 num_workers=config.num_workers)
    data = iter(loader)
    bar = tqdm(total=config.steps, initial=step, desc="fine-tuning", disable=not progress,
               dynamic_ncols=True)
    saved = step

    def save() -> None:
        if out is not None:
            save_training_state(out / CHECKPOINT_DIR, model, optimizer, step, config, aux,
                                fingerprints)

    try:
        while step < config.steps:
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for _ in range(config.grad_accum):
                batch = next(data).to(model.device)
                with _autocast(model, config.bf16):
                    losses = example_losses(model, batch, tokenizer.loc_ids, config.loc_sigma)
                    if aux is not None:
                        losses = losses + aux(model, batch)
                    loss = losses.mean()
                (loss / config.grad_accum).backward()
                loss_sum += float(loss.detach())
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / config.grad_accum:.4f}", lr=f"{lr:.2e}")
            metrics: dict[str, Any] = {"step": step, "loss": loss_sum / config.grad_accum,
                                       "lr": lr}
            last = step == config.steps
            if config.eval_every and step % config.eval_every == 0 or last:
                if eval_loader is not None:
                    metrics["eval_loss"] = evaluate_loss(model, eval_loader,
                                                         config.eval_batches, config.bf16)
                if evaluate is not None:
                    metrics.update(_run_callback(model, evaluate))
                if len(metrics) > 3:
                    bar.write(" ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))
            if out is not None:
                with open(out / METRICS_FILE, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                if config.save_every and step % config.save_every == 0 or last:
                    save()
                    saved = step
    except KeyboardInterrupt:
        if out is not None and step > saved:
            optimizer.zero_grad(set_to_none=True)  # a partly accumulated step is dropped
            save()
            bar.write(f"interrupted: saved the state after step {step} to "
                      f"{out / CHECKPOINT_DIR}; continue with --resume", file=sys.stderr)
        raise
    finally:
        bar.close()
    merge_lora(model)
    model.eval()
    if out is not None:
        save_model(model, tokenizer, out / MODEL_DIR, force=True)
    return model


def _truncate_metrics(path: Path, step: int) -> None:
    """Drops the lines of steps after `step` (run after the last checkpoint, then lost)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines()
             if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, path)  # all or nothing: an interruption here keeps the old file


def save_model(model: PaliGemmaModel, tokenizer: Tokenizer, directory: str | Path,
               force: bool = False) -> None:
    """Our checkpoint directory plus `tokenizer.model`: `PaliGemma.from_pretrained` loads it.
    Written atomically; `force` replaces a previous checkpoint folder (nothing else)."""
    with outputs.atomic(directory, "checkpoint", force) as tmp:
        ckpt.save_pretrained(model, tmp)
        shutil.copyfile(tokenizer.path, tmp / "tokenizer.model")


def export_npz(
    model_dir: str | Path, npz_path: str | Path, dtype: torch.dtype | None = torch.bfloat16,
    force: bool = False,
) -> None:
    """Our checkpoint directory -> the official big_vision `.npz` (bf16 stored as `|V2` by
    default), as `paligemma-convert DIR --to npz` writes it. `force` replaces an `.npz` this
    project exported before, nothing else."""
    write_npz(open_checkpoint(model_dir), npz_path, dtype, force=force, quiet=True)


def _run_callback(model: PaliGemmaModel, evaluate: Callable) -> dict[str, float]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return evaluate(model)
    finally:
        model.train(was_training)


def _autocast(model: PaliGemmaModel, enabled: bool) -> torch.autocast:
    return torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=enabled)


def _chunks(indices: Iterator[int], size: int) -> Iterator[list[int]]:
    while chunk := list(itertools.islice(indices, size)):
        yield chunk


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------
# Command line: `paligemma finetune`

_HELP = {
    "steps": "optimizer steps", "batch_size": "examples per micro-batch",
    "grad_accum": "micro-batches per optimizer step", "lr": "peak learning rate",
    "warmup_steps": "linear warmup steps (then cosine to 0)",
    "weight_decay": "AdamW weight decay", "max_grad_norm": "gradient clipping norm",
    "mode": "what to train: " + " | ".join(MODES), "lora_rank": "LoRA rank",
    "lora_alpha": "LoRA alpha (scaling alpha / rank)", "lora_dropout": "dropout on LoRA inputs",
    "grad_checkpointing": "recompute block activations in the backward pass (less memory)",
    "bf16": "bfloat16 autocast", "max_len": "truncate texts to this many tokens",
    "eval_every": "evaluate every N steps (0: at the end only)",
    "eval_batches": "evaluate on at most N batches",
    "save_every": "checkpoint every N steps (0: at the end and on interruption only)",
    "num_workers": "DataLoader worker processes", "seed": "data order seed",
    "loc_sigma": "train <loc> targets as a Gaussian over bins with this std (0: one-hot)",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers `paligemma finetune`: one flag per FinetuneConfig field, plus data and I/O."""
    p = sub.add_parser(
        "finetune",
        help="fine-tune on (image, prefix, suffix) JSONL records",
        description=__doc__.split("\n\n    model =")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: paligemma finetune --model ckpt/pg2-3b-224 --train data/train.jsonl "
        "--eval data/val.jsonl -o runs/lora --mode lora --steps 500 --lr 3e-4 "
        "--export-npz finetuned.npz",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="converted checkpoint directory")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="SentencePiece model (default: tokenizer.model in --model)")
    p.add_argument("--train", required=True, metavar="JSONL", help="training records")
    p.add_argument("--eval", metavar="JSONL", help="evaluation records: their loss, and task "
                   "metrics of greedy generations by prompt (caption: CIDEr, BLEU-4, exact "
                   "match; detect: accuracy at IoU 0.5, mean IoU; others: exact match, ANLS)")
    p.add_argument("--no-eval-metrics", dest="eval_metrics", action="store_false",
                   help="report the evaluation loss only (no generation)")
    p.add_argument("--image-dir", metavar="DIR",
                   help="folder image paths are relative to (default: the JSONL's folder)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="run folder: checkpoint/, metrics.jsonl, model/ (the result)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT/checkpoint (refused if the data, base model or a "
                   "training setting changed)")
    p.add_argument("--force", action="store_true",
                   help="replace OUTPUT if it is a previous run folder, and --export-npz if it "
                   "is a previous export (nothing else)")
    p.add_argument("--export-npz", metavar="FILE",
                   help="also write the result as an official big_vision .npz (bf16)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    for f in dataclasses.fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true", help=_HELP[f.name])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type.split(" ")[0]]
            p.add_argument(flag, type=kind, default=f.default, choices=MODES if f.name == "mode"
                           else None, help=f"{_HELP[f.name]} (default: {f.default})")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from .api import PaliGemma

    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    config = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in fields})
    # Everything that can be checked without the model, before loading it.
    if not args.resume:
        outputs.check(args.output, "finetune-run", args.force)
    if args.export_npz:
        outputs.check(args.export_npz, "npz", args.force)
    train = JsonlDataset(args.train, args.image_dir)
    evaluation = JsonlDataset(args.eval, args.image_dir) if args.eval else None
    pg = PaliGemma.from_pretrained(args.model, tokenizer=args.tokenizer, dtype=torch.float32,
                                   device=args.device)
    task_metrics = None
    if evaluation is not None and args.eval_metrics:  # generation scores beside the loss
        from .eval.runner import finetune_evaluator

        limit = config.eval_batches * config.batch_size if config.eval_batches else None
        task_metrics = finetune_evaluator(pg.tokenizer, evaluation.examples[:limit],
                                          config.batch_size)
    finetune(pg.model, pg.tokenizer, train, config, args.output, evaluation, task_metrics,
             resume=args.resume, force=args.force)
    print(f"wrote {Path(args.output) / MODEL_DIR}")
    if args.export_npz:
        export_npz(Path(args.output) / MODEL_DIR, args.export_npz, force=args.force)
        print(f"wrote {args.export_npz}")
    return 0
