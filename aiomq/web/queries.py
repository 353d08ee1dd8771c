"""What the dashboard reads: every query bounded by a LIMIT and by ``SET LOCAL statement_timeout``, in a
read-only transaction of its own, so a page can never hold a lock or run for long on a big table.

Lists page by keyset (``id`` for jobs, schedules and listeners, ``key`` for cursors), never by OFFSET:
the thousandth page costs what the first does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from .. import queues
from ..model import Model, all_states
from ..records import utcnow
from ..retry import RETRIED_BY_KEY
from ..sql import statements
from ..sql.parts import lit

__all__ = ["DEFAULT_TIMEOUT", "JobFilters", "Page", "Reader", "Throughput"]

log = logging.getLogger(__name__)

#: Seconds any one dashboard query may run.
DEFAULT_TIMEOUT = 5.0
#: The throughput chart counts jobs among this many newest (by id): one bounded index scan.
THROUGHPUT_WINDOW = 20_000
MINUTES = 60
#: Most steps followed each way along a retry chain.
CHAIN_STEPS = 10
#: Most rows on the workers page.
WORKER_ROWS = 500
SOURCE_KEY = "mq_source_job_id"


@dataclasses.dataclass(frozen=True)
class JobFilters:
    """The jobs list's filters; None means any. ``state`` is checked against the model's states."""

    queue: str | None = None
    method: str | None = None
    state: str | None = None
    cursor_key: str | None = None

    def as_params(self) -> dict[str, str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class Page:
    """Rows of one page; ``older``/``newer`` are the keys to continue from (None: no such page)."""

    rows: Sequence[Any]
    older: Any = None
    newer: Any = None


@dataclasses.dataclass(frozen=True)
class Throughput:
    """Jobs finished per minute over the last hour, oldest minute first: completed and failed."""

    completed: list[int]
    failed: list[int]

    @property
    def total(self) -> int:
        return sum(self.completed) + sum(self.failed)


class Reader:
    """The dashboard's queries on one engine and model."""

    def __init__(
        self, engine: AsyncEngine, model: Model, *, lock_key: int, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"statement timeout must be positive, got {timeout!r}")
        self.engine = engine
        self.model = model
        self.states = all_states(model.JobStates)
        self._st = statements(model)
        self._lock_key = lock_key
        self._timeout_ms = str(max(1, round(timeout * 1000)))
        p = self._st.parts
        self._job = p.job
        self._list_columns = [
            self._job.c[name]
            for name in (
                "id",
                "queue",
                "method",
                "state",
                "cursor_key",
                "created_time",
                "scheduled_time",
                "start_time",
                "end_time",
                "worker",
            )
        ]

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.connect() as conn, conn.begin():
            # One round trip: the bound and read-only for this transaction only (LOCAL).
            await conn.execute(
                sa.text(
                    "SELECT set_config('statement_timeout', :ms, true), "
                    "set_config('transaction_read_only', 'on', true)"
                ),
                {"ms": self._timeout_ms},
            )
            yield conn

    # ---------------------------------------------------------------- queues

    async def overview(self, now: datetime.datetime) -> tuple[list[queues.QueueStats], dict[str, Throughput]]:
        """Every queue's statistics and its throughput over the last hour."""
        async with self._read() as conn:
            stats = await queues.queue_stats(AsyncSession(bind=conn), self._st, now)
            rows = (await conn.execute(self._throughput_query(), {"now": now})).all()
        charts: dict[str, Throughput] = {}
        for row in rows:
            chart = charts.setdefault(row.queue, Throughput([0] * MINUTES, [0] * MINUTES))
            minute = MINUTES - 1 - min(int(row.ago), MINUTES - 1)
            bucket = chart.completed if row.state == self.model.JobStates.COMPLETED else chart.failed
            bucket[minute] += row.n
        return stats, charts

    async def queue_names(self) -> list[str]:
        """Every queue that has jobs or a pause (the live updates listen on their channels)."""
        async with self._read() as conn:
            stats = await queues.queue_stats(AsyncSession(bind=conn), self._st, utcnow())
        return [s.queue for s in stats]

    def _throughput_query(self) -> sa.Select[Any]:
        job, st = self._job, self.model.JobStates
        recent = (
            sa.select(job.c.queue, job.c.state, job.c.end_time)
            .order_by(job.c.id.desc())
            .limit(THROUGHPUT_WINDOW)
            .subquery("recent")
        )
        now = sa.bindparam("now", type_=sa.DateTime)
        ago = sa.func.floor(sa.extract("epoch", now - recent.c.end_time) / 60).label("ago")
        return (
            sa.select(recent.c.queue, recent.c.state, ago, sa.func.count().label("n"))
            .where(recent.c.state.in_([lit(st.COMPLETED), lit(st.FAILED)]))
            .where(recent.c.end_time > now - datetime.timedelta(minutes=MINUTES))
            .where(recent.c.end_time <= now)
            .group_by(recent.c.queue, recent.c.state, ago)
        )

    # ---------------------------------------------------------------- jobs

    def check_filters(self, filters: JobFilters) -> None:
        if filters.state is not None and filters.state not in self.states:
            raise ValueError(f"unknown job state {filters.state!r}; one of {', '.join(self.states)}")

    async def jobs(
        self, filters: JobFilters, *, before: int | None = None, after: int | None = None, limit: int = 50
    ) -> Page:
        """A page of jobs matching ``filters``, newest first: those older than ``before`` (an id), or
        newer than ``after``, or the newest."""
        self.check_filters(filters)
        job = self._job
        stmt = sa.select(*self._list_columns)
        for name, value in dataclasses.asdict(filters).items():
            if value is None:
                continue
            if name == "state":  # a literal, as every aiomq statement writes states (see sql.parts)
                stmt = stmt.where(job.c.state == lit(value))
            else:
                stmt = stmt.where(job.c[name] == sa.bindparam(name, value, type_=sa.Text))
        if after is not None:
            stmt = stmt.where(job.c.id > after).order_by(job.c.id.asc())
        else:
            if before is not None:
                stmt = stmt.where(job.c.id < before)
            stmt = stmt.order_by(job.c.id.desc())
        async with self._read() as conn:
            rows = list((await conn.execute(stmt.limit(limit + 1))).all())
        more = len(rows) > limit
        rows = rows[:limit]
        if after is not None:  # fetched oldest first: shown newest first, "Older" always leads back
            rows.reverse()
            return Page(rows, older=rows[-1].id if rows else after + 1, newer=rows[0].id if more else None)
        if before is None:  # the first page: nothing is newer
            return Page(rows, older=rows[-1].id if more else None)
        # "Newer" shows the jobs above this page (or, on an empty page, from ``before`` up).
        return Page(rows, older=rows[-1].id if more else None, newer=rows[0].id if rows else before - 1)

    async def job(self, job_id: int) -> tuple[Any, Any, bool, list[Any]] | None:
        """A job's row in full, its cursor's saved properties, whether an abort is requested, and its
        retry chain (a row of id, state and trace per attempt, oldest first, itself included); None if
        there is no such job."""
        job = self._job
        async with self._read() as conn:
            row = (await conn.execute(sa.select(job).where(job.c.id == job_id))).first()
            if row is None:
                return None
            cursor = None
            if row.cursor_key is not None:
                cursor = await conn.scalar(self._st.lookups.cursor_properties, {"key": row.cursor_key})
            aborting = False
            if self._st.aborts is not None and self.model.AbortRequest is not None:
                table = self.model.AbortRequest.__table__
                aborting = bool(await conn.scalar(sa.select(sa.exists().where(table.c.job_id == job_id))))
            chain = await self._chain(conn, row)
        return row, cursor, aborting, chain

    async def _chain(self, conn: AsyncConnection, row: Any) -> list[Any]:
        """Follow ``mq_source_job_id`` back and ``aiomq_retried_by`` forward, a few steps each way."""
        job = self._job
        query = sa.select(job.c.id, job.c.state, job.c.trace)

        async def fetch(job_id: Any) -> Any:
            if not isinstance(job_id, int) or isinstance(job_id, bool):
                return None
            return (await conn.execute(query.where(job.c.id == job_id))).first()

        def link(r: Any, key: str) -> Any:
            return r.trace.get(key) if isinstance(r.trace, dict) else None

        chain = [row]
        for _ in range(CHAIN_STEPS):
            earlier = await fetch(link(chain[0], SOURCE_KEY))
            if earlier is None or any(r.id == earlier.id for r in chain):
                break
            chain.insert(0, earlier)
        for _ in range(CHAIN_STEPS):
            later = await fetch(link(chain[-1], RETRIED_BY_KEY))
            if later is None or link(later, SOURCE_KEY) != chain[-1].id:
                break
            chain.append(later)
        return chain if len(chain) > 1 else []

    # ---------------------------------------------------------------- cursors, schedules, listeners

    async def cursors(self, *, after: str | None = None, limit: int = 50) -> Page:
        cursor = self._st.parts.cursor
        stmt = sa.select(cursor.c.key, cursor.c.properties, cursor.c.updated_job_id).order_by(cursor.c.key)
        if after is not None:
            stmt = stmt.where(cursor.c.key > sa.bindparam("after", after, type_=sa.Text))
        return await self._forward_page(stmt, limit, "key")

    async def schedules(self, *, after: int | None = None, limit: int = 50) -> Page:
        table = self.model.JobSchedule.__table__
        stmt = sa.select(table).order_by(table.c.id)
        if after is not None:
            stmt = stmt.where(table.c.id > after)
        return await self._forward_page(stmt, limit, "id")

    async def listeners(self, *, after: int | None = None, limit: int = 50) -> Page:
        table = self._st.parts.listener
        stmt = sa.select(table).order_by(table.c.id)
        if after is not None:
            stmt = stmt.where(table.c.id > after)
        return await self._forward_page(stmt, limit, "id")

    async def _forward_page(self, stmt: sa.Select[Any], limit: int, key: str) -> Page:
        async with self._read() as conn:
            rows = list((await conn.execute(stmt.limit(limit + 1))).all())
        more = len(rows) > limit
        rows = rows[:limit]
        return Page(rows, older=getattr(rows[-1], key) if more else None)

    # ---------------------------------------------------------------- workers

    async def workers(self) -> tuple[list[Any], list[Any]]:
        """The ``mq_lock`` rows, and the running jobs' holders (worker name and lock id), each with
        ``alive``: whether the holder's advisory lock ``(lock_key, lock_id)`` is held in this database,
        as maintenance decides whether a worker is gone."""
        p = self._st.parts
        lock, job = p.lock, p.job
        locks = (
            sa.select(
                lock.c.ns,
                lock.c.key,
                lock.c.lock_id,
                lock.c.worker,
                (~p.lock_gone(lock.c.lock_id)).label("alive"),
            )
            .order_by(lock.c.ns, lock.c.key)
            .limit(WORKER_ROWS)
        )
        holders = (
            sa.select(
                job.c.worker,
                job.c.lock_id,
                sa.func.count().label("running"),
                sa.func.min(job.c.start_time).label("since"),
                (~p.lock_gone(job.c.lock_id)).label("alive"),
            )
            .where(job.c.state == p.running)
            .group_by(job.c.worker, job.c.lock_id)
            .order_by(job.c.worker, job.c.lock_id)
            .limit(WORKER_ROWS)
        )
        params = {"lock_key": self._lock_key}
        async with self._read() as conn:
            lock_rows = list((await conn.execute(locks, params)).all())
            holder_rows = list((await conn.execute(holders, params)).all())
        return lock_rows, holder_rows
