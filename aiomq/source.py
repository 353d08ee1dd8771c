"""AsyncMQSource: enqueue and inspect jobs, inside the caller's transaction or in transactions of its own."""

from __future__ import annotations

import contextlib
import copy
import datetime
import inspect
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from . import sql
from .errors import SchemaMissingError
from .model import Model
from .records import JobInfo, QueuedJob, check_queue_name, to_naive_utc, utcnow
from .retry import sqlstate
from .serialize import dump_json
from .waiters import wait_for_job

__all__ = ["AsyncMQSource"]

log = logging.getLogger(__name__)

_EPOCH = datetime.datetime(1970, 1, 1)
# Columns call() fills itself; job_kwargs may set any other column of the job table.
_CALL_COLUMNS = frozenset(
    {
        "id",
        "state",
        "args",
        "trace",
        "created_time",
        "scheduled_time",
        "queue",
        "method",
        "cursor_key",
        "collapsible",
    }
)
_MISSING_TABLE = re.compile(r'relation "([^"]+)" does not exist')


def _epoch(when: datetime.datetime) -> int:
    return int((when - _EPOCH).total_seconds())


def _as_time(value: Any, now: datetime.datetime, what: str) -> datetime.datetime:
    if isinstance(value, datetime.datetime):
        return to_naive_utc(value)
    if isinstance(value, datetime.timedelta):
        return now + value
    raise TypeError(f"{what} must be a datetime or a timedelta, got {type(value).__name__}")


def _merge_ids(trace: Any, key: str, ids: Iterable[int] | None) -> Any:
    if not ids:
        return trace
    trace = dict(trace) if isinstance(trace, dict) else {}
    trace[key] = sorted(set(trace.get(key) or ()) | {int(i) for i in ids})
    return trace


class AsyncMQSource:
    """Enqueue and inspect jobs. Give exactly one of ``dbsession`` (never commits) or ``engine`` (commits)."""

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
        self._st = sql.statements(model)

    # ---------------------------------------------------------------- plumbing

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncSession]:
        try:
            if self.dbsession is not None:
                yield self.dbsession
            else:
                assert self.engine is not None
                async with AsyncSession(self.engine, expire_on_commit=False) as session, session.begin():
                    yield session
        except sa.exc.DBAPIError as ex:
            if sqlstate(ex) == "42P01":
                match = _MISSING_TABLE.search(str(ex))
                raise SchemaMissingError(match.group(1) if match else "mq_job") from ex
            raise

    def _bound_engine(self) -> AsyncEngine:
        if self.engine is not None:
            return self.engine
        assert self.dbsession is not None
        bind = self.dbsession.bind
        if isinstance(bind, AsyncEngine):
            return bind
        if isinstance(bind, AsyncConnection):
            return bind.engine
        raise ValueError("wait_for_job needs the dbsession to be bound to an AsyncEngine")

    async def _notify(self, session: AsyncSession, queue: str, payload: dict[str, Any]) -> None:
        await session.execute(
            self._st.notify,
            {"channel": f"{self.model.channel_prefix}{queue}", "payload": json.dumps(payload)},
        )

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
    ) -> QueuedJob:
        """Enqueue a job, or join the pending collapsible job on its cursor (then ``created`` is False)."""
        check_queue_name(queue)
        if not isinstance(method, str) or not method:
            raise ValueError(f"method must be a non-empty string, got {method!r}")
        if cursor_key is not None and not isinstance(cursor_key, str):
            raise TypeError(f"cursor_key must be a string, got {type(cursor_key).__name__}")
        if collapse_on_cursor is None:
            collapse_on_cursor = cursor_key is not None
        elif collapse_on_cursor and cursor_key is None:
            raise ValueError("collapse_on_cursor=True needs a cursor_key")
        now = utcnow() if now is None else _as_time(now, utcnow(), "now")
        when = now if when is None else _as_time(when, now, "when")
        args = {} if args is None else args
        args_json = dump_json(args, "args")
        trace = _merge_ids(trace, "mq_schedule_ids", schedule_ids)
        trace = _merge_ids(trace, "mq_listener_ids", listener_ids)
        trace_json = dump_json(trace, "trace")
        extra = dict(job_kwargs or {})
        columns = self._st.job.c
        for key in extra:
            if key in _CALL_COLUMNS or key not in columns:
                raise ValueError(f"job_kwargs cannot set {key!r}: not a free column of the job table")
        if conflict_resolver is not None and not callable(conflict_resolver):
            raise TypeError("conflict_resolver must be callable")
        params = {
            **extra,
            "created_time": now,
            "scheduled_time": when,
            "queue": queue,
            "method": method,
            "cursor_key": cursor_key,
            "collapsible": bool(collapse_on_cursor),
            "args_json": args_json,
            "trace_json": trace_json,
        }
        async with self._session() as session:
            return await self._enqueue(
                session,
                params,
                conflict_resolver=conflict_resolver,
                schedule_ids=schedule_ids,
                listener_ids=listener_ids,
            )

    async def _enqueue(
        self,
        session: AsyncSession,
        params: dict[str, Any],
        *,
        conflict_resolver: Callable[[Any], Any] | None,
        schedule_ids: Iterable[int] | None,
        listener_ids: Iterable[int] | None,
    ) -> QueuedJob:
        Job = self.model.Job
        queue, method, cursor_key, when = (
            params["queue"],
            params["method"],
            params["cursor_key"],
            params["scheduled_time"],
        )
        while True:
            row = (await session.execute(self._st.enqueue, params)).first()
            if row is not None:
                await self._link(session, row.id, schedule_ids, listener_ids)
                await self._notify(session, queue, {"j": row.id, "t": _epoch(when)})
                log.info("queued job %s (%s.%s, cursor_key=%s)", row.id, queue, method, cursor_key)
                return QueuedJob(row.id, queue, method, cursor_key, row.scheduled_time, True)
            # A collapsible job is pending on this slot: join it. If it left pending between the two
            # statements (READ COMMITTED), insert again.
            job = (
                await session.execute(
                    sa.select(Job)
                    .where(Job.state == self._st.pending)
                    .where(Job.queue == queue, Job.method == method, Job.cursor_key == cursor_key)
                    .where(Job.collapsible == sa.true())
                    .limit(1)
                    .with_for_update()
                    .execution_options(populate_existing=True)
                )
            ).scalar_one_or_none()
            if job is None:
                continue
            moved = when < job.scheduled_time
            if moved:
                job.scheduled_time = when
            if schedule_ids or listener_ids:
                trace = _merge_ids(job.trace, "mq_schedule_ids", schedule_ids)
                job.trace = _merge_ids(trace, "mq_listener_ids", listener_ids)
                await self._link(session, job.id, schedule_ids, listener_ids)
            if conflict_resolver is not None:
                outcome = conflict_resolver(job)
                if inspect.isawaitable(outcome):
                    await outcome
            await session.flush()
            if moved:
                await self._notify(session, queue, {"j": job.id, "t": _epoch(job.scheduled_time)})
            log.info("joined job %s (%s.%s, cursor_key=%s)", job.id, queue, method, cursor_key)
            return QueuedJob(job.id, queue, method, cursor_key, job.scheduled_time, False)

    async def _link(
        self,
        session: AsyncSession,
        job_id: int,
        schedule_ids: Iterable[int] | None,
        listener_ids: Iterable[int] | None,
    ) -> None:
        for link, column, ids in (
            (self.model.JobScheduleLink, "schedule_id", schedule_ids),
            (self.model.JobListenerLink, "listener_id", listener_ids),
        ):
            if link is None or not ids:
                continue
            await session.execute(
                pg_insert(link.__table__).on_conflict_do_nothing(),
                [{"job_id": job_id, column: int(i)} for i in sorted(set(ids))],
            )

    # ---------------------------------------------------------------- lookups

    async def get_job(self, job_id: int, *, for_update: bool = False, raises: bool = True) -> Any:
        """The ``model.Job`` row (detached with every column loaded from an engine source)."""
        if for_update and self.dbsession is None:
            raise ValueError(
                "get_job(for_update=True) needs a dbsession source: "
                "an engine source would release the lock at once"
            )
        async with self._session() as session:
            job = await session.get(
                self.model.Job, job_id, with_for_update=for_update or None, populate_existing=True
            )
            if job is None:
                if raises:
                    raise LookupError("cannot find job", job_id)
                return None
            if self.dbsession is None:
                session.expunge(job)
            return job

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
        job = self._st.job
        states = self._states()
        if state is not None and state not in states:
            raise ValueError(f"unknown job state {state!r}; one of {', '.join(states)}")
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive integer, got {limit!r}")
        stmt = sa.select(*(job.c[f] for f in JobInfo.__dataclass_fields__))
        for column, value in (
            ("queue", queue),
            ("method", method),
            ("state", state),
            ("cursor_key", cursor_key),
        ):
            if value is not None:
                stmt = stmt.where(job.c[column] == value)
        stmt = stmt.order_by(job.c.created_time.desc(), job.c.id.desc()).limit(limit)
        async with self._session() as session:
            rows = (await session.execute(stmt)).all()
        return [JobInfo.from_row(r) for r in rows]

    def _states(self) -> list[str]:
        st = self.model.JobStates
        return [st.PENDING, st.RUNNING, st.COMPLETED, st.FAILED, st.CANCELED, st.LOST]

    async def get_cursor(self, key: str) -> dict[str, Any] | None:
        """A cursor's saved properties, or None if no job on it has finished yet."""
        cursor = self.model.JobCursor.__table__
        async with self._session() as session:
            value = await session.scalar(sa.select(cursor.c.properties).where(cursor.c.key == key))
        return value  # type: ignore[no-any-return,unused-ignore]

    async def _job_info(self, job_id: int) -> JobInfo | None:
        job = self._st.job
        stmt = sa.select(*(job.c[f] for f in JobInfo.__dataclass_fields__)).where(job.c.id == job_id)
        async with self._bound_engine().connect() as conn:
            row = (await conn.execute(stmt)).first()
        return None if row is None else JobInfo.from_row(row)

    # ---------------------------------------------------------------- state changes

    async def retry_job(self, job_id: int, *, now: datetime.datetime | None = None) -> QueuedJob:
        """Enqueue a new job like ``job_id`` (any state), at its original scheduled time."""
        async with self._session() as session:
            job = await session.get(self.model.Job, job_id)
            if job is None:
                raise LookupError("cannot find job", job_id)
            trace = copy.deepcopy(job.trace) if isinstance(job.trace, dict) else {}
            trace["mq_source_job_id"] = job_id
            now = utcnow() if now is None else to_naive_utc(now)
            params = {
                "created_time": now,
                "scheduled_time": job.scheduled_time,
                "queue": job.queue,
                "method": job.method,
                "cursor_key": job.cursor_key,
                "collapsible": False,
                "args_json": dump_json(job.args, "args"),
                "trace_json": dump_json(trace, "trace"),
            }
            return await self._enqueue(
                session, params, conflict_resolver=None, schedule_ids=None, listener_ids=None
            )

    async def cancel_job(self, job_id: int, *, now: datetime.datetime | None = None) -> None:
        """Cancel a ``pending`` or ``failed`` job; anything else raises ``RuntimeError``."""
        st = self.model.JobStates
        now = utcnow() if now is None else to_naive_utc(now)
        async with self._session() as session:
            job = await self._locked(session, job_id)
            if job.state not in (st.PENDING, st.FAILED):
                raise RuntimeError("job is not in a valid state", job_id, job.state)
            job.state = st.CANCELED
            if job.end_time is None:
                job.end_time = now
            await session.flush()
            await self._finished_hint(session, job_id, st.CANCELED)
        log.info("canceled job %s", job_id)

    async def fail_lost_job(self, job_id: int, *, result: Any = None) -> None:
        """Move a ``lost`` job to ``failed`` (freeing its cursor), optionally with a ``result``."""
        st = self.model.JobStates
        result_json = None if result is None else dump_json(result, "result")
        async with self._session() as session:
            job = await self._locked(session, job_id)
            if job.state != st.LOST:
                raise RuntimeError("job is not in a lost state", job_id, job.state)
            job.state = st.FAILED
            if result_json is not None:
                job.result = json.loads(result_json)
            await session.flush()
            await self._finished_hint(session, job_id, st.FAILED)
        log.info("failed lost job %s", job_id)

    async def _locked(self, session: AsyncSession, job_id: int) -> Any:
        job = await session.get(self.model.Job, job_id, with_for_update=True, populate_existing=True)
        if job is None:
            raise LookupError("cannot find job", job_id)
        return job

    async def _finished_hint(self, session: AsyncSession, job_id: int, state: str) -> None:
        await session.execute(
            self._st.notify,
            {"channel": sql.FINISHED_CHANNEL, "payload": json.dumps({"j": job_id, "s": state})},
        )

    # ---------------------------------------------------------------- waiting

    async def wait_for_job(
        self, job_id: int, *, timeout: float | None = None, poll_interval: float = 1.0
    ) -> JobInfo:
        """Wait until the job is completed, failed, canceled or lost; return it then.

        Raises ``TimeoutError`` after ``timeout`` seconds and ``LookupError`` for an id no committed job
        has (commit before waiting).
        """
        st = self.model.JobStates
        done = {st.COMPLETED, st.FAILED, st.CANCELED, st.LOST}
        return await wait_for_job(
            self._bound_engine(),
            job_id,
            lambda: self._job_info(job_id),
            lambda info: info.state in done,
            timeout=timeout,
            poll_interval=poll_interval,
        )
