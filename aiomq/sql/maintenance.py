"""Maintenance: lost jobs, stale and released ``mq_lock`` rows, re-stamping after a reconnect."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from ..retry import RETRY_KEY
from .aborts import AbortStatements
from .parts import Parts, json_param

__all__ = ["MaintenanceStatements"]


class MaintenanceStatements:
    def __init__(self, p: Parts, aborts: AbortStatements | None) -> None:
        job, lock = p.job, p.lock
        #: Mark lost every running job of ``queues`` whose worker's advisory lock is gone
        #: (``lock_key``, ``now``).
        orphans = (
            sa.select(job.c.id)
            .where(job.c.state == p.running)
            .where(job.c.queue == sa.any_(p.queues))
            .where(p.lock_gone(job.c.lock_id))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        self.mark_lost = (
            job.update()
            .where(job.c.id.in_(orphans))
            .where(job.c.state == p.running)
            .values(state=p.lost, lock_id=None, end_time=sa.bindparam("now", type_=sa.DateTime))
            .returning(
                job.c.id,
                job.c.queue,
                job.c.method,
                job.c.cursor_key,
                job.c.worker,
                *p.finished_columns[3:],
            )
        )

        #: Delete ``mq_lock`` rows whose owner's advisory lock is gone (``lock_key``), whatever the queue.
        self.release_stale_locks = (
            lock.delete()
            .where(p.lock_gone(lock.c.lock_id))
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
            .where(job.c.state.in_([p.running, p.lost]))
            .values(
                state=p.running,
                lock_id=sa.bindparam("lock_id", type_=sa.Integer),
                worker=sa.bindparam("name", type_=sa.Text),
                end_time=None,
            )
            .returning(job.c.id)
        )
        #: ... and its ``mq_lock`` rows (scheduler ownership) from ``old_lock_id`` to ``lock_id``.
        self.move_locks = (
            lock.update()
            .where(lock.c.lock_id == sa.bindparam("old_lock_id", type_=sa.Integer))
            .values(lock_id=sa.bindparam("lock_id", type_=sa.Integer))
        )

        #: Seconds since the server started (``pg_postmaster_start_time()``): after a restart every
        #: advisory lock is gone at once, also those of workers that are only reconnecting.
        self.server_uptime = sa.select(
            sa.extract("epoch", sa.func.now() - sa.func.pg_postmaster_start_time()).label("uptime")
        )

        self._lost_resolution(p, aborts)

        #: A round trip on the worker's own connection: is it (and so its advisory lock) still there?
        self.keepalive: sa.Select[tuple[int]] = sa.select(sa.literal_column("1", sa.Integer))

    def _lost_resolution(self, p: Parts, aborts: AbortStatements | None) -> None:
        job = p.job
        #: Lost jobs of ``queues`` lost before ``before`` that can resolve themselves (DESIGN §7.2): with a
        #: retry policy in their trace, in one of ``policy_queues`` (the worker's default policies), or
        #: with an abort request. Locked, SKIP LOCKED: each is resolved by one worker.
        aborted = sa.false() if aborts is None else aborts.requested(job.c.id)
        self.resolvable_lost = (
            sa.select(
                job.c.id,
                job.c.queue,
                job.c.method,
                job.c.cursor_key,
                job.c.trace,
                job.c.worker,
                job.c.start_time,
                job.c.end_time,
                aborted.label("aborted"),
            )
            .where(job.c.state == p.lost)
            .where(job.c.queue == sa.any_(p.queues))
            .where(job.c.end_time <= sa.bindparam("before", type_=sa.DateTime))
            .where(
                sa.or_(
                    sa.and_(sa.func.jsonb_typeof(job.c.trace) == "object", job.c.trace.has_key(RETRY_KEY)),
                    job.c.queue == sa.any_(sa.bindparam("policy_queues", type_=pg.ARRAY(sa.Text))),
                    aborted,
                )
            )
            .order_by(job.c.end_time, job.c.id)
            .limit(100)
            .with_for_update(skip_locked=True, of=job)
        )
        #: Resolve one lost job (``job_id``) to ``state`` (failed or canceled) with ``result_json``, as
        #: ``fail_lost_job`` does: its ``end_time`` (when it was marked lost) kept.
        self.resolve_lost = (
            job.update()
            .where(job.c.id == sa.bindparam("job_id", type_=sa.BigInteger))
            .where(job.c.state == p.lost)
            .values(state=sa.bindparam("state", type_=job.c.state.type), result=json_param("result_json"))
            .returning(*p.finished_columns)
        )
