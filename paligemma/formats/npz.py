"""Streaming access to official big_vision `.npz` checkpoints, one array (or one layer) at a time.

`np.savez` stores each array as an uncompressed `.npy` member of a zip file, so headers (shape,
dtype) can be read without touching the data, and each array, or each slice along its leading
(layer) axis, can be read on its own: memory stays bounded by the largest slice read, not by the
checkpoint. `NpzWriter` writes the same format one member at a time, from chunks. Nothing is ever
unpickled.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import math
import os
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import dtypes
from .errors import CheckpointError

PARAMS_PREFIX = "params/"
_READ_CHUNK = 16 << 20  # bytes per read call: bounds the temporary copy zipfile makes


@dataclass(frozen=True)
class ArrayInfo:
    path: Archive  # the file (or split parts) holding it; str() names it in messages
    member: str  # zip member name, e.g. "params/llm/final_norm/scale.npy"
    shape: tuple[int, ...]
    dtype: torch.dtype
    fortran_order: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class OfficialNpz:
    """The arrays of one checkpoint, from one `.npz` or several parts.

    Parts are either separate `.npz` files, each with some of the arrays, or the byte-split
    pieces of one `.npz` (Google ships the 28B checkpoints as `*.npz.part*` to be joined with
    `cat`), read here as one file without joining them on disk. Keys are canonical big_vision
    names without the `params/` prefix (`llm/final_norm/scale`); files with and without the
    prefix are both accepted.
    """

    def __init__(self, paths: str | Path | Iterable[str | Path]):
        paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
        if not paths:
            raise CheckpointError("no checkpoint file given")
        self.paths = paths
        self.arrays: dict[str, ArrayInfo] = {}
        for archive in _archives(paths):
            for key, info in _read_headers(archive).items():
                if key in self.arrays:
                    raise CheckpointError(
                        f"{archive}: key {key!r} is also in {self.arrays[key].path}"
                    )
                self.arrays[key] = info

    def keys(self) -> list[str]:
        return list(self.arrays)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: info.shape for k, info in self.arrays.items()}

    def read(self, key: str) -> torch.Tensor:
        """The stored array as a CPU tensor of its stored dtype (bf16 included)."""
        info = self.arrays[key]
        with info.path.open() as zf, zf.open(info.member) as f:
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
        np_dtype = dtypes.NUMPY_DTYPES[info.dtype]
        with info.path.open() as zf, zf.open(info.member) as f:
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


@dataclass(frozen=True)
class Archive:
    """One zip archive, stored in one file or split byte-wise over several (in order)."""

    parts: tuple[Path, ...]

    def __str__(self) -> str:
        if len(self.parts) == 1:
            return str(self.parts[0])
        return f"{self.parts[0]} (+{len(self.parts) - 1} more parts)"

    @contextlib.contextmanager
    def open(self) -> Iterator[zipfile.ZipFile]:
        f = _JoinedFile(self.parts) if len(self.parts) > 1 else open(self.parts[0], "rb")
        try:
            with zipfile.ZipFile(f) as zf:
                yield zf
        finally:
            f.close()


class _JoinedFile(io.RawIOBase):
    """Several files read as their concatenation (what `cat part* > file` would write)."""

    def __init__(self, paths: tuple[Path, ...]):
        self._files = [open(p, "rb") for p in paths]  # noqa: SIM115 (closed in close())
        sizes = [p.stat().st_size for p in paths]
        self._starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._starts[-1]}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: memoryview) -> int:
        """Fills `buffer` across part boundaries; short only at the end of the last part."""
        view, done = memoryview(buffer).cast("B"), 0
        while done < len(view) and self._pos < self._starts[-1]:
            i = bisect.bisect_right(self._starts, self._pos) - 1
            f = self._files[i]
            f.seek(self._pos - self._starts[i])
            n = f.readinto(view[done : done + self._starts[i + 1] - self._pos])
            if not n:
                break
            done += n
            self._pos += n
        return done

    def close(self) -> None:
        for f in self._files:
            f.close()
        super().close()


def _archives(paths: list[Path]) -> list[Archive]:
    """Separate `.npz` files, or, when they are not zips on their own, parts of one."""
    for path in paths:
        if not path.exists():
            raise CheckpointError(f"{path}: no such file")
        if not path.is_file():
            raise CheckpointError(f"{path}: not a file")
    errors = {path: _zip_error(Archive((path,))) for path in paths}
    if len(paths) == 1 or not any(errors.values()):
        return [Archive((path,)) for path in paths]
    if all(errors.values()) and not _zip_error(Archive(tuple(paths))):
        return [Archive(tuple(paths))]
    bad = next(path for path, error in errors.items() if error)
    raise CheckpointError(
        f"{bad}: {errors[bad]}; and the files given are not the byte-split parts of one .npz "
        "either (parts must be given in order, e.g. file.npz.part*)"
    )


def _zip_error(archive: Archive) -> str | None:
    """Why `archive` cannot be opened as a zip, or None."""
    try:
        with archive.open() as zf:
            # A file whose central directory points before its start is the tail of a split.
            if any(info.header_offset < 0 for info in zf.infolist()):
                return "truncated .npz (zip) archive: it holds the end of a split .npz"
            return None
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        with open(archive.parts[0], "rb") as f:
            is_zip_start = f.read(4) == b"PK\x03\x04"
        if is_zip_start:
            return f"truncated or corrupt .npz (zip) archive: {e}"
        return f"not an .npz (zip) file: {e}"


def _read_headers(archive: Archive) -> dict[str, ArrayInfo]:
    error = _zip_error(archive)
    if error:
        raise CheckpointError(f"{archive}: {error}")
    arrays = {}
    with archive.open() as zf:
        for member in zf.namelist():
            if not member.endswith(".npy"):
                raise CheckpointError(
                    f"{archive}: unexpected member {member!r} (not an .npy array)"
                )
            key = member[: -len(".npy")].removeprefix(PARAMS_PREFIX)
            try:
                with zf.open(member) as f:
                    shape, fortran_order, dtype = _read_header(f)
            except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
                raise CheckpointError(f"{archive}: cannot read the header of {key!r}: {e}") from e
            if dtype.hasobject:
                raise CheckpointError(
                    f"{archive}: {key!r} is an object (pickled) array, dtype {dtype.str!r}; "
                    "refusing to unpickle it"
                )
            torch_dtype = dtypes.from_numpy(dtype)
            if torch_dtype is None:
                raise CheckpointError(
                    f"{archive}: {key!r} has unsupported dtype {dtype.str!r} "
                    "(expected float32, float16 or bfloat16 stored as |V2)"
                )
            arrays[key] = ArrayInfo(archive, member, tuple(shape), torch_dtype, fortran_order)
    return arrays


class NpzWriter:
    """Writes an `.npz` one member at a time from chunks, as `np.savez` lays it out.

    Members are stored uncompressed (zip64 when large), so `OfficialNpz` and `np.load` read them
    back; bf16 is written as `|V2`. Usage: `with NpzWriter(path) as w: w.add(key, shape, dtype,
    chunks)` where the chunks, in C order, concatenate to the array.
    """

    def __init__(self, path: str | Path, comment: bytes = b""):
        self.path = Path(path)
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self._zip = zipfile.ZipFile(self._file, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._zip.comment = comment

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
                "descr": np.lib.format.dtype_to_descr(dtypes.NUMPY_DTYPES[dtype]),
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
        try:
            self._zip.close()
            self._file.flush()
            os.fsync(self._file.fileno())  # on disk before anyone renames it into place
        finally:
            self._file.close()

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # the output is being discarded: do not let finishing the zip mask the error
            self._file.close()
            self._zip.fp = None  # or ZipFile.__del__ would try to finish it, printing a traceback


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of `t` in C order (a view when `t` is contiguous)."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())
