"""AsyncMQWorker: claims due jobs of its queues, runs their handlers, records each outcome once.

The loop (``_serve``) waits for the first of: a NOTIFY hint, a job finishing, the next due time, the next
maintenance, or stop; then it claims up to its free capacity and starts one task per job. Each job task
runs the handler and then records the outcome in one transaction that cancellation cannot interrupt.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import json
import logging
import os
import random
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import anyio
import anyio.to_thread
import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from . import sql
from .compiled import Compiled
from .errors import FailedJobError, SchemaMissingError
from .events import finished_event
from .listener import Listener, libpq_dsn
from .model import Model
from .records import JobContext, check_queue_name, utcnow
from .retry import is_retryable, is_unique_violation
from .schedules import next_rrule_time, schedule_statements
from .serialize import dump_json, error_result
from .source import AsyncMQSource

__all__ = ["AsyncMQWorker"]

log = logging.getLogger(__name__)

_EPOCH = datetime.datetime(1970, 1, 1)


def _seconds(value: float | datetime.timedelta) -> float:
    return value.total_seconds() if isinstance(value, datetime.timedelta) else float(value)


class _Handler:
    """A queue's handler: ``execute_job(job)`` or a plain callable, sync (run in a thread) or async."""

    def __init__(self, queue: str, handler: Any) -> None:
        fn = getattr(handler, "execute_job", None)
        if fn is None:
            if not callable(handler):
                raise TypeError(
                    f"handler for queue {queue!r} must have an execute_job(job) method or be callable"
                )
            fn = handler
        self.fn: Callable[[JobContext], Any] = fn
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004
        )


class _Outcome:
    __slots__ = ("result", "save_cursor", "state")

    def __init__(self, state: str, result: Any, save_cursor: bool) -> None:
        self.state = state
        self.result = result
        self.save_cursor = save_cursor


class _Record:
    """An outcome ready to store: JSON already encoded and checked."""

    __slots__ = ("cursor_json", "job", "result_json", "state")

    def __init__(self, job: JobContext, state: str, result_json: str | None, cursor_json: str | None) -> None:
        self.job = job
        self.state = state
        self.result_json = result_json
        self.cursor_json = cursor_json


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
        self.handlers = {check_queue_name(q): _Handler(q, h) for q, h in queues.items()}
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
        self._st = sql.statements(model)
        self._ss = schedule_statements(model)
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        # The statements that run on the listener connection, as asyncpg SQL.
        self._claim_sql = Compiled(self._st.claim, engine.dialect)
        self._adopt_sql = Compiled(self._st.adopt, engine.dialect)
        self._next_due_sql = Compiled(self._st.next_due, engine.dialect)
        self._finish_quiet_sql = Compiled(self._st.finish_quiet, engine.dialect)
        self._channels = {f"{model.channel_prefix}{q}": q for q in self.queues}

        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = False
        self._stopping = False
        self._wakeup: asyncio.Event | None = None
        self._listening: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._listener: Listener | None = None
        self._lock_id: int | None = None
        self._next_due: datetime.datetime | None = None
        self._owned: list[str] = []  # queues whose schedules this worker fires
        # Counters that tell whether something happened while a query was in flight (its answer may
        # predate a finish or a hint).
        self._settled = 0
        self._hints = 0
        self._db_next_due: datetime.datetime | None = None
        self._hinted_during_refresh = False
        self._next_schedule: datetime.datetime | None = None
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._jobs: dict[int, JobContext] = {}
        self._in_handler: dict[int, bool] = {}  # job id -> handler is sync
        # The jobs that hold one of the ``concurrency`` slots: claimed, handler not yet returned. A job
        # whose outcome is being recorded frees its slot, so the next claim overlaps the finish; at most
        # ``_max_unrecorded`` jobs may be claimed or waiting for their outcome to be recorded.
        self._in_slot: set[int] = set()
        self._max_unrecorded = 4 * concurrency
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._finishing: list[tuple[_Record, asyncio.Future[None]]] = []
        # Claims that failed in a way that may have committed (the reply was lost): their start_time
        # stamps, with the loop time of the failure. Looked up (``_adopt``) after the next successful
        # claim and at each maintenance, and forgotten once a lookup ran ``timeout`` after the failure.
        self._unsure: dict[datetime.datetime, float] = {}
        self._finisher_wakeup: asyncio.Event = asyncio.Event()

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
            "lock_id": self._lock_id,
            "listener_connected": self._listener is not None and self._listener.alive,
            "active_jobs": [
                {
                    "id": job.id,
                    "queue": job.queue,
                    "method": job.method,
                    "args": job.args,
                    "cursor_key": job.cursor_key,
                }
                for job in self._jobs.values()
            ],
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
        restore = self._install_signals() if self.capture_signals and not until_idle else None
        self._finisher_wakeup = asyncio.Event()
        finisher = asyncio.create_task(self._finisher(), name=f"aiomq finisher {self.name}")
        try:
            await self._check_schema()
            await self._connect(first=True)
            if self._listener is None:  # stopped while connecting
                return
            self._listening.set()
            log.info(
                "worker %s listening on queues %s (lock_id=%s)",
                self.name,
                ",".join(self.queues),
                self._lock_id,
            )
            await self._serve(until_idle=until_idle)
        except BaseException:
            self._cancel_handlers()
            raise
        finally:
            try:
                await asyncio.shield(self._teardown())
            finally:
                finisher.cancel()  # idle now: every job task waited for its outcome to be recorded
                if restore is not None:
                    restore()
                self._running = False
                self._stopping = False  # a stopped worker may run again
                self._listening = None
                self._stopped.set()

    async def _serve(self, *, until_idle: bool) -> None:
        loop = asyncio.get_running_loop()
        next_maintenance = loop.time()
        assert self._wakeup is not None
        while not self._stopping:
            if self._listener is None or not self._listener.alive:
                await self._connect(first=False)
                continue
            if loop.time() >= next_maintenance:
                await self._maintenance()
                if self._unsure and self._listener is not None and self._listener.alive:
                    await self._adopt()
                next_maintenance = loop.time() + self.timeout
                # NOTIFY is a hint: a cursor freed without one (fail_lost_job, a psycopg2_mq worker
                # finishing a job on a cursor shared with our queues) is found by this re-check.
                self._next_due = self.clock()
                if self._listener is None or not self._listener.alive:
                    continue  # maintenance may have spanned an outage: reconnect before claiming
            if self._next_schedule is not None and self._next_schedule <= self.clock():
                await self._apply_schedules()
            free = self._free_slots()
            claimed = 0
            settled = self._settled
            if free > 0 and (until_idle or self._is_due()):
                claimed = await self._claim(free)
                if claimed == 0 and self._is_due() and not self._hinted_during_refresh:
                    db_due = self._db_next_due
                    if db_due is not None and db_due <= self.clock():
                        # Due jobs exist but are locked (another worker's claim, a caller's FOR UPDATE):
                        # look again shortly instead of spinning.
                        self._next_due = self.clock() + datetime.timedelta(seconds=0.05)
                    else:  # an early hint (NOTIFY times are whole seconds): the database knows better
                        self._next_due = db_due
            if until_idle and claimed == 0 and not self._tasks and self._settled == settled:
                return  # (a job that finished during the claim may have freed a cursor: claim again)
            delay = next_maintenance - loop.time()
            if self._free_slots() > 0 and self._next_due is not None:
                delay = min(delay, (self._next_due - self.clock()).total_seconds())
            if self._next_schedule is not None:
                delay = min(delay, (self._next_schedule - self.clock()).total_seconds())
            if delay > 0 or not self._is_due():
                await self._sleep(max(delay, 0.0) + random.uniform(0, self.jitter))
        if self._tasks:
            log.info("worker %s waiting for %d job(s) to finish", self.name, len(self._tasks))
            await asyncio.wait(list(self._tasks.values()))

    def _free_slots(self) -> int:
        return min(self.concurrency - len(self._in_slot), self._max_unrecorded - len(self._tasks))

    def _is_due(self) -> bool:
        return self._next_due is not None and self._next_due <= self.clock()

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

    def _hint(self, when: datetime.datetime) -> None:
        self._hints += 1
        if self._next_due is None or when < self._next_due:
            self._next_due = when
        self._wake()

    # ---------------------------------------------------------------- listener

    def _on_notify(self, channel: str, payload: str) -> None:
        queue = self._channels.get(channel)
        if queue is None:
            log.warning("ignoring a notification on unknown channel %r", channel)
            return
        try:
            data = json.loads(payload)
            if not isinstance(data, dict) or not isinstance(data.get("t"), int | float):
                raise ValueError("no numeric 't'")
            when = _EPOCH + datetime.timedelta(seconds=int(data["t"]))
        except (ValueError, TypeError, OverflowError) as ex:
            log.warning("ignoring a malformed notification on %r: %r (%s)", channel, payload, ex)
            return
        if "j" in data:
            self._hint(when)
        elif "s" in data and queue in self._owned:
            if self._next_schedule is None or when < self._next_schedule:
                self._next_schedule = when
            self._wake()

    def _on_listener_lost(self) -> None:
        self._wake()

    async def _connect(self, *, first: bool) -> None:
        """Open (or rotate) the listener connection, retrying with capped backoff until stopped."""
        old_lock_id = self._lock_id
        if self._listener is not None:
            self._listener.abort()
            self._listener = None
        attempt = 0
        while not self._stopping:
            listener = Listener(
                dsn=self.listener_dsn,
                channels=self._channels,
                lock_key=self.lock_key,
                application_name=f"aiomq worker {self.name}"[:63],
                on_notify=self._on_notify,
                on_lost=self._on_listener_lost,
                json_deserializer=getattr(self.engine.dialect, "_json_deserializer", None) or json.loads,
            )
            try:
                lock_id = await listener.open()
                if first:
                    await self._prove_same_database(listener)
                if old_lock_id is not None:
                    await self._recover(old_lock_id, lock_id)
            except Exception as ex:
                listener.abort()
                if first and (
                    isinstance(ex, ValueError | SchemaMissingError)
                    or attempt + 1 >= len(self.retry_intervals)
                ):
                    raise
                delay = self._backoff(attempt)
                log.warning(
                    "worker %s cannot open its listener connection (%s); retrying in %.1fs",
                    self.name,
                    ex,
                    delay,
                )
                attempt += 1
                await self._sleep(delay)
                continue
            self._listener = listener
            self._lock_id = lock_id
            self._next_due = self.clock()  # anything may have been enqueued while we were away
            if old_lock_id is not None:
                log.info("worker %s reconnected (lock_id %s -> %s)", self.name, old_lock_id, lock_id)
            return

    async def _prove_same_database(self, listener: Listener) -> None:
        async def send(channel: str, payload: str) -> None:
            async with self.engine.begin() as conn:
                await conn.execute(self._st.notify, {"channel": channel, "payload": payload})

        if not await listener.probe(send, timeout=10):
            raise ValueError(
                "the listener connection and the engine do not reach the same database: a NOTIFY sent "
                "through the engine did not arrive on listener_dsn"
            )

    async def _recover(self, old_lock_id: int, lock_id: int) -> None:
        """After a reconnect, re-stamp the jobs still running here and move scheduler locks."""
        async with self.engine.begin() as conn:
            rows = await conn.execute(
                self._st.restamp,
                {"ids": list(self._jobs), "lock_id": lock_id, "name": self.name},
            )
            await conn.execute(self._st.move_locks, {"old_lock_id": old_lock_id, "lock_id": lock_id})
        recovered = [r.id for r in rows]
        if recovered:
            log.info(
                "worker %s re-stamped running jobs %s with lock_id=%s",
                self.name,
                recovered,
                lock_id,
            )

    def _backoff(self, attempt: int) -> float:
        base = self.retry_intervals[min(attempt, len(self.retry_intervals) - 1)]
        return base + random.uniform(0, self.jitter)

    # ---------------------------------------------------------------- database operations

    async def _check_schema(self) -> None:
        async def check(conn: AsyncConnection) -> None:
            for table in self._st.tables:
                found = await conn.scalar(sa.select(sa.func.to_regclass(table)))
                if found is None:
                    raise SchemaMissingError(table)

        await self._with_retries("schema check", check)

    async def _with_retries(
        self, what: str, op: Callable[[AsyncConnection], Any], *, while_stopping: bool = False
    ) -> Any:
        """Run ``op`` in a transaction, retried on retryable errors per ``retry_intervals``.

        Retries stop at shutdown unless ``while_stopping``: shutdown's own writes must still land.
        """
        attempts = len(self.retry_intervals)
        for attempt in range(attempts):
            try:
                async with self.engine.begin() as conn:
                    return await op(conn)
            except Exception as ex:
                gave_up = self._stopping and not while_stopping
                if attempt + 1 >= attempts or not self.is_retryable_error(ex) or gave_up:
                    raise
                delay = self._backoff(attempt)
                log.info("%s failed (%s); retry %d in %.1fs", what, ex, attempt + 1, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _maintenance(self) -> None:
        """Keepalive, stale scheduler locks, lost jobs. Failures are logged; the worker goes on."""
        assert self._listener is not None
        if not await self._listener.keepalive(timeout=min(self.timeout, 30)):
            return
        now = self.clock()

        async def op(conn: AsyncConnection) -> tuple[list[Any], list[Any]]:
            stale = list(await conn.execute(self._st.release_stale_locks, {"lock_key": self.lock_key}))
            lost = list(
                await conn.execute(
                    self._st.mark_lost, {"queues": self.queues, "lock_key": self.lock_key, "now": now}
                )
            )
            for job in lost:
                await self._job_finished(conn, job, self.model.JobStates.LOST, cursor_key=job.cursor_key)
            await self._scheduler_maintenance(conn, now)
            return stale, lost

        try:
            stale, lost = await self._with_retries("maintenance", op)
        except Exception:
            log.exception("maintenance failed; the worker goes on and tries again in %ss", self.timeout)
            return
        for row in stale:
            log.warning("released stale lock ns=%s key=%s of worker %s", row.ns, row.key, row.worker)
        for job in lost:
            log.error(
                "job %s (%s.%s, cursor_key=%s) of worker %s is lost: its worker is gone",
                job.id,
                job.queue,
                job.method,
                job.cursor_key,
                job.worker,
            )

    async def _scheduler_maintenance(self, conn: AsyncConnection, now: datetime.datetime) -> None:
        """Own the scheduling of every queue nobody owns; move stale schedules past ``now - timeout``."""
        ss = self._ss
        params = {"queues": self.queues, "lock_id": self._lock_id, "name": self.name}
        await conn.execute(ss.take_ownership, params)
        owned = [q for q in (await conn.scalars(ss.owned, params)).all() if q in self.handlers]
        if owned != self._owned:
            log.info("worker %s runs the schedules of queues %s", self.name, ",".join(owned) or "(none)")
        self._owned = owned
        if not owned:
            self._next_schedule = None
            return
        cutoff = now - datetime.timedelta(seconds=self.timeout)
        for schedule in await conn.execute(ss.stale, {"queues": owned, "before": cutoff}):
            try:
                next_time = next_rrule_time(schedule.rrule, schedule.created_time, cutoff)
            except Exception as ex:
                log.error(
                    "schedule %s: cannot evaluate rrule %r (%s); it will not fire",
                    schedule.id,
                    schedule.rrule,
                    ex,
                )
                await conn.execute(ss.set_next, {"schedule_id": schedule.id, "next_time": None})
                continue
            log.warning(
                "schedule %s (%s.%s) missed its time %s; skipping to %s",
                schedule.id,
                schedule.queue,
                schedule.method,
                schedule.next_execution_time,
                next_time,
            )
            await conn.execute(ss.set_next, {"schedule_id": schedule.id, "next_time": next_time})
        self._next_schedule = await conn.scalar(ss.next_time, {"queues": owned})

    async def _apply_schedules(self) -> None:
        """Fire every due schedule of the owned queues: one job each, no backfill."""
        now = self.clock()
        owned = list(self._owned)

        async def op(conn: AsyncConnection) -> list[Any]:
            fired = []
            due = list(await conn.execute(self._ss.due, {"queues": owned, "now": now}))
            if due:
                async with AsyncSession(bind=conn) as session:
                    source = self.mq_source_factory(dbsession=session, model=self.model)
                    for schedule in due:
                        try:  # one schedule that cannot fire (a bad rrule, a bad row) spares the others
                            async with session.begin_nested():
                                job = await source.call_schedule(
                                    schedule.id, now=now, when=schedule.next_execution_time, reload=False
                                )
                        except Exception as ex:
                            if self.is_retryable_error(ex):
                                raise
                            log.error("schedule %s cannot fire (%s); it will not fire again", schedule.id, ex)
                            await conn.execute(
                                self._ss.set_next, {"schedule_id": schedule.id, "next_time": None}
                            )
                            continue
                        fired.append((schedule.id, job))
                    await session.flush()
            self._next_schedule = await conn.scalar(self._ss.next_time, {"queues": owned})
            return fired

        try:
            fired = await self._with_retries("apply schedules", op)
        except Exception:
            log.exception("firing schedules failed; the worker goes on")
            self._next_schedule = now + datetime.timedelta(seconds=self.retry_intervals[-1])
            return
        for schedule_id, job in fired:
            log.info("schedule %s fired job %s", schedule_id, job.id)

    async def _claim(self, limit: int) -> int:
        """Claim up to ``limit`` due jobs and start them. Returns how many were started."""
        assert self._lock_id is not None
        now = self.clock()
        params = {
            "queues": self.queues,
            "now": now,
            "limit": limit,
            "lock_id": self._lock_id,
            "name": self.name,
        }
        races = 0
        attempt = 0
        while True:
            if self._listener is None or not self._listener.alive:
                return 0  # without our advisory lock, what we claim would look lost to everyone else
            try:
                # One statement on the listener connection: one round trip, one transaction, and it
                # can only commit while the advisory lock it stamps on the jobs is held. now is read per
                # attempt: a start_time taken before a retry's backoff could precede the moment the
                # job's cursor became free.
                now = params["now"] = self.clock()
                rows = await self._listener_fetch(self._claim_sql, params)
                break
            except Exception as ex:
                if is_unique_violation(ex) and races < 20:
                    races += 1  # another worker took a job of the same cursor: claim again at once
                    continue
                if not is_unique_violation(ex):  # it may have committed with its reply lost
                    self._unsure[now] = asyncio.get_running_loop().time()
                if self.is_retryable_error(ex) and attempt + 1 < len(self.retry_intervals):
                    delay = self._backoff(attempt)
                    log.info("claim failed (%s); retry %d in %.1fs", ex, attempt + 1, delay)
                    attempt += 1
                    await asyncio.sleep(delay)
                    if self._stopping:
                        return 0
                    continue
                log.exception("claim failed, the worker goes on: %s", ex)
                self._next_due = self.clock() + datetime.timedelta(seconds=self.retry_intervals[-1])
                return 0
        rows.sort(key=_due_order)
        for row in rows:
            self._start(JobContext.from_claim(row), row["scheduled_time"], now)
        if self._unsure:
            await self._adopt()
        if len(rows) >= limit:
            self._next_due = now  # there may be more: claim again when a slot frees
        else:
            await asyncio.sleep(0)  # let the handlers just started begin before the next query
            await self._refresh_next_due()
        return len(rows)

    async def _listener_fetch(self, statement: Compiled, params: Mapping[str, Any]) -> list[Any]:
        assert self._listener is not None
        return await self._listener.fetch(statement.sql, statement.args(params))

    async def _adopt(self) -> None:
        """Start the jobs of claims that committed although their reply was lost.

        They are ``running`` under this worker's live lock, so no maintenance would ever mark them lost:
        without this they would wait until the worker exits. Their handlers never ran, so they run now.
        """
        assert self._lock_id is not None
        looked_at = asyncio.get_running_loop().time()
        params = {
            "name": self.name,
            "stamps": list(self._unsure),
            "queues": self.queues,
            "known": list(self._jobs),
            "lock_id": self._lock_id,
        }
        try:
            rows = await self._listener_fetch(self._adopt_sql, params)
        except Exception as ex:
            log.warning("looking for the jobs of a failed claim failed (%s); looking again later", ex)
            return
        # A claim cut off on our side may still be committing on the server: keep looking for a while.
        self._unsure = {s: t for s, t in self._unsure.items() if looked_at - t < self.timeout}
        rows.sort(key=_due_order)
        for row in rows:
            log.warning("job %s was claimed by a claim whose reply was lost: running it now", row["id"])
            self._start(JobContext.from_claim(row), row["scheduled_time"], self.clock())

    async def _refresh_next_due(self) -> None:
        """Ask the database when the next job becomes claimable (None: wait for a hint)."""
        hints = self._hints
        value: datetime.datetime | None = None
        self._db_next_due = None
        try:
            rows = await self._listener_fetch(self._next_due_sql, {"queues": self.queues})
            value = rows[0][0]
        except Exception as ex:  # (the connection died, say): look again soon rather than never
            log.warning("reading the next due time failed (%s); looking again shortly", ex)
            value = self.clock() + datetime.timedelta(seconds=self.retry_intervals[0])
        # A hint that arrived while the query ran is newer than its answer: keep the earlier of the two.
        self._hinted_during_refresh = self._hints != hints
        hinted = self._next_due if self._hinted_during_refresh else None
        self._db_next_due = value
        self._next_due = min((t for t in (value, hinted) if t is not None), default=None)

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
        task = asyncio.create_task(self._run_job(job), name=f"aiomq job {job.id}")
        self._tasks[job.id] = task

    async def _run_job(self, job: JobContext) -> None:
        handler = self.handlers[job.queue]
        self._in_handler[job.id] = not handler.is_async
        try:
            outcome = await self._execute(handler, job)
        except asyncio.CancelledError:
            self._in_handler.pop(job.id, None)
            await asyncio.shield(self._abandon(job, sync=not handler.is_async))
            self._forget(job.id)
            raise
        self._in_handler.pop(job.id, None)
        self._in_slot.discard(job.id)  # the next claim need not wait for this outcome to be recorded
        self._wake()
        try:
            await asyncio.shield(self._finish(job, outcome))
        finally:
            self._forget(job.id)

    def _forget(self, job_id: int) -> None:
        self._settled += 1
        self._jobs.pop(job_id, None)
        self._tasks.pop(job_id, None)
        self._in_slot.discard(job_id)
        self._wake()

    async def _execute(self, handler: _Handler, job: JobContext) -> _Outcome:
        states = self.model.JobStates
        try:
            if handler.is_async:
                result = await handler.fn(job)
            else:
                result = await anyio.to_thread.run_sync(
                    _call_in_thread,
                    handler.fn,
                    job,
                    self.name,
                    abandon_on_cancel=True,
                    limiter=self._limiter,
                )
        except FailedJobError as ex:
            log.info("job %s failed on purpose (update_cursor=%s)", job.id, ex.update_cursor)
            return _Outcome(states.FAILED, ex.result, ex.update_cursor)
        except Exception as ex:
            log.exception("error while handling job=%s", job.id)
            return _Outcome(states.FAILED, self.result_from_error(ex), False)
        return _Outcome(states.COMPLETED, result, True)

    def _prepare(self, job: JobContext, outcome: _Outcome) -> _Record:
        """Encode the outcome; what JSON or jsonb cannot store fails the job with an error saying why."""
        states = self.model.JobStates
        try:
            result_json = None if outcome.result is None else dump_json(outcome.result, "the job result")
            cursor_json = None
            if outcome.save_cursor and job.cursor_key is not None:
                cursor_json = dump_json(job.cursor, "the job's cursor")
        except (TypeError, ValueError) as ex:
            log.error("job %s failed: %s", job.id, ex)
            return _Record(job, states.FAILED, dump_json(error_result(ex), "error result"), None)
        if job.cursor_key is None and job.cursor is not None:
            log.warning("job %s has no cursor_key: ignoring the cursor it set", job.id)
        return _Record(job, outcome.state, result_json, cursor_json)

    async def _finish(self, job: JobContext, outcome: _Outcome) -> None:
        """Hand the outcome to the finisher, which records outcomes in batches, and wait until it did."""
        done = asyncio.get_running_loop().create_future()
        self._finishing.append((self._prepare(job, outcome), done))
        self._finisher_wakeup.set()
        await done

    async def _finisher(self) -> None:
        """Record finished jobs, as many per transaction as have finished meanwhile."""
        while True:
            await self._finisher_wakeup.wait()
            self._finisher_wakeup.clear()
            while self._finishing:
                batch, self._finishing = self._finishing[:500], self._finishing[500:]
                try:
                    await self._finish_batch([record for record, _ in batch])
                except Exception as ex:  # one bad outcome must not lose the others: record one by one
                    log.warning(
                        "recording %d jobs at once failed (%s); recording them one by one", len(batch), ex
                    )
                    for record, _ in batch:
                        try:
                            await self._finish_one(record)
                        except Exception:  # never let the finisher die: jobs wait on it
                            log.exception("could not record job %s", record.job.id)
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

    async def _finish_batch(self, records: list[_Record]) -> None:
        """Record many outcomes: those whose event nobody listens to (with their cursors) in one autocommit
        statement, the rest (events, and those the statement left out) in one transaction. Retried while
        retryable."""
        rows = await self._retrying(len(records), lambda: self._finish_quiet(records))
        done = {row["id"] for row in rows}
        for record in records:
            if record.job.id in done:
                self._log_recorded(record, True)
        records = [r for r in records if r.job.id not in done]
        if records:
            await self._finish_in_transaction(records)

    async def _finish_quiet(self, records: list[_Record]) -> list[Any]:
        params = {
            "ids": [r.job.id for r in records],
            "states": [r.state for r in records],
            "results": [r.result_json for r in records],
            "cursors": [r.cursor_json for r in records],
            "now": self.clock(),
        }
        # One statement on a pooled connection's driver: SQLAlchemy's execution path was a quarter of
        # a no-op drain's CPU. A connection that failed other than by an SQL error is discarded.
        async with self._autocommit.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            try:
                rows: list[Any] = await driver.fetch(
                    self._finish_quiet_sql.sql, *self._finish_quiet_sql.args(params)
                )
            except Exception as ex:
                if not isinstance(ex, asyncpg.PostgresError):
                    await conn.invalidate(ex)
                raise
            return rows

    async def _retrying(self, count: int, op: Callable[[], Awaitable[Any]]) -> Any:
        """``op()`` until it succeeds; retryable errors back off, others (and giving up at stop) raise."""
        attempt = 0
        while True:
            try:
                return await op()
            except Exception as ex:
                gave_up = self._stopping and attempt >= len(self.retry_intervals)
                if gave_up or not self.is_retryable_error(ex):
                    raise
                delay = self._backoff(attempt)
                log.warning("recording %d jobs failed (%s); retrying in %.1fs", count, ex, delay)
                attempt += 1
                await asyncio.sleep(delay)

    async def _finish_in_transaction(self, records: list[_Record]) -> None:
        by_id = {r.job.id: r for r in records}

        async def op(conn: AsyncConnection) -> list[Any]:
            rows = list(
                await conn.execute(
                    self._st.finish_many,
                    {
                        "ids": [r.job.id for r in records],
                        "states": [r.state for r in records],
                        "results": [r.result_json for r in records],
                        "now": self.clock(),
                    },
                )
            )
            saves = [by_id[row.id] for row in rows if by_id[row.id].cursor_json is not None]
            if saves:
                await conn.execute(
                    self._st.save_cursors,
                    {
                        "keys": [r.job.cursor_key for r in saves],
                        "properties": [r.cursor_json for r in saves],
                        "job_ids": [r.job.id for r in saves],
                    },
                )
            for row in rows:
                if row.has_listeners:
                    record = by_id[row.id]
                    result = None if record.result_json is None else json.loads(record.result_json)
                    await self._emit_finished(conn, row, record.state, result)
            keys = sorted({row.cursor_key for row in rows if row.cursor_key is not None})
            if keys:
                await conn.execute(self._st.notify_successors, {"keys": keys})
            return rows

        rows = await self._retrying(len(records), lambda: self._transaction(op))
        recorded = {row.id for row in rows}
        for record in records:
            self._log_recorded(record, record.job.id in recorded)

    async def _transaction(self, op: Callable[[AsyncConnection], Any]) -> Any:
        async with self.engine.begin() as conn:
            return await op(conn)

    def _log_recorded(self, record: _Record, recorded: bool) -> None:
        if not recorded:
            log.warning(
                "job %s finished (%s) but is no longer running or lost: outcome discarded",
                record.job.id,
                record.state,
            )
            return
        log.info("finished job %s: %s", record.job.id, record.state)
        if record.job.cursor_key is not None:
            self._hint(self.clock())

    async def _finish_one(self, record: _Record) -> None:
        """Record one outcome; retried until it commits or the worker is stopped. If the database refuses
        it for good, the job is failed with an error result saying why."""
        states = self.model.JobStates
        job = record.job
        outcome = _Outcome(record.state, None, False)
        result_json, cursor_json = record.result_json, record.cursor_json

        async def op(conn: AsyncConnection) -> bool:
            now = self.clock()
            row = (
                await conn.execute(
                    self._st.finish,
                    {
                        "job_id": job.id,
                        "state": outcome.state,
                        "result_json": result_json,
                        "now": now,
                    },
                )
            ).first()
            if row is None:
                return False
            result_value = None if result_json is None else json.loads(result_json)
            if cursor_json is not None:
                await conn.execute(
                    self._st.save_cursor,
                    {"key": job.cursor_key, "properties_json": cursor_json, "job_id": job.id},
                )
            await self._job_finished(conn, row, outcome.state, result=result_value, cursor_key=job.cursor_key)
            return True

        attempt = 0
        rejected = False
        while True:
            try:
                async with self.engine.begin() as conn:
                    recorded = await op(conn)
                break
            except Exception as ex:
                if self.is_retryable_error(ex):
                    if self._stopping and attempt >= len(self.retry_intervals):
                        log.error("giving up recording job %s after %d attempts: %s", job.id, attempt, ex)
                        return
                    delay = self._backoff(attempt)
                    log.warning("recording job %s failed (%s); retrying in %.1fs", job.id, ex, delay)
                    attempt += 1
                    await asyncio.sleep(delay)
                    continue
                if rejected:
                    log.exception("could not record job %s", job.id)
                    return
                # Retrying cannot fix this (the database rejects the result or the cursor): say so.
                log.error("job %s: the database rejected its outcome: %s", job.id, ex)
                rejected = True
                outcome = _Outcome(states.FAILED, None, False)
                cursor_json = None
                result_json = dump_json(
                    {
                        **error_result(ex),
                        "message": f"the database rejected the job's outcome: {ex}",
                    },
                    "error result",
                )
        self._log_recorded(_Record(job, outcome.state, result_json, cursor_json), recorded)

    async def _job_finished(
        self,
        conn: AsyncConnection,
        row: Any,
        state: str,
        *,
        result: Any = None,
        cursor_key: str | None = None,
    ) -> None:
        """In the state change's transaction: the finished event (if anyone listens), a hint for waiters,
        and one for whoever serves the cursor's next job."""
        if row.has_listeners:
            await self._emit_finished(conn, row, state, result)
        await conn.execute(
            self._st.notify,
            {"channel": sql.FINISHED_CHANNEL, "payload": json.dumps({"j": row.id, "s": state})},
        )
        if cursor_key is not None:
            await conn.execute(self._st.notify_successors, {"keys": [cursor_key]})

    async def _emit_finished(self, conn: AsyncConnection, row: Any, state: str, result: Any) -> None:
        """Emit ``mq.job_finished.<state>.<queue>.<method>`` through the source factory, in ``conn``."""
        lost = state == self.model.JobStates.LOST
        name, data = finished_event(state, row, result=result, lost=lost)
        async with AsyncSession(bind=conn) as session:
            source = self.mq_source_factory(dbsession=session, model=self.model)
            await source.emit_event(name, data, now=self.clock())
            await session.flush()

    async def _abandon(self, job: JobContext, *, sync: bool) -> None:
        """A handler was cancelled by stop(timeout): an async job goes back to pending, a sync one is lost."""
        states = self.model.JobStates

        async def op(conn: AsyncConnection) -> Any:
            if sync:
                row = (
                    await conn.execute(self._st.mark_one_lost, {"job_id": job.id, "now": self.clock()})
                ).first()
                if row is not None:
                    await self._job_finished(conn, row, states.LOST, cursor_key=job.cursor_key)
                return row
            row = (await conn.execute(self._st.requeue, {"job_id": job.id})).first()
            if row is not None:
                await conn.execute(
                    self._st.notify,
                    {
                        "channel": f"{self.model.channel_prefix}{job.queue}",
                        "payload": json.dumps(
                            {"j": job.id, "t": int((self.clock() - _EPOCH).total_seconds())}
                        ),
                    },
                )
            return row

        try:
            await self._with_retries("abandon job", op, while_stopping=True)
        except Exception:
            log.exception("could not release job %s after cancelling its handler", job.id)
            return
        if sync:
            log.error("job %s: its sync handler could not be interrupted; marked lost", job.id)
        else:
            log.warning("job %s: handler cancelled at stop; the job is pending again", job.id)

    def _cancel_handlers(self) -> None:
        for job_id in list(self._in_handler):
            task = self._tasks.get(job_id)
            if task is not None and not task.done():
                task.cancel()

    async def _teardown(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()))
        listener, self._listener = self._listener, None
        lock_id = self._lock_id
        if listener is not None and lock_id is not None and listener.alive:

            async def release(conn: AsyncConnection) -> None:
                await conn.execute(self._st.release_my_locks, {"lock_id": lock_id})

            try:
                await self._with_retries("release locks", release, while_stopping=True)
            except Exception as ex:  # they go stale with our advisory lock; any maintenance deletes them
                log.warning("could not release the locks of worker %s: %s", self.name, ex)
        if listener is not None:
            await listener.close()
        self._lock_id = None
        log.info("worker %s stopped", self.name)

    # ---------------------------------------------------------------- signals

    def _install_signals(self) -> Callable[[], None] | None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("capture_signals=True needs run() on the main thread")
        loop = asyncio.get_running_loop()
        sigints = 0

        def on_sigint() -> None:
            nonlocal sigints
            sigints += 1
            if sigints == 1:
                log.info("SIGINT: shutting down gracefully (again to stop at once)")
                self.shutdown_gracefully()
            else:
                log.warning("second SIGINT: cancelling running handlers")
                self._cancel_handlers()

        def on_sigterm() -> None:
            log.info("SIGTERM: shutting down gracefully")
            self.shutdown_gracefully()

        def on_sigusr1() -> None:
            log.warning("status: %s", json.dumps(self.get_status(), default=str))

        handlers = {
            signal.SIGINT: on_sigint,
            signal.SIGTERM: on_sigterm,
            signal.SIGUSR1: on_sigusr1,
        }
        previous = {sig: signal.getsignal(sig) for sig in handlers}
        for sig, fn in handlers.items():
            loop.add_signal_handler(sig, fn)

        def restore() -> None:
            for sig, old in previous.items():
                loop.remove_signal_handler(sig)
                if old is not None:
                    signal.signal(sig, old)

        return restore


def _due_order(row: Any) -> tuple[Any, ...]:
    return row["scheduled_time"], row["created_time"], row["id"]


def _call_in_thread(fn: Callable[[JobContext], Any], job: JobContext, name: str) -> Any:
    thread = threading.current_thread()
    old = thread.name
    thread.name = f"{name},job={job.id}"
    try:
        return fn(job)
    except Exception:
        raise
    except BaseException as ex:  # SystemExit and friends from a handler fail the job, not the worker
        raise RuntimeError(f"handler raised {type(ex).__name__}: {ex}") from ex
    finally:
        thread.name = old
