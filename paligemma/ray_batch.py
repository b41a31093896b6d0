"""`paligemma batch ... --ray [ADDRESS]`: the batch job's items run on a Ray cluster.

Ray Data `map_batches` over an actor pool: each actor loads the model once and runs the same
per-process loop as one machine (`batch.process`: image loading, continuous batching, rows);
the driver keeps reading the input, resuming and writing the output (`batch.run_batch`), so the
output file, its resume and its error rows are those of a single-process run. Ray Data restarts
a killed actor and retries its unfinished batches (its defaults `max_restarts=-1`,
`max_task_retries=-1`); rows of a batch retried after it had partly come back are dropped by
the driver, so every item is written once.

The input is handed to Ray `window` items at a time (ids and paths only; a new dataset and actor
pool per window), which bounds the driver's memory for millions of items. Every node must see
the model directory and the image paths (a shared file system) and have this package installed
(`pip install -e ".[ray]"`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Iterator
from typing import Any

from .batch import Item, Job, process


class _Worker:
    """One Ray actor: one model, one scheduler per batch of items."""

    def __init__(self, model: dict[str, Any], job: Job, max_batch: int):
        from .api import PaliGemma

        self.pg = PaliGemma.from_pretrained(**model)
        self.job = job
        self.max_batch = max_batch

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        items = [Item(str(i), str(path), None if text is None else str(text))
                 for i, path, text in zip(batch["id"], batch["image"], batch["text"],
                                          strict=True)]
        rows = process(self.pg, self.job, items, self.max_batch)
        return {"row": [json.dumps(row, ensure_ascii=False) for row in rows]}


def process_on_ray(
    model: dict[str, Any],
    job: Job,
    items: Iterator[Item],
    address: str | None = None,
    actors: int = 2,
    batch_size: int = 32,
    max_batch: int = 16,
    cpus_per_actor: float = 1,
    window: int = 100_000,
) -> Iterator[dict[str, Any]]:
    """Rows of `items` computed by `actors` Ray actors, in completion order (see the module
    docstring). model: keyword arguments of `PaliGemma.from_pretrained`; address: a Ray
    cluster ("auto", "ray://host:10001", ...), None starts a local one (unless Ray is already
    initialized in this process); batch_size: items per Ray task."""
    try:
        import ray
    except ImportError:
        raise ValueError('--ray needs Ray: pip install -e ".[ray]"') from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts rows
    while chunk := list(itertools.islice(items, window)):
        dataset = ray.data.from_items([dataclasses.asdict(item) for item in chunk])
        rows = dataset.map_batches(
            _Worker,
            fn_constructor_kwargs={"model": model, "job": job, "max_batch": max_batch},
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus_per_actor,
        )
        try:
            for row in rows.iter_rows():
                yield json.loads(row["row"])
        except ray.exceptions.RayError as e:  # e.g. an actor could not load the model
            message = str(e).strip().splitlines()
            raise ValueError(f"Ray job failed: {message[-1] if message else type(e).__name__}"
                             ) from None
