"""Our checkpoint directory: `config.json` + safetensors weights, the usual Hugging Face layout.

    config.json                    {"model_type": "paligemma", "vision": {...}, "text": {...},
                                    "name": ...} (PaliGemmaConfig.to_dict()), or another
                                    model_type such as "vae-oid" (see convert/); a quantized
                                    checkpoint adds "quantization": {"mode": "int4",
                                    "group_size": 128, "int4_layout": 2}
                                    (`quantize.Quantization`; group_size and int4_layout for
                                    int4 modes only)
    model.safetensors              every tensor, PaliGemmaModel.state_dict() names, or when
                                   larger than the shard limit:
    model-00001-of-0000N.safetensors ... + model.safetensors.index.json
                                   {"metadata": {"total_size": bytes}, "weight_map": {name: file}}
    manifest.json                  optional (written by the converter): sources and versions

A quantized checkpoint (`paligemma-convert --quantize`) stores each quantized weight as
`quantize_(model, mode)` holds it: `<module>.weight` int8 [N, K] with `<module>.scale` float32
[N], or packed int4 uint8 [N, K / 2] with `<module>.scale` float32 [N, K / G, 2] in the layout
"int4_layout" names (`paligemma.int4` documents layout 2, `int4.LAYOUT`, which the converter
writes). Loading maps these as they are: nothing is quantized again. An int4 record without
"int4_layout" is layout 1 (checkpoints written before the layout changed): `formats.load`
converts each packed matrix to layout 2 as it reads it (`int4.from_layout_1`, a copy in memory
on every load; one whose N is not a multiple of 16 cannot be converted), and re-writing it with
`paligemma-convert --quantize` from the unquantized checkpoint lets it load mapped again.

Reading is header-first (`tensor_specs`) and then one memory-mapped tensor at a time
(`read_tensor`; `formats.load` builds the model from them without a second copy). Writing plans
every tensor's byte range up front and streams each tensor, in chunks, to its place in its
shard: memory stays bounded by one chunk, not by a shard.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from ..model import PaliGemmaModel
from ..quantize import Quantization
from .dtypes import QUANTIZED_DTYPES, SAFETENSORS_DTYPES, from_safetensors
from .errors import CheckpointError
from .npz import tensor_bytes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
MANIFEST_FILE = "manifest.json"
MODEL_TYPE = "paligemma"
QUANTIZATION_KEY = "quantization"
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9  # bytes; the Hugging Face default ("5GB")
CHUNK_BYTES = 64 << 20  # tensors are converted and written in pieces of about this size
_FINITE_CHECK_ELEMENTS = 1 << 24  # bounds the temporary bool mask that locates a NaN/Inf


# ---------------------------------------------------------------------------------------------
# Reading


def read_config(directory: str | Path) -> dict[str, Any]:
    """The raw `config.json` of a checkpoint directory."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {CONFIG_FILE} (not a converted checkpoint)")
    return read_json(path)


def read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return obj


def read_quantization(raw: dict[str, Any], directory: str | Path) -> Quantization | None:
    """The quantization a checkpoint's config records (None: not quantized)."""
    if QUANTIZATION_KEY not in raw:
        return None
    try:
        return Quantization.from_dict(raw[QUANTIZATION_KEY])
    except ValueError as e:
        raise CheckpointError(
            f"{Path(directory) / CONFIG_FILE}: invalid {QUANTIZATION_KEY!r}: {e}"
        ) from None


def weight_map(directory: str | Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of a checkpoint directory (sharded or single file)."""
    directory = Path(directory)
    index = directory / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            files = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index: {e}") from e
        mapping = {name: directory / file for name, file in files.items()}
    elif (directory / WEIGHTS_FILE).is_file():
        with _open_safetensors(directory / WEIGHTS_FILE) as f:
            mapping = dict.fromkeys(f.keys(), directory / WEIGHTS_FILE)
    else:
        raise CheckpointError(f"{directory}: no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}")
    for path in set(mapping.values()):
        if not path.is_file():
            raise CheckpointError(f"{path}: shard listed in {WEIGHTS_INDEX_FILE} is missing")
    return mapping


def shards(directory: str | Path) -> dict[Path, list[str]]:
    """{safetensors file: names of the tensors it holds}."""
    by_file: dict[Path, list[str]] = {}
    for name, path in weight_map(directory).items():
        by_file.setdefault(path, []).append(name)
    return by_file


def tensor_specs(
    directory: str | Path, quantized: bool = False
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of every stored tensor, from the headers only. Float dtypes only,
    unless the checkpoint is `quantized` (then int8 and uint8 too)."""
    specs = {}
    for path, names in shards(directory).items():
        with _open_safetensors(path) as f:
            stored = set(f.keys())
            for name in names:
                if name not in stored:
                    raise CheckpointError(f"{path}: no tensor {name!r} (listed in the index)")
                sl = f.get_slice(name)
                dtype = from_safetensors(sl.get_dtype())
                if dtype is None or (dtype in QUANTIZED_DTYPES.values() and not quantized):
                    raise CheckpointError(
                        f"{path}: {name!r} has unsupported dtype {sl.get_dtype()}"
                    )
                specs[name] = (tuple(sl.get_shape()), dtype)
    return specs


def read_tensor(path: str | Path, name: str) -> torch.Tensor:
    """One tensor, memory-mapped. The file's mapping lives only as long as the tensor, so
    reading tensors one after another keeps one tensor's pages resident, not the file's."""
    with _open_safetensors(path) as f:
        return f.get_tensor(name)


def check_finite(t: torch.Tensor, where: str, row_offset: int = 0) -> None:
    """Raises CheckpointError naming the first NaN/Inf of `t` and its index (rows counted from
    `row_offset`). Cheap when all is well: one sum, no temporary mask. Integer tensors
    (quantized weights) hold no NaN/Inf and are not read."""
    # A sum is NaN/Inf whenever an element is, so a finite sum clears the tensor. It is taken in
    # the stored dtype: torch accumulates bf16/f16 in float32 anyway, while sum(dtype=float32)
    # converts element by element first, about 9x slower on bf16 (measured 1.0 vs 9 GB/s on 2
    # cores: that conversion was most of a checkpoint's load time, warm or cold). A sum that
    # overflows the stored dtype (f16 past 65504) only sends us to the exact scan below.
    if t.numel() == 0 or not t.is_floating_point() or torch.isfinite(t.sum()):
        return
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHECK_ELEMENTS):
        bad = ~torch.isfinite(flat[start : start + _FINITE_CHECK_ELEMENTS])
        if bad.any():
            i = start + int(bad.nonzero()[0, 0])
            index = [int(x) for x in np.unravel_index(i, tuple(t.shape))] if t.dim() else []
            if index:
                index[0] += row_offset
            raise CheckpointError(
                f"{where} has {float(flat[i])} at index {index}: the checkpoint holds NaN/Inf "
                "weights (a broken download or training run); it cannot give sensible outputs"
            )


def load_state_dict(
    directory: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, memory-mapped (dtype None keeps the stored one).

    With a dtype change, only one shard's file pages are mapped at a time next to the
    converted tensors. Every tensor is checked for NaN/Inf (`check_finite`).
    """
    state = {}
    for path, names in shards(directory).items():
        with _open_safetensors(path, device) as f:
            for name in names:
                tensor = f.get_tensor(name)
                check_finite(tensor, f"{path}: {name!r}")
                state[name] = tensor if dtype is None else tensor.to(dtype)
    return state


def _open_safetensors(path: Path, device: torch.device | str = "cpu") -> safe_open:
    try:
        return safe_open(path, framework="pt", device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file: {e}") from e


# ---------------------------------------------------------------------------------------------
# Writing


class SafetensorsWriter:
    """Streams planned tensors into one or more safetensors files.

    `specs` ({name: (shape, dtype)}, in write order) fixes every tensor's byte range before any
    data is written, so the header goes first and each tensor is then written, chunk by chunk,
    straight to its place. Tensors go to shards in order, a new shard starting when the next
    tensor would pass `max_shard_size`; within a shard, wider dtypes come first so that every
    tensor stays aligned to its element size (memory-mapped loading needs that).

    Use as a context manager: a clean exit checks that every tensor was written and writes the
    index file when there are several shards.
    """

    def __init__(
        self,
        directory: str | Path,
        specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
    ):
        self.directory = Path(directory)
        shards: list[list[str]] = [[]]
        size = 0
        for name, (shape, dtype) in specs.items():
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        n = len(shards)
        files = (
            [WEIGHTS_FILE]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self.total_size = 0
        self.weight_map: dict[str, str] = {}
        self._where: dict[str, tuple[int, int, int, torch.dtype]] = {}  # fd, begin, end, dtype
        self._fds: dict[int, Path] = {}
        for file, names in zip(files, shards, strict=True):
            path = self.directory / file
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[fd] = path
            names = sorted(names, key=lambda k: -specs[k][1].itemsize)  # stable
            header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {})}}
            offset = 0
            for name in names:
                shape, dtype = specs[name]
                end = offset + math.prod(shape) * dtype.itemsize
                header[name] = {
                    "dtype": SAFETENSORS_DTYPES[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, end],
                }
                self.weight_map[name] = file
                offset = end
            # Pad the header with spaces to 8 bytes, as the format allows, to keep data aligned.
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            for name in names:
                begin, end = header[name]["data_offsets"]
                self._where[name] = (fd, 8 + len(blob) + begin, 8 + len(blob) + end, specs[name][1])
            self._write(fd, "the header", 0, len(blob).to_bytes(8, "little") + blob)
            self.total_size += offset
        self._pending = set(specs)

    def write(self, name: str, chunks: torch.Tensor | Iterable[torch.Tensor]) -> None:
        """Writes tensor `name`, given whole or as pieces that concatenate along axis 0."""
        fd, begin, end, dtype = self._where[name]
        pos = begin
        for chunk in [chunks] if isinstance(chunks, torch.Tensor) else chunks:
            for piece in split_rows(chunk):
                data = tensor_bytes(piece.to(dtype))
                if pos + len(data) > end:
                    raise ValueError(f"{self._fds[fd]}: {name!r} is larger than planned")
                self._write(fd, repr(name), pos, data)
                pos += len(data)
        if pos != end:
            raise ValueError(
                f"{self._fds[fd]}: {name!r} has {pos - begin} bytes, planned {end - begin}"
            )
        self._pending.discard(name)

    def _write(self, fd: int, what: str, offset: int, data: memoryview | bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            raise OSError(e.errno, f"{self._fds[fd]}: cannot write {what}: {e.strerror}") from e

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        try:
            if exc_type is None:  # on disk before the output is renamed into place
                for fd in self._fds:
                    os.fsync(fd)
        finally:
            for fd in self._fds:
                os.close(fd)
        if exc_type is not None:
            return
        if self._pending:
            raise ValueError(
                f"{self.directory}: tensors never written: {sorted(self._pending)[:3]}"
            )
        if len(self._fds) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            write_json(self.directory / WEIGHTS_INDEX_FILE, index)


def split_rows(t: torch.Tensor, max_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
    """Views of `t` along axis 0, each about `max_bytes` or less (at least one row)."""
    if t.dim() == 0 or t.nbytes <= max_bytes:
        yield t
        return
    rows = max(1, max_bytes // max(1, t[0].nbytes))
    yield from t.split(rows)


def save_pretrained(
    model: PaliGemmaModel,
    directory: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
) -> None:
    """Writes `model` into `directory` (created if needed) as a checkpoint that
    `load_pretrained` reads. Files there are overwritten: commands write through
    `paligemma.outputs.atomic` (see `finetune.save_model`). Quantized checkpoints are written
    from an unquantized one by `formats.writers.write_ours` (`paligemma-convert --quantize`)."""
    if any(p.dtype in (torch.int8, torch.uint8) for p in model.parameters()):
        raise ValueError(
            "save_pretrained writes unquantized models; write a quantized checkpoint from the "
            "unquantized one with paligemma-convert SRC -o OUT --quantize MODE"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    specs = {k: (tuple(v.shape), dtype or v.dtype) for k, v in state.items()}
    with SafetensorsWriter(directory, specs, max_shard_size) as writer:
        for name, tensor in state.items():
            writer.write(name, tensor.detach().cpu())
    write_json(directory / CONFIG_FILE, {"model_type": MODEL_TYPE, **model.config.to_dict()})


def write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
