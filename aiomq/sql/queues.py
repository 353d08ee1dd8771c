"""Queues: pausing and resuming (``aiomq_queue_pause``), and the statistics of every queue."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert

from .parts import Parts

__all__ = ["QueueStatements"]


class QueueStatements:
    def __init__(self, p: Parts, pause: sa.Table | None) -> None:
        queue = sa.bindparam("queue", type_=sa.Text)
        #: Pause ``queue`` at ``now``; returns the row when it was not paused yet. None without the table.
        self.pause: Any = None
        #: Resume ``queue``; returns the row when it was paused.
        self.resume: Any = None
        #: The paused queues among ``queues``.
        self.paused_among: Any = None
        pause_names: Any = None
        if pause is not None:
            self.pause = (
                pg_insert(pause)
                .values(queue=queue, paused_time=sa.bindparam("now", type_=sa.DateTime))
                .on_conflict_do_nothing(index_elements=[pause.c.queue])
                .returning(pause.c.queue)
            )
            self.resume = pause.delete().where(pause.c.queue == queue).returning(pause.c.queue)
            self.paused_among = sa.select(pause.c.queue).where(pause.c.queue == sa.any_(p.queues))
            pause_names = sa.select(pause.c.queue.label("queue"), sa.true().label("paused"))
        #: One row per queue that has jobs or a pause, by name, at ``now``.
        self.stats = self._stats(p, pause_names)

    @staticmethod
    def _stats(p: Parts, pause_names: Any) -> Any:
        job = p.job
        # Every queue name in the job table, one index probe of ix_mq_job_queue per queue (a loose index
        # scan): no read of the finished rows, however many there are.
        later = job.alias("later")
        seen = sa.select(sa.func.min(job.c.queue).label("queue")).cte("seen", recursive=True)
        following = (
            sa.select(later.c.queue).where(later.c.queue > seen.c.queue).order_by(later.c.queue).limit(1)
        )
        seen = seen.union_all(
            sa.select(following.scalar_subquery().label("queue")).where(seen.c.queue.isnot(None))
        )
        listed: Any = sa.select(seen.c.queue, sa.false().label("paused")).where(seen.c.queue.isnot(None))
        if pause_names is not None:
            listed = listed.union_all(pause_names)
        listed_q = listed.subquery("listed")
        names = (
            sa.select(listed_q.c.queue, sa.func.bool_or(listed_q.c.paused).label("paused"))
            .group_by(listed_q.c.queue)
            .subquery("names")
        )
        now = sa.bindparam("now", type_=sa.DateTime)
        due = job.c.scheduled_time <= now
        # Pending jobs from the partial index ix_aiomq_job_pending_due; running and lost ones are few.
        pending = (
            sa.select(
                job.c.queue,
                sa.func.count().filter(due).label("pending_due"),
                sa.func.count().filter(~due).label("pending_later"),
                sa.func.min(job.c.scheduled_time).filter(due).label("oldest_due"),
            )
            .where(job.c.state == p.pending)
            .group_by(job.c.queue)
            .subquery("pending")
        )
        active = (
            sa.select(
                job.c.queue,
                sa.func.count().filter(job.c.state == p.running).label("running"),
                sa.func.count().filter(job.c.state == p.lost).label("lost"),
            )
            .where(job.c.state.in_([p.running, p.lost]))
            .group_by(job.c.queue)
            .subquery("active")
        )
        return (
            sa.select(
                names.c.queue,
                sa.func.coalesce(pending.c.pending_due, 0).label("pending_due"),
                sa.func.coalesce(pending.c.pending_later, 0).label("pending_later"),
                sa.func.coalesce(active.c.running, 0).label("running"),
                sa.func.coalesce(active.c.lost, 0).label("lost"),
                names.c.paused,
                pending.c.oldest_due,
            )
            .select_from(
                names.outerjoin(pending, pending.c.queue == names.c.queue).outerjoin(
                    active, active.c.queue == names.c.queue
                )
            )
            .order_by(names.c.queue)
        )
