"""Pruning finished jobs (DESIGN §7.6): ``prune_jobs``, and the worker duty ``prune_after``.

Jobs are walked in id order, one window of ``batch_size`` ids per transaction, so a prune of millions of
rows never holds locks for long nor grows one transaction; it stops at the first window created entirely
after the cutoff. Only completed, failed and canceled jobs are ever deleted, never the job that last
updated a cursor (the cursor's row would change), and nothing else: cursors and schedules stay.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from .pooling import is_pooled
from .records import check_queue_name, to_naive_utc, utcnow
from .sql import Statements

__all__ = ["DEFAULT_STATES", "Pruner", "prune_cutoff", "prune_jobs", "prune_states"]

log = logging.getLogger(__name__)

#: What ``prune_jobs`` deletes unless told otherwise: failed jobs stay for someone to look at.
DEFAULT_STATES = ("completed", "canceled")
MAX_BATCH = 100_000


def prune_states(job_states: Any, states: Iterable[str]) -> list[str]:
    """``states`` checked: only the finished states a person does not need to resolve."""
    if isinstance(states, str):
        raise TypeError(f"states must be a sequence of state names, got the string {states!r}")
    allowed = [job_states.COMPLETED, job_states.FAILED, job_states.CANCELED]
    chosen = list(states)
    for state in chosen:
        if state not in allowed:
            raise ValueError(
                f"cannot prune jobs in state {state!r}: only {', '.join(allowed)} jobs are pruned"
            )
    if not chosen:
        raise ValueError("states must name at least one state to prune")
    return sorted(set(chosen))


def prune_cutoff(
    older_than: datetime.timedelta | datetime.datetime, now: datetime.datetime
) -> datetime.datetime:
    """The ``end_time`` before which jobs are pruned; never in the future."""
    if isinstance(older_than, datetime.timedelta):
        if older_than < datetime.timedelta():
            raise ValueError(f"older_than must not be negative, got {older_than!r}")
        return now - older_than
    if isinstance(older_than, datetime.datetime):
        cutoff = to_naive_utc(older_than)
        if cutoff > now:
            raise ValueError(
                f"older_than is in the future ({cutoff.isoformat()} UTC): nothing that old has ended"
            )
        return cutoff
    raise TypeError(f"older_than must be a timedelta or a datetime, got {type(older_than).__name__}")


def _check_batch(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size must be an integer from 1 to {MAX_BATCH}, got {batch_size!r}")
    return batch_size


async def prune_jobs(
    engine: AsyncEngine,
    st: Statements,
    *,
    older_than: datetime.timedelta | datetime.datetime,
    states: Iterable[str] = DEFAULT_STATES,
    queue: str | None = None,
    batch_size: int = 5000,
    dry_run: bool = False,
    now: datetime.datetime | None = None,
    exclusive: bool = False,
    stopping: Callable[[], bool] = lambda: False,
) -> int:
    """Delete (or with ``dry_run`` count) finished jobs in ``states`` whose ``end_time`` is older than
    ``older_than``; returns how many. ``exclusive``: return 0 at once if another exclusive prune runs."""
    params: dict[str, Any] = {
        "states": prune_states(st.parts.model.JobStates, states),
        "before": prune_cutoff(older_than, utcnow() if now is None else to_naive_utc(now)),
        "queue": None if queue is None else check_queue_name(queue),
        "batch": _check_batch(batch_size),
        "after": 0,
    }
    if not exclusive:
        return await _batches(engine, st, params, dry_run, stopping)
    # A session lock on a connection of its own, held for the whole prune: one pruner at a time. Behind
    # a transaction pooler the session is only ours inside a transaction: one stays open meanwhile.
    pooled = await is_pooled(engine)
    async with engine.connect() as conn:
        if not pooled:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        if not await conn.scalar(st.prune.try_prune_lock):
            log.debug("another worker is pruning")
            return 0
        try:
            return await _batches(engine, st, params, dry_run, stopping)
        finally:
            await conn.execute(st.prune.prune_unlock)
            if pooled:
                await conn.commit()


async def _batches(
    engine: AsyncEngine, st: Statements, params: dict[str, Any], dry_run: bool, stopping: Callable[[], bool]
) -> int:
    statement = st.prune.count_batch if dry_run else st.prune.prune_batch
    total = 0
    while not stopping():
        async with engine.begin() as conn:
            row = (await conn.execute(statement, params)).one()
        total += row.deleted
        if row.last_id is None or not row.older:
            break
        params["after"] = row.last_id
        await asyncio.sleep(0)  # (a caller on the same loop goes on between batches)
    if total and not dry_run:
        log.info("pruned %d jobs that ended before %s", total, params["before"].isoformat())
    return total


class Pruner:
    """The worker duty ``prune_after``: at a maintenance, unless a prune is still running or this worker
    started one less than ``interval`` seconds ago, start one in the background (it must not hold up
    claims), deleting completed and canceled jobs that ended more than ``prune_after`` ago. Many workers
    may have it: one prunes at a time (a session advisory lock), the others skip their turn.

    The interval keeps an idle prune cheap: a prune walks every job kept (failed ones, say) to find the
    ones to delete, and once everything old is gone there is nothing to gain from walking again soon."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        st: Statements,
        prune_after: datetime.timedelta | None,
        clock: Callable[[], datetime.datetime],
        stopping: Callable[[], bool],
        interval: float,
    ) -> None:
        self._engine = engine
        self._st = st
        self._prune_after = prune_after
        self._clock = clock
        self._stopping = stopping
        self._interval = interval
        self._started: float | None = None  # the loop's time of the last start
        self._task: asyncio.Task[int] | None = None

    def start(self) -> None:
        if self._prune_after is None or (self._task is not None and not self._task.done()):
            return
        now = asyncio.get_running_loop().time()
        if self._started is not None and now - self._started < self._interval:
            return
        self._started = now
        self._task = asyncio.create_task(self._run(self._prune_after), name="aiomq prune")

    async def _run(self, prune_after: datetime.timedelta) -> int:
        try:
            return await prune_jobs(
                self._engine,
                self._st,
                older_than=prune_after,
                now=self._clock(),
                exclusive=True,
                stopping=self._stopping,
            )
        except Exception as ex:
            log.warning("pruning failed (%s); trying again at the next maintenance", ex)
            return 0

    async def stop(self) -> None:
        """Wait for a prune in progress: it stops after its current batch."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
