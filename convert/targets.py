"""Where tensors go: our directory format, a Hugging Face directory, or an official `.npz`.

Every writer goes through `paligemma.outputs.atomic`: output is written to a temporary sibling
and renamed into place only when complete; `--force` replaces only a previous output of the
same kind.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from paligemma import __version__, checkpoint, outputs
from paligemma.npz import PARAMS_PREFIX, TORCH_DTYPE_NAMES, NpzWriter
from paligemma.weights import WeightRule, official_shapes, weight_rules

from . import hf, vae
from .sources import ConversionError, ConvertedSource, Source

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HASH_CHUNK = 16 << 20


def write_ours(
    source: Source,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_size: int = checkpoint.DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    hash_sources: bool = False,
    quiet: bool = False,
) -> None:
    """Our checkpoint directory: config.json, safetensors (sharded if large), manifest.json.

    dtype None keeps each tensor's stored dtype.
    """
    specs = {k: (shape, dtype or d) for k, (shape, d) in source.specs.items()}
    config = source.vae_config or {"model_type": checkpoint.MODEL_TYPE, **source.config.to_dict()}
    with outputs.atomic(out_dir, "checkpoint", force) as tmp:
        manifest = _manifest(source, "paligemma", specs, hash_sources, quiet)
        _stream(source, tmp, specs, {k: k for k in specs}, max_shard_size, quiet)
        checkpoint.write_json(tmp / checkpoint.CONFIG_FILE, config)
        checkpoint.write_json(tmp / checkpoint.MANIFEST_FILE, manifest)


def write_hf(
    source: Source,
    out_dir: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_size: int = checkpoint.DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    hash_sources: bool = False,
    quiet: bool = False,
) -> None:
    """A transformers PaliGemmaForConditionalGeneration directory (see convert.hf)."""
    if source.config is None:
        raise ConversionError(
            f"{vae.VARIANT} has no transformers equivalent; --to hf is for PaliGemma checkpoints"
        )
    stored = {d for _, d in source.specs.values()}
    if dtype is None and len(stored) > 1:
        raise ConversionError(f"mixed stored dtypes {sorted(map(str, stored))}: pass --dtype")
    out_dtype = dtype or stored.pop()
    names = hf.hf_names(source.config, list(source.specs))
    specs = {names[k]: (hf.hf_shape(k, shape), out_dtype) for k, (shape, _) in source.specs.items()}
    config = hf.hf_config(source.config, out_dtype)
    with outputs.atomic(out_dir, "hf-checkpoint", force) as tmp:
        manifest = _manifest(source, "transformers-paligemma", specs, hash_sources, quiet)
        _stream(source, tmp, specs, names, max_shard_size, quiet, hf.hf_tensor)
        checkpoint.write_json(tmp / checkpoint.CONFIG_FILE, config)
        checkpoint.write_json(tmp / checkpoint.MANIFEST_FILE, manifest)
        (tmp / "README.md").write_text(hf.hf_readme(source.config, out_dtype))


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
        raise ConversionError("--to npz reads a converted directory (SRC must be one directory)")

    def out_dtype(key: str, stored: torch.dtype) -> torch.dtype:
        original = source.official.get(key, {}).get("dtype")
        return dtype or (DTYPES[original] if original in DTYPES else stored)

    bar = _progress(source.nbytes, quiet, f"writing {Path(out_file).name}")
    with (outputs.atomic(out_file, "npz", force) as tmp,
          NpzWriter(tmp, comment=outputs.npz_comment()) as npz):
        if source.config is None:  # the VAE: same keys, no prefix
            for name, (shape, stored) in source.specs.items():
                tensor = source.read(name)
                npz.add(name, shape, out_dtype(name, stored), checkpoint.split_rows(tensor))
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
        ours = [source.read(n) for n in rule.our_names(i)]
        yield from checkpoint.split_rows(rule.transform.to_official(*ours))
        bar.update(sum(t.nbytes for t in ours))


def _stream(
    source: Source,
    directory: Path,
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    names: dict[str, str],
    max_shard_size: int,
    quiet: bool,
    transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,  # per chunk
) -> None:
    bar = _progress(source.nbytes, quiet, "converting")
    with checkpoint.SafetensorsWriter(directory, specs, max_shard_size) as writer:
        for name, chunks in source.tensors(bar):
            if transform is not None:
                chunks = (transform(name, c) for c in chunks)
            writer.write(names[name], chunks)
    bar.close()


def _manifest(
    source: Source,
    fmt: str,
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    hash_sources: bool,
    quiet: bool,
) -> dict[str, Any]:
    dtypes = sorted({TORCH_DTYPE_NAMES[d] for _, d in specs.values()})
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
