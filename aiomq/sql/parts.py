"""Pieces the statements of several concerns share: the tables, literals, and common subqueries.

State values appear as literals, never as bind parameters: asyncpg prepares statements, and once
PostgreSQL switches a prepared statement to a generic plan, ``state = $1`` no longer matches a partial
index whose predicate is ``state = 'pending'`` (an ``ON CONFLICT`` arbiter then fails outright).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from .. import channels
from ..model import Model

__all__ = ["Parts", "json_param", "lit"]

_pg_locks = sa.table(
    "pg_locks",
    sa.column("locktype", sa.Text),
    sa.column("database", sa.Integer),
    sa.column("classid", sa.Integer),
    sa.column("objid", sa.Integer),
    sa.column("objsubid", sa.Integer),
    sa.column("pid", sa.Integer),
    sa.column("granted", sa.Boolean),
)
_pg_database = sa.table("pg_database", sa.column("oid", sa.Integer), sa.column("datname", sa.Text))


def lit(value: str) -> sa.ColumnElement[Any]:
    """A string literal in the SQL text (not a parameter)."""
    return sa.literal_column("'" + value.replace("'", "''") + "'")


def json_param(name: str) -> sa.ColumnElement[Any]:
    """A parameter taking JSON text already encoded (and checked) by :func:`aiomq.serialize.dump_json`."""
    return sa.cast(sa.bindparam(name, type_=sa.Text), pg.JSONB)


class Parts:
    """One model's tables and the expressions several statement groups are built from."""

    def __init__(self, model: Model) -> None:
        st = model.JobStates
        self.model = model
        self.job: sa.Table = model.Job.__table__
        self.cursor: sa.Table = model.JobCursor.__table__
        self.lock: sa.Table = model.Lock.__table__
        self.listener: sa.Table = model.JobListener.__table__
        self.pending = lit(st.PENDING)
        self.running = lit(st.RUNNING)
        self.lost = lit(st.LOST)
        self.queues = sa.bindparam("queues", type_=pg.ARRAY(sa.Text))
        job = self.job
        self.due_order = (job.c.scheduled_time, job.c.created_time, job.c.id)
        #: The job table's priority column (DESIGN §7.6); None on a custom model without one.
        self.priority: sa.ColumnElement[Any] | None = job.c.priority if "priority" in job.c else None
        #: The order a queue's due jobs are claimed in: highest priority first, then due order.
        self.claim_order = (
            self.due_order if self.priority is None else (self.priority.desc(), *self.due_order)
        )
        active = job.alias("active")
        #: Another job of this job's cursor holds the cursor (running or lost).
        self.cursor_busy = (
            sa.exists()
            .where(active.c.cursor_key == job.c.cursor_key)
            .where(active.c.cursor_key.isnot(None))
            .where(active.c.state.in_([self.running, self.lost]))
        )
        #: What a state change returns: enough for the job_finished event, and whether anyone listens
        #: to it (so the common case of no listeners costs no extra round trip).
        self.finished_columns = (
            job.c.id,
            job.c.queue,
            job.c.method,
            job.c.start_time,
            job.c.end_time,
            self.listened(job.c.state).label("has_listeners"),
        )

    def listened(self, state: sa.ColumnElement[Any]) -> sa.Exists:
        """Whether an enabled listener waits for this job's mq.job_finished.<state>... event."""
        job, listener = self.job, self.listener
        name = sa.literal("mq.job_finished.", sa.Text) + sa.cast(state, sa.Text) + "." + job.c.queue
        return (
            sa.exists()
            .where(listener.c.event == name + "." + job.c.method)
            .where(listener.c.is_enabled == sa.true())
        )

    def successor_hints(self, on_keys: sa.ColumnElement[bool]) -> sa.Select[Any]:
        """One ``{"j", "t"}`` hint per queue with a pending job whose cursor is ``on_keys``, on that
        queue's channel: it wakes whoever serves the next job of a freed cursor."""
        job = self.job
        successor = (
            sa.select(
                job.c.queue,
                sa.func.min(job.c.id).label("id"),
                sa.func.min(job.c.scheduled_time).label("scheduled_time"),
            )
            .where(job.c.state == self.pending)
            .where(on_keys)
            .group_by(job.c.queue)
            .subquery("successor")
        )
        epoch = sa.cast(sa.func.floor(sa.extract("epoch", successor.c.scheduled_time)), sa.BigInteger)
        return sa.select(
            sa.func.pg_notify(
                channels.queue_channel_sql(self.model.channel_prefix, successor.c.queue),
                sa.cast(sa.func.json_build_object("j", successor.c.id, "t", epoch), sa.Text),
            ).label("hint")
        )

    def lock_holders(self) -> sa.Select[Any]:
        """The sessions holding the two-key advisory lock (lock_key, lock_id): process id and database."""
        return (
            sa.select(_pg_locks.c.pid, _pg_database.c.datname.label("database"))
            .select_from(_pg_locks.outerjoin(_pg_database, _pg_database.c.oid == _pg_locks.c.database))
            .where(_pg_locks.c.locktype == "advisory")
            .where(_pg_locks.c.classid == sa.bindparam("lock_key", type_=sa.Integer))
            .where(_pg_locks.c.objid == sa.bindparam("lock_id", type_=sa.Integer))
            .where(_pg_locks.c.objsubid == 2)
            .where(_pg_locks.c.granted)
        )

    def lock_gone(self, lock_id_col: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
        """No session holds the two-key advisory lock (lock_key, lock_id) in this database."""
        this_db = (
            sa.select(_pg_database.c.oid)
            .where(_pg_database.c.datname == sa.func.current_database())
            .scalar_subquery()
        )
        return ~(
            sa.exists()
            .where(_pg_locks.c.locktype == "advisory")
            .where(_pg_locks.c.database == this_db)
            .where(_pg_locks.c.classid == sa.bindparam("lock_key", type_=sa.Integer))
            .where(_pg_locks.c.objid == lock_id_col)
            .where(_pg_locks.c.objsubid == 2)
        )
