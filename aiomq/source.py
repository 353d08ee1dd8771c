"""AsyncMQSource: enqueue and inspect jobs, inside the caller's transaction or in transactions of its own.

A facade: validation and inserting live in :mod:`aiomq.enqueue`, what a state change sends in
:mod:`aiomq.events`, the statements in :mod:`aiomq.sql`, schedules and listeners in :mod:`aiomq.registry`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from . import jobops, pruning, queues
from .compiled import Compiled
from .enqueue import Enqueuer, validate_call, validate_call_item
from .events import emit_to_listeners
from .model import Model, finished_states
from .pooling import is_pooled
from .records import JobInfo, QueuedJob, to_naive_utc, utcnow
from .registry import Registry
from .retry import RETRIED_BY_KEY, Retry
from .schema import schema_errors
from .serialize import dump_json
from .sql import statements
from .waiters import HubRead, wait_for_job

__all__ = ["AsyncMQSource"]

log = logging.getLogger(__name__)


class AsyncMQSource(Registry):
    """Enqueue and inspect jobs. Give exactly one of ``dbsession`` (never commits) or ``engine`` (commits).

    Schedules and listeners (``add_schedule``, ``add_listener``, ...) come from :class:`Registry`.
    """

    def __init__(
        self,
        *,
        model: Model,
        dbsession: AsyncSession | None = None,
        engine: AsyncEngine | None = None,
    ) -> None:
        if (dbsession is None) == (engine is None):
            raise ValueError("AsyncMQSource needs exactly one of dbsession= or engine=")
        if dbsession is not None and not isinstance(dbsession, AsyncSession):
            raise ValueError(f"dbsession must be an sqlalchemy AsyncSession, got {dbsession!r}")
        if engine is not None and not isinstance(engine, AsyncEngine):
            raise ValueError(f"engine must be an sqlalchemy AsyncEngine, got {engine!r}")
        self.model = model
        self.dbsession = dbsession
        self.engine = engine
        self._st = statements(model)
        self._enqueuer = Enqueuer(self._st)
        self._autocommit = None if engine is None else engine.execution_options(isolation_level="AUTOCOMMIT")

    # ---------------------------------------------------------------- plumbing

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncSession]:
        with schema_errors():
            if self.dbsession is not None:
                yield self.dbsession
            else:
                assert self.engine is not None
                async with AsyncSession(self.engine, expire_on_commit=False) as session, session.begin():
                    yield session

    def _bound_engine(self) -> AsyncEngine:
        if self.engine is not None:
            return self.engine
        assert self.dbsession is not None
        bind = self.dbsession.bind
        if isinstance(bind, AsyncEngine):
            return bind
        if isinstance(bind, AsyncConnection):
            return bind.engine
        raise ValueError("this needs the dbsession to be bound to an AsyncEngine (wait_for_job, prune_jobs)")

    # ---------------------------------------------------------------- enqueue

    async def call(
        self,
        queue: str,
        method: str,
        args: Any = None,
        *,
        when: datetime.datetime | datetime.timedelta | None = None,
        now: datetime.datetime | None = None,
        cursor_key: str | None = None,
        collapse_on_cursor: bool | None = None,
        conflict_resolver: Callable[[Any], Any] | None = None,
        trace: Any = None,
        job_kwargs: dict[str, Any] | None = None,
        schedule_ids: Iterable[int] | None = None,
        listener_ids: Iterable[int] | None = None,
        retry: Retry | int | None = None,
        timeout: float | datetime.timedelta | None = None,
        priority: int = 0,
    ) -> QueuedJob:
        """Enqueue a job, or join the pending collapsible job on its cursor (then ``created`` is False).

        ``priority`` (-32768 to 32767, default 0): among a queue's due jobs, higher is claimed first, by
        aiomq workers; a cursor's jobs keep their order whatever their priorities.

        ``retry`` (a :class:`~aiomq.Retry`, or an int n for ``Retry(max_attempts=n)``) and ``timeout``
        (seconds or a timedelta) go in the job's trace: they override the worker's ``retry`` and
        ``job_timeout`` for this job. A join keeps the pending job's own.
        """
        call = validate_call(  # everything is checked before any SQL
            self._st.parts.job.c,
            queue,
            method,
            args,
            when=when,
            now=now,
            cursor_key=cursor_key,
            collapse_on_cursor=collapse_on_cursor,
            conflict_resolver=conflict_resolver,
            trace=trace,
            job_kwargs=job_kwargs,
            schedule_ids=schedule_ids,
            listener_ids=listener_ids,
            retry=retry,
            timeout=timeout,
            priority=priority,
        )
        if self._autocommit is not None and not call.linked and not await is_pooled(self._autocommit):
            # Engine mode: a new job is one autocommit statement (INSERT and NOTIFY), one round trip
            # (not behind a transaction pooler: SQLAlchemy prepares and executes in two).
            # A collapse (no row) changed nothing: joining takes the transaction below.
            with schema_errors():
                async with self._autocommit.connect() as conn:
                    row = (await conn.execute(*self._enqueuer.enqueue_notify(call))).first()
            if row is not None:
                log.info("queued job %s (%s.%s, cursor_key=%s)", row.id, queue, method, cursor_key)
                return QueuedJob(row.id, queue, method, cursor_key, row.scheduled_time, True)
        async with self._session() as session:
            return await self._enqueuer.insert_or_join(session, call)

    async def call_many(self, calls: Iterable[Mapping[str, Any]]) -> list[QueuedJob]:
        """Enqueue many jobs in few statements; returns one ``QueuedJob`` per call, in order.

        Each call is a mapping of :meth:`call`'s arguments (``queue``, ``method``, and optionally ``args``
        and the keyword arguments), with ``call``'s meaning item by item: cursors, collapsing, conflict
        resolvers, provenance ids. Calls that share a collapse slot join the first of them. Jobs without
        a collapse slot go in one multi-row INSERT; collapsing calls go one by one in (cursor_key, queue,
        method) order, so two concurrent batches lock their slots in the same order and cannot deadlock.
        At most one NOTIFY per queue is sent for the whole batch. Everything is validated first: one bad
        call raises (naming its position) before any SQL.
        """
        batch_now = utcnow()  # one transaction, one created_time (unless a call gives its own now)
        columns = self._st.parts.job.c
        planned = [validate_call_item(columns, i, item, batch_now) for i, item in enumerate(calls)]
        async with self._session() as session:
            return await self._enqueuer.insert_many(session, planned)

    # ---------------------------------------------------------------- lookups

    async def get_job(self, job_id: int, *, for_update: bool = False, raises: bool = True) -> Any:
        """The ``model.Job`` row (detached with every column loaded from an engine source)."""
        return await self._get_row(self.model.Job, "job", job_id, for_update, raises)

    async def _get_row(self, cls: type[Any], what: str, row_id: int, for_update: bool, raises: bool) -> Any:
        jobops.check_for_update(for_update, self.dbsession is None, what)
        async with self._session() as session:
            return await jobops.get_row(
                session,
                cls,
                what,
                row_id,
                for_update=for_update,
                raises=raises,
                detach=self.dbsession is None,
            )

    async def find_jobs(
        self,
        *,
        queue: str | None = None,
        method: str | None = None,
        state: str | None = None,
        cursor_key: str | None = None,
        limit: int = 100,
    ) -> list[JobInfo]:
        """Jobs matching every given filter, newest first."""
        filters = jobops.job_filters(
            self._st, queue=queue, method=method, state=state, cursor_key=cursor_key, limit=limit
        )
        async with self._session() as session:
            return await jobops.find_jobs(session, self._st, filters, limit)

    async def get_cursor(self, key: str) -> dict[str, Any] | None:
        """A cursor's saved properties, or None if no job on it has finished yet."""
        async with self._session() as session:
            value = await session.scalar(self._st.lookups.cursor_properties, {"key": key})
        return value  # type: ignore[no-any-return,unused-ignore]

    async def _job_info(self, job_id: int) -> JobInfo | None:
        async with self._bound_engine().connect() as conn:
            row = (await conn.execute(self._st.lookups.job_info, {"job_id": job_id})).first()
        return None if row is None else JobInfo.from_row(row)

    # ---------------------------------------------------------------- state changes

    async def retry_job(self, job_id: int, *, now: datetime.datetime | None = None) -> QueuedJob:
        """Enqueue a new job like ``job_id`` (any state), at its original scheduled time."""
        async with self._session() as session:
            return await jobops.retry_job(session, self._st, self._enqueuer, job_id, self._now(now))

    async def cancel_job(self, job_id: int, *, now: datetime.datetime | None = None) -> None:
        """Cancel a ``pending`` or ``failed`` job; anything else raises ``RuntimeError``."""
        now = self._now(now)
        async with self._session() as session:
            await jobops.cancel_job(session, self._st, self._enqueuer, job_id, now)

    async def abort_job(self, job_id: int, *, now: datetime.datetime | None = None) -> None:
        """Abort a job: a ``pending`` one is canceled at once (as ``cancel_job``); for a ``running`` one
        a request is stored (``aiomq_abort_request``) and its worker woken: it cancels an async handler
        (a sync one sees ``job.abort_requested``) and records the job ``canceled``. Any other state raises
        ``RuntimeError`` and changes nothing; an unknown id raises ``LookupError``."""
        now = self._now(now)
        async with self._session() as session:
            await jobops.abort_job(session, self._st, self._enqueuer, job_id, now)

    async def fail_lost_job(self, job_id: int, *, result: Any = None) -> None:
        """Move a ``lost`` job to ``failed`` (freeing its cursor), optionally with a ``result``."""
        async with self._session() as session:
            await jobops.fail_lost_job(session, self._st, self._enqueuer, job_id, result)

    # ---------------------------------------------------------------- operating queues

    async def pause_queue(self, queue: str, *, now: datetime.datetime | None = None) -> bool:
        """Stop aiomq workers claiming ``queue``'s jobs (running ones finish; enqueueing goes on) until
        :meth:`resume_queue`. Lasts across restarts. False if it was paused already."""
        async with self._session() as session:
            return await queues.pause_queue(session, self._st, queue, self._now(now))

    async def resume_queue(self, queue: str) -> bool:
        """Let workers claim ``queue``'s jobs again, at once. False if it was not paused."""
        async with self._session() as session:
            return await queues.resume_queue(session, self._st, queue, utcnow())

    async def queue_stats(self, *, now: datetime.datetime | None = None) -> list[queues.QueueStats]:
        """One :class:`~aiomq.QueueStats` per queue that has jobs or a pause, by name: read from the
        pending jobs' index and the few running and lost jobs, so it stays cheap on millions of rows."""
        async with self._session() as session:
            return await queues.queue_stats(session, self._st, self._now(now))

    async def prune_jobs(
        self,
        *,
        older_than: datetime.timedelta | datetime.datetime,
        states: Iterable[str] = pruning.DEFAULT_STATES,
        queue: str | None = None,
        batch_size: int = 5000,
        dry_run: bool = False,
        now: datetime.datetime | None = None,
    ) -> int:
        """Delete jobs in ``states`` (completed, failed or canceled only) whose ``end_time`` is older than
        ``older_than`` (a timedelta before now, or a datetime); returns how many (``dry_run``: counts).

        Batches of ``batch_size`` run in transactions of their own on the engine, also for a source on a
        session: a prune is not part of the caller's transaction. Cursors, schedules and listeners stay,
        and so does the job that last updated each cursor."""
        with schema_errors():
            return await pruning.prune_jobs(
                self._bound_engine(),
                self._st,
                older_than=older_than,
                states=states,
                queue=queue,
                batch_size=batch_size,
                dry_run=dry_run,
                now=None if now is None else self._now(now),
            )

    @staticmethod
    def _now(now: datetime.datetime | None) -> datetime.datetime:
        return utcnow() if now is None else to_naive_utc(now)

    # ---------------------------------------------------------------- events and waiting

    async def emit_event(
        self,
        name: str,
        data: Any = None,
        *,
        now: datetime.datetime | None = None,
        trace: Any = None,
    ) -> list[QueuedJob]:
        """Create one job per enabled listener of ``name``; returns them (ids repeat when they collapse)."""
        now = utcnow() if now is None else to_naive_utc(now)
        dump_json(data, "event data")
        dump_json(trace, "trace")
        async with self._session() as session:
            return await emit_to_listeners(
                session, self._st, self._enqueuer, name, data, now=now, trace=trace
            )

    async def wait_for_job(
        self,
        job_id: int,
        *,
        timeout: float | None = None,
        poll_interval: float = 1.0,
        follow_retries: bool = False,
    ) -> JobInfo:
        """Wait until the job is completed, failed, canceled or lost; return it then.

        With ``follow_retries``, a job that failed with a retry scheduled (``aiomq_retried_by`` in its
        trace) is followed to its retry, and so on: the last attempt is returned once it is final.
        Raises ``TimeoutError`` after ``timeout`` seconds in all and ``LookupError`` for an id no committed
        job has (commit before waiting).
        """
        done = finished_states(self.model.JobStates)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            left = None if deadline is None else max(deadline - loop.time(), 0.0)
            try:
                info = await wait_for_job(
                    self._bound_engine(),
                    job_id,
                    functools.partial(self._job_info, job_id),
                    lambda info: info.state in done,
                    timeout=left,
                    poll_interval=poll_interval,
                    hub_read=_hub_read(self.model, self._bound_engine().dialect),
                )
            except TimeoutError:
                raise TimeoutError(f"job {job_id} did not finish within {timeout} seconds") from None
            retried_by = info.trace.get(RETRIED_BY_KEY) if isinstance(info.trace, dict) else None
            if (
                not follow_retries
                or info.state != self.model.JobStates.FAILED
                or not isinstance(retried_by, int)
            ):
                return info
            retry = await self._job_info(retried_by)
            trace = retry.trace if retry is not None and isinstance(retry.trace, dict) else {}
            if trace.get("mq_source_job_id") != job_id:  # not this job's retry: a stale key, copied
                return info
            job_id = retried_by


@functools.lru_cache(maxsize=64)
def _hub_read(model: Model, dialect: Dialect) -> HubRead[JobInfo]:
    """``wait_for_job``'s batched read of ``model``'s jobs, compiled once per model and dialect (one
    object, so reads of every source on the model share a batch)."""
    compiled = Compiled(statements(model).lookups.jobs_info, dialect)
    table = dialect.identifier_preparer.format_table(model.Job.__table__)
    return HubRead(compiled.sql, _info_from_record, table)


def _info_from_record(record: Any) -> JobInfo:
    return JobInfo(**record)
