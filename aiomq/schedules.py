"""Recurring schedules: RRULE arithmetic, and the statements of per-queue scheduler ownership.

One worker per queue fires that queue's schedules: the one whose row ``mq_lock('queue-schedules', queue)``
carries its advisory lock id (the same protocol as psycopg2_mq, so either library's workers may own it).
A row whose owner's advisory lock is gone is deleted by any worker's maintenance, and the next insert wins.
"""

from __future__ import annotations

import datetime
import functools
from typing import Any

import sqlalchemy as sa
from dateutil import rrule as du_rrule
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects.postgresql import insert as pg_insert

from .model import Model

__all__ = ["SCHEDULER_NS", "ScheduleStatements", "check_rrule", "next_rrule_time", "schedule_statements"]

SCHEDULER_NS = "queue-schedules"


def _rule(rrule: str, dtstart: datetime.datetime) -> Any:
    # dateutil drops microseconds from dtstart itself; a DTSTART inside the text wins over dtstart.
    return du_rrule.rrulestr(rrule, dtstart=dtstart)


def check_rrule(rrule: object, dtstart: datetime.datetime) -> str:
    """``rrule`` if dateutil can parse it, else ``ValueError`` naming the problem."""
    if not isinstance(rrule, str) or not rrule.strip():
        raise ValueError(f"rrule must be a non-empty RFC 5545 RRULE string, got {rrule!r}")
    try:
        _rule(rrule, dtstart)
    except (ValueError, TypeError, KeyError) as ex:
        raise ValueError(f"invalid rrule {rrule!r}: {ex}") from ex
    return rrule


def next_rrule_time(
    rrule: str, dtstart: datetime.datetime, after: datetime.datetime
) -> datetime.datetime | None:
    """The first occurrence strictly after ``after`` (naive UTC), or None once the rule is exhausted.

    A ``DTSTART;TZID=...`` rule yields aware times: they are compared with ``after`` as UTC and returned
    as naive UTC.
    """
    rule = _rule(rrule, dtstart)
    try:
        found = rule.after(after, inc=False)
    except TypeError:  # the rule carries its own time zone
        found = rule.after(after.replace(tzinfo=datetime.UTC), inc=False)
    if found is None:
        return None
    if found.tzinfo is not None:
        found = found.astimezone(datetime.UTC).replace(tzinfo=None)
    return found  # type: ignore[no-any-return]


class ScheduleStatements:
    """Scheduler-ownership statements of one model."""

    def __init__(self, model: Model) -> None:
        lock = model.Lock.__table__
        schedule = model.JobSchedule.__table__
        ns = sa.literal(SCHEDULER_NS, sa.Text)
        queues = sa.bindparam("queues", type_=pg.ARRAY(sa.Text))

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


@functools.cache
def schedule_statements(model: Model) -> ScheduleStatements:
    return ScheduleStatements(model)
