"""`paligemma batch`: one task over a folder or a JSONL manifest of images -> a JSONL of results.

    paligemma batch caption --input photos/ --output captions.jsonl --model pg2-3b-224
    paligemma batch ask --input items.jsonl --output answers.jsonl --model DIR --question "..."
    paligemma batch detect --input photos/ --output boxes.jsonl --model DIR --objects "car ; person"
    paligemma batch caption --input photos/ --output c.jsonl --model DIR --ray [ADDRESS]

Input: a folder (every image file under it, recursively, in sorted path order; the id of an item
is its path relative to the folder), or a JSONL manifest of `{"image": PATH, "id": ...,
"question" | "objects" | "prompt": ...}` (relative paths are relative to the manifest's folder;
id defaults to the image path; the per-item text overrides --question / --objects / --prompt).
Both are read lazily: memory is bounded by the batch, plus the set of finished ids.

Output: one JSON object per line and per item, appended and flushed as each item finishes (in
completion order): `{"id", "image", "prompt", "text", "finish_reason"[, "objects"]}`, or
`{"id", "image", "error"}` for an item that failed (missing file, corrupt image, prompt too
long); the job goes on. Rerunning the same command resumes: items whose id is in the output
are skipped (an error row counts as done), a line cut short by a crash is dropped, so no item
is lost or written twice. Ctrl-C / SIGTERM stop after flushing what is finished.

Decoding runs through `paligemma.scheduler` (continuous batching: a finished row is replaced by
the next item at once). Sampling with --seed uses seed + crc32(id) per item, so an item's
output does not depend on what it was batched with, nor on the machine (Ray) that ran it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from .image import preprocess, to_rgb_array
from .tasks import parse_detections, task_prefix

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# batch task -> (official task, the per-item text key of a manifest row)
TASKS = {"caption": ("caption", None), "describe": ("describe", None), "ocr": ("ocr", None),
         "ask": ("answer", "question"), "detect": ("detect", "objects"),
         "generate": (None, "prompt")}
ITEM_ERRORS = (OSError, ValueError)  # per-item failures: recorded as error rows


@dataclass(frozen=True)
class Item:
    id: str
    image: str  # path
    text: str | None = None  # per-item question / objects / prompt (manifest)


@dataclass
class Job:
    """What to run on every item: the task, its text, and the generation settings."""

    task: str  # a key of TASKS
    text: str | None = None  # --question / --objects / --prompt, unless the item has its own
    lang: str = "en"
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown batch task {self.task!r}; known: {', '.join(TASKS)}")

    def prompt(self, item: Item) -> str:
        official, key = TASKS[self.task]
        text = item.text if item.text is not None else self.text
        if key is not None and not text:
            raise ValueError(f"item {item.id!r} has no {key!r} and no --{key} was given")
        if official is None:
            return text
        if official in ("caption", "describe"):
            return task_prefix(official, lang=self.lang)
        if official == "answer":
            return task_prefix(official, text, self.lang)
        return task_prefix(official, text or "")

    def seed_for(self, item: Item) -> int | None:
        return None if self.seed is None else (self.seed + zlib.crc32(item.id.encode())) % 2**63


# -- input ------------------------------------------------------------------------------------

def read_items(source: str | Path) -> Iterator[Item]:
    """Lazily lists a folder's images or a manifest's rows (see the module docstring)."""
    source = Path(source)
    if source.is_dir():
        yield from _folder_items(source)
    elif source.is_file():
        yield from _manifest_items(source)
    else:
        raise FileNotFoundError(f"{source}: no such folder or manifest file")


def _folder_items(root: Path) -> Iterator[Item]:
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                path = Path(folder) / name
                yield Item(path.relative_to(root).as_posix(), str(path))


def _manifest_items(manifest: Path) -> Iterator[Item]:
    with open(manifest, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{manifest}, line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                raise ValueError(f'{where}: expected an object with an "image" path')
            image = row["image"]
            item_id = str(row.get("id", image))
            texts = [row[k] for k in ("question", "objects", "prompt") if k in row]
            if any(not isinstance(t, str) for t in texts):
                raise ValueError(f"{where}: question / objects / prompt must be strings")
            yield Item(item_id, str(manifest.parent / image), texts[0] if texts else None)


def count_items(source: str | Path) -> int:
    return sum(1 for _ in read_items(source))


def load_image(path: str, image_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """-> (pixels [3, R, R] in [-1, 1], (width, height) of the original image)."""
    array = to_rgb_array(path)
    return preprocess([array], image_size)[0], (array.shape[1], array.shape[0])


# -- output -----------------------------------------------------------------------------------

class Results:
    """The output JSONL: finished ids read back on open (resume), rows appended and flushed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"--output {self.path}: is a folder, expected a .jsonl file")
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"--output {self.path}: folder {self.path.parent} does not "
                                    "exist")
        if not os.access(self.path if self.path.exists() else self.path.parent, os.W_OK):
            raise ValueError(f"--output {self.path}: not writable")
        self.done: set[str] = set()
        self.errors = 0
        if self.path.exists():
            self._read_back()
        self._file: IO[str] | None = None  # opened by the first row: a failed start leaves no file

    def _read_back(self) -> None:
        good = 0  # bytes of complete lines
        with open(self.path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.endswith(b"\n"):
                    break  # cut short by a crash while writing: dropped below, redone
                try:
                    row = json.loads(line)
                    self.done.add(row["id"])
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                    raise ValueError(
                        f"--output {self.path}, line {number}: not a row of a paligemma batch "
                        "results file; pass a new file or the output of an earlier run"
                    ) from None
                self.errors += "error" in row
                good += len(line)
        if good < self.path.stat().st_size:
            os.truncate(self.path, good)

    def write(self, row: dict[str, Any]) -> None:
        if self._file is None:
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()
        self.done.add(row["id"])
        self.errors += "error" in row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> Results:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def error_row(item: Item, error: BaseException) -> dict[str, Any]:
    return {"id": item.id, "image": item.image, "error": str(error)}


def result_row(job: Job, item: Item, handle: Any, size: tuple[int, int]) -> dict[str, Any]:
    row = {"id": item.id, "image": item.image, "prompt": handle.request.prompt,
           "text": handle.text, "finish_reason": handle.finish_reason}
    if job.task == "detect":
        row["objects"] = [d.to_json() for d in parse_detections(handle.text, *size)]
    return row


# -- one process ------------------------------------------------------------------------------

def process(
    pg: Any,
    job: Job,
    items: Iterable[Item],
    max_batch: int = 16,
    loaders: int = 2,
) -> Iterator[dict[str, Any]]:
    """Runs `job` on `items` with continuous batching; yields one row per item as it finishes.

    Images are decoded and preprocessed by `loaders` threads, at most 2 * max_batch ahead.
    """
    from .scheduler import Request, Scheduler

    sched = Scheduler(pg, max_batch, min_prefill=max(1, max_batch // 4))
    size = pg.image_size
    pending: deque[tuple[Item, Future]] = deque()
    meta: dict[str, tuple[Item, tuple[int, int]]] = {}
    todo = iter(items)
    exhausted = False
    with ThreadPoolExecutor(loaders) as pool:
        while True:
            while not exhausted and len(pending) < 2 * max_batch:
                item = next(todo, None)
                if item is None:
                    exhausted = True
                else:
                    pending.append((item, pool.submit(load_image, item.image, size)))
            # Hand loaded items to the scheduler; wait for one only when nothing else can run.
            while pending and sched.num_queued < max_batch and (
                    pending[0][1].done() or not sched.has_work()):
                item, future = pending.popleft()
                try:
                    pixels, original = future.result()
                    request = Request(pixels, job.prompt(item), max_new_tokens=job.max_new_tokens,
                                      temperature=job.temperature, top_k=job.top_k,
                                      top_p=job.top_p, seed=job.seed_for(item), id=item.id)
                    sched.submit(request)
                except ITEM_ERRORS as e:
                    yield error_row(item, e)
                    continue
                meta[item.id] = (item, original)
            if not sched.has_work():
                if pending:
                    continue
                return
            for event in sched.step():
                if event.finished:
                    item, original = meta.pop(event.handle.id)
                    yield result_row(job, item, event.handle, original)


def run_batch(
    rows: Callable[[Iterator[Item]], Iterator[dict[str, Any]]],
    source: str | Path,
    output: str | Path,
    progress: bool = True,
) -> dict[str, int]:
    """Drives a job: skips the ids already in `output`, feeds the rest to `rows` (a function
    items -> rows, e.g. `functools.partial(process, pg, job)`), writes each row as it comes.
    Returns counts {"done", "errors", "skipped", "total"}. An id is handed out once (a
    repeated id in the input is skipped) and written once (rows of a retried Ray task for ids
    already written are dropped)."""
    from tqdm import tqdm

    with Results(output) as results:
        total = count_items(source)  # also fails early on a bad --input
        skipped = len(results.done)
        seen = set(results.done)

        def todo() -> Iterator[Item]:
            for item in read_items(source):
                if item.id not in seen:
                    seen.add(item.id)
                    yield item

        bar = None  # started with the first row: the rate and ETA leave out model loading
        try:
            for row in rows(todo()):
                if row["id"] in results.done:
                    continue
                results.write(row)
                if bar is None:
                    bar = tqdm(total=total, initial=min(skipped, total), unit="img",
                               disable=not progress, dynamic_ncols=True, smoothing=0.05)
                bar.update()
                bar.set_postfix(errors=results.errors, refresh=False)
        finally:
            if bar is not None:
                bar.close()
        return {"done": len(results.done) - skipped, "errors": results.errors,
                "skipped": skipped, "total": total}


# -- command line -----------------------------------------------------------------------------

def add_parser(sub: Any) -> None:
    from .cli import _add_model_args

    p = sub.add_parser(
        "batch", help="run a task over a folder or manifest of images into a resumable JSONL",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=list(TASKS), help="what to do with every image")
    p.add_argument("--input", required=True, metavar="DIR|FILE.jsonl",
                   help="a folder of images (recursive) or a JSONL manifest")
    p.add_argument("--output", required=True, metavar="FILE.jsonl",
                   help="results, one JSON row per item; an existing file is resumed")
    p.add_argument("--lang", default="en", help="language of caption / describe / ask")
    p.add_argument("--question", help="ask: the question (unless the manifest row has one)")
    p.add_argument("--objects", help="detect: object names, e.g. 'car ; person'")
    p.add_argument("--prompt", help="generate: the prefix, e.g. 'caption es'")
    _add_model_args(p, generation=False)
    g = p.add_argument_group("generation (default: greedy)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, metavar="K")
    g.add_argument("--top-p", type=float, metavar="P")
    g.add_argument("--seed", type=int, help="sampling seed (item i uses seed + crc32(id))")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="rows decoded together (continuous batching; default: 16)")
    p.add_argument("--loaders", type=int, default=2, metavar="N",
                   help="image decoding threads (default: 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    r = p.add_argument_group("Ray (pip install -e '.[ray]')")
    r.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run on a Ray cluster (ADDRESS, e.g. auto or ray://host:10001; "
                   "none: a local one)")
    r.add_argument("--ray-actors", type=int, default=2, metavar="N",
                   help="actors, one model each (default: 2)")
    r.add_argument("--ray-cpus", type=float, default=1, metavar="N", help="CPUs per actor")
    r.add_argument("--ray-batch-size", type=int, default=32, metavar="N",
                   help="items per Ray task (default: 32)")
    p.set_defaults(func=_main)


def _main(args: Any) -> int:
    import functools
    import signal

    job = Job(args.task, {"ask": args.question, "detect": args.objects,
                          "generate": args.prompt}.get(args.task), args.lang,
              args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    model = {"name_or_path": args.model, "tokenizer": args.tokenizer, "device": args.device,
             "dtype": getattr(torch, args.dtype) if args.dtype else None,
             "quantize": args.quantize}
    if args.ray is not None:
        from .ray_batch import process_on_ray

        rows = functools.partial(process_on_ray, model, job, address=args.ray or None,
                                 actors=args.ray_actors, batch_size=args.ray_batch_size,
                                 max_batch=args.max_batch, cpus_per_actor=args.ray_cpus)
    else:
        def rows(items: Iterator[Item]) -> Iterator[dict[str, Any]]:
            from .api import PaliGemma

            pg = PaliGemma.from_pretrained(**model)  # after the input / output checks
            return process(pg, job, items, args.max_batch, args.loaders)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    # An item's malformed detect output shows in its row (objects: []); no warning per item.
    logging.getLogger("paligemma").setLevel(logging.ERROR)
    try:
        counts = run_batch(rows, args.input, args.output, progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"interrupted; finished rows are in {args.output}: rerun the same command to "
              "resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{counts['done']} items done ({counts['errors']} errors in all), {counts['skipped']} "
          f"already in {args.output}, {counts['total']} in the input", file=sys.stderr)
    return 0
