"""AsyncMQWorker: claims due jobs of its queues, runs their handlers, records each outcome once.

The worker is a conductor. Its loop (:meth:`AsyncMQWorker._serve`) waits for the first of: a NOTIFY hint, a
job finishing, the next due time, the next maintenance, or stop; then it claims up to its free capacity and
starts one task per job. The parts, each handed what it needs at construction:

- :class:`~aiomq.link.Link`: the dedicated connection (LISTEN, the advisory lock), replaced when it dies;
- :class:`~aiomq.claims.Claimer`: claims, adoption of lost claim replies, the next due time;
- :class:`~aiomq.execution.Executor`: runs one handler, on the loop or in a thread;
- :class:`~aiomq.outcomes.Recorder`: records outcomes in batches, in transactions cancellation cannot cut;
- :class:`~aiomq.maintenance.Maintenance` and :class:`~aiomq.scheduler.Scheduler`: the periodic duties.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import random
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from . import channels, signals, tracing
from .assembly import Callbacks, assemble
from .dberrors import is_retryable
from .dsn import libpq_dsn
from .execution import Handler, Middleware, Outcome, check_middleware
from .hooks import JobHooks, hook_set
from .listener import Listener
from .model import Model
from .outcomes import Record
from .proof import prove_session
from .records import JobContext, check_queue_name, utcnow
from .retry import Policies, Retry
from .schema import check_schema
from .serialize import error_result
from .source import AsyncMQSource
from .wakeup import sleep_delay

__all__ = ["AsyncMQWorker"]

log = logging.getLogger(__name__)


def _seconds(value: float | datetime.timedelta) -> float:
    return value.total_seconds() if isinstance(value, datetime.timedelta) else float(value)


def _active(job: JobContext) -> dict[str, Any]:
    """A running job as ``get_status()`` lists it."""
    return {
        "id": job.id,
        "queue": job.queue,
        "method": job.method,
        "args": job.args,
        "cursor_key": job.cursor_key,
    }


class AsyncMQWorker:
    """Runs jobs of ``queues`` (``{name: handler}``) from a PostgreSQL database. See DESIGN §2."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        queues: Mapping[str, Any],
        model: Model,
        concurrency: int = 10,
        timeout: float | datetime.timedelta = 60,
        jitter: float = 0,
        lock_key: int = 1250360252,
        retry_intervals: Sequence[float | datetime.timedelta] = (1, 3, 5, 10, 15, 30),
        name: str | None = None,
        listener_dsn: str | None = None,
        capture_signals: bool = False,
        mq_source_factory: Callable[..., AsyncMQSource] = AsyncMQSource,
        clock: Callable[[], datetime.datetime] | None = None,
        retry: Retry | int | Mapping[str, Retry | int] | None = None,
        lost_grace: float | datetime.timedelta = 120.0,
        job_timeout: float | datetime.timedelta | Mapping[str, float | datetime.timedelta] | None = None,
        middleware: Sequence[Middleware] = (),
        prune_after: float | datetime.timedelta | None = None,
        hooks: Sequence[JobHooks] = (),
    ) -> None:
        if not isinstance(engine, AsyncEngine) or engine.dialect.driver != "asyncpg":
            raise ValueError(
                "engine must be an AsyncEngine using the asyncpg driver "
                "(create_async_engine('postgresql+asyncpg://...')), "
                f"got {engine!r}"
            )
        if not queues:
            raise ValueError("queues must name at least one queue")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
        self.engine = engine
        self.model = model
        self.handlers = {check_queue_name(q): Handler(q, h) for q, h in queues.items()}
        self.queues = list(self.handlers)
        self.concurrency = concurrency
        self.timeout = _seconds(timeout)
        if self.timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self.jitter = float(jitter)
        self.lock_key = int(lock_key)
        self.retry_intervals = [_seconds(i) for i in retry_intervals] or [1.0]
        self.name = name or f"{socket.gethostname()}.{os.getpid()}"
        self.listener_dsn = libpq_dsn(listener_dsn or engine.url)
        self.capture_signals = capture_signals
        self.mq_source_factory = mq_source_factory
        self.clock = clock or utcnow
        self._policies = Policies(self.queues, retry=retry, job_timeout=job_timeout)
        self.lost_grace = _seconds(lost_grace)
        if not self.lost_grace >= 0:
            raise ValueError(f"lost_grace must be zero or more seconds, got {lost_grace!r}")
        self._middleware = check_middleware(middleware)
        # Observers of every job (aiomq.hooks): tracing's when OpenTelemetry is importable, then the caller's.
        self._hooks = hook_set(hooks, first=tracing.worker_hooks(model.JobStates))
        if self._hooks is not None:
            self._middleware = [*self._hooks.middleware, *self._middleware]
        self.prune_after = None if prune_after is None else datetime.timedelta(seconds=_seconds(prune_after))
        if self.prune_after is not None and self.prune_after <= datetime.timedelta():
            raise ValueError(f"prune_after must be a positive duration (or None), got {prune_after!r}")
        self._init_state()

    def _init_state(self) -> None:
        """The worker's own run-time state, and its parts (:mod:`aiomq.assembly`)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self._stopping = False
        self._wakeup: asyncio.Event | None = None
        self._listening: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._settled = 0  # jobs finished so far: tells whether one finished while a claim was in flight
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._jobs: dict[int, JobContext] = {}
        self._in_handler: dict[int, bool] = {}  # job id -> handler is sync
        # The jobs that hold one of the ``concurrency`` slots: claimed, handler not yet returned. A job
        # whose outcome is being recorded frees its slot, so the next claim overlaps the finish; at most
        # ``_max_unrecorded`` jobs may be claimed or waiting for their outcome to be recorded.
        self._in_slot: set[int] = set()
        self._max_unrecorded = 4 * self.concurrency
        self._channels = {channels.queue_channel(self.model.channel_prefix, q): q for q in self.queues}
        parts = assemble(
            self,
            Callbacks(
                start=self._start,
                running=self._jobs.keys,
                on_notify=self._on_notify,
                on_recorded=self._on_recorded,
                on_abort=self._abort,
                wake=self._wake,
                sleep=self._sleep,
                stopping=lambda: self._stopping,
            ),
            channels=[*self._channels, channels.ABORT_CHANNEL, channels.PAUSE_CHANNEL],
            policies=self._policies,
            middleware=self._middleware,
        )
        self._st, self._link, self._tx = parts.st, parts.link, parts.transactions
        self._claimer, self._executor, self._recorder = parts.claimer, parts.executor, parts.recorder
        self._scheduler, self._maintenance = parts.scheduler, parts.maintenance
        self._pauses, self._pruner = parts.pauses, parts.pruner

    # ---------------------------------------------------------------- public lifecycle

    async def run(self) -> None:
        """Serve until :meth:`shutdown_gracefully` (or :meth:`stop`); returns normally after it."""
        await self._run(until_idle=False)

    async def run_until_idle(self) -> None:
        """Run every due job, follow-ups included, and return when none is due and none is in flight."""
        if self._running:
            raise RuntimeError("run_until_idle() cannot be used while run() is active")
        await self._run(until_idle=True)

    def shutdown_gracefully(self) -> None:
        """No new claims; jobs in flight finish and are recorded. Thread-safe, idempotent."""
        self._stopping = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._wake()
        else:
            with contextlib.suppress(RuntimeError):  # loop closed meanwhile
                loop.call_soon_threadsafe(self._wake)

    async def stop(self, timeout: float | None = None) -> None:
        """Shut down gracefully and wait. After ``timeout`` seconds, cancel handlers still running."""
        self.shutdown_gracefully()
        stopped = self._stopped
        if not self._running and self._run_task is None:
            self._stopping = False  # nothing was running: nothing to stop
            return
        if stopped is None or not self._running:
            task, self._run_task = self._run_task, None
            if task is not None and task is not asyncio.current_task():
                await task  # started but not yet running: it sees the flag and returns at once
            return
        if timeout is not None:
            try:
                await asyncio.wait_for(stopped.wait(), timeout)
            except TimeoutError:
                self._cancel_handlers()
        await stopped.wait()
        task = self._run_task
        if task is not None and task is not asyncio.current_task():
            self._run_task = None
            await task

    async def __aenter__(self) -> AsyncMQWorker:
        if self._running:
            raise RuntimeError("this worker is already running")
        self._listening = asyncio.Event()
        task = asyncio.create_task(self.run(), name=f"aiomq-worker {self.name}")
        self._run_task = task
        listening = asyncio.ensure_future(self._listening.wait())
        await asyncio.wait({task, listening}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            listening.cancel()
            self._run_task = None
            task.result()  # raises what run() raised
            raise RuntimeError("worker stopped before it was listening")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def get_status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "running": self._running and not self._stopping,
            "concurrency": self.concurrency,
            "queues": list(self.queues),
            "lock_id": self._link.lock_id,
            "listener_connected": self._link.alive,
            "active_jobs": [_active(job) for job in self._jobs.values()],
            "overdue": sorted(self._executor.overdue),
            "paused_queues": sorted(self._pauses.paused),
        }

    # ---------------------------------------------------------------- overridable

    def result_from_error(self, ex: BaseException) -> Any:
        """The ``result`` stored for a handler that raised ``ex`` (anything but FailedJobError)."""
        return error_result(ex)

    def is_retryable_error(self, ex: BaseException) -> bool:
        """Whether a database operation that raised ``ex`` is worth trying again."""
        return is_retryable(ex)

    # ---------------------------------------------------------------- the loop

    async def _run(self, *, until_idle: bool) -> None:
        if self._running:
            raise RuntimeError("this worker is already running")
        self._running = True
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._stopped = asyncio.Event()
        if self._listening is None:
            self._listening = asyncio.Event()
        restore = None
        if self.capture_signals and not until_idle:
            restore = signals.install(
                shutdown=self.shutdown_gracefully,
                cancel_handlers=self._cancel_handlers,
                status=lambda: json.dumps(self.get_status(), default=str),
            )
        self._recorder.start(f"aiomq finisher {self.name}")
        try:
            missing = await self._tx.run("schema check", lambda conn: check_schema(conn, self.model))
            self._maintenance.missing_tables(missing)
            await self._connect(first=True)
            if not self._link.connected:  # stopped while connecting
                return
            self._listening.set()
            log.info(
                "worker %s listening on queues %s (lock_id=%s)",
                self.name,
                ",".join(self.queues),
                self._link.lock_id,
            )
            await self._serve(until_idle=until_idle)
        except BaseException:
            self._cancel_handlers()
            raise
        finally:
            try:
                await asyncio.shield(self._teardown())
            finally:
                self._recorder.stop()  # idle now: every job task waited for its outcome to be recorded
                if restore is not None:
                    restore()
                self._running = False
                self._stopping = False  # a stopped worker may run again
                self._listening = None
                self._stopped.set()

    async def _serve(self, *, until_idle: bool) -> None:
        loop = asyncio.get_running_loop()
        claimer, scheduler = self._claimer, self._scheduler
        next_maintenance = loop.time()
        while not self._stopping:
            if not self._link.alive:
                await self._connect(first=False)
                continue
            if loop.time() >= next_maintenance:
                await self._maintain()
                next_maintenance = loop.time() + min(self.timeout, self._maintenance.again_in or self.timeout)
                if not self._link.alive:
                    continue  # maintenance may have spanned an outage: reconnect before claiming
            if scheduler.is_due():
                await scheduler.fire()
            claimed, settled = 0, self._settled
            if self._free_slots() > 0 and (until_idle or claimer.is_due()):
                claimed = await claimer.claim(self._free_slots())
                if claimed == 0:
                    claimer.after_empty_claim()
            if until_idle and claimed == 0 and not self._tasks and self._settled == settled:
                return  # (a job that finished during the claim may have freed a cursor: claim again)
            now = self.clock()
            delay = sleep_delay(
                now,
                maintenance_in=next_maintenance - loop.time(),
                next_due=claimer.next_due if self._free_slots() > 0 else None,
                next_schedule=scheduler.next_time,
            )
            if delay > 0 or not claimer.is_due():
                await self._sleep(max(delay, 0.0) + random.uniform(0, self.jitter))
        if self._tasks:
            log.info("worker %s waiting for %d job(s) to finish", self.name, len(self._tasks))
            await asyncio.wait(list(self._tasks.values()))

    async def _maintain(self) -> None:
        await self._maintenance.run()
        if self._claimer.unsure and self._link.alive:
            await self._claimer.adopt()
        # NOTIFY is a hint: a cursor freed without one (fail_lost_job, a psycopg2_mq worker finishing a
        # job on a cursor shared with our queues) is found by this re-check.
        self._claimer.next_due = self.clock()

    def _free_slots(self) -> int:
        return min(self.concurrency - len(self._in_slot), self._max_unrecorded - len(self._tasks))

    async def _sleep(self, delay: float) -> None:
        assert self._wakeup is not None
        if self._wakeup.is_set():
            self._wakeup.clear()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), delay)
        self._wakeup.clear()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    # ---------------------------------------------------------------- the connection

    def _on_notify(self, channel: str, payload: str) -> None:
        if channel == channels.ABORT_CHANNEL:
            try:
                self._abort([channels.parse_finished(payload).job_id])
            except ValueError as ex:  # a missed abort costs latency only: maintenance reads the requests
                log.warning("ignoring a malformed notification on %r: %r (%s)", channel, payload, ex)
            return
        if channel == channels.PAUSE_CHANNEL:
            if self._pauses.note(payload):  # resumed: its due jobs are ours to claim
                self._claimer.next_due = self.clock()
                self._wake()
            return
        queue = self._channels.get(channel)
        if queue is None:
            log.warning("ignoring a notification on unknown channel %r", channel)
            return
        try:
            note = channels.parse_queue_note(payload)
        except ValueError as ex:
            log.warning("ignoring a malformed notification on %r: %r (%s)", channel, payload, ex)
            return
        if note.kind == "job":
            self._claimer.hint(note.when)
            self._wake()
        elif note.kind == "schedule" and self._scheduler.hint(queue, note.when):
            self._wake()

    async def _connect(self, *, first: bool) -> None:
        """Open (or replace) the link; then anything may have been enqueued meanwhile: look."""
        await self._link.connect(first=first, prove=self._prove_session, recover=self._recover)
        if self._link.connected:
            # Listening now: read the pauses, which a NOTIFY keeps current from here on.
            try:
                await self._tx.run("read paused queues", self._pauses.reload)
            except Exception as ex:  # maintenance reads them again
                log.warning("reading the paused queues failed (%s); maintenance reads them again", ex)
            self._claimer.next_due = self.clock()

    async def _prove_session(self, listener: Listener) -> None:
        await prove_session(listener, self.engine, self._st, lock_key=self.lock_key)

    async def _recover(self, old_lock_id: int, lock_id: int) -> None:
        await self._maintenance.recover(old_lock_id, lock_id, list(self._jobs))

    # ---------------------------------------------------------------- jobs

    def _start(self, job: JobContext, scheduled: datetime.datetime, now: datetime.datetime) -> None:
        log.info(
            "running job %s (%s.%s, cursor_key=%s), %.3fs after its scheduled time",
            job.id,
            job.queue,
            job.method,
            job.cursor_key,
            (now - scheduled).total_seconds(),
        )
        self._jobs[job.id] = job
        self._in_slot.add(job.id)
        self._tasks[job.id] = asyncio.create_task(self._run_job(job), name=f"aiomq job {job.id}")
        if self._hooks is not None:
            self._hooks.started(job, scheduled, now)

    async def _run_job(self, job: JobContext) -> None:
        handler = self.handlers[job.queue]
        self._in_handler[job.id] = not handler.is_async
        try:
            outcome = await self._executor.execute(
                handler, job, self._policies.timeout_for(job.queue, job.trace)
            )
        except asyncio.CancelledError:
            self._in_handler.pop(job.id, None)
            task = asyncio.current_task()
            aborted = job.abort_requested and handler.is_async  # a sync job's cancel is always stop's
            if not aborted or task is None or task.uncancel() > 0:  # stop(timeout)
                self._finished(job, None)
                await asyncio.shield(self._recorder.abandon(job, sync=not handler.is_async))
                self._forget(job.id)
                raise
            outcome = self._executor.aborted(job)
        self._in_handler.pop(job.id, None)
        self._finished(job, outcome)
        if job.abort_requested:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # the handler swallowed the abort's cancel
                task.uncancel()
        self._in_slot.discard(job.id)  # the next claim need not wait for this outcome to be recorded
        self._wake()
        try:
            await asyncio.shield(self._recorder.record(job, outcome))
        finally:
            self._forget(job.id)

    def _finished(self, job: JobContext, outcome: Outcome | None) -> None:
        if self._hooks is not None:
            self._hooks.finished(job, outcome)

    def _forget(self, job_id: int) -> None:
        self._settled += 1
        self._jobs.pop(job_id, None)
        self._tasks.pop(job_id, None)
        self._in_slot.discard(job_id)
        self._wake()

    def _on_recorded(self, record: Record) -> None:
        if self._hooks is not None:
            self._hooks.recorded(record.job, record.state, record.retry_wait is not None)
        if record.job.cursor_key is not None:  # its cursor is free: its next job may be ours
            self._claimer.hint(self.clock())
            self._wake()

    def _abort(self, job_ids: Iterable[int]) -> None:
        """Someone asked to abort these jobs: those running here stop (async) or are told (sync)."""
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is None or job.abort_requested:
                continue
            job.abort_requested = True
            log.warning("job %s: abort requested", job_id)
            task = self._tasks.get(job_id)
            if self._in_handler.get(job_id) is False and task is not None:  # an async handler is running
                task.cancel()

    def _cancel_handlers(self) -> None:
        for job_id in list(self._in_handler):
            task = self._tasks.get(job_id)
            if task is not None and not task.done():
                task.cancel()

    async def _teardown(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()))
        await self._pruner.stop()
        lock_id = self._link.lock_id
        if lock_id is not None and self._link.alive:
            await self._maintenance.release(lock_id)
        await self._link.close()
        log.info("worker %s stopped", self.name)
