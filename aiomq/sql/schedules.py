"""Schedules: per-queue scheduler ownership (rows ``mq_lock('queue-schedules', queue)``), firing, staleness.

One worker per queue fires that queue's schedules: the one whose ``mq_lock`` row carries its advisory lock
id (psycopg2_mq's protocol, so either library's workers may own it).
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from .parts import Parts

__all__ = ["SCHEDULER_NS", "ScheduleStatements"]

SCHEDULER_NS = "queue-schedules"


class ScheduleStatements:
    """Scheduler ownership, stale and due schedules, the next schedule time."""

    def __init__(self, p: Parts) -> None:
        lock = p.lock
        schedule: sa.Table = p.model.JobSchedule.__table__
        ns = sa.literal(SCHEDULER_NS, sa.Text)
        queues = p.queues

        #: Try to own the scheduling of each of ``queues`` (``lock_id``, ``name``); returns those now owned.
        wanted = sa.select(
            ns.label("ns"),
            sa.func.unnest(queues).label("key"),
            sa.bindparam("lock_id", type_=sa.Integer).label("lock_id"),
            sa.bindparam("name", type_=sa.Text).label("worker"),
        )
        self.take_ownership = (
            pg_insert(lock)
            .from_select(["ns", "key", "lock_id", "worker"], wanted)
            .on_conflict_do_nothing(index_elements=[lock.c.ns, lock.c.key])
        )
        #: The queues whose scheduling this worker (``lock_id``) owns.
        self.owned = sa.select(lock.c.key).where(
            lock.c.ns == ns, lock.c.lock_id == sa.bindparam("lock_id", type_=sa.Integer)
        )
        #: Enabled schedules of the owned ``queues`` whose next time is before ``before`` (stale).
        self.stale = (
            sa.select(schedule)
            .where(schedule.c.queue == sa.any_(queues))
            .where(schedule.c.is_enabled == sa.true())
            .where(schedule.c.next_execution_time < sa.bindparam("before", type_=sa.DateTime))
            .with_for_update(skip_locked=True)
        )
        #: Enabled schedules of the owned ``queues`` due at ``now``, in firing order.
        self.due = (
            sa.select(schedule.c.id, schedule.c.next_execution_time)
            .where(schedule.c.queue == sa.any_(queues))
            .where(schedule.c.is_enabled == sa.true())
            .where(schedule.c.next_execution_time <= sa.bindparam("now", type_=sa.DateTime))
            .order_by(schedule.c.next_execution_time, schedule.c.created_time, schedule.c.id)
            .with_for_update(skip_locked=True)
        )
        #: When the next schedule of the owned ``queues`` is due (NULL: none).
        self.next_time = (
            sa.select(sa.func.min(schedule.c.next_execution_time))
            .where(schedule.c.queue == sa.any_(queues))
            .where(schedule.c.is_enabled == sa.true())
        )
        self.set_next = (
            schedule.update()
            .where(schedule.c.id == sa.bindparam("schedule_id", type_=sa.BigInteger))
            .values(next_execution_time=sa.bindparam("next_time", type_=sa.DateTime))
        )
