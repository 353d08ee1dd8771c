"""Maintenance, at start and every ``timeout``: the link's keepalive, stale ``mq_lock`` rows, jobs whose
worker is gone (marked lost, with their event), lost jobs that resolve themselves (DESIGN §7.2), abort
requests the worker missed, the schedule duty's ownership; and re-stamping this worker's running jobs
after its connection was replaced; paused queues read again; and the prune duty started."""

from __future__ import annotations

import datetime
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from .dberrors import Transactions
from .events import Announcer, iso
from .outcomes import schedule_retries
from .pauses import Pauses
from .pruning import Pruner
from .retry import Policies, attempt_of
from .scheduler import Scheduler
from .serialize import dump_json
from .sql import Statements

__all__ = ["Maintenance", "lost_job_result", "marking_window"]

log = logging.getLogger(__name__)


def lost_job_result(row: Any) -> dict[str, Any]:
    """The result a lost job gets when it resolves itself (what ``fail_lost_job(result=...)`` writes)."""
    return {
        "exc": "LostJobError",
        "message": f"job {row.id} was lost: its worker {row.worker!r} went away while running it",
        "worker": row.worker,
        "start_time": iso(row.start_time),
        "lost_time": iso(row.end_time),
    }


def marking_window(window: float, server_uptime: float, since_reconnect: float | None) -> float:
    """Seconds until this worker may mark other workers' jobs lost (0: now).

    After a database restart every advisory lock is gone at once, and workers that are still reconnecting
    would look dead: so not while the server has been up for less than ``window``, nor for that long after
    this worker's own connection came back (``since_reconnect``; None if it never had to)."""
    wait = max(window - server_uptime, 0.0)
    if since_reconnect is not None:
        wait = max(wait, window - since_reconnect)
    return wait


class Maintenance:
    def __init__(
        self,
        *,
        st: Statements,
        transactions: Transactions,
        keepalive: Callable[[float], Awaitable[bool]],
        lock_id: Callable[[], int | None],
        since_reconnect: Callable[[], float | None],
        scheduler: Scheduler,
        announcer: Announcer,
        policies: Policies,
        pauses: Pauses,
        pruner: Pruner,
        running: Callable[[], Iterable[int]],
        on_abort: Callable[[list[int]], None],
        queues: Sequence[str],
        lock_key: int,
        name: str,
        clock: Callable[[], datetime.datetime],
        timeout: float,
        lost_grace: float,
        window: float,
    ) -> None:
        self._st = st
        self._tx = transactions
        self._keepalive = keepalive
        self._lock_id = lock_id
        self._since_reconnect = since_reconnect
        self._scheduler = scheduler
        self._announcer = announcer
        self._policies = policies
        self._pauses = pauses
        self._pruner = pruner
        self._running = running
        self._on_abort = on_abort
        self._queues = list(queues)
        self._lock_key = lock_key
        self._name = name
        self._clock = clock
        self._timeout = timeout
        self._lost_grace = lost_grace
        self._window = window
        self._policy_queues = [q for q in self._queues if policies.retry_for(q, None) is not None]
        #: Whether ``aiomq_abort_request`` exists (checked at start: a psycopg2_mq database may lack it).
        self.aborts = st.aborts is not None
        #: Seconds until the next pass should run again, sooner than ``timeout`` (a marking window).
        self.again_in: float | None = None

    def missing_tables(self, tables: list[str]) -> None:
        """At start: aiomq's own tables the database lacks (a psycopg2_mq or aiomq 0.1 schema)."""
        model = self._st.parts.model
        for table in tables:
            if model.AbortRequest is not None and table == model.AbortRequest.__table__.fullname:
                self.aborts, feature = False, "abort requests"
            elif model.QueuePause is not None and table == model.QueuePause.__table__.fullname:
                self._pauses.enabled, feature = False, "paused queues"
            else:
                continue
            log.warning(
                "worker %s: table %s is missing, so it sees no %s (`aiomq schema --create` adds it)",
                self._name,
                table,
                feature,
            )

    async def run(self) -> None:
        """One pass. Failures are logged; the worker goes on."""
        if not await self._keepalive(min(self._timeout, 30)):
            return
        now = self._clock()

        async def op(conn: AsyncConnection) -> tuple[list[Any], list[Any], list[int]]:
            maintenance = self._st.maintenance
            stale = list(await conn.execute(maintenance.release_stale_locks, {"lock_key": self._lock_key}))
            lost = await self._mark_lost(conn, now)
            await self._resolve_lost(conn, now)
            aborts = await self._requested_aborts(conn)
            await self._pauses.reload(conn)  # a missed pause or resume NOTIFY costs one interval
            await self._scheduler.maintain(conn, now, self._lock_id())
            return stale, lost, aborts

        try:
            stale, lost, aborts = await self._tx.run("maintenance", op)
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
        if aborts:
            self._on_abort(aborts)
        self._pruner.start()

    async def _mark_lost(self, conn: AsyncConnection, now: datetime.datetime) -> list[Any]:
        maintenance = self._st.maintenance
        uptime = float(await conn.scalar(maintenance.server_uptime) or 0.0)
        wait = marking_window(self._window, uptime, self._since_reconnect())
        self.again_in = wait or None
        if wait:
            log.info("not marking jobs lost for %.1fs: the database or this worker just reconnected", wait)
            return []
        params = {"queues": self._queues, "lock_key": self._lock_key, "now": now}
        lost = list(await conn.execute(maintenance.mark_lost, params))
        state = self._st.parts.model.JobStates.LOST
        for job in lost:
            await self._announcer.announce(conn, job, state, job.cursor_key)
        return lost

    async def _resolve_lost(self, conn: AsyncConnection, now: datetime.datetime) -> None:
        """Lost jobs past ``lost_grace`` with a retry policy fail (and retry while runs are left); those
        someone asked to abort end canceled."""
        maintenance = self._st.maintenance
        states = self._st.parts.model.JobStates
        params = {
            "queues": self._queues,
            "before": now - datetime.timedelta(seconds=self._lost_grace),
            "policy_queues": self._policy_queues,
        }
        for row in list(await conn.execute(maintenance.resolvable_lost, params)):
            policy = self._policies.retry_for(row.queue, row.trace)
            if row.aborted:
                state, result = states.CANCELED, None
            elif policy is not None:
                state, result = states.FAILED, lost_job_result(row)
            else:
                continue  # an invalid policy in its trace (logged): it stays lost
            changed = {
                "job_id": row.id,
                "state": state,
                "result_json": None if result is None else dump_json(result, "lost job result"),
            }
            resolved = (await conn.execute(maintenance.resolve_lost, changed)).first()
            if resolved is None:
                continue
            retry_id = None
            attempt = attempt_of(row.trace)
            if state == states.FAILED and policy is not None and policy.runs_left(attempt):
                when = now + datetime.timedelta(seconds=policy.wait(attempt))
                retry_id = (await schedule_retries(conn, self._st, [(row.id, when, attempt + 1)], now)).get(
                    row.id
                )
            await self._announcer.announce(
                conn, resolved, state, row.cursor_key, result=result, retry_job_id=retry_id
            )
            log.warning(
                "lost job %s resolved: %s%s",
                row.id,
                state,
                f", retried as job {retry_id}" if retry_id else "",
            )

    async def _requested_aborts(self, conn: AsyncConnection) -> list[int]:
        """Abort requests for the jobs running here (their NOTIFY may have been missed); and the requests
        of jobs that finished meanwhile are forgotten."""
        aborts = self._st.aborts
        if aborts is None or not self.aborts:
            return []
        await conn.execute(aborts.purge)
        running = list(self._running())
        if not running:
            return []
        return list((await conn.scalars(aborts.requested_among, {"ids": running})).all())

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
