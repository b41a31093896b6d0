"""Streaming access to official big_vision `.npz` checkpoints, one array (or one layer) at a time.

`np.savez` stores each array as an uncompressed `.npy` member of a zip file, so headers (shape,
dtype) can be read without touching the data, and each array, or each slice along its leading
(layer) axis, can be read on its own: memory stays bounded by the largest slice read, not by the
checkpoint. `NpzWriter` writes the same format one member at a time, from chunks. Nothing is ever
unpickled.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PARAMS_PREFIX = "params/"
# numpy has no bfloat16: big_vision's checkpoints store it as raw 2-byte void (`|V2`).
_NUMPY_TO_TORCH = {"float32": torch.float32, "float16": torch.float16, "V2": torch.bfloat16}
_TORCH_TO_NUMPY = {
    torch.float32: np.dtype("<f4"),
    torch.float16: np.dtype("<f2"),
    torch.bfloat16: np.dtype("V2"),
}
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_READ_CHUNK = 16 << 20  # bytes per read call: bounds the temporary copy zipfile makes


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the key at fault."""


@dataclass(frozen=True)
class ArrayInfo:
    path: Path
    member: str  # zip member name, e.g. "params/llm/final_norm/scale.npy"
    shape: tuple[int, ...]
    dtype: torch.dtype
    fortran_order: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class OfficialNpz:
    """The arrays of one checkpoint, possibly split over several `.npz` parts.

    Keys are canonical big_vision names without the `params/` prefix (`llm/final_norm/scale`);
    files with and without the prefix are both accepted.
    """

    def __init__(self, paths: str | Path | Iterable[str | Path]):
        paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        if not paths:
            raise CheckpointError("no checkpoint file given")
        self.paths = paths
        self.arrays: dict[str, ArrayInfo] = {}
        for path in paths:
            for key, info in _read_headers(path).items():
                if key in self.arrays:
                    raise CheckpointError(f"{path}: key {key!r} is also in {self.arrays[key].path}")
                self.arrays[key] = info

    def keys(self) -> list[str]:
        return list(self.arrays)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: info.shape for k, info in self.arrays.items()}

    def read(self, key: str) -> torch.Tensor:
        """The stored array as a CPU tensor of its stored dtype (bf16 included)."""
        info = self.arrays[key]
        with zipfile.ZipFile(info.path) as zf, zf.open(info.member) as f:
            try:
                array = np.lib.format.read_array(f, allow_pickle=False)
            except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
                raise CheckpointError(f"{info.path}: cannot read {key!r}: {e}") from e
        return _to_torch(array, info.dtype)

    def iter_rows(self, key: str, max_rows: int = 1) -> Iterator[torch.Tensor]:
        """The array in consecutive slices along axis 0, [n <= max_rows, *shape[1:]] each.

        Only one slice is in memory at a time: reading a scan-stacked array layer by layer
        costs one layer, not the stack. A 0-d array comes as a single [1] slice.
        """
        info = self.arrays[key]
        if info.fortran_order:  # no official file has one; correctness over memory here
            yield from self.read(key).reshape(-1, *info.shape[1:]).split(max_rows)
            return
        rows = info.shape[0] if info.shape else 1
        row_shape = info.shape[1:]
        row_bytes = math.prod(row_shape) * info.dtype.itemsize
        np_dtype = _TORCH_TO_NUMPY[info.dtype]
        with zipfile.ZipFile(info.path) as zf, zf.open(info.member) as f:
            try:
                _read_header(f)
                for start in range(0, rows, max_rows):
                    n = min(max_rows, rows - start)
                    buf = np.empty((n, *row_shape), np_dtype)
                    _read_exact(f, memoryview(buf.reshape(-1).view(np.uint8)), n * row_bytes)
                    yield _to_torch(buf, info.dtype)
            except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
                raise CheckpointError(f"{info.path}: cannot read {key!r}: {e}") from e


def _to_torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _read_exact(f: io.BufferedIOBase, out: memoryview, nbytes: int) -> None:
    pos = 0
    while pos < nbytes:
        piece = f.read(min(_READ_CHUNK, nbytes - pos))
        if not piece:
            raise EOFError(f"array data ends after {pos} of {nbytes} bytes")
        out[pos : pos + len(piece)] = piece
        pos += len(piece)


def _read_header(f: io.BufferedIOBase) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _open_zip(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        with open(path, "rb") as f:
            is_zip_start = f.read(4) == b"PK\x03\x04"
        what = (
            "truncated or corrupt .npz (zip) archive" if is_zip_start else "not an .npz (zip) file"
        )
        raise CheckpointError(f"{path}: {what}: {e}") from e


def _read_headers(path: Path) -> dict[str, ArrayInfo]:
    arrays = {}
    with _open_zip(path) as zf:
        for member in zf.namelist():
            if not member.endswith(".npy"):
                raise CheckpointError(f"{path}: unexpected member {member!r} (not an .npy array)")
            key = member[: -len(".npy")].removeprefix(PARAMS_PREFIX)
            try:
                with zf.open(member) as f:
                    shape, fortran_order, dtype = _read_header(f)
            except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
                raise CheckpointError(f"{path}: cannot read the header of {key!r}: {e}") from e
            if dtype.hasobject:
                raise CheckpointError(
                    f"{path}: {key!r} is an object (pickled) array, dtype {dtype.str!r}; "
                    "refusing to unpickle it"
                )
            name = "V2" if dtype == np.dtype("V2") else dtype.name
            if name not in _NUMPY_TO_TORCH or dtype.byteorder == ">":
                raise CheckpointError(
                    f"{path}: {key!r} has unsupported dtype {dtype.str!r} "
                    "(expected float32, float16 or bfloat16 stored as |V2)"
                )
            arrays[key] = ArrayInfo(
                path, member, tuple(shape), _NUMPY_TO_TORCH[name], fortran_order
            )
    return arrays


class NpzWriter:
    """Writes an `.npz` one member at a time from chunks, as `np.savez` lays it out.

    Members are stored uncompressed (zip64 when large), so `OfficialNpz` and `np.load` read them
    back; bf16 is written as `|V2`. Usage: `with NpzWriter(path) as w: w.add(key, shape, dtype,
    chunks)` where the chunks, in C order, concatenate to the array.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._zip = zipfile.ZipFile(self.path, "w", zipfile.ZIP_STORED, allowZip64=True)

    def add(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        chunks: Iterable[torch.Tensor],
    ) -> None:
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header,
            {
                "descr": np.lib.format.dtype_to_descr(_TORCH_TO_NUMPY[dtype]),
                "fortran_order": False,
                "shape": tuple(shape),
            },
        )
        nbytes = math.prod(shape) * dtype.itemsize
        # Fixed timestamp: the same arrays give the same file.
        info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
        info.file_size = len(header.getvalue()) + nbytes
        written = 0
        with self._zip.open(info, "w", force_zip64=True) as f:
            f.write(header.getvalue())
            for chunk in chunks:
                data = tensor_bytes(chunk.to(dtype))
                f.write(data)
                written += len(data)
        if written != nbytes:
            raise ValueError(f"{self.path}: {name!r} got {written} bytes, expected {nbytes}")

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of `t` in C order (a view when `t` is contiguous)."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
