"""Every statement the worker and the source run, built once per model from its table objects.

State values appear as literals, never as bind parameters: asyncpg prepares statements, and once
PostgreSQL switches a prepared statement to a generic plan, ``state = $1`` no longer matches a partial
index whose predicate is ``state = 'pending'`` (an ``ON CONFLICT`` arbiter then fails outright).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects.postgresql import insert as pg_insert

from .model import Model

__all__ = ["FINISHED_CHANNEL", "Statements", "statements"]

#: wait_for_job's channel: the dot keeps it apart from every queue channel (queue names are identifiers).
FINISHED_CHANNEL = "mq.job_finished"

_pg_locks = sa.table(
    "pg_locks",
    sa.column("locktype", sa.Text),
    sa.column("database", sa.Integer),
    sa.column("classid", sa.Integer),
    sa.column("objid", sa.Integer),
    sa.column("objsubid", sa.Integer),
)
_pg_database = sa.table("pg_database", sa.column("oid", sa.Integer), sa.column("datname", sa.Text))


def _lit(value: str) -> sa.ColumnElement[Any]:
    return sa.literal_column("'" + value.replace("'", "''") + "'")


def _json(name: str) -> sa.ColumnElement[Any]:
    """A parameter taking JSON text already encoded (and checked) by :func:`aiomq.serialize.dump_json`."""
    return sa.cast(sa.bindparam(name, type_=sa.Text), pg.JSONB)


class Statements:
    """The compiled-once statements of one model. Parameters are named in each docstring."""

    def __init__(self, model: Model) -> None:
        st = model.JobStates
        job = model.Job.__table__
        cursor = model.JobCursor.__table__
        lock = model.Lock.__table__
        self.job = job
        self.pending = _lit(st.PENDING)
        running, lost = _lit(st.RUNNING), _lit(st.LOST)
        queues = sa.bindparam("queues", type_=pg.ARRAY(sa.Text))

        active = job.alias("active")
        cursor_busy = (
            sa.exists()
            .where(active.c.cursor_key == job.c.cursor_key)
            .where(active.c.cursor_key.isnot(None))
            .where(active.c.state.in_([running, lost]))
        )
        due_order = (job.c.scheduled_time, job.c.created_time, job.c.id)

        # What a state change returns: enough for the job_finished event, and whether anyone listens to it
        # (so the common case of no listeners costs no extra round trip).
        listener = model.JobListener.__table__

        def listened(state: sa.ColumnElement[Any]) -> sa.Exists:
            """Whether an enabled listener waits for this job's mq.job_finished.<state>... event."""
            name = sa.literal("mq.job_finished.", sa.Text) + sa.cast(state, sa.Text) + "." + job.c.queue
            return (
                sa.exists()
                .where(listener.c.event == name + "." + job.c.method)
                .where(listener.c.is_enabled == sa.true())
            )

        def successor_hints(on_keys: sa.ColumnElement[bool]) -> Any:
            """One ``{"j", "t"}`` hint per queue with a pending job whose cursor is ``on_keys``, on that
            queue's channel: it wakes whoever serves the next job of a freed cursor."""
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
                    sa.literal(model.channel_prefix, sa.Text) + successor.c.queue,
                    sa.cast(sa.func.json_build_object("j", successor.c.id, "t", epoch), sa.Text),
                ).label("hint")
            )

        has_listeners = listened(job.c.state).label("has_listeners")
        finished_columns = (
            job.c.id,
            job.c.queue,
            job.c.method,
            job.c.start_time,
            job.c.end_time,
            has_listeners,
        )

        #: Enqueue (params: the job's columns, ``args``/``trace`` as JSON text). The arbiter is the collapse
        #: index, so only a collapsible insert can conflict; then no row comes back and the caller joins.
        self.enqueue = self._insert_job({})

        self._enqueue_notify: dict[frozenset[str], sa.Executable] = {}

        #: Enqueue many non-collapsible jobs in one statement (arrays ``created``, ``scheduled``, ``queues``,
        #: ``methods``, ``cursor_keys``, ``args`` and ``traces`` as JSON text), inserted in array order.
        batch = (
            sa.func.unnest(
                sa.bindparam("created", type_=pg.ARRAY(sa.DateTime)),
                sa.bindparam("scheduled", type_=pg.ARRAY(sa.DateTime)),
                sa.bindparam("queues", type_=pg.ARRAY(sa.Text)),
                sa.bindparam("methods", type_=pg.ARRAY(sa.Text)),
                sa.bindparam("cursor_keys", type_=pg.ARRAY(sa.Text)),
                sa.bindparam("args", type_=pg.ARRAY(sa.Text)),
                sa.bindparam("traces", type_=pg.ARRAY(sa.Text)),
            )
            .table_valued(
                "created", "scheduled", "queue", "method", "cursor_key", "args", "trace", with_ordinality="n"
            )
            .render_derived(name="batch", with_types=False)
        )
        self.enqueue_many = (
            pg_insert(job)
            .from_select(
                [
                    "state",
                    "created_time",
                    "scheduled_time",
                    "queue",
                    "method",
                    "cursor_key",
                    "collapsible",
                    "args",
                    "trace",
                ],
                sa.select(
                    self.pending,
                    batch.c.created,
                    batch.c.scheduled,
                    batch.c.queue,
                    batch.c.method,
                    batch.c.cursor_key,
                    sa.false(),
                    sa.cast(batch.c.args, pg.JSONB),
                    sa.cast(batch.c.trace, pg.JSONB),
                ).order_by(batch.c.n),
            )
            .returning(job.c.id, job.c.scheduled_time)
        )

        #: Claim up to ``limit`` due jobs of ``queues`` at ``now`` for worker ``name`` holding ``lock_id``.
        #: SKIP LOCKED lets workers claim side by side; the first CTE locks candidates in due order, and the
        #: window (not allowed beside FOR UPDATE, hence the second step) keeps one job per cursor. A claim
        #: race on one cursor between two workers surfaces as a unique violation on
        #: uq_mq_job_active_cursor_key, which the worker retries at once (the cursor is then busy).
        # One ordered walk of ix_aiomq_job_pending_due per queue (PostgreSQL before 17 cannot walk a btree
        # in order for ``queue = ANY(...)`` and would sort the whole backlog), merged, then the first
        # ``limit``: a claim's cost does not grow with the backlog.
        wanted = sa.func.unnest(queues).table_valued("name").render_derived(name="wanted")
        per_queue = (
            sa.select(job.c.id, job.c.cursor_key, *due_order)
            .where(job.c.state == self.pending)
            .where(job.c.queue == wanted.c.name)
            .where(job.c.scheduled_time <= sa.bindparam("now", type_=sa.DateTime))
            .where(~cursor_busy)
            .order_by(*due_order)
            .limit(sa.bindparam("limit", type_=sa.Integer))
            .with_for_update(skip_locked=True, of=job)
            .lateral("candidates")
        )
        locked = (
            sa.select(
                per_queue.c.id, per_queue.c.cursor_key, per_queue.c.scheduled_time, per_queue.c.created_time
            )
            .select_from(wanted.join(per_queue, sa.true()))
            .order_by(per_queue.c.scheduled_time, per_queue.c.created_time, per_queue.c.id)
            .limit(sa.bindparam("limit", type_=sa.Integer))
            .cte("locked")
        )
        ranked = sa.select(
            locked.c.id,
            locked.c.cursor_key,
            locked.c.scheduled_time,
            locked.c.created_time,
            sa.func.row_number()
            .over(
                partition_by=locked.c.cursor_key,
                order_by=(locked.c.scheduled_time, locked.c.created_time, locked.c.id),
            )
            .label("rank"),
        ).subquery("ranked")
        # An earlier due job of the same cursor in these queues that the walk did not lock was skipped:
        # another worker is claiming it. Taking this one would run the cursor out of order, and a
        # psycopg2_mq worker (whose claim reads the cursor, then writes the job in a second statement)
        # could then start that earlier job from a cursor this one is about to change.
        earlier = job.alias("earlier")
        skipped_ahead = (
            sa.exists()
            .where(earlier.c.cursor_key == ranked.c.cursor_key)
            .where(earlier.c.state == self.pending)
            .where(earlier.c.queue == sa.any_(queues))
            .where(earlier.c.scheduled_time <= sa.bindparam("now", type_=sa.DateTime))
            .where(
                sa.tuple_(earlier.c.scheduled_time, earlier.c.created_time, earlier.c.id)
                < sa.tuple_(ranked.c.scheduled_time, ranked.c.created_time, ranked.c.id)
            )
        )
        picked = (
            sa.select(ranked.c.id)
            .where(sa.or_(ranked.c.cursor_key.is_(None), sa.and_(ranked.c.rank == 1, ~skipped_ahead)))
            .cte("picked")
        )
        snapshot = sa.select(cursor.c.properties).where(cursor.c.key == job.c.cursor_key).scalar_subquery()
        claimed = (
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
        self.claim = (
            job.update()
            .where(job.c.id == picked.c.id)
            .values(
                state=running,
                lock_id=sa.bindparam("lock_id", type_=sa.Integer),
                worker=sa.bindparam("name", type_=sa.Text),
                start_time=sa.bindparam("now", type_=sa.DateTime),
                cursor_snapshot=snapshot,
            )
            .returning(*claimed)
        )

        #: The earliest time a job of ``queues`` becomes claimable (cursor not busy), or NULL.
        first_due = (
            sa.select(job.c.scheduled_time)
            .where(job.c.state == self.pending)
            .where(job.c.queue == wanted.c.name)
            .where(~cursor_busy)
            .order_by(*due_order)
            .limit(1)
            .lateral("first_due")
        )
        self.next_due = sa.select(sa.func.min(first_due.c.scheduled_time)).select_from(
            wanted.join(first_due, sa.true())
        )

        #: Record a handler's outcome (``id``, ``state``, ``result_json`` or NULL, ``now``), only while
        #: the job is running or lost: a late finish after fail_lost_job or cancel_job changes nothing.
        self.finish = (
            job.update()
            .where(job.c.id == sa.bindparam("job_id", type_=sa.BigInteger))
            .where(job.c.state.in_([running, lost]))
            .values(
                state=sa.bindparam("state", type_=job.c.state.type),
                result=_json("result_json"),
                end_time=sa.bindparam("now", type_=sa.DateTime),
                lock_id=None,
            )
            .returning(*finished_columns)
        )

        # Finishes look their jobs up by primary key (``id = ANY(:ids)``), and test the state as text so
        # the planner cannot walk ix_mq_job_state for running jobs instead: until vacuum, that index holds
        # a dead entry for every job that ever ran, and a load test on a fresh table ran at a fifth of its
        # speed for a minute.
        by_key_still_active = sa.cast(job.c.state, sa.Text).in_([_lit(st.RUNNING), _lit(st.LOST)])

        def record_outcomes(*extra: str) -> tuple[Any, Any]:
            """The arrays ``ids``, ``states``, ``results`` (JSON text or NULL) and ``extra`` as a table
            ``done``, and the UPDATE recording them (with ``now``) on the jobs still running or lost."""
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
                .where(by_key_still_active)
                .values(
                    state=sa.cast(done.c.state, job.c.state.type),
                    result=sa.cast(done.c.result, pg.JSONB),
                    end_time=sa.bindparam("now", type_=sa.DateTime),
                    lock_id=None,
                )
            )
            return done, update

        #: Record many outcomes at once (arrays ``ids``, ``states``, ``results`` as JSON text or NULL, and
        #: ``now``), each only while its job is running or lost, and send each one's mq.job_finished hint.
        _, recording = record_outcomes()
        recorded = recording.returning(*finished_columns, job.c.cursor_key, job.c.state).cte("recorded")
        #: The same for jobs whose event nobody listens to, with their cursors (array ``cursors``: the
        #: cursor's JSON text to save, or NULL), in one statement, so it runs in autocommit in one round
        #: trip: record the outcomes, save the cursors, send each job's mq.job_finished hint and one hint
        #: per queue with a pending job on a freed cursor. Jobs it leaves out (someone listens, or no
        #: longer running or lost) go through ``finish_many`` in a transaction.
        quiet_done, quiet_recording = record_outcomes("cursors")
        quiet = (
            quiet_recording.where(~listened(quiet_done.c.state))
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
        hinted = successor_hints(job.c.cursor_key == sa.any_(freed_keys)).cte("hinted")
        self.finish_quiet = sa.select(
            quiet.c.id,
            sa.func.pg_notify(
                sa.literal(FINISHED_CHANNEL, sa.Text),
                sa.cast(
                    sa.func.json_build_object("j", quiet.c.id, "s", sa.cast(quiet.c.state, sa.Text)),
                    sa.Text,
                ),
            ).label("notified"),
            # A SELECT CTE runs only where it is read: read the successor hints once (an InitPlan).
            sa.select(sa.func.count()).select_from(hinted).scalar_subquery().label("hints"),
        ).add_cte(saved_cte)
        self.finish_many = sa.select(
            recorded,
            sa.func.pg_notify(
                sa.literal(FINISHED_CHANNEL, sa.Text),
                sa.cast(
                    sa.func.json_build_object("j", recorded.c.id, "s", sa.cast(recorded.c.state, sa.Text)),
                    sa.Text,
                ),
            ).label("notified"),
        )

        #: Save many cursors (arrays ``keys``, ``properties``, ``job_ids``), as ``save_cursor`` does one.
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
        self.save_cursors = many.on_conflict_do_update(
            index_elements=[cursor.c.key],
            set_={"properties": many.excluded.properties, "updated_job_id": many.excluded.updated_job_id},
            where=cursor.c.properties.is_distinct_from(many.excluded.properties),
        )

        #: Save a cursor (``key``, ``properties_json``, ``job_id``): created even when ``{}``, updated (with
        #: ``updated_job_id``) only when the properties changed.
        ins = pg_insert(cursor).values(
            key=sa.bindparam("key", type_=sa.Text),
            properties=_json("properties_json"),
            updated_job_id=sa.bindparam("job_id", type_=sa.BigInteger),
        )
        self.save_cursor = ins.on_conflict_do_update(
            index_elements=[cursor.c.key],
            set_={
                "properties": ins.excluded.properties,
                "updated_job_id": ins.excluded.updated_job_id,
            },
            where=cursor.c.properties.is_distinct_from(ins.excluded.properties),
        )

        #: Put a job whose handler was cancelled by stop(timeout) back to pending (``job_id``). If a newer
        #: collapsible job took its collapse slot meanwhile, it returns as non-collapsible.
        twin = job.alias("twin")
        slot_taken = (
            sa.exists()
            .where(twin.c.state == self.pending)
            .where(twin.c.collapsible == sa.true())
            .where(twin.c.cursor_key == job.c.cursor_key)
            .where(twin.c.queue == job.c.queue)
            .where(twin.c.method == job.c.method)
        )
        self.requeue = (
            job.update()
            .where(job.c.id == sa.bindparam("job_id", type_=sa.BigInteger))
            .where(job.c.state.in_([running, lost]))
            .values(
                state=self.pending,
                lock_id=None,
                start_time=None,
                end_time=None,
                worker=None,
                cursor_snapshot=sa.null(),  # SQL NULL, as for a job never claimed (None would be JSON null)
                collapsible=sa.case((slot_taken, sa.false()), else_=job.c.collapsible),
            )
            .returning(job.c.id)
        )

        #: Mark one job lost now (``job_id``, ``now``): its handler could not be interrupted.
        self.mark_one_lost = (
            job.update()
            .where(job.c.id == sa.bindparam("job_id", type_=sa.BigInteger))
            .where(job.c.state == running)
            .values(state=lost, lock_id=None, end_time=sa.bindparam("now", type_=sa.DateTime))
            .returning(*finished_columns)
        )

        def lock_gone(lock_id_col: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
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

        #: Mark lost every running job of ``queues`` whose worker's advisory lock is gone
        #: (``lock_key``, ``now``).
        orphans = (
            sa.select(job.c.id)
            .where(job.c.state == running)
            .where(job.c.queue == sa.any_(queues))
            .where(lock_gone(job.c.lock_id))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        self.mark_lost = (
            job.update()
            .where(job.c.id.in_(orphans))
            .where(job.c.state == running)
            .values(state=lost, lock_id=None, end_time=sa.bindparam("now", type_=sa.DateTime))
            .returning(
                job.c.id,
                job.c.queue,
                job.c.method,
                job.c.cursor_key,
                job.c.worker,
                *finished_columns[3:],
            )
        )

        #: Delete ``mq_lock`` rows whose owner's advisory lock is gone (``lock_key``), whatever the queue.
        self.release_stale_locks = (
            lock.delete()
            .where(lock_gone(lock.c.lock_id))
            .returning(lock.c.ns, lock.c.key, lock.c.lock_id, lock.c.worker)
        )

        #: Delete this worker's ``mq_lock`` rows (``lock_id``) at shutdown.
        self.release_my_locks = lock.delete().where(
            lock.c.lock_id == sa.bindparam("lock_id", type_=sa.Integer)
        )

        #: After a listener reconnect: the jobs this worker still runs (``ids``) move to the new ``lock_id``;
        #: one that another worker marked lost meanwhile is running again.
        self.restamp = (
            job.update()
            .where(job.c.id == sa.any_(sa.bindparam("ids", type_=pg.ARRAY(sa.BigInteger))))
            .where(job.c.state.in_([running, lost]))
            .values(
                state=running,
                lock_id=sa.bindparam("lock_id", type_=sa.Integer),
                worker=sa.bindparam("name", type_=sa.Text),
                end_time=None,
            )
            .returning(job.c.id)
        )
        #: Take back the jobs of claims whose reply never arrived (the connection died after the commit):
        #: ``running`` (or ``lost``, if the lock changed meanwhile) for worker ``name`` with a ``start_time``
        #: among ``stamps`` (each failed claim stamped its own ``now``), not among ``known`` (the jobs the
        #: worker runs). Their handlers never ran. Re-stamped under ``lock_id``; returns what ``claim`` does.
        self.adopt = (
            job.update()
            .where(job.c.state.in_([running, lost]))
            .where(job.c.worker == sa.bindparam("name", type_=sa.Text))
            .where(job.c.start_time == sa.any_(sa.bindparam("stamps", type_=pg.ARRAY(sa.DateTime))))
            .where(job.c.queue == sa.any_(queues))
            .where(job.c.id != sa.all_(sa.bindparam("known", type_=pg.ARRAY(sa.BigInteger))))
            .values(
                state=running,
                lock_id=sa.bindparam("lock_id", type_=sa.Integer),
                end_time=None,
            )
            .returning(*claimed)
        )
        self.move_locks = (
            lock.update()
            .where(lock.c.lock_id == sa.bindparam("old_lock_id", type_=sa.Integer))
            .values(lock_id=sa.bindparam("lock_id", type_=sa.Integer))
        )

        #: Send a NOTIFY (``channel``, ``payload``) inside the current transaction.
        self.notify = sa.select(
            sa.func.pg_notify(sa.bindparam("channel", type_=sa.Text), sa.bindparam("payload", type_=sa.Text))
        )

        #: Wake whoever serves the next job on cursors ``keys``: one ``{"j", "t"}`` hint per queue that has a
        #: pending job on one of them, on that queue's own channel.
        self.notify_successors = successor_hints(
            job.c.cursor_key == sa.any_(sa.bindparam("keys", type_=pg.ARRAY(sa.Text)))
        )

        #: The table names that must exist (checked at worker start).
        self.tables = [t.name for t in (job, cursor, lock)]

    def _insert_job(self, columns: dict[str, Any]) -> Any:
        """INSERT a pending job (``columns`` as given, or from the execution's parameters), RETURNING
        ``id, scheduled_time``; nothing when it would collapse into a pending collapsible job."""
        job = self.job
        return (
            pg_insert(job)
            .values(state=self.pending, args=_json("args_json"), trace=_json("trace_json"), **columns)
            .on_conflict_do_nothing(
                index_elements=[job.c.cursor_key, job.c.queue, job.c.method],
                index_where=sa.and_(job.c.state == self.pending, job.c.collapsible == sa.true()),
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
        key = frozenset(columns) - {"args_json", "trace_json"}
        statement = self._enqueue_notify.get(key)
        if statement is None:
            job = self.job
            columns = {name: sa.bindparam(name, type_=job.c[name].type) for name in sorted(key)}
            queued = self._insert_job(columns).cte("queued")
            payload = sa.func.concat(
                '{"j": ', queued.c.id, ', "t": ', sa.bindparam("t", type_=sa.BigInteger), "}"
            )
            statement = sa.select(
                queued.c.id,
                queued.c.scheduled_time,
                sa.func.pg_notify(sa.bindparam("channel", type_=sa.Text), payload).label("notified"),
            ).select_from(queued)
            self._enqueue_notify[key] = statement
        return statement


@functools.cache
def statements(model: Model) -> Statements:
    """The statements of ``model``, built on first use."""
    return Statements(model)
