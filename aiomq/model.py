"""The queue's tables: psycopg2_mq 0.13.6's schema, plus aiomq's own indexes.

The columns, types, enum, constraints and index predicates must stay byte-compatible with psycopg2_mq so
that both libraries can share one database (tests/test_schema.py compares the two reflected schemas).
"""

from __future__ import annotations

import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = ["JobStates", "Model", "all_states", "finished_states", "make_default_model"]


class JobStates:
    """The values of the ``mq_job_state`` enum. Subclass to rename them (the reference allows it)."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"
    LOST = "lost"


def all_states(states: type[JobStates]) -> list[str]:
    """Every state of ``states``, in the enum's order."""
    return [states.PENDING, states.RUNNING, states.COMPLETED, states.FAILED, states.CANCELED, states.LOST]


def finished_states(states: type[JobStates]) -> frozenset[str]:
    """The states a job does not leave by itself: ``wait_for_job`` returns on them."""
    return frozenset({states.COMPLETED, states.FAILED, states.CANCELED, states.LOST})


class Model:
    """The ORM classes a source and a worker work on.

    Build it with :func:`make_default_model`, or by hand with classes of your own (other table names,
    extra columns): aiomq reads table and column objects from these classes, never names. The link classes
    are optional; without them no link rows are written. ``AbortRequest`` (aiomq's own table, 0.2) is
    optional too; without it ``abort_job`` cannot abort a running job; so is ``QueuePause`` (without it
    queues cannot be paused). A job table without a ``priority`` column takes no priorities.
    """

    channel_prefix = "mq_"

    def __init__(
        self,
        *,
        Job: type[Any],
        JobStates: type[JobStates],
        Lock: type[Any],
        JobCursor: type[Any],
        JobListener: type[Any],
        JobSchedule: type[Any],
        JobListenerLink: type[Any] | None = None,
        JobScheduleLink: type[Any] | None = None,
        AbortRequest: type[Any] | None = None,
        QueuePause: type[Any] | None = None,
    ) -> None:
        self.Job = Job
        self.JobStates = JobStates
        self.Lock = Lock
        self.JobCursor = JobCursor
        self.JobListener = JobListener
        self.JobSchedule = JobSchedule
        self.JobListenerLink = JobListenerLink
        self.JobScheduleLink = JobScheduleLink
        self.AbortRequest = AbortRequest
        self.QueuePause = QueuePause

    def __repr__(self) -> str:
        return f"<Model job_table={self.Job.__table__.name!r}>"


def make_default_model(metadata: sa.MetaData, JobStates: type[JobStates] = JobStates) -> Model:
    """Declare psycopg2_mq's tables on ``metadata`` and return the :class:`Model` holding them.

    Create the tables with ``await conn.run_sync(metadata.create_all)``.
    """
    states = JobStates

    shared_metadata = metadata

    class Base(DeclarativeBase):
        metadata = shared_metadata

    state_enum = sa.Enum(*all_states(states), name="mq_job_state", metadata=metadata)

    Job = _declare_job(Base, state_enum)
    _job_constraints(Job.__table__, states)
    JobCursor, JobListener, JobSchedule = _declare_cursor_and_events(Base)
    JobListenerLink, JobScheduleLink, Lock = _declare_links_and_lock(Base)
    AbortRequest, QueuePause = _declare_aiomq_tables(Base)
    return Model(
        Job=Job,
        JobStates=states,
        Lock=Lock,
        JobCursor=JobCursor,
        JobListener=JobListener,
        JobSchedule=JobSchedule,
        JobListenerLink=JobListenerLink,
        JobScheduleLink=JobScheduleLink,
        AbortRequest=AbortRequest,
        QueuePause=QueuePause,
    )


def _declare_job(Base: type[DeclarativeBase], state_enum: sa.Enum) -> type[Any]:
    class Job(Base):  # type: ignore[misc,valid-type]  # a declarative base per metadata
        __tablename__ = "mq_job"

        id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
        start_time: Mapped[datetime.datetime | None] = mapped_column(sa.DateTime)
        end_time: Mapped[datetime.datetime | None] = mapped_column(sa.DateTime)
        state: Mapped[str] = mapped_column(state_enum, nullable=False, index=True)
        created_time: Mapped[datetime.datetime] = mapped_column(sa.DateTime, nullable=False)
        scheduled_time: Mapped[datetime.datetime] = mapped_column(sa.DateTime, nullable=False, index=True)
        queue: Mapped[str] = mapped_column(sa.Text, nullable=False, index=True)
        method: Mapped[str] = mapped_column(sa.Text, nullable=False)
        args: Mapped[Any] = mapped_column(pg.JSONB, nullable=False)
        result: Mapped[Any] = mapped_column(pg.JSONB, nullable=True)
        cursor_key: Mapped[str | None] = mapped_column(sa.Text)
        cursor_snapshot: Mapped[Any] = mapped_column(pg.JSONB, nullable=True)
        collapsible: Mapped[bool | None] = mapped_column(sa.Boolean)
        trace: Mapped[Any] = mapped_column(pg.JSONB, nullable=True)
        lock_id: Mapped[int | None] = mapped_column(sa.Integer)
        worker: Mapped[str | None] = mapped_column(sa.Text)
        # aiomq's own (0.2, DESIGN §7.6): a server default, so psycopg2_mq's inserts need not know it.
        priority: Mapped[int] = mapped_column(sa.SmallInteger, nullable=False, server_default=sa.text("0"))

        listener_links: Mapped[list[Any]] = relationship("JobListenerLink", back_populates="job")
        listeners: Mapped[list[Any]] = relationship(
            "JobListener",
            secondary="mq_job_listener_link",
            back_populates="jobs",
            viewonly=True,
        )
        schedule_links: Mapped[list[Any]] = relationship("JobScheduleLink", back_populates="job")
        schedules: Mapped[list[Any]] = relationship(
            "JobSchedule",
            secondary="mq_job_schedule_link",
            back_populates="jobs",
            viewonly=True,
        )

        def __repr__(self) -> str:
            return (
                f"<Job id={self.id} state={self.state!r} queue={self.queue!r} "
                f"method={self.method!r} cursor_key={self.cursor_key!r} "
                f"scheduled_time={self.scheduled_time}>"
            )

    return Job


def _job_constraints(job: sa.Table, states: type[JobStates]) -> None:
    """psycopg2_mq's check constraint and partial indexes on ``mq_job``, and aiomq's own indexes."""
    # The predicates are written as psycopg2_mq writes them, so reflection compares equal.
    job.append_constraint(
        sa.CheckConstraint(
            sa.or_(job.c.state != states.RUNNING, job.c.lock_id != sa.null()),
            name="ck_mq_job_lock_id",
        )
    )
    sa.Index(
        "uq_mq_job_pending_cursor_key_queue_method",
        job.c.cursor_key,
        job.c.queue,
        job.c.method,
        unique=True,
        postgresql_where=sa.and_(job.c.state == states.PENDING, job.c.collapsible == sa.true()),
    )
    sa.Index(
        "uq_mq_job_active_cursor_key",
        job.c.cursor_key,
        unique=True,
        postgresql_where=sa.and_(
            job.c.cursor_key.isnot(None), job.c.state.in_([states.RUNNING, states.LOST])
        ),
    )
    # aiomq's own: a claim walks pending jobs of its queues in due order, so its cost does not grow
    # with the number of finished rows (psycopg2_mq ignores this index).
    sa.Index(
        "ix_aiomq_job_pending_due",
        job.c.queue,
        job.c.scheduled_time,
        job.c.created_time,
        job.c.id,
        postgresql_where=job.c.state == sa.literal_column(_quote(states.PENDING)),
    )
    # aiomq's own: claims walk a queue's pending jobs highest priority first, then in due order.
    sa.Index(
        "ix_aiomq_job_pending_priority",
        job.c.queue,
        job.c.priority.desc(),
        job.c.scheduled_time,
        job.c.created_time,
        job.c.id,
        postgresql_where=job.c.state == sa.literal_column(_quote(states.PENDING)),
    )
    # aiomq's own: a finish looks up the pending successors of the cursors it frees, and a claim asks
    # whether a candidate has an earlier due job on its cursor; in due order, each is one probe, however
    # many jobs the cursor has pending. (It replaces 0.1's ix_aiomq_job_pending_cursor, on cursor_key
    # alone, which ``aiomq schema --create`` drops: see schema.OBSOLETE_INDEXES.)
    sa.Index(
        "ix_aiomq_job_pending_cursor_due",
        job.c.cursor_key,
        job.c.scheduled_time,
        job.c.created_time,
        job.c.id,
        postgresql_where=sa.and_(
            job.c.state == sa.literal_column(_quote(states.PENDING)), job.c.cursor_key.isnot(None)
        ),
    )


def _declare_cursor_and_events(Base: type[DeclarativeBase]) -> tuple[type[Any], type[Any], type[Any]]:
    class JobCursor(Base):  # type: ignore[misc,valid-type]  # a declarative base per metadata
        __tablename__ = "mq_job_cursor"

        key: Mapped[str] = mapped_column(sa.Text, primary_key=True)
        properties: Mapped[Any] = mapped_column(pg.JSONB, nullable=False, default=dict)
        updated_job_id: Mapped[int | None] = mapped_column(
            sa.ForeignKey("mq_job.id", ondelete="set null", onupdate="cascade")
        )
        updated_job: Mapped[Any] = relationship("Job")

        # aiomq's own: deleting a job (pruning) looks up the cursor it last updated, through this index
        # rather than a scan of every cursor per deleted job.
        __table_args__ = (sa.Index("ix_aiomq_job_cursor_updated_job", "updated_job_id"),)

        def __repr__(self) -> str:
            return f"<JobCursor key={self.key!r} updated_job_id={self.updated_job_id}>"

    class JobListener(Base):  # type: ignore[misc,valid-type]  # a declarative base per metadata
        __tablename__ = "mq_job_listener"

        id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
        created_time: Mapped[datetime.datetime] = mapped_column(sa.DateTime, nullable=False)
        is_enabled: Mapped[bool] = mapped_column(sa.Boolean, nullable=False)
        event: Mapped[str] = mapped_column(sa.Text, nullable=False, index=True)
        queue: Mapped[str] = mapped_column(sa.Text, nullable=False, index=True)
        method: Mapped[str] = mapped_column(sa.Text, nullable=False)
        args: Mapped[Any] = mapped_column(pg.JSONB, nullable=False)
        context_arg_key: Mapped[str] = mapped_column(sa.Text, nullable=False)
        when: Mapped[datetime.timedelta | None] = mapped_column(pg.INTERVAL)
        cursor_key: Mapped[str | None] = mapped_column(sa.Text)
        collapse_on_cursor: Mapped[bool | None] = mapped_column(sa.Boolean)

        job_links: Mapped[list[Any]] = relationship("JobListenerLink", back_populates="listener")
        jobs: Mapped[list[Any]] = relationship(
            "Job", secondary="mq_job_listener_link", back_populates="listeners", viewonly=True
        )

        def __repr__(self) -> str:
            return (
                f"<JobListener id={self.id} event={self.event!r} queue={self.queue!r} "
                f"method={self.method!r} is_enabled={self.is_enabled}>"
            )

    class JobSchedule(Base):  # type: ignore[misc,valid-type]  # a declarative base per metadata
        __tablename__ = "mq_job_schedule"

        id: Mapped[int] = mapped_column(sa.BigInteger, primary_key=True)
        created_time: Mapped[datetime.datetime] = mapped_column(sa.DateTime, nullable=False)
        is_enabled: Mapped[bool] = mapped_column(sa.Boolean, nullable=False)
        rrule: Mapped[str] = mapped_column(sa.Text, nullable=False)
        queue: Mapped[str] = mapped_column(sa.Text, nullable=False, index=True)
        method: Mapped[str] = mapped_column(sa.Text, nullable=False)
        args: Mapped[Any] = mapped_column(pg.JSONB, nullable=False)
        cursor_key: Mapped[str | None] = mapped_column(sa.Text)
        collapse_on_cursor: Mapped[bool | None] = mapped_column(sa.Boolean)
        next_execution_time: Mapped[datetime.datetime | None] = mapped_column(sa.DateTime, nullable=True)

        job_links: Mapped[list[Any]] = relationship("JobScheduleLink", back_populates="schedule")
        jobs: Mapped[list[Any]] = relationship(
            "Job", secondary="mq_job_schedule_link", back_populates="schedules", viewonly=True
        )

        def __repr__(self) -> str:
            return (
                f"<JobSchedule id={self.id} queue={self.queue!r} method={self.method!r} "
                f"rrule={self.rrule!r} is_enabled={self.is_enabled}>"
            )

    return JobCursor, JobListener, JobSchedule


def _declare_links_and_lock(Base: type[DeclarativeBase]) -> tuple[type[Any], type[Any], type[Any]]:
    class JobListenerLink(Base):  # type: ignore[misc,valid-type]  # a declarative base per metadata
        __tablename__ = "mq_job_listener_link"

        job_id: Mapped[int] = mapped_column(
            sa.ForeignKey("mq_job.id", ondelete="cascade", onupdate="cascade"),
            primary_key=True,
            nullable=False,
            index=True,
        )
        listener_id: Mapped[int] = mapped_column(
            sa.ForeignKey("mq_job_listener.id", ondelete="cascade", onupdate="cascade"),
            primary_key=True,
            nullable=False,
            index=True,
        )
        job: Mapped[Any] = relationship("Job", back_populates="listener_links")
        listener: Mapped[Any] = relationship("JobListener", back_populates="job_links")

    class JobScheduleLink(Base):  # type: ignore[misc,valid-type]  # a declarative base per metadata
        __tablename__ = "mq_job_schedule_link"

        job_id: Mapped[int] = mapped_column(
            sa.ForeignKey("mq_job.id", ondelete="cascade", onupdate="cascade"),
            primary_key=True,
            nullable=False,
            index=True,
        )
        schedule_id: Mapped[int] = mapped_column(
            sa.ForeignKey("mq_job_schedule.id", ondelete="cascade", onupdate="cascade"),
            primary_key=True,
            nullable=False,
            index=True,
        )
        job: Mapped[Any] = relationship("Job", back_populates="schedule_links")
        schedule: Mapped[Any] = relationship("JobSchedule", back_populates="job_links")

    class Lock(Base):  # type: ignore[misc,valid-type]  # a declarative base per metadata
        __tablename__ = "mq_lock"

        ns: Mapped[str] = mapped_column(sa.Text, primary_key=True)
        key: Mapped[str] = mapped_column(sa.Text, primary_key=True)
        lock_id: Mapped[int] = mapped_column(sa.Integer, nullable=False)
        worker: Mapped[str] = mapped_column(sa.Text, nullable=False)

        def __repr__(self) -> str:
            return f"<Lock ns={self.ns!r} key={self.key!r} lock_id={self.lock_id}>"

    return JobListenerLink, JobScheduleLink, Lock


def _declare_aiomq_tables(Base: type[DeclarativeBase]) -> tuple[type[Any], type[Any]]:
    """aiomq's own tables (``aiomq_*``, DESIGN §1.2): psycopg2_mq neither reads nor needs them."""

    class AbortRequest(Base):  # type: ignore[misc,valid-type]  # a declarative base per metadata
        """A request to abort a running job (``AsyncMQSource.abort_job``): durable, so it outlives the
        worker it was sent to; deleted with its job, or by maintenance once the job is finished."""

        __tablename__ = "aiomq_abort_request"

        job_id: Mapped[int] = mapped_column(
            sa.ForeignKey("mq_job.id", ondelete="cascade", onupdate="cascade"), primary_key=True
        )
        requested_time: Mapped[datetime.datetime] = mapped_column(sa.DateTime, nullable=False)

        def __repr__(self) -> str:
            return f"<AbortRequest job_id={self.job_id} requested_time={self.requested_time}>"

    class QueuePause(Base):  # type: ignore[misc,valid-type]  # a declarative base per metadata
        """A paused queue (``AsyncMQSource.pause_queue``): aiomq workers claim none of its jobs until the
        row is deleted (``resume_queue``). A row, so the pause outlives every worker."""

        __tablename__ = "aiomq_queue_pause"

        queue: Mapped[str] = mapped_column(sa.Text, primary_key=True)
        paused_time: Mapped[datetime.datetime] = mapped_column(sa.DateTime, nullable=False)

        def __repr__(self) -> str:
            return f"<QueuePause queue={self.queue!r} paused_time={self.paused_time}>"

    return AbortRequest, QueuePause


def _quote(value: str) -> str:
    """A SQL string literal; for enum values that must appear literally in index predicates."""
    return "'" + value.replace("'", "''") + "'"
