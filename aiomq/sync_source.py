"""SyncMQSource: enqueue and inspect jobs from sync code (a WSGI view, Django, Flask, a script).

It runs ``AsyncMQSource``'s own code, not a copy: validation in :mod:`aiomq.enqueue`, inserting and
joining in :class:`~aiomq.enqueue.Enqueuer`, the rest in :mod:`aiomq.jobops`, all awaiting a sync
``Session`` through :class:`~aiomq.sessions.SyncSessionView`. So the rows, NOTIFYs and errors are
``AsyncMQSource``'s, on psycopg 3 or psycopg2.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from . import jobops
from .enqueue import Enqueuer, queued, validate_call, validate_call_item
from .model import Model
from .records import JobInfo, QueuedJob, to_naive_utc, utcnow
from .retry import Retry
from .schema import schema_errors
from .sessions import SyncSessionView, complete
from .sql import statements

__all__ = ["SyncMQSource"]


class SyncMQSource:
    """Enqueue and inspect jobs on a SQLAlchemy sync ``Session`` or ``Engine`` (psycopg or psycopg2).

    Give exactly one of ``dbsession`` (the job commits with your transaction; never commits itself) or
    ``engine`` (each call in a transaction of its own, committed). The methods mean what
    :class:`~aiomq.AsyncMQSource`'s do, without ``await``.
    """

    def __init__(
        self, *, model: Model, dbsession: Session | None = None, engine: sa.Engine | None = None
    ) -> None:
        if (dbsession is None) == (engine is None):
            raise ValueError("SyncMQSource needs exactly one of dbsession= or engine=")
        if dbsession is not None and not isinstance(dbsession, Session):
            raise ValueError(f"dbsession must be an sqlalchemy (sync) Session, got {dbsession!r}")
        if engine is not None:
            if not isinstance(engine, sa.Engine):
                raise ValueError(f"engine must be an sqlalchemy (sync) Engine, got {engine!r}")
            if engine.dialect.name != "postgresql" or engine.dialect.is_async:
                raise ValueError(
                    f"engine must use a sync PostgreSQL driver (postgresql+psycopg or postgresql+psycopg2), "
                    f"got {engine.dialect.name}+{engine.dialect.driver}"
                )
        self.model = model
        self.dbsession = dbsession
        self.engine = engine
        self._st = statements(model)
        self._enqueuer = Enqueuer(self._st)
        self._autocommit = None if engine is None else engine.execution_options(isolation_level="AUTOCOMMIT")

    @contextlib.contextmanager
    def _session(self) -> Iterator[SyncSessionView]:
        with schema_errors():
            if self.dbsession is not None:
                yield SyncSessionView(self.dbsession)
            else:
                with Session(self.engine, expire_on_commit=False) as session, session.begin():
                    yield SyncSessionView(session)

    # ---------------------------------------------------------------- enqueue

    def call(
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
        """Enqueue a job, or join the pending collapsible job on its cursor (then ``created`` is False):
        ``AsyncMQSource.call``. A ``conflict_resolver`` must be a plain (sync) callable."""
        if inspect.iscoroutinefunction(conflict_resolver):  # refused before any SQL, not on a collapse
            raise TypeError(
                "SyncMQSource needs a sync callable as conflict_resolver, not a coroutine function"
            )
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
        if self._autocommit is not None and not call.linked:
            # Engine mode, as AsyncMQSource: a new job is one autocommit statement (INSERT and NOTIFY);
            # a collapse (no row) changed nothing, and joining takes the transaction below.
            with schema_errors(), self._autocommit.connect() as conn:
                row = conn.execute(*self._enqueuer.enqueue_notify(call)).first()
            if row is not None:
                return queued(call, row.id, row.scheduled_time)
        with self._session() as session:
            return complete(self._enqueuer.insert_or_join(session, call))

    def call_many(self, calls: Iterable[Mapping[str, Any]]) -> list[QueuedJob]:
        """Enqueue many jobs in few statements, one ``QueuedJob`` per call: ``AsyncMQSource.call_many``."""
        batch_now = utcnow()
        columns = self._st.parts.job.c
        planned = [validate_call_item(columns, i, item, batch_now) for i, item in enumerate(calls)]
        with self._session() as session:
            return complete(self._enqueuer.insert_many(session, planned))

    # ---------------------------------------------------------------- lookups

    def get_job(self, job_id: int, *, for_update: bool = False, raises: bool = True) -> Any:
        """The ``model.Job`` row (detached with every column loaded from an engine source)."""
        jobops.check_for_update(for_update, self.dbsession is None)
        with self._session() as session:
            row = jobops.get_row(
                session,
                self.model.Job,
                "job",
                job_id,
                for_update=for_update,
                raises=raises,
                detach=self.dbsession is None,
            )
            return complete(row)

    def find_jobs(
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
        with self._session() as session:
            return complete(jobops.find_jobs(session, self._st, filters, limit))

    # ---------------------------------------------------------------- state changes

    def retry_job(self, job_id: int, *, now: datetime.datetime | None = None) -> QueuedJob:
        """Enqueue a new job like ``job_id`` (any state), at its original scheduled time."""
        now = _now(now)
        with self._session() as session:
            return complete(jobops.retry_job(session, self._st, self._enqueuer, job_id, now))

    def cancel_job(self, job_id: int, *, now: datetime.datetime | None = None) -> None:
        """Cancel a ``pending`` or ``failed`` job; anything else raises ``RuntimeError``."""
        now = _now(now)
        with self._session() as session:
            complete(jobops.cancel_job(session, self._st, self._enqueuer, job_id, now))

    def abort_job(self, job_id: int, *, now: datetime.datetime | None = None) -> None:
        """Cancel a ``pending`` job, or ask the worker running a ``running`` one to abort it
        (``AsyncMQSource.abort_job``); other states raise ``RuntimeError``, an unknown id ``LookupError``."""
        now = _now(now)
        with self._session() as session:
            complete(jobops.abort_job(session, self._st, self._enqueuer, job_id, now))


def _now(now: datetime.datetime | None) -> datetime.datetime:
    return utcnow() if now is None else to_naive_utc(now)
