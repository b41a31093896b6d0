"""The model's one worker thread, and the bounded, cancellable queue in front of it.

HTTP handlers run on the event loop; the model runs on one thread of its own. A handler
submits a job and gets a `Ticket`: an asyncio queue that the worker fills with events
(`Token`, then `Done` or `Failed`). Cancelling a ticket (client gone, timeout) makes the worker
drop the job at its next step. At most `max_queue` jobs are admitted at once (queued or
running); beyond that `submit` raises `Busy`, which the app answers with 429.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..api import PaliGemma
from ..generate import make_sampler, stream

logger = logging.getLogger("paligemma.serve")


class Busy(RuntimeError):
    """The queue is full (HTTP 429)."""


class ShuttingDown(RuntimeError):
    """The server is stopping and takes no new work (HTTP 503)."""


@dataclass
class Sampling:
    """One request's decoding settings: greedy when temperature is 0."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None


@dataclass
class Token:
    id: int


@dataclass
class Done:
    tokens: list[int]  # generated ids, eos excluded
    finish_reason: str  # "stop" (eos) or "length" (max_tokens reached)
    value: Any = None  # a call job's return value


@dataclass
class Failed:
    error: BaseException


class Ticket:
    """The handler's side of a job: `events` (asyncio.Queue) and `cancel()`."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.events: asyncio.Queue[Token | Done | Failed] = asyncio.Queue()
        self._loop = loop
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _emit(self, event: Token | Done | Failed) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass

    async def result(self) -> Done:
        """Waits for the end of the job; raises its error."""
        while True:
            event = await self.events.get()
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Done):
                return event


@dataclass
class _Generate:
    ticket: Ticket
    pixels: torch.Tensor  # [3, R, R], preprocessed
    prefix: str
    sampling: Sampling


@dataclass
class _Call:
    ticket: Ticket
    fn: Callable[[], Any]


class Engine:
    """Runs generation and other model work (`call`) on one thread, in arrival order."""

    def __init__(self, pg: PaliGemma, max_queue: int = 64):
        self.pg = pg
        self.max_queue = max_queue
        self._jobs: collections.deque[_Generate | _Call] = collections.deque()
        self._admitted = 0  # queued + running
        self._lock = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the handlers' side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="paligemma-engine", daemon=True)
        self._thread.start()

    def generate(self, pixels: torch.Tensor, prefix: str, sampling: Sampling) -> Ticket:
        """Queues generation for one image [3, R, R]; the ticket streams Token events."""
        ticket = Ticket(asyncio.get_running_loop())
        self._admit(_Generate(ticket, pixels, prefix, sampling))
        return ticket

    def call(self, fn: Callable[[], Any]) -> Ticket:
        """Queues fn() to run on the model's thread (alone); Done.value is its result."""
        ticket = Ticket(asyncio.get_running_loop())
        self._admit(_Call(ticket, fn))
        return ticket

    @property
    def load(self) -> int:
        """Jobs admitted and not finished."""
        return self._admitted

    def _admit(self, job: _Generate | _Call) -> None:
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if self._admitted >= self.max_queue:
                raise Busy(f"server busy: {self._admitted} requests in progress (limit "
                           f"{self.max_queue}); retry later")
            self._admitted += 1
            self._jobs.append(job)
            self._lock.notify()

    def shutdown(self, timeout: float) -> None:
        """Stops admitting; lets admitted jobs finish for up to `timeout` seconds, then fails
        the rest (ShuttingDown) and joins the worker."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            left, self._jobs = list(self._jobs), collections.deque()
        for job in left:
            job.ticket._emit(Failed(ShuttingDown("the server shut down before this request ran")))
        self._abort = True
        if self._thread is not None:
            self._thread.join()

    # -- the worker ---------------------------------------------------------------------------

    _abort = False  # set by shutdown once its grace period is over: drop the running job

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._jobs and not self._stopping:
                    self._lock.wait()
                if not self._jobs:
                    return  # stopping, nothing left
                job = self._jobs.popleft()
            try:
                if job.ticket.cancelled:
                    continue
                if isinstance(job, _Call):
                    job.ticket._emit(Done([], "stop", job.fn()))
                else:
                    self._generate(job)
            except Exception as e:  # noqa: BLE001 - reported to the request, not the server
                logger.exception("request failed")
                job.ticket._emit(Failed(e))
            finally:
                with self._lock:
                    self._admitted -= 1

    def _generate(self, job: _Generate) -> None:
        pg, s = self.pg, job.sampling
        tokens, mask_ar, input_mask = pg.tokenizer.batch([job.prefix])
        generator = None
        if s.seed is not None:
            generator = torch.Generator(device=pg.model.device).manual_seed(s.seed)
        sampler = make_sampler(s.temperature, None, s.top_p, generator)
        device = pg.model.device
        ids: list[int] = []
        eos = pg.tokenizer.eos_id
        steps = stream(pg.model, job.pixels[None].to(device, pg.model.dtype), tokens.to(device),
                       mask_ar.to(device), input_mask.to(device), s.max_tokens, sampler, eos)
        for token, _ in steps:
            if job.ticket.cancelled or self._abort:
                steps.close()
                if self._abort:
                    job.ticket._emit(Failed(ShuttingDown("the server shut down")))
                return
            token_id = int(token[0])
            if token_id == eos:
                job.ticket._emit(Done(ids, "stop"))
                return
            ids.append(token_id)
            job.ticket._emit(Token(token_id))
        job.ticket._emit(Done(ids, "length"))
