"""Recording outcomes: finishing jobs (one, or many at once), saving cursors, and sending what a
state change sends (:mod:`aiomq.channels`) inside the same statement or transaction."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects.postgresql import insert as pg_insert

from .. import channels
from ..retry import ATTEMPT_KEY, RETRIED_BY_KEY
from .parts import Parts, json_param, lit

__all__ = ["OutcomeStatements"]

#: The trace key psycopg2_mq's retry_job writes: the job a retry comes from.
SOURCE_KEY = "mq_source_job_id"


class OutcomeStatements:
    """Finish jobs, save cursors, put jobs back or mark them lost when their handler was cancelled."""

    def __init__(self, p: Parts) -> None:
        job = p.job
        st = p.model.JobStates
        #: Record a handler's outcome (``job_id``, ``state``, ``result_json`` or NULL, ``now``), only while
        #: the job is running or lost: a late finish after fail_lost_job or cancel_job changes nothing.
        self.finish = (
            job.update()
            .where(job.c.id == sa.bindparam("job_id", type_=sa.BigInteger))
            .where(job.c.state.in_([p.running, p.lost]))
            .values(
                state=sa.bindparam("state", type_=job.c.state.type),
                result=json_param("result_json"),
                end_time=sa.bindparam("now", type_=sa.DateTime),
                lock_id=None,
            )
            .returning(*p.finished_columns)
        )
        # Finishes look their jobs up by primary key (``id = ANY(:ids)``), and test the state as text so
        # the planner cannot walk ix_mq_job_state for running jobs instead: until vacuum, that index holds
        # a dead entry for every job that ever ran, and a load test on a fresh table ran at a fifth of its
        # speed for a minute.
        self._still_active = sa.cast(job.c.state, sa.Text).in_([lit(st.RUNNING), lit(st.LOST)])

        #: Record many outcomes at once (arrays ``ids``, ``states``, ``results`` as JSON text or NULL, and
        #: ``now``), each only while its job is running or lost, and send each one's mq.job_finished hint.
        _, recording = self._record_outcomes(p)
        recorded = recording.returning(*p.finished_columns, job.c.cursor_key, job.c.state).cte("recorded")
        self.finish_many = sa.select(
            recorded,
            sa.func.pg_notify(
                sa.literal(channels.FINISHED_CHANNEL, sa.Text),
                channels.finished_payload_sql(recorded.c.id, recorded.c.state),
            ).label("notified"),
        )
        self.finish_quiet = self._finish_quiet(p)
        self.save_cursors = self._save_cursors(p)

        #: Save a cursor (``key``, ``properties_json``, ``job_id``): created even when ``{}``, updated (with
        #: ``updated_job_id``) only when the properties changed.
        cursor = p.cursor
        ins = pg_insert(cursor).values(
            key=sa.bindparam("key", type_=sa.Text),
            properties=json_param("properties_json"),
            updated_job_id=sa.bindparam("job_id", type_=sa.BigInteger),
        )
        self.save_cursor = ins.on_conflict_do_update(
            index_elements=[cursor.c.key],
            set_={"properties": ins.excluded.properties, "updated_job_id": ins.excluded.updated_job_id},
            where=cursor.c.properties.is_distinct_from(ins.excluded.properties),
        )

        #: Wake whoever serves the next job on cursors ``keys``: one ``{"j", "t"}`` hint per queue that has a
        #: pending job on one of them, on that queue's own channel.
        self.notify_successors = p.successor_hints(
            job.c.cursor_key == sa.any_(sa.bindparam("keys", type_=pg.ARRAY(sa.Text)))
        )
        self.requeue = self._requeue(p)
        self.retry_many = self._retry_many(p)

        #: Mark one job lost now (``job_id``, ``now``): its handler could not be interrupted.
        self.mark_one_lost = (
            job.update()
            .where(job.c.id == sa.bindparam("job_id", type_=sa.BigInteger))
            .where(job.c.state == p.running)
            .values(state=p.lost, lock_id=None, end_time=sa.bindparam("now", type_=sa.DateTime))
            .returning(*p.finished_columns)
        )

    def _record_outcomes(self, p: Parts, *extra: str) -> tuple[Any, Any]:
        """The arrays ``ids``, ``states``, ``results`` (JSON text or NULL) and ``extra`` as a table
        ``done``, and the UPDATE recording them (with ``now``) on the jobs still running or lost."""
        job = p.job
        arrays = ["ids", "states", "results", *extra]
        done = (
            sa.func.unnest(
                *(
                    sa.bindparam(name, type_=pg.ARRAY(sa.BigInteger if name == "ids" else sa.Text))
                    for name in arrays
                )
            )
            .table_valued("id", "state", "result", *(name.removesuffix("s") for name in extra))
            .render_derived(name="done", with_types=False)
        )
        update = (
            job.update()
            .where(job.c.id == done.c.id)
            .where(job.c.id == sa.any_(sa.bindparam("ids", type_=pg.ARRAY(sa.BigInteger))))
            .where(self._still_active)
            .values(
                state=sa.cast(done.c.state, job.c.state.type),
                result=sa.cast(done.c.result, pg.JSONB),
                end_time=sa.bindparam("now", type_=sa.DateTime),
                lock_id=None,
            )
        )
        return done, update

    def _finish_quiet(self, p: Parts) -> Any:
        """``finish_many`` for jobs whose event nobody listens to, with their cursors (array ``cursors``:
        the cursor's JSON text to save, or NULL), in one statement, so it runs in autocommit in one round
        trip: record the outcomes, save the cursors, send each job's mq.job_finished hint and one hint per
        queue with a pending job on a freed cursor. Jobs it leaves out (someone listens, or no longer
        running or lost) go through ``finish_many`` in a transaction."""
        job, cursor = p.job, p.cursor
        quiet_done, quiet_recording = self._record_outcomes(p, "cursors")
        quiet = (
            quiet_recording.where(~p.listened(quiet_done.c.state))
            .returning(job.c.id, job.c.state, job.c.cursor_key, quiet_done.c.cursor)
            .cte("recorded")
        )
        saved = pg_insert(cursor).from_select(
            ["key", "properties", "updated_job_id"],
            sa.select(quiet.c.cursor_key, sa.cast(quiet.c.cursor, pg.JSONB), quiet.c.id)
            .where(quiet.c.cursor.isnot(None))
            .where(quiet.c.cursor_key.isnot(None)),
        )
        saved_cte = saved.on_conflict_do_update(
            index_elements=[cursor.c.key],
            set_={"properties": saved.excluded.properties, "updated_job_id": saved.excluded.updated_job_id},
            where=cursor.c.properties.is_distinct_from(saved.excluded.properties),
        ).cte("saved")
        freed_keys = sa.func.array(
            sa.select(quiet.c.cursor_key).where(quiet.c.cursor_key.isnot(None)).scalar_subquery()
        )
        hinted = p.successor_hints(job.c.cursor_key == sa.any_(freed_keys)).cte("hinted")
        return sa.select(
            quiet.c.id,
            sa.func.pg_notify(
                sa.literal(channels.FINISHED_CHANNEL, sa.Text),
                channels.finished_payload_sql(quiet.c.id, quiet.c.state),
            ).label("notified"),
            # A SELECT CTE runs only where it is read: read the successor hints once (an InitPlan).
            sa.select(sa.func.count()).select_from(hinted).scalar_subquery().label("hints"),
        ).add_cte(saved_cte)

    @staticmethod
    def _save_cursors(p: Parts) -> Any:
        """Save many cursors (arrays ``keys``, ``properties``, ``job_ids``), as ``save_cursor`` does one."""
        cursor = p.cursor
        rows = (
            sa.func.unnest(
                sa.bindparam("keys", type_=pg.ARRAY(sa.Text)),
                sa.bindparam("properties", type_=pg.ARRAY(sa.Text)),
                sa.bindparam("job_ids", type_=pg.ARRAY(sa.BigInteger)),
            )
            .table_valued("key", "properties", "job_id")
            .render_derived(name="saved", with_types=False)
        )
        many = pg_insert(cursor).from_select(
            ["key", "properties", "updated_job_id"],
            sa.select(rows.c.key, sa.cast(rows.c.properties, pg.JSONB), rows.c.job_id),
        )
        return many.on_conflict_do_update(
            index_elements=[cursor.c.key],
            set_={"properties": many.excluded.properties, "updated_job_id": many.excluded.updated_job_id},
            where=cursor.c.properties.is_distinct_from(many.excluded.properties),
        )

    @staticmethod
    def _retry_many(p: Parts) -> Any:
        """Schedule the next run of failed jobs (arrays ``ids``, ``scheduled``, ``attempts``; ``now``), as
        ``retry_job`` would: a new pending job of the same queue, method, args, cursor and priority, not
        collapsible, its trace copied with ``mq_source_job_id`` and ``aiomq_attempt``; the failed job's
        trace gets ``aiomq_retried_by``. Returns each new job's ``id`` and ``source_id`` and sends its
        ``{"j", "t"}`` NOTIFY. Run in the transaction that records the failures."""
        job = p.job
        wanted = (
            sa.func.unnest(
                sa.bindparam("ids", type_=pg.ARRAY(sa.BigInteger)),
                sa.bindparam("scheduled", type_=pg.ARRAY(sa.DateTime)),
                sa.bindparam("attempts", type_=pg.ARRAY(sa.Integer)),
            )
            .table_valued("id", "scheduled", "attempt")
            .render_derived(name="wanted", with_types=False)
        )
        failed = job.alias("failed")
        source_key = sa.literal(SOURCE_KEY, sa.Text)
        # The failed job's own aiomq_retried_by (copied from its original by retry_job) is not the retry's.
        trace = (
            _as_object(failed.c.trace)
            .op("-")(sa.literal(RETRIED_BY_KEY, sa.Text))
            .op("||")(
                sa.func.jsonb_build_object(
                    source_key, failed.c.id, sa.literal(ATTEMPT_KEY, sa.Text), wanted.c.attempt
                )
            )
        )
        # A retry keeps its job's priority (aiomq's column; absent from a custom model without it).
        kept = [] if p.priority is None else [failed.c.priority]
        inserted = (
            pg_insert(job)
            .from_select(
                [*_RETRY_COLUMNS, *(["priority"] if kept else [])],
                sa.select(
                    p.pending,
                    sa.bindparam("now", type_=sa.DateTime),
                    wanted.c.scheduled,
                    failed.c.queue,
                    failed.c.method,
                    failed.c.args,
                    failed.c.cursor_key,
                    sa.false(),
                    trace,
                    *kept,
                )
                .select_from(wanted.join(failed, failed.c.id == wanted.c.id))
                .order_by(wanted.c.id),
            )
            .returning(
                job.c.id,
                job.c.queue,
                job.c.scheduled_time,
                sa.cast(job.c.trace[SOURCE_KEY].astext, sa.BigInteger).label("source_id"),
            )
            .cte("retried")
        )
        marked = (
            job.update()
            .where(job.c.id == inserted.c.source_id)
            .values(
                trace=_as_object(job.c.trace).op("||")(
                    sa.func.jsonb_build_object(sa.literal(RETRIED_BY_KEY, sa.Text), inserted.c.id)
                )
            )
            .returning(job.c.id)
            .cte("marked")
        )
        epoch = sa.cast(sa.func.floor(sa.extract("epoch", inserted.c.scheduled_time)), sa.BigInteger)
        return sa.select(
            inserted.c.id,
            inserted.c.source_id,
            sa.func.pg_notify(
                channels.queue_channel_sql(p.model.channel_prefix, inserted.c.queue),
                channels.job_payload_sql(inserted.c.id, epoch),
            ).label("notified"),
            sa.select(sa.func.count()).select_from(marked).scalar_subquery().label("marked"),
        )

    @staticmethod
    def _requeue(p: Parts) -> Any:
        """Put a job whose handler was cancelled by stop(timeout) back to pending (``job_id``). If a newer
        collapsible job took its collapse slot meanwhile, it returns as non-collapsible."""
        job = p.job
        twin = job.alias("twin")
        slot_taken = (
            sa.exists()
            .where(twin.c.state == p.pending)
            .where(twin.c.collapsible == sa.true())
            .where(twin.c.cursor_key == job.c.cursor_key)
            .where(twin.c.queue == job.c.queue)
            .where(twin.c.method == job.c.method)
        )
        return (
            job.update()
            .where(job.c.id == sa.bindparam("job_id", type_=sa.BigInteger))
            .where(job.c.state.in_([p.running, p.lost]))
            .values(
                state=p.pending,
                lock_id=None,
                start_time=None,
                end_time=None,
                worker=None,
                cursor_snapshot=sa.null(),  # SQL NULL, as for a job never claimed (None would be JSON null)
                collapsible=sa.case((slot_taken, sa.false()), else_=job.c.collapsible),
            )
            .returning(job.c.id)
        )


#: The columns a retry's INSERT fills (the rest keep their defaults, as for ``retry_job``).
_RETRY_COLUMNS = [
    "state",
    "created_time",
    "scheduled_time",
    "queue",
    "method",
    "args",
    "cursor_key",
    "collapsible",
    "trace",
]


def _as_object(trace: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """A trace as a JSON object to add keys to: ``{}`` when it is anything else (``retry_job``'s rule)."""
    return sa.case(
        (sa.func.jsonb_typeof(trace) == "object", trace), else_=sa.cast(sa.literal("{}"), pg.JSONB)
    )
