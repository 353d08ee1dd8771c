"""The worker's schedule duty: owning the scheduling of its queues (one owner per queue, through
``mq_lock`` rows that carry the owner's advisory lock id), skipping missed times, and firing due schedules.
The RRULE maths is :mod:`aiomq.schedules`."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from .dberrors import Transactions
from .records import QueuedJob
from .schedules import next_rrule_time
from .sql import Statements

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)

#: ``source_for(session)``: a source on ``session`` (the worker's ``mq_source_factory``).
SourceFor = Callable[[AsyncSession], Any]


class Scheduler:
    """Fires the schedules of the queues this worker owns."""

    def __init__(
        self,
        *,
        st: Statements,
        transactions: Transactions,
        queues: Sequence[str],
        name: str,
        clock: Callable[[], datetime.datetime],
        timeout: float,
        retry_after: float,
        source_for: SourceFor,
        is_retryable: Callable[[BaseException], bool],
    ) -> None:
        self._ss = st.schedules
        self._tx = transactions
        self._queues = list(queues)
        self._name = name
        self._clock = clock
        self._timeout = timeout
        self._retry_after = retry_after
        self._source_for = source_for
        self._is_retryable = is_retryable
        self.owned: list[str] = []  # queues whose schedules this worker fires
        #: When the next schedule of the owned queues is due (None: none).
        self.next_time: datetime.datetime | None = None

    def hint(self, queue: str, when: datetime.datetime) -> bool:
        """A ``{"s", "t"}`` NOTIFY on ``queue``: True if it concerns this worker (then fire by ``when``)."""
        if queue not in self.owned:
            return False
        if self.next_time is None or when < self.next_time:
            self.next_time = when
        return True

    def is_due(self) -> bool:
        return self.next_time is not None and self.next_time <= self._clock()

    async def maintain(self, conn: AsyncConnection, now: datetime.datetime, lock_id: int | None) -> None:
        """In maintenance's transaction: own the scheduling of every queue nobody owns; move stale
        schedules past ``now - timeout``."""
        ss = self._ss
        params = {"queues": self._queues, "lock_id": lock_id, "name": self._name}
        await conn.execute(ss.take_ownership, params)
        owned = [q for q in (await conn.scalars(ss.owned, params)).all() if q in self._queues]
        if owned != self.owned:
            log.info("worker %s runs the schedules of queues %s", self._name, ",".join(owned) or "(none)")
        self.owned = owned
        if not owned:
            self.next_time = None
            return
        cutoff = now - datetime.timedelta(seconds=self._timeout)
        for schedule in await conn.execute(ss.stale, {"queues": owned, "before": cutoff}):
            await self._skip_missed(conn, schedule, cutoff)
        self.next_time = await conn.scalar(ss.next_time, {"queues": owned})

    async def _skip_missed(self, conn: AsyncConnection, schedule: Any, cutoff: datetime.datetime) -> None:
        """No backfill: a schedule that missed its time moves to its first time after ``cutoff``."""
        try:
            next_time = next_rrule_time(schedule.rrule, schedule.created_time, cutoff)
        except Exception as ex:
            log.error(
                "schedule %s: cannot evaluate rrule %r (%s); it will not fire",
                schedule.id,
                schedule.rrule,
                ex,
            )
            await conn.execute(self._ss.set_next, {"schedule_id": schedule.id, "next_time": None})
            return
        log.warning(
            "schedule %s (%s.%s) missed its time %s; skipping to %s",
            schedule.id,
            schedule.queue,
            schedule.method,
            schedule.next_execution_time,
            next_time,
        )
        await conn.execute(self._ss.set_next, {"schedule_id": schedule.id, "next_time": next_time})

    async def fire(self) -> None:
        """Fire every due schedule of the owned queues: one job each, no backfill."""
        now = self._clock()
        owned = list(self.owned)

        async def op(conn: AsyncConnection) -> list[tuple[int, QueuedJob]]:
            fired = []
            due = list(await conn.execute(self._ss.due, {"queues": owned, "now": now}))
            if due:
                async with AsyncSession(bind=conn) as session:
                    source = self._source_for(session)
                    for schedule in due:
                        job = await self._fire_one(conn, session, source, schedule, now)
                        if job is not None:
                            fired.append((schedule.id, job))
                    await session.flush()
            self.next_time = await conn.scalar(self._ss.next_time, {"queues": owned})
            return fired

        try:
            fired = await self._tx.run("apply schedules", op)
        except Exception:
            log.exception("firing schedules failed; the worker goes on")
            self.next_time = now + datetime.timedelta(seconds=self._retry_after)
            return
        for schedule_id, job in fired:
            log.info("schedule %s fired job %s", schedule_id, job.id)

    async def _fire_one(
        self, conn: AsyncConnection, session: AsyncSession, source: Any, schedule: Any, now: datetime.datetime
    ) -> QueuedJob | None:
        try:  # one schedule that cannot fire (a bad rrule, a bad row) spares the others
            async with session.begin_nested():
                job: QueuedJob = await source.call_schedule(
                    schedule.id, now=now, when=schedule.next_execution_time, reload=False
                )
                return job
        except Exception as ex:
            if self._is_retryable(ex):
                raise
            log.error("schedule %s cannot fire (%s); it will not fire again", schedule.id, ex)
            await conn.execute(self._ss.set_next, {"schedule_id": schedule.id, "next_time": None})
            return None
