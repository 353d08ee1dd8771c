"""Claiming: the statements the worker runs on its own connection, the one holding its advisory lock."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from .parts import Parts

__all__ = ["ClaimStatements"]


class ClaimStatements:
    """Claim due jobs, find when the next becomes due, adopt the jobs of a claim whose reply was lost."""

    def __init__(self, p: Parts) -> None:
        job, cursor = p.job, p.cursor
        wanted = sa.func.unnest(p.queues).table_valued("name").render_derived(name="wanted")
        #: What a claim returns, and what ``JobContext.from_claim`` reads.
        self.claimed = (
            job.c.id,
            job.c.queue,
            job.c.method,
            job.c.args,
            job.c.cursor_key,
            job.c.cursor_snapshot,
            job.c.trace,
            job.c.scheduled_time,
            job.c.created_time,
        )
        snapshot = sa.select(cursor.c.properties).where(cursor.c.key == job.c.cursor_key).scalar_subquery()

        #: Claim up to ``limit`` due jobs of ``queues`` at ``now`` for worker ``name`` holding ``lock_id``.
        #: SKIP LOCKED lets workers claim side by side; each queue's walk locks candidates in claim order,
        #: only the first due job of each cursor among them (so one job per cursor). A claim
        #: race on one cursor between two workers surfaces as a unique violation on
        #: uq_mq_job_active_cursor_key, which the worker retries at once (the cursor is then busy).
        # The ids as one array (``id = ANY(...)``): the generic plan then looks each one up in the primary
        # key. A join with the CTE instead is planned for thousands of rows (an unknown LIMIT), as a merge
        # join over the whole table's primary key: tens of milliseconds on a large backlog.
        picked = self._picked(p, wanted)
        ids = pg.ARRAY(sa.BigInteger)  # (a cast, or ANY would read the subquery as a set of arrays)
        self.claim = (
            job.update()
            .where(
                job.c.id == sa.any_(sa.cast(sa.select(sa.func.array_agg(picked.c.id)).scalar_subquery(), ids))
            )
            .values(
                state=p.running,
                lock_id=sa.bindparam("lock_id", type_=sa.Integer),
                worker=sa.bindparam("name", type_=sa.Text),
                start_time=sa.bindparam("now", type_=sa.DateTime),
                cursor_snapshot=snapshot,
            )
            .returning(*self.claimed)
        )

        #: The earliest time a job of ``queues`` becomes claimable (cursor not busy), or NULL.
        first_due = (
            sa.select(job.c.scheduled_time)
            .where(job.c.state == p.pending)
            .where(job.c.queue == wanted.c.name)
            .where(~p.cursor_busy)
            .order_by(*p.due_order)
            .limit(1)
            .lateral("first_due")
        )
        self.next_due = sa.select(sa.func.min(first_due.c.scheduled_time)).select_from(
            wanted.join(first_due, sa.true())
        )

        #: Take back the jobs of claims whose reply never arrived (the connection died after the commit):
        #: ``running`` (or ``lost``, if the lock changed meanwhile) for worker ``name`` with a ``start_time``
        #: among ``stamps`` (each failed claim stamped its own ``now``), not among ``known`` (the jobs the
        #: worker runs). Their handlers never ran. Re-stamped under ``lock_id``; returns what ``claim`` does.
        self.adopt = (
            job.update()
            .where(job.c.state.in_([p.running, p.lost]))
            .where(job.c.worker == sa.bindparam("name", type_=sa.Text))
            .where(job.c.start_time == sa.any_(sa.bindparam("stamps", type_=pg.ARRAY(sa.DateTime))))
            .where(job.c.queue == sa.any_(p.queues))
            .where(job.c.id != sa.all_(sa.bindparam("known", type_=pg.ARRAY(sa.BigInteger))))
            .values(
                state=p.running,
                lock_id=sa.bindparam("lock_id", type_=sa.Integer),
                end_time=None,
            )
            .returning(*self.claimed)
        )

        #: Take the session advisory lock (``lock_key``, ``lock_id``) that is a worker's liveness, if free.
        self.try_lock = sa.select(
            sa.func.pg_try_advisory_lock(
                sa.bindparam("lock_key", type_=sa.Integer), sa.bindparam("lock_id", type_=sa.Integer)
            )
        )

    @staticmethod
    def _picked(p: Parts, wanted: Any) -> Any:
        """The ids a claim takes: due jobs in claim order, SKIP LOCKED, at most one per cursor, and a
        cursor's jobs in due order whatever their priorities (``behind`` below)."""
        job = p.job
        now = sa.bindparam("now", type_=sa.DateTime)
        # A cursor's jobs run in due order whatever their priorities: a job with an earlier due job of its
        # cursor pending in these queues is not a candidate. (Refusing such jobs only after the walk, a
        # claim could fill ``limit`` with later jobs of one cursor of a higher priority, refuse them all
        # and claim nothing, again and again: the whole queue would starve.)
        earlier = job.alias("earlier")
        behind = (
            sa.exists()
            .where(earlier.c.cursor_key == job.c.cursor_key)
            .where(earlier.c.state == p.pending)
            .where(earlier.c.queue == sa.any_(p.queues))
            .where(earlier.c.scheduled_time <= now)
            .where(
                sa.tuple_(earlier.c.scheduled_time, earlier.c.created_time, earlier.c.id)
                < sa.tuple_(job.c.scheduled_time, job.c.created_time, job.c.id)
            )
        )
        # One ordered walk of ix_aiomq_job_pending_priority per queue (PostgreSQL before 17 cannot walk a
        # btree in order for ``queue = ANY(...)`` and would sort the whole backlog), merged, then the first
        # ``limit``: a claim's cost does not grow with the backlog.
        ranks = [] if p.priority is None else [p.priority]
        per_queue = (
            sa.select(job.c.id, *ranks, *p.due_order)
            .where(job.c.state == p.pending)
            .where(job.c.queue == wanted.c.name)
            .where(job.c.scheduled_time <= now)
            .where(~p.cursor_busy)
            .where(sa.or_(job.c.cursor_key.is_(None), ~behind))
            .order_by(*p.claim_order)
            .limit(sa.bindparam("limit", type_=sa.Integer))
            .with_for_update(skip_locked=True, of=job)
            .lateral("candidates")
        )
        merged_order: list[Any] = [per_queue.c.scheduled_time, per_queue.c.created_time, per_queue.c.id]
        if p.priority is not None:
            merged_order.insert(0, per_queue.c.priority.desc())
        # At most one job per cursor comes out of the walks (only the first due one of its cursor), so the
        # merged first ``limit`` are all taken. An earlier due job of a cursor that another worker has
        # locked keeps its later jobs out too: taking one would run the cursor out of order, and a
        # psycopg2_mq worker (whose claim reads the cursor, then writes the job in a second statement)
        # could then start that earlier job from a cursor this one is about to change.
        return (
            sa.select(per_queue.c.id)
            .select_from(wanted.join(per_queue, sa.true()))
            .order_by(*merged_order)
            .limit(sa.bindparam("limit", type_=sa.Integer))
            .cte("locked")
        )
