"""AsyncMQSource: enqueue and inspect jobs, inside the caller's transaction or in transactions of its own."""

from __future__ import annotations

import contextlib
import copy
import datetime
import inspect
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from . import sql
from .errors import SchemaMissingError
from .events import finished_event
from .model import Model
from .records import JobInfo, QueuedJob, check_queue_name, to_naive_utc, utcnow
from .retry import sqlstate
from .schedules import check_rrule, next_rrule_time
from .serialize import MAX_KEY_BYTES, check_text, dump_json
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


def _as_time(value: Any, now: datetime.datetime | None, what: str) -> datetime.datetime:
    """A datetime as naive UTC, or a timedelta from ``now`` (None: the current time)."""
    if isinstance(value, datetime.datetime):
        return to_naive_utc(value)
    if isinstance(value, datetime.timedelta):
        return (utcnow() if now is None else now) + value
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
        self._autocommit = None if engine is None else engine.execution_options(isolation_level="AUTOCOMMIT")

    # ---------------------------------------------------------------- plumbing

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[AsyncSession]:
        with _schema_errors():
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
        schedule_ids, listener_ids = _ids(schedule_ids), _ids(listener_ids)
        params = self._call_params(  # validates everything before any SQL
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
        )
        if self._autocommit is not None and not schedule_ids and not listener_ids:
            # Engine mode: a new job is one autocommit statement (INSERT and NOTIFY), one round trip.
            # A collapse (no row) changed nothing: joining takes the transaction below.
            with _schema_errors():
                async with self._autocommit.connect() as conn:
                    row = (await conn.execute(*self._enqueue_notify(params))).first()
            if row is not None:
                return self._queued(params, row)
        async with self._session() as session:
            return await self._enqueue(
                session,
                params,
                conflict_resolver=conflict_resolver,
                schedule_ids=schedule_ids,
                listener_ids=listener_ids,
            )

    def _enqueue_notify(self, params: dict[str, Any]) -> tuple[sa.Executable, dict[str, Any]]:
        """The INSERT-and-NOTIFY statement for ``params`` (from ``_call_params``), and its parameters."""
        extra = {
            "channel": f"{self.model.channel_prefix}{params['queue']}",
            "t": _epoch(params["scheduled_time"]),
        }
        return self._st.enqueue_notify(params), {**params, **extra}

    def _queued(self, params: dict[str, Any], row: Any) -> QueuedJob:
        queue, method, cursor_key = params["queue"], params["method"], params["cursor_key"]
        log.info("queued job %s (%s.%s, cursor_key=%s)", row.id, queue, method, cursor_key)
        return QueuedJob(row.id, queue, method, cursor_key, row.scheduled_time, True)

    async def _call_in(
        self, session: AsyncSession, queue: str, method: str, args: Any, **kw: Any
    ) -> QueuedJob:
        """``call`` inside an already open session (schedules and listeners)."""
        kw["schedule_ids"], kw["listener_ids"] = _ids(kw.get("schedule_ids")), _ids(kw.get("listener_ids"))
        params = self._call_params(queue, method, args, **kw)
        return await self._enqueue(
            session,
            params,
            conflict_resolver=kw.get("conflict_resolver"),
            schedule_ids=kw.get("schedule_ids"),
            listener_ids=kw.get("listener_ids"),
        )

    def _call_params(
        self,
        queue: str,
        method: str,
        args: Any,
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
    ) -> dict[str, Any]:
        check_queue_name(queue)
        _check_method(method)
        collapse = _collapse(collapse_on_cursor, cursor_key)
        now = utcnow() if now is None else _as_time(now, None, "now")
        when = now if when is None else _as_time(when, now, "when")
        args_json = dump_json({} if args is None else args, "args")
        trace = _merge_ids(trace, "mq_schedule_ids", schedule_ids)
        trace = _merge_ids(trace, "mq_listener_ids", listener_ids)
        trace_json = "null" if trace is None else dump_json(trace, "trace")
        extra = dict(job_kwargs or {})
        columns = self._st.job.c
        for key in extra:
            if key in _CALL_COLUMNS or key not in columns:
                raise ValueError(f"job_kwargs cannot set {key!r}: not a free column of the job table")
        if conflict_resolver is not None and not callable(conflict_resolver):
            raise TypeError("conflict_resolver must be callable")
        return {
            **extra,
            "created_time": now,
            "scheduled_time": when,
            "queue": queue,
            "method": method,
            "cursor_key": cursor_key,
            "collapsible": collapse,
            "args_json": args_json,
            "trace_json": trace_json,
        }

    async def _enqueue(
        self,
        session: AsyncSession,
        params: dict[str, Any],
        *,
        conflict_resolver: Callable[[Any], Any] | None,
        schedule_ids: Iterable[int] | None,
        listener_ids: Iterable[int] | None,
        hints: dict[str, tuple[int, int]] | None = None,
    ) -> QueuedJob:
        """Insert, or join the pending collapsible job of the slot. NOTIFY at once, or, given ``hints``,
        collect the earliest ``t`` per queue there for the caller to send once."""
        Job = self.model.Job
        queue, method, cursor_key, when = (
            params["queue"],
            params["method"],
            params["cursor_key"],
            params["scheduled_time"],
        )
        while True:
            if hints is None:  # the INSERT sends its own NOTIFY
                row = (await session.execute(*self._enqueue_notify(params))).first()
            else:
                row = (await session.execute(self._st.enqueue, params)).first()
            if row is not None:
                await self._link(session, row.id, schedule_ids, listener_ids)
                if hints is not None:
                    await self._hint(session, hints, queue, row.id, when)
                return self._queued(params, row)
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
                await self._hint(session, hints, queue, job.id, job.scheduled_time)
            log.info("joined job %s (%s.%s, cursor_key=%s)", job.id, queue, method, cursor_key)
            return QueuedJob(job.id, queue, method, cursor_key, job.scheduled_time, False)

    async def _hint(
        self,
        session: AsyncSession,
        hints: dict[str, tuple[int, int]] | None,
        queue: str,
        job_id: int,
        when: datetime.datetime,
    ) -> None:
        if hints is None:
            await self._notify(session, queue, {"j": job_id, "t": _epoch(when)})
        else:  # one NOTIFY per queue later, for its earliest job
            hints[queue] = min(hints.get(queue, (_epoch(when), job_id)), (_epoch(when), job_id))

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
        planned: list[tuple[dict[str, Any], dict[str, Any]]] = []
        batch_now = utcnow()  # one transaction, one created_time (unless a call gives its own now)
        for index, call in enumerate(calls):
            kw = dict(call)
            unknown = set(kw) - _CALL_MANY_KEYS
            if unknown or "queue" not in kw or "method" not in kw:
                raise TypeError(
                    f"call {index}: needs queue and method, and only call()'s arguments; "
                    f"unknown: {sorted(unknown)}"
                )
            queue, method, args = kw.pop("queue"), kw.pop("method"), kw.pop("args", None)
            kw["schedule_ids"], kw["listener_ids"] = (
                _ids(kw.get("schedule_ids")),
                _ids(kw.get("listener_ids")),
            )
            try:
                params = self._call_params(queue, method, args, **{"now": batch_now, **kw})
            except (TypeError, ValueError) as ex:
                raise type(ex)(f"call {index}: {ex}") from ex
            planned.append((params, kw))
        results: list[QueuedJob | None] = [None] * len(planned)
        hints: dict[str, tuple[int, int]] = {}
        bulk = [i for i, (p, kw) in enumerate(planned) if _bulk_insertable(p, kw)]
        rest = sorted(
            (i for i, (p, kw) in enumerate(planned) if not _bulk_insertable(p, kw)),
            key=lambda i: (
                planned[i][0]["cursor_key"] or "",
                planned[i][0]["queue"],
                planned[i][0]["method"],
                i,
            ),
        )
        async with self._session() as session:
            if bulk:
                rows = list(
                    await session.execute(
                        self._st.enqueue_many,
                        {column: [planned[i][0][key] for i in bulk] for column, key in _BULK_COLUMNS.items()},
                    )
                )
                # ids come from the sequence in insertion order, and rows are inserted in call order
                for i, row in zip(bulk, sorted(rows, key=lambda r: r.id), strict=True):
                    p = planned[i][0]
                    results[i] = QueuedJob(
                        row.id, p["queue"], p["method"], p["cursor_key"], row.scheduled_time, True
                    )
                    hint, current = (_epoch(row.scheduled_time), row.id), hints.get(p["queue"])
                    if current is None or hint < current:  # one NOTIFY per queue, for its earliest job
                        hints[p["queue"]] = hint
            for i in rest:
                params, kw = planned[i]
                results[i] = await self._enqueue(
                    session,
                    params,
                    conflict_resolver=kw.get("conflict_resolver"),
                    schedule_ids=kw.get("schedule_ids"),
                    listener_ids=kw.get("listener_ids"),
                    hints=hints,
                )
            for queue, (t, job_id) in sorted(hints.items()):
                await self._notify(session, queue, {"j": job_id, "t": t})
        log.info("queued %d calls in one batch", len(planned))
        return [r for r in results if r is not None]

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
            if job.cursor_key is not None:  # its cursor is free: wake whoever serves the next job on it
                await session.execute(self._st.notify_successors, {"keys": [job.cursor_key]})
            name, data = finished_event(st.FAILED, job, result=result)
            await self._emit(session, name, data, now=utcnow(), trace=None)
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

    # ---------------------------------------------------------------- schedules

    async def add_schedule(
        self,
        queue: str,
        method: str,
        args: Any = None,
        *,
        rrule: str,
        is_enabled: bool = True,
        cursor_key: str | None = None,
        collapse_on_cursor: bool | None = None,
        schedule_kwargs: dict[str, Any] | None = None,
        now: datetime.datetime | None = None,
        reload: bool = True,
    ) -> Any:
        """Add a recurring schedule (RFC 5545 RRULE); returns the ``model.JobSchedule`` row."""
        check_queue_name(queue)
        _check_method(method)
        collapse = _collapse(collapse_on_cursor, cursor_key)
        now = utcnow() if now is None else to_naive_utc(now)
        check_rrule(rrule, now)
        args = {} if args is None else args
        args = json.loads(dump_json(args, "args"))
        next_time = next_rrule_time(rrule, now, now)
        schedule = self.model.JobSchedule(
            **(schedule_kwargs or {}),
            created_time=now,
            is_enabled=bool(is_enabled),
            rrule=rrule,
            queue=queue,
            method=method,
            args=args,
            cursor_key=cursor_key,
            collapse_on_cursor=collapse,
            next_execution_time=next_time,
        )
        async with self._session() as session:
            session.add(schedule)
            await session.flush()
            if reload and is_enabled and next_time is not None:
                await self._notify(session, queue, {"s": None, "t": _epoch(next_time)})
            if self.dbsession is None:
                session.expunge(schedule)
        log.info("added schedule %s (%s.%s, rrule=%r)", schedule.id, queue, method, rrule)
        return schedule

    async def get_schedule(self, schedule_id: int, *, for_update: bool = False, raises: bool = True) -> Any:
        """The ``model.JobSchedule`` row; ``LookupError`` (or None with ``raises=False``) if missing."""
        return await self._get_row(self.model.JobSchedule, "schedule", schedule_id, for_update, raises)

    async def _get_row(self, cls: type[Any], what: str, row_id: int, for_update: bool, raises: bool) -> Any:
        if for_update and self.dbsession is None:
            raise ValueError(f"get_{what}(for_update=True) needs a dbsession source")
        async with self._session() as session:
            row = await session.get(cls, row_id, with_for_update=for_update or None, populate_existing=True)
            if row is None:
                if raises:
                    raise LookupError(f"cannot find {what}", row_id)
                return None
            if self.dbsession is None:
                session.expunge(row)
            return row

    async def disable_schedule(self, schedule_id: int) -> None:
        async with self._session() as session:
            schedule = await self._locked_row(session, self.model.JobSchedule, "schedule", schedule_id)
            if not schedule.is_enabled:
                log.info("schedule %s is already disabled", schedule_id)
                return
            schedule.is_enabled = False
            schedule.next_execution_time = None
            await session.flush()
        log.info("disabled schedule %s", schedule_id)

    async def enable_schedule(
        self, schedule_id: int, *, now: datetime.datetime | None = None, reload: bool = True
    ) -> None:
        now = utcnow() if now is None else to_naive_utc(now)
        async with self._session() as session:
            schedule = await self._locked_row(session, self.model.JobSchedule, "schedule", schedule_id)
            if schedule.is_enabled:
                log.info("schedule %s is already enabled", schedule_id)
                return
            schedule.is_enabled = True
            schedule.next_execution_time = next_rrule_time(schedule.rrule, schedule.created_time, now)
            await session.flush()
            if reload and schedule.next_execution_time is not None:
                await self._notify(
                    session, schedule.queue, {"s": None, "t": _epoch(schedule.next_execution_time)}
                )
        log.info("enabled schedule %s", schedule_id)

    async def call_schedule(
        self,
        schedule_id: int,
        *,
        now: datetime.datetime | None = None,
        reload: bool = True,
        when: datetime.datetime | datetime.timedelta | None = None,
    ) -> QueuedJob:
        """Enqueue the schedule's job now; an enabled schedule then advances past ``now``."""
        now = utcnow() if now is None else to_naive_utc(now)
        async with self._session() as session:
            schedule = await self._locked_row(session, self.model.JobSchedule, "schedule", schedule_id)
            job = await self._call_in(
                session,
                schedule.queue,
                schedule.method,
                schedule.args,
                when=now if when is None else _as_time(when, now, "when"),
                now=now,
                cursor_key=schedule.cursor_key,
                collapse_on_cursor=bool(schedule.collapse_on_cursor),
                schedule_ids=[schedule.id],
            )
            if schedule.is_enabled:
                schedule.next_execution_time = next_rrule_time(schedule.rrule, schedule.created_time, now)
                await session.flush()
                if reload and schedule.next_execution_time is not None:
                    await self._notify(
                        session, schedule.queue, {"s": None, "t": _epoch(schedule.next_execution_time)}
                    )
            return job

    async def reload_scheduler(self, queue: str, *, now: datetime.datetime | None = None) -> None:
        """Ask the worker owning ``queue``'s schedules to re-read them now."""
        check_queue_name(queue)
        now = utcnow() if now is None else to_naive_utc(now)
        async with self._session() as session:
            await self._notify(session, queue, {"s": None, "t": _epoch(now)})

    # ---------------------------------------------------------------- listeners and events

    async def add_listener(
        self,
        event: str,
        queue: str,
        method: str,
        args: Any = None,
        *,
        when: datetime.timedelta | None = None,
        is_enabled: bool = True,
        context_arg_key: str | None = None,
        cursor_key: str | None = None,
        collapse_on_cursor: bool | None = None,
        listener_kwargs: dict[str, Any] | None = None,
        now: datetime.datetime | None = None,
    ) -> Any:
        """Turn every ``emit_event(event, ...)`` into a job; returns the ``model.JobListener`` row."""
        if not isinstance(event, str) or not event:
            raise ValueError(f"event must be a non-empty string, got {event!r}")
        check_queue_name(queue)
        _check_method(method)
        collapse = _collapse(collapse_on_cursor, cursor_key)
        if when is not None and not isinstance(when, datetime.timedelta):
            raise TypeError(
                f"when must be a timedelta (the delay after the event), got {type(when).__name__}"
            )
        if context_arg_key is None:
            context_arg_key = "events" if collapse else "event"
        now = utcnow() if now is None else to_naive_utc(now)
        args = json.loads(dump_json({} if args is None else args, "args"))
        if not isinstance(args, dict):
            raise TypeError("a listener's args must be a dict (the event is added under context_arg_key)")
        listener = self.model.JobListener(
            **(listener_kwargs or {}),
            created_time=now,
            is_enabled=bool(is_enabled),
            event=event,
            queue=queue,
            method=method,
            args=args,
            context_arg_key=context_arg_key,
            when=when,
            cursor_key=cursor_key,
            collapse_on_cursor=collapse,
        )
        async with self._session() as session:
            session.add(listener)
            await session.flush()
            if self.dbsession is None:
                session.expunge(listener)
        log.info("added listener %s (%s -> %s.%s)", listener.id, event, queue, method)
        return listener

    async def get_listener(self, listener_id: int, *, for_update: bool = False, raises: bool = True) -> Any:
        """The ``model.JobListener`` row; ``LookupError`` (or None with ``raises=False``) if missing."""
        return await self._get_row(self.model.JobListener, "listener", listener_id, for_update, raises)

    async def enable_listener(self, listener_id: int, *, now: datetime.datetime | None = None) -> None:
        await self._toggle_listener(listener_id, True)

    async def disable_listener(self, listener_id: int) -> None:
        await self._toggle_listener(listener_id, False)

    async def _toggle_listener(self, listener_id: int, enabled: bool) -> None:
        async with self._session() as session:
            listener = await self._locked_row(session, self.model.JobListener, "listener", listener_id)
            if listener.is_enabled == enabled:
                log.info("listener %s is already %s", listener_id, "enabled" if enabled else "disabled")
                return
            listener.is_enabled = enabled
            await session.flush()

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
            return await self._emit(session, name, data, now=now, trace=trace)

    async def _emit(
        self, session: AsyncSession, name: str, data: Any, *, now: datetime.datetime, trace: Any
    ) -> list[QueuedJob]:
        Listener = self.model.JobListener
        listeners = (
            await session.scalars(
                sa.select(Listener)
                .where(Listener.event == name, Listener.is_enabled == sa.true())
                .order_by(Listener.id)
            )
        ).all()
        stamp = now.replace(tzinfo=datetime.UTC).isoformat()
        jobs = []
        for listener in listeners:
            try:  # rows written by other code (psycopg2_mq stores any queue string)
                check_queue_name(listener.queue)
            except ValueError as ex:
                log.warning("listener %s skipped for event %s: %s", listener.id, name, ex)
                continue
            event = {"name": name, "listener_id": listener.id, "now": stamp, "data": data}
            key = listener.context_arg_key
            collapse = bool(listener.collapse_on_cursor)
            resolver = None
            if collapse:
                args = {key: [event], **listener.args}
                resolver = _append_event(key, event)
            else:
                args = {key: event, **listener.args}
            jobs.append(
                await self._call_in(
                    session,
                    listener.queue,
                    listener.method,
                    args,
                    when=now + (listener.when or datetime.timedelta(0)),
                    now=now,
                    cursor_key=listener.cursor_key,
                    collapse_on_cursor=collapse,
                    conflict_resolver=resolver,
                    listener_ids=[listener.id],
                    trace=copy.deepcopy(trace),
                )
            )
        return jobs

    async def _locked_row(self, session: AsyncSession, cls: type[Any], what: str, row_id: int) -> Any:
        row = await session.get(cls, row_id, with_for_update=True, populate_existing=True)
        if row is None:
            raise LookupError(f"cannot find {what}", row_id)
        return row


_CALL_MANY_KEYS = frozenset(
    {
        "queue",
        "method",
        "args",
        "when",
        "now",
        "cursor_key",
        "collapse_on_cursor",
        "conflict_resolver",
        "trace",
        "job_kwargs",
        "schedule_ids",
        "listener_ids",
    }
)
# enqueue_many's array parameters and the call parameters they come from
_BULK_COLUMNS = {
    "created": "created_time",
    "scheduled": "scheduled_time",
    "queues": "queue",
    "methods": "method",
    "cursor_keys": "cursor_key",
    "args": "args_json",
    "traces": "trace_json",
}


@contextlib.contextmanager
def _schema_errors() -> Iterator[None]:
    """A missing table surfaces as SchemaMissingError naming it."""
    try:
        yield
    except sa.exc.DBAPIError as ex:
        if sqlstate(ex) == "42P01":
            match = _MISSING_TABLE.search(str(ex))
            raise SchemaMissingError(match.group(1) if match else "mq_job") from ex
        raise


def _slot(params: dict[str, Any]) -> tuple[str, str, str]:
    """The lock order of collapsing calls in a batch: (cursor_key, queue, method)."""
    return (params["cursor_key"] or "", params["queue"], params["method"])


def _bulk_insertable(params: dict[str, Any], kw: dict[str, Any]) -> bool:
    """A call the multi-row INSERT can take: no collapse slot, no extra columns, no link rows."""
    return (
        not params["collapsible"]
        and not kw.get("job_kwargs")
        and not kw.get("schedule_ids")
        and not (kw.get("listener_ids"))
    )


def _ids(ids: Iterable[int] | None) -> list[int] | None:
    """Provenance ids as a sorted list: they are read more than once (trace, links)."""
    return None if ids is None else sorted({int(i) for i in ids})


def _check_method(method: object) -> None:
    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be a non-empty string, got {method!r}")
    check_text(method, "method", max_bytes=MAX_KEY_BYTES)


def _collapse(collapse_on_cursor: bool | None, cursor_key: str | None) -> bool:
    if cursor_key is not None:
        if not isinstance(cursor_key, str):
            raise TypeError(f"cursor_key must be a string, got {type(cursor_key).__name__}")
        check_text(cursor_key, "cursor_key", max_bytes=MAX_KEY_BYTES)
    if collapse_on_cursor is None:
        return cursor_key is not None
    if collapse_on_cursor and cursor_key is None:
        raise ValueError("collapse_on_cursor=True needs a cursor_key")
    return bool(collapse_on_cursor)


def _append_event(key: str, event: dict[str, Any]) -> Callable[[Any], None]:
    def resolve(job: Any) -> None:
        args = copy.deepcopy(job.args) if isinstance(job.args, dict) else {}
        events = args.setdefault(key, [])
        if isinstance(events, list):
            events.append(event)
            job.args = args

    return resolve
