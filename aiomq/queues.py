"""Operating queues (DESIGN §7.6): pausing and resuming a queue, and every queue's statistics.

A pause is a row in ``aiomq_queue_pause`` and a NOTIFY on ``mq.queue_pause`` in the same transaction:
the row makes it last (workers read it at start and at each maintenance), the NOTIFY makes aiomq workers
stop claiming the queue at once (:mod:`aiomq.pauses`). psycopg2_mq workers know neither and go on.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from . import channels
from .records import check_queue_name
from .sql import Statements

__all__ = ["QueueStats", "pause_queue", "queue_stats", "resume_queue"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class QueueStats:
    """One queue at a glance: its pending jobs that are due and that are scheduled later, its running and
    lost jobs, whether it is paused, and how long its oldest due job has waited (None: none is due)."""

    queue: str
    pending_due: int
    pending_later: int
    running: int
    lost: int
    paused: bool
    oldest_due_age: datetime.timedelta | None


def _pause_statements(st: Statements, what: str) -> Any:
    # (A model with the table on a database without it fails in the statement: SchemaMissingError.)
    if st.queues.pause is None:
        raise ValueError(f"cannot {what} a queue: the model has no QueuePause table")
    return st.queues


async def _set_paused(
    session: AsyncSession, st: Statements, queue: str, paused: bool, now: datetime.datetime
) -> bool:
    check_queue_name(queue)
    statements = _pause_statements(st, "pause" if paused else "resume")
    statement = statements.pause if paused else statements.resume
    changed = (await session.execute(statement, {"queue": queue, "now": now})).first() is not None
    # Sent even when nothing changed: a worker that missed the first one hears it now.
    payload = channels.pause_payload(queue, paused)
    await session.execute(st.notify, {"channel": channels.PAUSE_CHANNEL, "payload": payload})
    if changed:
        log.info("queue %s %s", queue, "paused" if paused else "resumed")
    return changed


async def pause_queue(session: AsyncSession, st: Statements, queue: str, now: datetime.datetime) -> bool:
    """Pause ``queue``; False if it was paused already."""
    return await _set_paused(session, st, queue, True, now)


async def resume_queue(session: AsyncSession, st: Statements, queue: str, now: datetime.datetime) -> bool:
    """Resume ``queue``; False if it was not paused."""
    return await _set_paused(session, st, queue, False, now)


async def queue_stats(session: AsyncSession, st: Statements, now: datetime.datetime) -> list[QueueStats]:
    """Every queue that has jobs or a pause, by name."""
    rows = await session.execute(st.queues.stats, {"now": now})
    return [
        QueueStats(
            queue=row.queue,
            pending_due=row.pending_due,
            pending_later=row.pending_later,
            running=row.running,
            lost=row.lost,
            paused=bool(row.paused),
            oldest_due_age=None
            if row.oldest_due is None
            else max(now - row.oldest_due, datetime.timedelta()),
        )
        for row in rows
    ]
