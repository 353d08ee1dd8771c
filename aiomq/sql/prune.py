"""Pruning: deleting finished jobs, one window of ids per transaction."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from .parts import Parts

__all__ = ["PruneStatements"]


class PruneStatements:
    def __init__(self, p: Parts) -> None:
        job, cursor = p.job, p.cursor
        before = sa.bindparam("before", type_=sa.DateTime)
        queue = sa.bindparam("queue", type_=sa.Text)
        # The next ``batch`` jobs by id after ``after``, whatever their state: a walk of the primary key
        # that reads each row once over the whole prune, however many of them are kept.
        scanned = (
            sa.select(job.c.id, job.c.state, job.c.end_time, job.c.created_time, job.c.queue)
            .where(job.c.id > sa.bindparam("after", type_=sa.BigInteger))
            .order_by(job.c.id)
            .limit(sa.bindparam("batch", type_=sa.Integer))
            .cte("scanned")
        )

        def doomed(t: sa.FromClause) -> sa.ColumnElement[bool]:
            """Finished in one of ``states`` before ``before``, of ``queue`` (if not NULL), and not the job
            that last updated a cursor (deleting it would change the cursor's row)."""
            return sa.and_(
                sa.cast(t.c.state, sa.Text) == sa.any_(sa.bindparam("states", type_=pg.ARRAY(sa.Text))),
                t.c.end_time < before,
                sa.or_(queue.is_(None), t.c.queue == queue),
                ~sa.exists().where(cursor.c.updated_job_id == t.c.id),
            )

        deleted = (
            job.delete()
            .where(job.c.id.in_(sa.select(scanned.c.id).where(doomed(scanned))))
            .where(doomed(job))  # checked again on the row it locks: it may have changed meanwhile
            .returning(job.c.id)
            .cte("deleted")
        )
        window = (
            sa.func.max(scanned.c.id).label("last_id"),
            # Once a whole window was created after the cutoff, no later id can have ended before it.
            sa.func.coalesce(sa.func.bool_or(scanned.c.created_time < before), False).label("older"),
        )
        #: Delete one window (``after``, ``batch``) of jobs in ``states`` that ended before ``before``
        #: (``queue`` or NULL for all); returns the window's last id, how many were deleted, and whether
        #: the window held jobs created before the cutoff (the walk goes on while it does).
        self.prune_batch = sa.select(
            *window, sa.select(sa.func.count()).select_from(deleted).scalar_subquery().label("deleted")
        ).select_from(scanned)
        #: ``prune_batch`` counting instead of deleting (``--dry-run``).
        self.count_batch = sa.select(
            *window, sa.func.count().filter(doomed(scanned)).label("deleted")
        ).select_from(scanned)
        #: One pruner at a time among the workers (``prune_after``): a session try-lock, held by a
        #: connection of its own for the whole prune, and its release. (One bigint key: apart from the
        #: two-integer keys of the workers' locks in pg_locks.)
        key = sa.func.hashtext(sa.literal("aiomq prune", sa.Text))
        self.try_prune_lock = sa.select(sa.func.pg_try_advisory_lock(key))
        self.prune_unlock = sa.select(sa.func.pg_advisory_unlock(key))
