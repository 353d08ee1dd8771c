"""Records aiomq hands out: frozen, safe to keep after the session that produced them is gone."""

from __future__ import annotations

import dataclasses
import datetime
import re
from typing import Any

from .retry import attempt_of

__all__ = ["QUEUE_NAME", "JobContext", "JobInfo", "QueuedJob", "check_queue_name", "utcnow"]

#: Queue names become NOTIFY channels ``mq_<queue>``; channel names are limited to 63 bytes.
QUEUE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,59}")


def check_queue_name(queue: object) -> str:
    if not isinstance(queue, str) or not QUEUE_NAME.fullmatch(queue):
        raise ValueError(
            f"invalid queue name {queue!r}: use 1 to 60 characters of [A-Za-z0-9_], not starting with a digit"
        )
    return queue


def utcnow() -> datetime.datetime:
    """Now as a naive UTC datetime: the time format of every psycopg2_mq column."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def to_naive_utc(value: datetime.datetime) -> datetime.datetime:
    if value.tzinfo is None:
        return value
    return value.astimezone(datetime.UTC).replace(tzinfo=None)


@dataclasses.dataclass(frozen=True, slots=True)
class QueuedJob:
    """What ``call`` (and ``retry_job``, ``call_schedule``, ``emit_event``) return.

    ``created`` is False when the call joined an existing pending job on its cursor; ``scheduled_time`` is
    the job's time after the call.
    """

    id: int
    queue: str
    method: str
    cursor_key: str | None
    scheduled_time: datetime.datetime
    created: bool


@dataclasses.dataclass(frozen=True, slots=True)
class JobInfo:
    """A snapshot of one ``mq_job`` row."""

    id: int
    queue: str
    method: str
    args: Any
    state: str
    result: Any
    cursor_key: str | None
    created_time: datetime.datetime
    scheduled_time: datetime.datetime
    start_time: datetime.datetime | None
    end_time: datetime.datetime | None
    worker: str | None
    trace: Any

    @classmethod
    def from_row(cls, row: Any) -> JobInfo:
        return cls(**{f.name: getattr(row, f.name) for f in dataclasses.fields(cls)})


class JobContext:
    """The job a handler receives.

    ``cursor`` is a mutable dict for cursor jobs (``{}`` before the cursor's first save) and None for jobs
    without a cursor; what the handler leaves in it is saved when the job succeeds. Changing ``args`` has no
    effect on the database. ``extend(**kw)`` attaches attributes of the queue's own.

    ``attempt`` is the run number (1 for the first run; a retry's is one more than the run it retries).
    ``abort_requested`` becomes True when someone asked to abort the job (``AsyncMQSource.abort_job``): a
    sync handler, which cannot be interrupted, may check it and return early.
    """

    def __init__(
        self,
        *,
        id: int,
        queue: str,
        method: str,
        args: Any,
        cursor_key: str | None,
        cursor: dict[str, Any] | None,
        trace: Any,
    ) -> None:
        self.id = id
        self.queue = queue
        self.method = method
        self.args = args
        self.cursor_key = cursor_key
        self.cursor = cursor
        self.trace = trace
        ids = trace if isinstance(trace, dict) else {}
        self.schedule_ids: list[int] | None = ids.get("mq_schedule_ids")
        self.listener_ids: list[int] | None = ids.get("mq_listener_ids")
        self.attempt = attempt_of(trace)
        self.abort_requested = False

    def extend(self, **kw: Any) -> None:
        for key, value in kw.items():
            setattr(self, key, value)

    def __repr__(self) -> str:
        return (
            f"<JobContext id={self.id} queue={self.queue!r} method={self.method!r} "
            f"cursor_key={self.cursor_key!r}>"
        )

    @classmethod
    def from_claim(cls, row: Any) -> JobContext:
        """From a claimed row (a mapping of the claim's columns, JSON decoded afresh for this job)."""
        cursor: dict[str, Any] | None = None
        if row["cursor_key"] is not None:
            snapshot = row["cursor_snapshot"]
            cursor = snapshot if snapshot is not None else {}
        return cls(
            id=row["id"],
            queue=row["queue"],
            method=row["method"],
            args=row["args"],
            cursor_key=row["cursor_key"],
            cursor=cursor,
            trace=row["trace"],
        )
