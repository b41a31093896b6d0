"""Streaming access to official big_vision `.npz` checkpoints, one array at a time.

`np.savez` stores each array as an uncompressed `.npy` member of a zip file, so headers (shape,
dtype) can be read without touching the data and each array can be read on its own: memory stays
bounded by the largest array, not the checkpoint. Nothing is ever unpickled.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

PARAMS_PREFIX = "params/"
# numpy has no bfloat16: big_vision's checkpoints store it as raw 2-byte void (`|V2`).
_NUMPY_TO_TORCH = {"float32": torch.float32, "float16": torch.float16, "V2": torch.bfloat16}
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and the key at fault."""


@dataclass(frozen=True)
class ArrayInfo:
    path: Path
    member: str  # zip member name, e.g. "params/llm/final_norm/scale.npy"
    shape: tuple[int, ...]
    dtype: torch.dtype


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
        if info.dtype == torch.bfloat16:
            return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(array)


def _read_headers(path: Path) -> dict[str, ArrayInfo]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: not an .npz (zip) file: {e}") from e
    arrays = {}
    with zf:
        for member in zf.namelist():
            if not member.endswith(".npy"):
                raise CheckpointError(f"{path}: unexpected member {member!r} (not an .npy array)")
            key = member[: -len(".npy")].removeprefix(PARAMS_PREFIX)
            try:
                with zf.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(f)
            except (ValueError, EOFError, OSError, zipfile.BadZipFile) as e:
                raise CheckpointError(f"{path}: cannot read the header of {key!r}: {e}") from e
            name = "V2" if dtype == np.dtype("V2") else dtype.name
            if name not in _NUMPY_TO_TORCH:
                raise CheckpointError(
                    f"{path}: {key!r} has unsupported dtype {dtype.str!r} "
                    "(expected float32, float16 or bfloat16 stored as |V2)"
                )
            arrays[key] = ArrayInfo(path, member, tuple(shape), _NUMPY_TO_TORCH[name])
    return arrays
