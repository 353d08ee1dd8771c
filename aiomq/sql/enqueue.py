"""Enqueueing: insert a job (or find the pending job it collapses into), many at once, its NOTIFY, links."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects.postgresql import insert as pg_insert

from .. import channels
from .parts import Parts, json_param

__all__ = ["EnqueueStatements"]

#: The columns of a call whose value goes in as JSON text (``args_json``, ``trace_json``).
JSON_COLUMNS = frozenset({"args_json", "trace_json"})


class EnqueueStatements:
    def __init__(self, p: Parts) -> None:
        self._p = p
        #: Enqueue (params: the job's columns, ``args``/``trace`` as JSON text). The arbiter is the collapse
        #: index, so only a collapsible insert can conflict; then no row comes back and the caller joins.
        self.enqueue = self._insert_job({})
        self._enqueue_notify: dict[frozenset[str], sa.Executable] = {}
        self.enqueue_many = self._enqueue_many(p, prioritized=False)
        #: ``enqueue_many`` with an array ``priorities`` too (None on a model without the column).
        self.enqueue_many_prioritized = (
            None if p.priority is None else self._enqueue_many(p, prioritized=True)
        )

        #: The pending collapsible job of a collapse slot (``queue``, ``method``, ``cursor_key``), locked:
        #: the job a collapsing call joins. ORM rows, so a conflict resolver can change them.
        Job = p.model.Job
        self.join = (
            sa.select(Job)
            .where(Job.state == p.pending)
            .where(
                Job.queue == sa.bindparam("queue", type_=sa.Text),
                Job.method == sa.bindparam("method", type_=sa.Text),
                Job.cursor_key == sa.bindparam("cursor_key", type_=sa.Text),
            )
            .where(Job.collapsible == sa.true())
            .limit(1)
            .with_for_update()
            .execution_options(populate_existing=True)
        )

        #: Link rows of a job to the schedules and listeners it came from (executemany of ``job_id`` and
        #: ``schedule_id`` / ``listener_id``); None where the model has no link table.
        self.link_schedules = self._link(p.model.JobScheduleLink)
        self.link_listeners = self._link(p.model.JobListenerLink)

        #: Send a NOTIFY (``channel``, ``payload``) inside the current transaction.
        self.notify = sa.select(
            sa.func.pg_notify(sa.bindparam("channel", type_=sa.Text), sa.bindparam("payload", type_=sa.Text))
        )

    @staticmethod
    def _link(link: type[Any] | None) -> sa.Executable | None:
        return None if link is None else pg_insert(link.__table__).on_conflict_do_nothing()

    def _insert_job(self, columns: dict[str, Any]) -> Any:
        """INSERT a pending job (``columns`` as given, or from the execution's parameters), RETURNING
        ``id, scheduled_time``; nothing when it would collapse into a pending collapsible job."""
        p = self._p
        job = p.job
        return (
            pg_insert(job)
            .values(state=p.pending, args=json_param("args_json"), trace=json_param("trace_json"), **columns)
            .on_conflict_do_nothing(
                index_elements=[job.c.cursor_key, job.c.queue, job.c.method],
                index_where=sa.and_(job.c.state == p.pending, job.c.collapsible == sa.true()),
            )
            .returning(job.c.id, job.c.scheduled_time)
        )

    def enqueue_notify(self, columns: Iterable[str]) -> sa.Executable:
        """``enqueue`` and the queue's NOTIFY in one statement (one round trip fewer per call).

        Params: the job's ``columns`` (as for ``enqueue``), ``args_json``, ``trace_json``, ``channel`` and
        ``t`` (the epoch seconds of ``scheduled_time``). Returns ``id, scheduled_time`` of the new job and
        sends ``{"j": id, "t": t}``, byte for byte as ``json.dumps`` writes it; no row and no NOTIFY when
        the job would collapse (the caller then joins the pending job).
        """
        key = frozenset(columns) - JSON_COLUMNS
        statement = self._enqueue_notify.get(key)
        if statement is None:
            job = self._p.job
            values = {name: sa.bindparam(name, type_=job.c[name].type) for name in sorted(key)}
            queued = self._insert_job(values).cte("queued")
            payload = channels.job_payload_sql(queued.c.id, sa.bindparam("t", type_=sa.BigInteger))
            statement = sa.select(
                queued.c.id,
                queued.c.scheduled_time,
                sa.func.pg_notify(sa.bindparam("channel", type_=sa.Text), payload).label("notified"),
            ).select_from(queued)
            self._enqueue_notify[key] = statement
        return statement

    @staticmethod
    def _enqueue_many(p: Parts, *, prioritized: bool) -> Any:
        """Enqueue many non-collapsible jobs in one statement (arrays ``created``, ``scheduled``, ``queues``,
        ``methods``, ``cursor_keys``, ``args`` and ``traces`` as JSON text, and ``priorities`` if
        ``prioritized``), inserted in array order."""
        arrays = [
            sa.bindparam("created", type_=pg.ARRAY(sa.DateTime)),
            sa.bindparam("scheduled", type_=pg.ARRAY(sa.DateTime)),
            sa.bindparam("queues", type_=pg.ARRAY(sa.Text)),
            sa.bindparam("methods", type_=pg.ARRAY(sa.Text)),
            sa.bindparam("cursor_keys", type_=pg.ARRAY(sa.Text)),
            sa.bindparam("args", type_=pg.ARRAY(sa.Text)),
            sa.bindparam("traces", type_=pg.ARRAY(sa.Text)),
        ]
        names = ["created", "scheduled", "queue", "method", "cursor_key", "args", "trace"]
        if prioritized:
            arrays.append(sa.bindparam("priorities", type_=pg.ARRAY(sa.SmallInteger)))
            names.append("priority")
        batch = (
            sa.func.unnest(*arrays)
            .table_valued(*names, with_ordinality="n")
            .render_derived(name="batch", with_types=False)
        )
        columns = ["state", "created_time", "scheduled_time", "queue", "method", "cursor_key"]
        values = [
            p.pending,
            batch.c.created,
            batch.c.scheduled,
            batch.c.queue,
            batch.c.method,
            batch.c.cursor_key,
            sa.false(),
            sa.cast(batch.c.args, pg.JSONB),
            sa.cast(batch.c.trace, pg.JSONB),
        ]
        inserted = [*columns, "collapsible", "args", "trace"]
        if prioritized:
            inserted.append("priority")
            values.append(batch.c.priority)
        return (
            pg_insert(p.job)
            .from_select(inserted, sa.select(*values).order_by(batch.c.n))
            .returning(p.job.c.id, p.job.c.scheduled_time)
        )
