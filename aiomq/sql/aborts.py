"""Abort requests (``aiomq_abort_request``): made by ``abort_job``, read by the worker running the job."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects.postgresql import insert as pg_insert

from .parts import Parts

__all__ = ["AbortStatements"]


class AbortStatements:
    def __init__(self, p: Parts, table: sa.Table) -> None:
        job = p.job
        self.table = table
        #: Ask to abort job ``job_id`` (at ``now``); a second request changes nothing.
        self.request = (
            pg_insert(table)
            .values(
                job_id=sa.bindparam("job_id", type_=sa.BigInteger),
                requested_time=sa.bindparam("now", type_=sa.DateTime),
            )
            .on_conflict_do_nothing(index_elements=[table.c.job_id])
        )
        #: Which of the jobs ``ids`` (those a worker runs) someone asked to abort.
        self.requested_among = sa.select(table.c.job_id).where(
            table.c.job_id == sa.any_(sa.bindparam("ids", type_=pg.ARRAY(sa.BigInteger)))
        )
        #: Forget the requests of jobs that are no longer running or lost (they finished meanwhile, or a
        #: psycopg2_mq worker, which ignores requests, ran them to the end).
        self.purge = table.delete().where(table.c.job_id == job.c.id, job.c.state.notin_([p.running, p.lost]))

    def requested(self, job_id: sa.ColumnElement[Any]) -> sa.Exists:
        """Whether someone asked to abort the job ``job_id``."""
        return sa.exists().where(self.table.c.job_id == job_id)
