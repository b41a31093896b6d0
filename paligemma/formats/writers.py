"""Where tensors go: our directory format, a Hugging Face directory, or an official `.npz`.

Every writer takes an opened `Source` (`formats.open`) and goes through
`paligemma.outputs.atomic`: output is written to a temporary sibling and renamed into place
only when complete; `--force` replaces only a previous output of the same kind.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import __version__, int4, outputs
from ..model import PaliGemmaModel
from ..quantize import Quantization, quantize_int8, quantized_modules, quantized_specs, stores_int4
from ..tokenizer import Tokenizer
from . import hf, hf_serve, ours, vae
from .dtypes import DTYPES, dtype_name
from .errors import CheckpointError
from .mapping import WeightRule, official_shapes, weight_rules
from .npz import PARAMS_PREFIX, NpzWriter
from .open import ConvertedSource, Source

_HASH_CHUNK = 16 << 20


def write_ours(
    source: Source,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_size: int = ours.DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    hash_sources: bool = False,
    quiet: bool = False,
    quantization: Quantization | None = None,
) -> None:
    """Our checkpoint directory: config.json, safetensors (sharded if large), manifest.json.

    dtype None keeps each tensor's stored dtype (of the tensors left unquantized).
    quantization: write a quantized checkpoint (`formats.ours`), each matrix quantized from
    the source's stored values exactly as `load_pretrained(..., quantize=mode)` would, one
    matrix (the embedding: a row chunk) at a time; it then loads memory-mapped, with nothing
    left to compute.
    """
    specs = {k: (shape, dtype or d) for k, (shape, d) in source.specs.items()}
    config = source.vae_config or {"model_type": ours.MODEL_TYPE, **source.config.to_dict()}
    split = None
    if quantization is not None:
        if source.config is None or source.quantization is not None:
            what = vae.VARIANT if source.config is None else "an already quantized checkpoint"
            raise CheckpointError(f"{source.files[0]}: --quantize cannot apply to {what}")
        if quantization.mode.startswith("int4") and quantization.int4_layout != int4.LAYOUT:
            raise ValueError(f"int4 checkpoints are written in int4 layout {int4.LAYOUT}, "
                             f"not {quantization.int4_layout}")
        with torch.device("meta"):
            model = PaliGemmaModel(source.config)
        specs = quantized_specs(model, specs, quantization)
        config[ours.QUANTIZATION_KEY] = quantization.to_dict()
        split = functools.partial(
            _quantized_tensors, quantized_modules(model, quantization.mode), quantization,
            {k: shape for k, (shape, _) in source.specs.items()},
        )
    with outputs.atomic(out_dir, "checkpoint", force) as tmp:
        manifest = _manifest(source, "paligemma", specs, hash_sources, quiet)
        _stream(source, tmp, specs, {k: k for k in specs}, max_shard_size, quiet, split=split)
        ours.write_json(tmp / ours.CONFIG_FILE, config)
        ours.write_json(tmp / ours.MANIFEST_FILE, manifest)


def _quantized_tensors(
    modules: set[str],
    q: Quantization,
    shapes: dict[str, tuple[int, ...]],
    name: str,
    chunks: Iterator[torch.Tensor],
) -> Iterator[tuple[str, Iterator[torch.Tensor]]]:
    """(name, pieces) to write for one source tensor: itself, or its quantized weight then its
    scale. Both int8 and int4 quantize rows independently, so row pieces quantize one by one,
    with the quantizer the whole matrix's shape chose (`shapes`: the source's); int4 ones in
    whole blocks of `int4.BLOCK_ROWS` rows (`_row_blocks`)."""
    module, _, kind = name.rpartition(".")
    if module not in modules or kind != "weight":
        yield name, chunks
        return
    if stores_int4(shapes[name], q.mode, q.group_size):
        pieces = _row_blocks(chunks, int4.BLOCK_ROWS)
        quantize = functools.partial(int4.quantize_int4, group_size=q.group_size)
    else:
        pieces, quantize = chunks, quantize_int8
    scales: list[torch.Tensor] = []

    def weights() -> Iterator[torch.Tensor]:
        for piece in pieces:
            weight, scale = quantize(piece)
            scales.append(scale)
            yield weight

    yield name, weights()
    yield f"{module}.scale", iter([torch.cat(scales)])


def _row_blocks(chunks: Iterable[torch.Tensor], rows: int) -> Iterator[torch.Tensor]:
    """The rows of `chunks` (pieces along axis 0, of any heights) again, in pieces whose heights
    are multiples of `rows`, except a last one of whatever is left. Rows a piece leaves over
    (fewer than `rows`) are copied and completed from the next piece: at most a piece plus
    `rows` rows are held at a time."""
    carry = None
    for piece in chunks:
        if carry is not None:
            need = rows - carry.shape[0]
            carry, piece = torch.cat([carry, piece[:need]]), piece[need:]
            if carry.shape[0] < rows:
                continue
            yield carry
            carry = None
        whole = piece.shape[0] - piece.shape[0] % rows
        if whole:
            yield piece[:whole]
        if whole < piece.shape[0]:
            carry = piece[whole:].clone()  # not a view that keeps the whole piece alive
    if carry is not None:
        yield carry


def write_hf(
    source: Source,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_size: int = ours.DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    hash_sources: bool = False,
    quiet: bool = False,
    tokenizer: str | Path | None = None,
) -> None:
    """A transformers PaliGemmaForConditionalGeneration directory (see formats.hf) with what
    `AutoProcessor` and serving stacks read (formats.hf_serve). tokenizer: the SentencePiece
    file (default: the one next to the source's weights; without one, no tokenizer files)."""
    if source.config is None:
        raise CheckpointError(
            f"{vae.VARIANT} has no transformers equivalent; --to hf is for PaliGemma checkpoints"
        )
    _refuse_quantized(source, "hf")
    stored = {d for _, d in source.specs.values()}
    if dtype is None and len(stored) > 1:
        raise CheckpointError(f"mixed stored dtypes {sorted(map(str, stored))}: pass --dtype")
    out_dtype = dtype or stored.pop()
    tokenizer = tokenizer or source.tokenizer
    tok = _open_tokenizer(tokenizer) if tokenizer else None
    if tok is not None:
        hf_serve.check_tokenizer(tok, source.config)
    names = hf.hf_names(source.config, list(source.specs))
    specs = {
        names[k]: (hf.hf_shape(k, shape, source.config), out_dtype)
        for k, (shape, _) in source.specs.items()
    }
    config = hf.hf_config(source.config, out_dtype, hf_serve.special_ids(tok) if tok else None)
    with outputs.atomic(out_dir, "hf-checkpoint", force) as tmp:
        manifest = _manifest(source, "transformers-paligemma", specs, hash_sources, quiet)
        chunks = functools.partial(hf.hf_chunks, source.config)
        _stream(source, tmp, specs, names, max_shard_size, quiet, chunks)
        ours.write_json(tmp / ours.CONFIG_FILE, config)
        ours.write_json(tmp / ours.MANIFEST_FILE, manifest)
        hf_serve.write_serving_files(tmp, source.config, tok)
        (tmp / "README.md").write_text(hf.hf_readme(source.config, out_dtype, tok is not None))


def _refuse_quantized(source: Source, to: str) -> None:
    if source.quantization is not None:
        raise CheckpointError(
            f"{source.files[0]}: a quantized checkpoint ({source.quantization.mode}) cannot be "
            f"written --to {to}; convert the unquantized checkpoint it was written from"
        )


def _open_tokenizer(path: str | Path) -> Tokenizer:
    try:
        return Tokenizer(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a usable tokenizer: {e}") from e


def write_npz(
    source: ConvertedSource,
    out_file: str | Path,
    dtype: torch.dtype | None = None,
    force: bool = False,
    quiet: bool = False,
) -> None:
    """The official layout again: `params/` keys, scan-stacked layers, bf16 as `|V2`.

    Each array gets its original dtype (from the manifest; else the stored one) unless `dtype`
    is given. Written one member, and within a member one layer, at a time.
    """
    if not isinstance(source, ConvertedSource):
        raise CheckpointError("--to npz reads a converted directory (SRC must be one directory)")
    _refuse_quantized(source, "npz")

    def out_dtype(key: str, stored: torch.dtype) -> torch.dtype:
        original = source.official.get(key, {}).get("dtype")
        return dtype or (DTYPES[original] if original in DTYPES else stored)

    bar = _progress(source.nbytes, quiet, f"writing {Path(out_file).name}")
    with (outputs.atomic(out_file, "npz", force) as tmp,
          NpzWriter(tmp, comment=outputs.npz_comment()) as npz):
        if source.config is None:  # the VAE: same keys, no prefix
            for name, (shape, stored) in source.specs.items():
                tensor = source.read(name)
                npz.add(name, shape, out_dtype(name, stored), ours.split_rows(tensor))
                bar.update(tensor.nbytes)
            bar.close()
            return
        shapes = official_shapes(source.config)
        for rule in sorted(weight_rules(source.config), key=lambda r: r.official):
            stored = source.specs[rule.our_names(0 if rule.stacked else None)[0]][1]
            layers = range(shapes[rule.official][0]) if rule.stacked else [None]
            npz.add(
                PARAMS_PREFIX + rule.official,
                shapes[rule.official],
                out_dtype(rule.official, stored),
                _official_chunks(source, rule, layers, bar),
            )
        bar.close()


def _official_chunks(
    source: ConvertedSource, rule: WeightRule, layers: Iterable[int | None], bar: tqdm
) -> Iterator[torch.Tensor]:
    """One official array, layer by layer (in C order), from our tensors."""
    for i in layers:
        tensors = [source.read(n) for n in rule.our_names(i)]
        yield from ours.split_rows(rule.transform.to_official(*tensors))
        bar.update(sum(t.nbytes for t in tensors))


def _stream(
    source: Source,
    directory: Path,
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    names: dict[str, str],
    max_shard_size: int,
    quiet: bool,
    transform: Callable[[str, Iterator[torch.Tensor]], Iterator[torch.Tensor]] | None = None,
    split: Callable[[str, Iterator[torch.Tensor]], Iterable[tuple[str, Iterator[torch.Tensor]]]]
    | None = None,
) -> None:
    """Writes every source tensor (chunks: `transform`'s; `split`: the tensors it becomes)."""
    bar = _progress(source.nbytes, quiet, "converting")
    with ours.SafetensorsWriter(directory, specs, max_shard_size) as writer:
        for name, chunks in source.tensors(bar):
            if transform is not None:
                chunks = transform(name, chunks)
            for out, pieces in split(name, chunks) if split else [(name, chunks)]:
                writer.write(names[out], pieces)
    bar.close()


def _manifest(
    source: Source,
    fmt: str,
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    hash_sources: bool,
    quiet: bool,
) -> dict[str, Any]:
    dtypes = sorted({dtype_name(d) for _, d in specs.values()})
    return {
        "format": fmt,
        "converter": "paligemma-convert",
        "converter_version": __version__,
        "torch_version": torch.__version__,
        "variant": (source.config.name if source.config else vae.VARIANT),
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "sources": [
            {
                "file": path.name,
                "bytes": path.stat().st_size,
                "sha256": _sha256(path, quiet) if hash_sources else None,
            }
            for path in source.files
        ],
        "official_arrays": source.official,
    }


def _sha256(path: Path, quiet: bool) -> str:
    digest = hashlib.sha256()
    bar = _progress(path.stat().st_size, quiet, f"sha256 {path.name}")
    with open(path, "rb") as f:
        while block := f.read(_HASH_CHUNK):
            digest.update(block)
            bar.update(len(block))
    bar.close()
    return digest.hexdigest()


def _progress(total: int, quiet: bool, desc: str) -> tqdm:
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=quiet,
        file=sys.stderr,
        leave=False,
    )
