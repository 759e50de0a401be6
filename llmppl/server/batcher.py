"""The request queue: requests that arrive while a batch runs are served together by one ``run_batch``.

A :class:`Job` is one HTTP request: its prompts (token ids, already validated) and its sampler
settings.  Jobs wait in a bounded FIFO (``queue_size``; one more raises :class:`QueueFull`, a 429).
The worker task takes the oldest waiting job and every other waiting job with the same *key*
(method, max_tokens, seed and the options the method reads: settings under which the prompts can
share one ``engine.run_batch`` call), up to ``max_batch_prompts`` prompts, and runs them in a
worker thread, so the event loop keeps answering (``/health``, new requests, 429s) meanwhile.

Failures stay with their request: a prompt whose particles all die comes back as a ``Result``
with ``error`` set and fails only its own job; if ``run_batch`` itself raises, each job of the
batch is re-run alone so that one bad request cannot fail the others.  A job whose client has
gone away is dropped if it has not started, and its results are discarded if it has.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Hashable
import threading
from dataclasses import dataclass, field
from typing import Any

from ..methods import MethodOptions, build_method
from ..inference.result import Result
from ..targets import Power, Target
from .config import ServerConfig

log = logging.getLogger("llmppl.server")


class QueueFull(Exception):
    """The queue holds ``queue_size`` waiting requests."""


class ShuttingDown(Exception):
    """The server is stopping: queued and running requests are answered with a 503."""


@dataclass(frozen=True)
class RunSettings:
    """How one request is sampled: the method, its typed options (``max_tokens`` included as
    ``options.max_new_tokens``), the token budget and the target's truncation rule."""

    method: str
    options: MethodOptions
    max_new_tokens: int
    truncation: str = "keep"


@dataclass
class Job:
    """One request: prompts (token ids) sampled under ``settings``."""

    prompts: list[list[int]]
    settings: RunSettings
    alpha: float  # the target's exponent (1 for methods that sample the base LM)
    seed: int | None
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    started: float | None = None
    batch: dict[str, Any] | None = None  # filled when its batch has run
    constraint: Any = None  # the request's grammar constraint (response_format): the target gets * it

    @property
    def key(self) -> Hashable:
        """Jobs with equal keys share one ``run_batch``: same method, options, budget, seed, target."""
        s = self.settings
        return (s.method, s.options, s.max_new_tokens, s.truncation, self.seed, self.alpha, self.constraint)

    def progress(self) -> dict[str, Any]:
        """Where this request is: ``queued`` or ``running`` (with the seconds since it started)."""
        now = time.perf_counter()
        if self.started is None:
            return {"status": "queued", "queued_s": round(now - self.enqueued, 3)}
        return {"status": "running", "running_s": round(now - self.started, 3),
                "queued_s": round(self.started - self.enqueued, 3)}


@dataclass
class Stats:
    """Server-side counters (``/health`` reports them)."""

    requests: int = 0  # accepted into the queue
    completed: int = 0  # answered with a completion
    failed: int = 0  # answered with an error after running (particles died, engine error)
    rejected: int = 0  # 429: queue full
    disconnected: int = 0  # client went away before its answer
    batches: int = 0  # run_batch calls
    batched_requests: int = 0  # requests served by those calls
    batched_prompts: int = 0
    largest_batch: int = 0  # most requests in one run_batch
    tokens_decoded: int = 0
    busy_seconds: float = 0.0
    batch_failures: int = 0  # run_batch calls that raised (their requests were then re-run one by one)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class Batcher:
    """Queue + worker over one LM.  Start with :meth:`start` inside the event loop."""

    def __init__(self, lm: Any, config: ServerConfig, potential: Any = None) -> None:
        self.lm = lm
        self.config = config
        self.potential = potential
        self.pending: deque[Job] = deque()
        self.running: list[Job] = []
        self.stats = Stats()
        self._threads = itertools.count(1)
        self._thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._ids = itertools.count(1)
        self.closing = False

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="llmppl-batcher")

    def shutdown(self) -> None:
        """The server is stopping: refuse new requests and answer every queued and running one
        now with :class:`ShuttingDown` (a 503 JSON error), instead of leaving them to be cancelled.
        A running ``run_batch`` finishes in its thread; its results are discarded."""
        self.closing = True
        for job in [*self.pending, *self.running]:
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the server is shutting down; retry on another server or later"))
                job.future.exception()  # retrieved: no "exception was never retrieved" log
        self.pending.clear()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.shutdown()

    # ------------------------------------------------------------ requests
    def submit(self, job: Job) -> None:
        """Queue ``job`` (raises :class:`QueueFull` when ``queue_size`` jobs are waiting)."""
        if self.closing:
            raise ShuttingDown("the server is shutting down")
        if len(self.pending) >= self.config.queue_size:
            self.stats.rejected += 1
            raise QueueFull(f"the queue is full ({self.config.queue_size} requests waiting); retry later")
        self.pending.append(job)
        self.stats.requests += 1
        assert self._wake is not None, "Batcher.start() was not called"
        self._wake.set()

    def cancel(self, job: Job) -> None:
        """The client went away: drop ``job`` if it waits; discard its results if it runs."""
        if job.cancelled:
            return
        job.cancelled = True
        self.stats.disconnected += 1
        try:
            self.pending.remove(job)
        except ValueError:
            pass  # already running (or done)

    # ------------------------------------------------------------ worker
    def _take(self) -> list[Job]:
        """The oldest job and the waiting jobs compatible with it, up to ``max_batch_prompts`` prompts."""
        first = self.pending[0]
        key, room = first.key, self.config.max_batch_prompts
        group: list[Job] = []
        for job in list(self.pending):
            if job.key == key and (not group or len(job.prompts) <= room):
                group.append(job)
                room -= len(job.prompts)
                self.pending.remove(job)
            if room <= 0:
                break
        return group

    async def _worker(self) -> None:
        """Serve batches until cancelled; an unexpected error fails its batch, never the worker."""
        assert self._wake is not None
        while True:
            if not self.pending:
                self._wake.clear()
                await self._wake.wait()
                if self.config.batch_wait_s > 0:  # let near-simultaneous requests join
                    await asyncio.sleep(self.config.batch_wait_s)
                if not self.pending:
                    continue
            group = self._take()
            try:
                await self._serve(group)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("batcher error")
                for job in group:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                self.running = []

    async def _serve(self, group: list[Job]) -> None:
        """Run ``group`` in the worker thread, then hand each request its results (or its error)."""
        loop = asyncio.get_running_loop()
        self.running = group
        started = time.perf_counter()
        for job in group:
            job.started = started
        outcomes = await self._in_thread(loop, group)
        self.running = []
        seconds = time.perf_counter() - started
        batch = {"id": next(self._ids), "requests": len(group), "prompts": sum(len(j.prompts) for j in group),
                 "wall_time": seconds}
        s = self.stats
        s.batches += 1
        s.batched_requests += len(group)
        s.batched_prompts += batch["prompts"]
        s.largest_batch = max(s.largest_batch, len(group))
        s.busy_seconds += seconds
        for job, out in zip(group, outcomes):
            job.batch = batch
            if isinstance(out, list):
                s.tokens_decoded += sum(int(r.stats.get("tokens_decoded", 0)) for r in out)
            if job.cancelled or job.future.done():  # its client has gone: nobody reads it
                continue
            if isinstance(out, BaseException):
                job.future.set_exception(out)
            else:
                job.future.set_result(out)

    def _in_thread(self, loop: asyncio.AbstractEventLoop, group: list[Job]) -> "asyncio.Future[Any]":
        """``_run_group(group)`` in a daemon thread (a batch still running when the server stops does
        not hold the process: its results would be discarded anyway)."""
        future: asyncio.Future[Any] = loop.create_future()

        def settle(ok: bool, value: Any) -> None:
            if not future.done():
                future.set_result(value) if ok else future.set_exception(value)

        def work() -> None:
            try:
                out = self._run_group(group)
                ok: bool = True
            except BaseException as exc:  # noqa: BLE001 - handed to the event loop
                out, ok = exc, False
            try:
                loop.call_soon_threadsafe(settle, ok, out)
            except RuntimeError:  # the loop has closed: the server is gone
                pass

        self._thread = threading.Thread(target=work, name=f"llmppl-batch-{next(self._threads)}", daemon=True)
        self._thread.start()
        return future

    def busy(self) -> bool:
        """A batch is running in its thread."""
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the batch in progress (if any) to finish."""
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------ in the worker thread
    def target(self, alpha: float, truncation: str = "keep", constraint: Any = None) -> Target:
        potential = Power(alpha) if self.potential is None else Power(alpha) * self.potential
        potential = potential if constraint is None else potential * constraint
        return Target(self.lm, potential, chat=False, truncation=truncation)  # prompts arrive as token ids

    def _run(self, jobs: list[Job]) -> list[Result]:
        first = jobs[0]
        s = first.settings
        method = build_method(s.method, s.options)
        prompts = [p for job in jobs for p in job.prompts]
        return method.run_batch(self.target(first.alpha, s.truncation, first.constraint), prompts, s.max_new_tokens,
                                seed=first.seed)

    def _run_group(self, group: list[Job]) -> list[list[Result] | BaseException]:
        """Results per job; an exception for a job that failed on its own."""
        live = [j for j in group if not j.cancelled]
        out: dict[int, list[Result] | BaseException] = {}
        if live:
            try:
                results = self._run(live)
                i = 0
                for job in live:
                    out[id(job)] = results[i:i + len(job.prompts)]
                    i += len(job.prompts)
            except Exception as exc:
                if len(live) == 1:
                    out[id(live[0])] = exc
                else:
                    log.warning("run_batch of %d requests failed (%s: %s); re-running them one by one",
                                len(live), type(exc).__name__, exc, exc_info=True)
                    self.stats.batch_failures += 1
                    for job in live:
                        try:
                            out[id(job)] = self._run([job])
                        except Exception as exc1:
                            out[id(job)] = exc1
        return [out.get(id(j), asyncio.CancelledError("client disconnected")) for j in group]
