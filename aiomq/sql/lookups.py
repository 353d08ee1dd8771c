"""Reading jobs, cursors and listeners for the source's lookups and ``wait_for_job``."""

from __future__ import annotations

import dataclasses
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from ..records import JobInfo
from .parts import Parts

__all__ = ["LookupStatements"]

#: The filters of ``find_jobs``, in the order they appear in its WHERE clause.
FIND_FILTERS = ("queue", "method", "state", "cursor_key")


class LookupStatements:
    def __init__(self, p: Parts) -> None:
        job = p.job
        self._p = p
        self._info_columns = [job.c[f.name] for f in dataclasses.fields(JobInfo)]
        #: One job's ``JobInfo`` columns (``job_id``).
        self.job_info = sa.select(*self._info_columns).where(
            job.c.id == sa.bindparam("job_id", type_=sa.BigInteger)
        )
        #: Jobs' ``JobInfo`` columns, labelled by field (``job_ids``, an array): ``wait_for_job``'s batched
        #: read on its own connection.
        self.jobs_info = sa.select(*(job.c[f.name].label(f.name) for f in dataclasses.fields(JobInfo))).where(
            job.c.id == sa.any_(sa.bindparam("job_ids", type_=pg.ARRAY(sa.BigInteger)))
        )
        cursor = p.cursor
        #: A cursor's saved properties (``key``).
        self.cursor_properties = sa.select(cursor.c.properties).where(
            cursor.c.key == sa.bindparam("key", type_=sa.Text)
        )
        #: The enabled listeners of an event (``event``), in id order: ORM rows.
        Listener = p.model.JobListener
        self.listeners_of = (
            sa.select(Listener)
            .where(Listener.event == sa.bindparam("event", type_=sa.Text), Listener.is_enabled == sa.true())
            .order_by(Listener.id)
        )

    def find_jobs(self, filters: dict[str, Any]) -> sa.Select[Any]:
        """Jobs whose columns equal ``filters`` (keys among :data:`FIND_FILTERS`), newest first, at most
        ``limit`` (a parameter). Values are parameters of the same names."""
        job = self._p.job
        stmt = sa.select(*self._info_columns)
        for column in FIND_FILTERS:
            if column in filters:
                stmt = stmt.where(job.c[column] == sa.bindparam(column, type_=job.c[column].type))
        return stmt.order_by(job.c.created_time.desc(), job.c.id.desc()).limit(
            sa.bindparam("limit", type_=sa.Integer)
        )
