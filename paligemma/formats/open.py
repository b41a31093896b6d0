"""open -> check -> load: the one way every checkpoint is read.

`open_checkpoint(paths)` recognises the format (official big_vision `.npz` or its parts, our
directory, a Hugging Face transformers directory, the mask VAE in either form), resolves the
config and checks every name and shape against it, and returns a `Source`; `formats.load`
builds the model from it (`from_pretrained`, `--quantize`, the parity harness),
`formats.writers` streams it to another format (the converter, fine-tuning export, the demo).

A source knows every tensor's name (ours), shape and stored dtype before reading any data
(`specs`), and then streams the tensors one at a time (`tensors()`): a scan-stacked official
array is read layer by layer and the embedding in row chunks, so memory stays bounded by one
layer, not by the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from ..config import VARIANTS, PaliGemmaConfig
from ..model import PaliGemmaModel
from ..quantize import Quantization, quantized_specs
from . import hf_import, ours, vae
from .dtypes import DTYPES, TORCH_DTYPE_NAMES, dtype_name
from .errors import CheckpointError, check_layout
from .mapping import (
    IDENTITY,
    check_official_layout,
    official_shapes,
    resolve_config,
    to_ours,
    weight_rules,
)
from .npz import OfficialNpz

Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]
Chunks = Iterator[torch.Tensor]  # pieces of one tensor along axis 0
_CHUNK_BYTES = ours.CHUNK_BYTES
TOKENIZER_FILES = ("tokenizer.model", "paligemma_tokenizer.model")


class Progress(Protocol):
    def update(self, n: int) -> object: ...


class NoProgress:
    def update(self, n: int) -> None:
        pass


@dataclass
class Source:
    """What every source provides. `config` is None for the VAE, `vae_config` None otherwise."""

    files: list[Path]
    specs: Specs  # our names, stored dtype, in streaming order
    config: PaliGemmaConfig | None
    vae_config: dict[str, Any] | None
    # Official key -> {"shape", "dtype"} of the original arrays (for the manifest and --to npz).
    official: dict[str, dict[str, Any]] = field(default_factory=dict)
    check_finite: bool = True
    tokenizer: Path | None = None  # the SentencePiece file next to the weights, if any
    quantization: Quantization | None = None  # a quantized checkpoint of ours (config.json)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for s, d in self.specs.values())

    def tensors(self, progress: Progress) -> Iterator[tuple[str, Chunks]]:
        raise NotImplementedError


class OfficialSource(Source):
    """One official checkpoint, possibly split over several `.npz` parts."""

    def __init__(
        self,
        paths: list[str | Path],
        variant: str | None = None,
        config_file: str | Path | None = None,
        check_finite: bool = True,
        config: PaliGemmaConfig | None = None,
    ):
        self.ckpt = OfficialNpz(paths)
        _check_parts_agree(self.ckpt)
        is_vae = variant == vae.VARIANT or (
            variant is None
            and config_file is None
            and config is None
            and vae.is_vae(self.ckpt.keys())
        )
        if is_vae:
            vae.check_layout(self.ckpt)
            config, vae_config = None, dict(vae.CONFIG)
            specs = {k: (i.shape, i.dtype) for k, i in self.ckpt.arrays.items()}
        else:
            config, vae_config = _resolve_config(self.ckpt, variant, config_file, config), None
            check_official_layout(self.ckpt, config)
            specs = {}
            for rule in weight_rules(config):
                info = self.ckpt.arrays[rule.official]
                meta = torch.empty(info.shape, dtype=info.dtype, device="meta")
                specs.update({k: (tuple(t.shape), t.dtype) for k, t in to_ours(rule, meta).items()})
        official = {
            k: {"shape": list(i.shape), "dtype": TORCH_DTYPE_NAMES[i.dtype]}
            for k, i in sorted(self.ckpt.arrays.items())
        }
        tokenizer = _find_tokenizer(self.ckpt.paths[0].parent)
        super().__init__(
            self.ckpt.paths, specs, config, vae_config, official, check_finite, tokenizer
        )

    def tensors(self, progress: Progress) -> Iterator[tuple[str, Chunks]]:
        if self.config is None:  # the VAE: names kept, arrays as stored
            for key in self.ckpt.keys():
                yield key, self._rows(key, progress, _CHUNK_BYTES)
            return
        for rule in weight_rules(self.config):
            if rule.stacked:  # one layer at a time: the whole stack can be many GB
                for i, layer in enumerate(self._rows(rule.official, progress)):
                    names = rule.our_names(i)
                    for name, t in zip(names, rule.transform.to_ours(layer[0]), strict=True):
                        yield name, iter([t])
            elif rule.transform is IDENTITY:  # e.g. the embedding: streamed in row chunks
                yield rule.our_names()[0], self._rows(rule.official, progress, _CHUNK_BYTES)
            else:
                whole = torch.cat(list(self._rows(rule.official, progress, _CHUNK_BYTES)))
                for name, t in to_ours(rule, whole).items():
                    yield name, iter([t])

    def _rows(self, key: str, progress: Progress, max_bytes: int = 0) -> Chunks:
        """Reads `key` in slices along axis 0 (one row, or as many as fit in max_bytes)."""
        info = self.ckpt.arrays[key]
        row_bytes = max(1, info.nbytes // max(1, info.shape[0] if info.shape else 1))
        start = 0
        for chunk in self.ckpt.iter_rows(key, max(1, max_bytes // row_bytes)):
            if self.check_finite:
                ours.check_finite(chunk, f"{info.path}: {key!r}", start)
            progress.update(chunk.nbytes)
            start += chunk.shape[0]
            yield chunk if info.shape else chunk.reshape(())


class ConvertedSource(Source):
    """One of our checkpoint directories (see formats.ours)."""

    def __init__(self, directory: str | Path, check_finite: bool = True):
        self.directory = Path(directory)
        raw = ours.read_config(self.directory)
        self.weight_map = ours.weight_map(self.directory)
        specs = ours.tensor_specs(self.directory, quantized=ours.QUANTIZATION_KEY in raw)
        manifest_path = self.directory / ours.MANIFEST_FILE
        official = {}
        if manifest_path.is_file():
            official = ours.read_json(manifest_path).get("official_arrays", {})
        quantization = None
        if raw.get("model_type", ours.MODEL_TYPE) == vae.VARIANT:
            config, vae_config = None, raw
            expected = {k: (s, None) for k, s in vae.SHAPES.items()}
            expected.update({k: v for k, v in specs.items() if k.startswith(vae.ENCODER_PREFIX)})
        elif raw.get("model_type", ours.MODEL_TYPE) != ours.MODEL_TYPE:
            raise CheckpointError(
                f"{self.directory / ours.CONFIG_FILE}: model_type {raw['model_type']!r} is "
                f"neither {ours.MODEL_TYPE!r} nor {vae.VARIANT!r}"
            )
        else:
            try:
                config, vae_config = PaliGemmaConfig.from_dict(raw), None
            except (TypeError, ValueError) as e:
                raise CheckpointError(
                    f"{self.directory / ours.CONFIG_FILE}: invalid config: {e}"
                ) from e
            quantization = ours.read_quantization(raw, self.directory)
            with torch.device("meta"):
                model = PaliGemmaModel(config)
            expected = {k: (tuple(v.shape), None) for k, v in model.state_dict().items()}
            if quantization is not None:
                expected = quantized_specs(model, expected, quantization)
        check_layout(self.directory, {k: s for k, (s, _) in expected.items()},
                     {k: s for k, (s, _) in specs.items()}, files=self.weight_map)
        self._check_dtypes(expected, specs, quantization)
        files = sorted(set(self.weight_map.values()))
        super().__init__(
            files, specs, config, vae_config, official, check_finite,
            _find_tokenizer(self.directory), quantization,
        )

    def _check_dtypes(self, expected: Specs, specs: Specs, q: Quantization | None) -> None:
        """Quantized tensors must have exactly the dtype their mode stores, the others a float
        dtype: a mismatch names the file and key."""
        for name, (_, dtype) in specs.items():
            want = expected.get(name, (None, None))[1]
            if dtype == want or (want is None and dtype in DTYPES.values()):
                continue
            record = f"quantization {q.to_dict()}" if q else "no quantization"
            wanted = dtype_name(want) if want is not None else "a float dtype"
            raise CheckpointError(
                f"{self.weight_map[name]}: {name!r} has dtype {dtype_name(dtype)}, expected "
                f"{wanted} ({self.directory / ours.CONFIG_FILE} records {record})"
            )

    def read(self, name: str) -> torch.Tensor:
        """One tensor (our name), memory-mapped; checked for NaN/Inf if asked."""
        tensor = ours.read_tensor(self.weight_map[name], name)
        if self.check_finite:
            ours.check_finite(tensor, f"{self.weight_map[name]}: {name!r}")
        return tensor

    def tensors(self, progress: Progress) -> Iterator[tuple[str, Chunks]]:
        for name in self.specs:
            tensor = self.read(name)
            progress.update(tensor.nbytes)
            yield name, iter([tensor])


class HFSource(ConvertedSource):
    """A Hugging Face transformers PaliGemma directory (see formats.hf_import)."""

    def __init__(self, directory: str | Path, check_finite: bool = True):
        self.directory = Path(directory)
        raw = ours.read_config(self.directory)
        stored = ours.tensor_specs(self.directory)
        where = self.directory
        embedding = next(
            (spec for name, spec in stored.items()
             if hf_import.canonical_name(name) == hf_import.EMBEDDING),
            None,
        )
        if embedding is None:
            raise CheckpointError(f"{where}: missing tensor {hf_import.EMBEDDING!r}")
        config = hf_import.config_from_hf(raw, embedding, where / ours.CONFIG_FILE)
        self.names = hf_import.our_names(config, stored, where)  # stored -> ours
        stored_map = ours.weight_map(self.directory)
        self.weight_map = {our: stored_map[name] for name, our in self.names.items()}
        self._stored_name = {our: name for name, our in self.names.items()}
        with torch.device("meta"):
            shapes = {k: tuple(t.shape) for k, t in PaliGemmaModel(config).state_dict().items()}
        specs = {our: (shapes[our], stored[name][1]) for name, our in self.names.items()}
        files = sorted(set(stored_map.values()))
        # Source's fields directly: ConvertedSource.__init__ reads our layout, not this one.
        Source.__init__(
            self, files, specs, config, None, {}, check_finite, _find_tokenizer(self.directory)
        )

    def read(self, name: str) -> torch.Tensor:
        """One tensor (our name) in our layout, memory-mapped; checked for NaN/Inf if asked."""
        path, stored = self.weight_map[name], self._stored_name[name]
        tensor = hf_import.from_hf_tensor(name, ours.read_tensor(path, stored), self.config)
        if self.check_finite:
            ours.check_finite(tensor, f"{path}: {stored!r}")
        return tensor


def open_checkpoint(
    srcs: str | Path | list[str | Path],
    variant: str | None = None,
    config_file: str | Path | None = None,
    check_finite: bool = True,
) -> Source:
    """Opens and checks a checkpoint: one directory (ours, or a Hugging Face transformers one),
    or official `.npz` file(s) / parts. variant / config_file apply to `.npz` only (detected
    from the shapes by default)."""
    srcs = [srcs] if isinstance(srcs, (str, Path)) else list(srcs)
    if len(srcs) == 1 and Path(srcs[0]).is_dir():
        if variant or config_file:
            raise CheckpointError(
                f"{srcs[0]}: a checkpoint directory carries its own config; "
                "--variant / --config apply to .npz sources only"
            )
        if hf_import.is_hf_config(ours.read_config(srcs[0])):
            return HFSource(srcs[0], check_finite)
        return ConvertedSource(srcs[0], check_finite)
    return OfficialSource(srcs, variant, config_file, check_finite)


def _find_tokenizer(directory: Path) -> Path | None:
    return next((directory / f for f in TOKENIZER_FILES if (directory / f).is_file()), None)


def _resolve_config(
    ckpt: OfficialNpz,
    variant: str | None,
    config_file: str | Path | None,
    config: PaliGemmaConfig | None = None,
) -> PaliGemmaConfig:
    if sum(x is not None for x in (variant, config_file, config)) > 1:
        raise CheckpointError("give --variant or --config, not both")
    if config is not None:
        return resolve_config(ckpt, config)
    if variant:
        if variant not in VARIANTS:
            known = ", ".join([*VARIANTS, vae.VARIANT])
            raise CheckpointError(f"unknown variant {variant!r}; known: {known}")
        return resolve_config(ckpt, VARIANTS[variant])
    if config_file:
        try:
            config = PaliGemmaConfig.load(config_file)
        except (OSError, TypeError, ValueError) as e:
            raise CheckpointError(f"{config_file}: not a usable config file: {e}") from e
        return resolve_config(ckpt, config)
    try:
        return resolve_config(ckpt, None)
    except CheckpointError as e:
        raise CheckpointError(f"{e}{_closest_variant_hint(ckpt)}") from None


def _closest_variant_hint(ckpt: OfficialNpz) -> str:
    """Why the closest official variant does not fit, to make detection failures actionable."""
    shapes = ckpt.shapes()

    def score(cfg: PaliGemmaConfig) -> int:
        return sum(shapes.get(k) == s for k, s in official_shapes(cfg).items())

    scores = {name: score(cfg) for name, cfg in VARIANTS.items()}
    name = max(scores, key=scores.get)
    if not scores[name]:
        return " (no official variant shares a single array shape with it)"
    try:
        check_official_layout(ckpt, VARIANTS[name])
    except CheckpointError as e:
        return f"; closest official variant {name}: {e}"
    return ""


def _check_parts_agree(ckpt: OfficialNpz) -> None:
    """Parts of one release share a dtype: parts stored in different dtypes were mixed up."""
    dtypes: dict[Path, set[torch.dtype]] = {}
    for info in ckpt.arrays.values():
        dtypes.setdefault(info.path, set()).add(info.dtype)
    uniform = {path: next(iter(d)) for path, d in dtypes.items() if len(d) == 1}
    if len(dtypes) > 1 and len(uniform) == len(dtypes) and len(set(uniform.values())) > 1:
        listing = ", ".join(f"{p} ({TORCH_DTYPE_NAMES[d]})" for p, d in uniform.items())
        raise CheckpointError(
            f"parts of different checkpoints: {listing} are stored in different dtypes"
        )
    keys = ckpt.keys()
    if vae.is_vae(keys) and any(k.startswith(("img/", "llm/")) for k in keys):
        raise CheckpointError(
            f"{', '.join(map(str, ckpt.paths))}: mixes segmentation VAE keys with PaliGemma keys"
        )
