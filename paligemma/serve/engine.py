"""The model's one worker thread: the continuous-batching scheduler, fed by HTTP handlers.

Handlers run on the event loop; the model runs on one thread of its own, stepping
`paligemma.scheduler.Scheduler` (the same scheduler as the batch job): a request joins the
decode batch at the next step boundary and leaves when it is done, with its own sampling
settings and limits. Work that cannot share the batch (`call`, e.g. `explain`, which records
attention) runs alone between two steps.

A handler gets a `Ticket`: an asyncio queue that the worker fills with events (`Token`, then
`Done` or `Failed`). `Ticket.cancel()` (client gone, timeout) drops the row at the next step.
At most `max_queue` jobs are admitted at once (queued or running); beyond that the engine
raises `Busy`, which the app answers with 429.
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
from ..scheduler import Event, Handle, Request, Scheduler

logger = logging.getLogger("paligemma.serve")

FINISH_REASONS = {"eos": "stop", "length": "length"}  # scheduler's -> OpenAI's


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
    value: Any = None  # a call's return value


@dataclass
class Failed:
    error: BaseException


class Ticket:
    """The handler's side of a job: `events` (asyncio.Queue) and `cancel()`."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.events: asyncio.Queue[Token | Done | Failed] = asyncio.Queue()
        self.handle: Handle | None = None  # the scheduler's row, for generation
        self._loop = loop
        self._cancelled = False

    def cancel(self) -> None:
        """Drops the work at the next step boundary (no-op once it is done)."""
        self._cancelled = True
        if self.handle is not None:
            self.handle.cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

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
class _Call:
    ticket: Ticket
    fn: Callable[[], Any]


class Engine:
    """Owns the model: generation through the scheduler, other work (`call`) between steps."""

    def __init__(self, pg: PaliGemma, max_batch: int = 8, max_queue: int = 64):
        self.pg = pg
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.scheduler = Scheduler(pg, max_batch)
        self._calls: collections.deque[_Call] = collections.deque()
        self._live: set[Ticket] = set()  # generation tickets admitted and not finished
        self._admitted = 0  # generation + calls, queued or running
        self._lock = threading.Condition()
        self._stopping = False
        self._abort = False  # the shutdown grace period is over: drop what is left
        self._thread: threading.Thread | None = None
        self.stats: collections.Counter[str] = collections.Counter()  # done/cancelled/failed

    # -- the handlers' side (event loop thread) -----------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="paligemma-engine", daemon=True)
        self._thread.start()

    def generate(self, pixels: torch.Tensor, prefix: str, sampling: Sampling) -> Ticket:
        """Queues generation for one preprocessed image [3, R, R]; the ticket streams Token
        events, then Done."""
        ticket = Ticket(asyncio.get_running_loop())
        request = Request(pixels, prefix, max_new_tokens=sampling.max_tokens,
                          temperature=sampling.temperature, top_p=sampling.top_p,
                          seed=sampling.seed, id=ticket)
        with self._lock:
            self._check_room()
            ticket.handle = self.scheduler.submit(request)  # tokenizes: cheap
            self._admitted += 1
            self._live.add(ticket)
            self._lock.notify()
        return ticket

    def call(self, fn: Callable[[], Any]) -> Ticket:
        """Queues fn() to run on the model's thread, alone between two decode steps;
        Done.value is its result."""
        ticket = Ticket(asyncio.get_running_loop())
        with self._lock:
            self._check_room()
            self._admitted += 1
            self._calls.append(_Call(ticket, fn))
            self._lock.notify()
        return ticket

    @property
    def load(self) -> int:
        """Jobs admitted and not finished."""
        return self._admitted

    def _check_room(self) -> None:
        if self._stopping:
            raise ShuttingDown("the server is shutting down")
        if self._admitted >= self.max_queue:
            raise Busy(f"server busy: {self._admitted} requests in progress (limit "
                       f"{self.max_queue}); retry later")

    def shutdown(self, timeout: float) -> None:
        """Stops admitting; lets admitted work finish for up to `timeout` seconds, then fails
        the rest with ShuttingDown and joins the worker."""
        with self._lock:
            self._stopping = True
            self._lock.notify()
        if self._thread is None:
            return
        self._thread.join(timeout)
        with self._lock:
            self._abort = True
            self._lock.notify()
        self._thread.join()

    # -- the worker thread --------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._calls or self.scheduler.has_work()
                                    or self._stopping)
                if self._abort:
                    self._fail_all(ShuttingDown("the server shut down before this request "
                                                "finished"))
                    return
                if self._stopping and not self._calls and not self.scheduler.has_work():
                    return
                call = self._calls.popleft() if self._calls else None
            if call is not None:
                self._run_call(call)
            elif self.scheduler.has_work():
                try:
                    events = self.scheduler.step()
                except Exception as e:  # noqa: BLE001 - fails the batch, not the server
                    logger.exception("decode step failed")
                    with self._lock:
                        self._fail_all(e)
                    continue
                for event in events:
                    self._deliver(event)

    def _run_call(self, call: _Call) -> None:
        outcome: Done | Failed | None = None
        try:
            if call.ticket.cancelled:
                self.stats["cancelled"] += 1
            else:
                outcome = Done([], "stop", call.fn())
                self.stats["done"] += 1
        except Exception as e:  # noqa: BLE001 - reported to the request, not the server
            logger.exception("request failed")
            outcome = Failed(e)
            self.stats["failed"] += 1
        finally:
            self._finish(call.ticket, outcome)

    def _deliver(self, event: Event) -> None:
        ticket: Ticket = event.handle.id
        if event.token is not None:
            ticket._emit(Token(event.token))
        if not event.finished:
            return
        reason = event.handle.finish_reason
        if reason in FINISH_REASONS:
            self.stats["done"] += 1
            self._finish(ticket, Done(list(event.handle.tokens), FINISH_REASONS[reason]))
        else:  # cancelled: the client is gone, or the server is shutting down
            self.stats["cancelled"] += 1
            self._finish(ticket, Failed(ShuttingDown("request cancelled")))

    def _finish(self, ticket: Ticket, outcome: Done | Failed | None) -> None:
        """Stops counting the job, then hands over its outcome: whoever receives it sees the
        load without it."""
        with self._lock:
            self._live.discard(ticket)
            self._admitted -= 1
        if outcome is not None:
            ticket._emit(outcome)

    def _fail_all(self, error: BaseException) -> None:
        """(lock held) Fails every admitted job and starts over with an empty scheduler."""
        for ticket in self._live:
            ticket._emit(Failed(error))
        for call in self._calls:
            call.ticket._emit(Failed(error))
        self._admitted -= len(self._live) + len(self._calls)
        self.stats["failed"] += len(self._live) + len(self._calls)
        self._live.clear()
        self._calls.clear()
        self.scheduler = Scheduler(self.pg, self.max_batch)
