"""Claiming: the statements the worker runs on its own connection, the one holding its advisory lock."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
        self.claim = self._claim(p, wanted, snapshot, self.claimed)
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
        #: This session's server process and database. The worker's start-up proof (:mod:`aiomq.proof`)
        #: runs it on the listener and through the engine, and compares.
        self.whoami = sa.select(
            sa.func.pg_backend_pid().label("pid"), sa.func.current_database().label("database")
        )
        #: Who holds (``lock_key``, ``lock_id``): process ids and databases. Through the engine at start,
        #: it tells whether the listener's own process holds the worker's lock.
        self.lock_holders = p.lock_holders()

    @staticmethod
    def _claim(p: Parts, wanted: Any, snapshot: Any, claimed: Sequence[Any]) -> Any:
        job = p.job
        # The ids as one array (``id = ANY(...)``): the generic plan then looks each one up in the primary
        # key. A join with the CTE instead is planned for thousands of rows (an unknown LIMIT), as a merge
        # join over the whole table's primary key: tens of milliseconds on a large backlog.
        picked = ClaimStatements._picked(p, wanted)
        ids = pg.ARRAY(sa.BigInteger)  # (a cast, or ANY would read the subquery as a set of arrays)
        return (
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
            .returning(*claimed)
        )

    @staticmethod
    def _picked(p: Parts, wanted: Any) -> Any:
        """The ids a claim takes: due jobs in claim order, SKIP LOCKED, at most one per cursor, and a
        cursor's jobs in due order whatever their priorities (``behind`` below)."""
        job = p.job
        now = sa.bindparam("now", type_=sa.DateTime)
        ranks = [] if p.priority is None else [p.priority]

        def walk(
            order: Sequence[Any],
            limit: Any,
            name: str,
            only_if: Any = None,
            keep: Callable[[Any], Any] | None = None,
        ) -> Any:
            # One ordered walk of an index per queue (PostgreSQL before 17 cannot walk a btree in order for
            # ``queue = ANY(...)`` and would sort the whole backlog): a claim's cost does not grow with the
            # backlog.
            walked = (
                sa.select(job.c.id, job.c.cursor_key, *ranks, *p.due_order)
                .where(job.c.state == p.pending)
                .where(job.c.queue == wanted.c.name)
                .where(job.c.scheduled_time <= now)
                .where(~p.cursor_busy)
                .where(sa.true() if only_if is None else only_if)
                .where(sa.true() if keep is None else keep(job))
                .order_by(*order)
                .limit(limit)
                .with_for_update(skip_locked=True, of=job)
                .lateral(name)
            )
            return sa.select(*walked.c).select_from(wanted.join(walked, sa.true()))

        # ``limit`` jobs of each queue in claim order (ix_aiomq_job_pending_priority), less those behind an
        # earlier job of their cursor (below): what remains is exactly the first of the claimable jobs in
        # claim order, maybe fewer than ``limit``. With priorities, a cursor's later jobs may come first and
        # all be refused; only then (PostgreSQL skips the walk otherwise) a second walk refuses them as it
        # goes, so the claim still takes the best claimable jobs and makes progress. That walk reads past
        # every refused job: give a cursor's jobs one priority to keep it short. (The first CTE is named
        # ``locked``: the SQL starts "WITH locked AS", which fault-injection hooks look for.)
        by_claim = walk(p.claim_order, sa.bindparam("limit", type_=sa.Integer), "by_claim").subquery()
        accepted = sa.select(*by_claim.c).where(ClaimStatements._first_of_cursor(p, by_claim)).cte("locked")
        candidates: Any = accepted
        if p.priority is not None:
            past = walk(
                p.claim_order,
                sa.bindparam("limit", type_=sa.Integer),
                "past_refused",
                ~sa.exists(sa.select(accepted.c.id)),
                lambda t: ClaimStatements._first_of_cursor(p, t),
            ).subquery()
            union: Any = sa.union_all  # (typed as Any: mypy 2.4 crashes on its variadic signature)
            candidates = union(sa.select(*accepted.c), sa.select(*past.c)).subquery("candidates")
        order: list[Any] = [candidates.c.scheduled_time, candidates.c.created_time, candidates.c.id]
        if p.priority is not None:
            order.insert(0, candidates.c.priority.desc())
        return (
            sa.select(candidates.c.id)
            .order_by(*order)
            .limit(sa.bindparam("limit", type_=sa.Integer))
            .cte("picked")
        )

    @staticmethod
    def _first_of_cursor(p: Parts, candidates: Any) -> Any:
        """A candidate without a cursor, or with no earlier due job of its cursor pending in these queues.

        Such an earlier job is among the candidates (then it is the one taken), or another worker's claim
        has it locked. Taking this one would run the cursor out of order, and a psycopg2_mq worker (whose
        claim reads the cursor, then writes the job in a second statement) could then start the earlier
        job from a cursor this one is about to change. One probe of ix_aiomq_job_pending_cursor_due."""
        earlier = p.job.alias("earlier")
        behind = (
            sa.exists()
            .where(earlier.c.cursor_key == candidates.c.cursor_key)
            .where(earlier.c.state == p.pending)
            .where(earlier.c.queue == sa.any_(p.queues))
            .where(earlier.c.scheduled_time <= sa.bindparam("now", type_=sa.DateTime))
            .where(
                sa.tuple_(earlier.c.scheduled_time, earlier.c.created_time, earlier.c.id)
                < sa.tuple_(candidates.c.scheduled_time, candidates.c.created_time, candidates.c.id)
            )
        )
        return sa.or_(candidates.c.cursor_key.is_(None), ~behind)
