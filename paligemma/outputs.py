"""Safe output targets: the one way every command of the project writes a file or a folder.

Nothing is lost: an existing target is refused unless the caller passes `force`, and `force`
replaces only a previous output of the same kind, recognised by the mark its writer left
(folders: `"kind"` in their `manifest.json`; PNG files: a text chunk; `.npz` files: the zip
comment; JSON reports: their structure). Anything else -- a source checkpoint, the folder that
holds it, a photo -- is refused even with `force`.

Nothing is half-written or left behind: output goes to a temporary sibling
`.NAME.PID.RANDOM.tmp` (same folder, so the final rename is atomic) and is renamed into place
only when complete. While it is written, `.NAME.lock` holds the writer's PID, so a second
concurrent writer of the same target fails instead of both "succeeding". Temporaries and locks
whose PID no longer runs (a SIGKILL, a power cut) are removed, with a warning, by the next
writer of that target. `sigterm_as_interrupt` turns SIGTERM into KeyboardInterrupt, so `kill`,
`timeout` and `docker stop` clean up exactly like Ctrl-C.

    check("out/model", "checkpoint", force)           # before the long work: fails early
    with atomic("out/model", "checkpoint", force) as tmp:
        ...write into tmp...                          # renamed to out/model on success
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import threading
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger("paligemma")

MANIFEST = "manifest.json"  # in every folder output; its "kind" key marks whose it is
MARK = "paligemma-output"  # PNG text key / zip comment prefix that marks file outputs
# kind -> (is a folder, what to call it in messages)
KINDS: dict[str, tuple[bool, str]] = {
    "checkpoint": (True, "converted checkpoint folder"),
    "hf-checkpoint": (True, "transformers checkpoint folder"),
    "finetune-run": (True, "fine-tuning run folder"),
    "training-state": (True, "fine-tuning checkpoint"),
    "demo": (True, "demo output folder"),
    "npz": (False, "exported .npz"),
    "png": (False, "PNG written by paligemma"),
    "parity-report": (False, "parity JSON report"),
    "benchmark-report": (False, "benchmark JSON report"),
}


class OutputError(FileExistsError):
    """Writing there could lose something, or another process is writing it."""


def check(path: str | Path, kind: str, force: bool = False, sources: Iterable[str | Path] = ()
          ) -> None:
    """Raises OutputError unless `kind` may be written to `path`: it does not exist, or it is a
    previous output of the same kind and `force` is set. `sources` (the inputs) may be neither
    the target nor inside it. Cheap: call it before the long work starts."""
    path = Path(path)
    is_dir, what = KINDS[kind]
    for src in sources:
        src = Path(src).resolve()
        if src == path.resolve() or path.resolve() in src.parents:
            raise OutputError(f"{path}: holds the input {src}; write the output somewhere else")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: cannot create it, {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: cannot write into {parent} (permission denied)")
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        raise OutputError(f"{path}: already exists (use --force to replace a previous {what})")
    found = kind_of(path)
    if found != kind or path.is_symlink():
        seen = "not written by this command"
        if found in KINDS:
            other = KINDS[found][1]
            seen = ("an " if other[0] in "aeiou" else "a ") + other
        raise OutputError(
            f"{path}: exists and is {seen}, not a previous {what}; --force only replaces "
            "those: remove it yourself or choose another path"
        )


def kind_of(path: str | Path) -> str | None:
    """The kind of output `path` was written as, from its mark; None if it has none."""
    path = Path(path)
    with contextlib.suppress(OSError, ValueError, zipfile.BadZipFile):
        if path.is_dir():
            manifest = json.loads((path / MANIFEST).read_text())
            return manifest.get("kind") if isinstance(manifest, dict) else None
        with open(path, "rb") as f:
            magic = f.read(8)
        if magic.startswith(b"\x89PNG"):
            import PIL.Image

            with PIL.Image.open(path) as image:
                return image.info.get(MARK)
        if magic.startswith(b"PK"):
            with zipfile.ZipFile(path) as z:
                comment = z.comment.decode("ascii", "replace")
            return comment.removeprefix(MARK + ": ") if comment.startswith(MARK) else None
        if magic.lstrip()[:1] in (b"{", b"["):
            report = json.loads(path.read_text())
            reports = report if isinstance(report, list) else [report]
            if reports and all(isinstance(r, dict) and {"case", "stages"} <= set(r)
                               for r in reports):
                return "parity-report"
            if isinstance(report, dict) and isinstance(report.get("benchmark"), str):
                return "benchmark-report"  # benchmarks/record.py
    return None


def npz_comment(kind: str = "npz") -> bytes:
    """The zip comment that marks an `.npz` this project wrote."""
    return f"{MARK}: {kind}".encode()


def png_info(kind: str = "png") -> Any:
    """`pnginfo=` for PIL's save, marking a PNG this project wrote."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(MARK, kind)
    return info


@contextlib.contextmanager
def atomic(path: str | Path, kind: str, force: bool = False,
           manifest: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yields a temporary path (a folder, or a file path inside a temporary folder) to write
    `kind` into; on success it replaces `path` (see `check`). Folders get `manifest.json`
    with `kind` added (merged into one the writer wrote, or `manifest`). On any error or
    interruption the temporary is removed and `path` is untouched."""
    path = Path(path)
    is_dir = KINDS[kind][0]
    with locked(path):
        check(path, kind, force)  # again, under the lock: another writer may have finished
        path.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkdtemp: its 0700 mode would end up on the output; mkdir follows umask.
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        tmp.mkdir()
        try:
            out = tmp if is_dir else tmp / path.name
            yield out
            if is_dir:
                mark(out, kind, manifest)
            if path.exists() or path.is_symlink():  # force: the old output goes only now
                old = tmp.parent / (tmp.name + ".old")
                os.replace(path, old)
                _remove(old)
            os.replace(out, path)
        finally:
            _remove(tmp)


def mark(directory: str | Path, kind: str, manifest: dict[str, Any] | None = None) -> None:
    """Writes / completes `directory/manifest.json` with `"kind": kind`."""
    file = Path(directory) / MANIFEST
    content = json.loads(file.read_text()) if file.is_file() else {}
    content = {"kind": kind, **content, **(manifest or {})}
    file.write_text(json.dumps(content, indent=2) + "\n")


@contextlib.contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Holds `.NAME.lock` (with this PID) next to `path`; OutputError if a live process holds
    it. Stale temporaries and locks of dead processes are removed first."""
    path = Path(path)
    remove_stale(path)
    lock = path.parent / f".{path.name}.lock"
    created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise OutputError(
            f"{path}: process {_pid_in(lock)} is writing it right now (lock {lock}); wait for "
            "it to finish or write somewhere else"
        ) from None
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    except BaseException:
        lock.unlink(missing_ok=True)
        for folder in created:  # made for this output, left empty by the failure: removed
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    lock.unlink(missing_ok=True)


def remove_stale(path: str | Path) -> list[Path]:
    """Removes temporaries and locks of `path` left by processes that no longer run (logging
    each); returns them."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]+\.tmp(\.old)?")
    removed = []
    for entry in path.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if entry.name == f".{path.name}.lock":
            pid = _pid_in(entry)
        elif m:
            pid = int(m.group(1))
        else:
            continue
        if pid is None or _alive(pid):
            continue
        _remove(entry)
        removed.append(entry)
        logger.warning("removed %s, left behind by process %d (no longer running)", entry, pid)
    return removed


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within: SIGTERM raises KeyboardInterrupt("SIGTERM") in the main thread, so the clean-up
    of every `atomic` output runs as for Ctrl-C. The previous handler is restored after."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _pid_in(lock: Path) -> int | None:
    try:
        return int(lock.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
