"""The one error type of every on-disk format, and the one layout check that raises it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

_LISTED = 5  # names listed in a message before "and N more"


class CheckpointError(ValueError):
    """A checkpoint, or a request about one, that cannot be carried out.

    The message names the file, key, shape, flag or value at fault; the command-line layers
    (`paligemma`, `paligemma-convert`) print it as one line.
    """


def check_layout(
    where: object,
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    noun: str = "tensor",
    files: Mapping[str, Path] | None = None,
) -> None:
    """Raises CheckpointError at the first missing or unexpected name, then the first wrong
    shape. where: what the message names (a file, a directory); files: the file holding each
    name, named instead for a wrong shape (a checkpoint in several parts)."""
    for what, names in (
        ("missing", sorted(set(expected) - set(found))),
        ("unexpected", sorted(set(found) - set(expected))),
    ):
        if names:
            more = f" and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
            raise CheckpointError(f"{where}: {what} {noun}(s) {names[:_LISTED]}{more}")
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise CheckpointError(
                f"{(files or {}).get(name, where)}: {name!r} has shape {list(found[name])}, "
                f"expected {list(shape)}"
            )
