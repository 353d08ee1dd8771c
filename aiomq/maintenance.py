"""Maintenance, at start and every ``timeout``: the link's keepalive, stale ``mq_lock`` rows, jobs whose
worker is gone (marked lost, with their event), the schedule duty's ownership; and re-stamping this
worker's running jobs after its connection was replaced. The home of lost-job resolution and pruning."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from .dberrors import Transactions
from .events import Announcer
from .scheduler import Scheduler
from .sql import Statements

__all__ = ["Maintenance"]

log = logging.getLogger(__name__)


class Maintenance:
    def __init__(
        self,
        *,
        st: Statements,
        transactions: Transactions,
        keepalive: Callable[[float], Awaitable[bool]],
        lock_id: Callable[[], int | None],
        scheduler: Scheduler,
        announcer: Announcer,
        queues: Sequence[str],
        lock_key: int,
        name: str,
        clock: Callable[[], datetime.datetime],
        timeout: float,
    ) -> None:
        self._st = st
        self._tx = transactions
        self._keepalive = keepalive
        self._lock_id = lock_id
        self._scheduler = scheduler
        self._announcer = announcer
        self._queues = list(queues)
        self._lock_key = lock_key
        self._name = name
        self._clock = clock
        self._timeout = timeout

    async def run(self) -> None:
        """One pass. Failures are logged; the worker goes on."""
        if not await self._keepalive(min(self._timeout, 30)):
            return
        now = self._clock()
        maintenance = self._st.maintenance
        lost_state = self._st.parts.model.JobStates.LOST

        async def op(conn: AsyncConnection) -> tuple[list[Any], list[Any]]:
            stale = list(await conn.execute(maintenance.release_stale_locks, {"lock_key": self._lock_key}))
            params = {"queues": self._queues, "lock_key": self._lock_key, "now": now}
            lost = list(await conn.execute(maintenance.mark_lost, params))
            for job in lost:
                await self._announcer.announce(conn, job, lost_state, job.cursor_key)
            await self._scheduler.maintain(conn, now, self._lock_id())
            return stale, lost

        try:
            stale, lost = await self._tx.run("maintenance", op)
        except Exception:
            log.exception("maintenance failed; the worker goes on and tries again in %ss", self._timeout)
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

    async def recover(self, old_lock_id: int, lock_id: int, running: Iterable[int]) -> None:
        """After a reconnect, re-stamp the jobs still running here and move scheduler locks."""
        maintenance = self._st.maintenance
        async with self._tx.engine.begin() as conn:
            params = {"ids": list(running), "lock_id": lock_id, "name": self._name}
            rows = await conn.execute(maintenance.restamp, params)
            await conn.execute(maintenance.move_locks, {"old_lock_id": old_lock_id, "lock_id": lock_id})
        recovered = [r.id for r in rows]
        if recovered:
            log.info("worker %s re-stamped running jobs %s with lock_id=%s", self._name, recovered, lock_id)

    async def release(self, lock_id: int) -> None:
        """At shutdown: delete this worker's ``mq_lock`` rows."""

        async def op(conn: AsyncConnection) -> None:
            await conn.execute(self._st.maintenance.release_my_locks, {"lock_id": lock_id})

        try:
            await self._tx.run("release locks", op, while_stopping=True)
        except Exception as ex:  # they go stale with our advisory lock; any maintenance deletes them
            log.warning("could not release the locks of worker %s: %s", self._name, ex)
