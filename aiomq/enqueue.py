"""The enqueue path: a call validated into a frozen :class:`Call`, then inserted or joined to the pending
job it collapses into, alone or in a batch. Shared by every source.

Validation happens entirely in :func:`validate_call`, before any SQL: a bad call raises ``TypeError`` or
``ValueError`` naming the problem and leaves the caller's transaction usable.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from . import channels, tracing
from .records import QueuedJob, check_queue_name, to_naive_utc, utcnow
from .retry import RETRIED_BY_KEY, RETRY_KEY, TIMEOUT_KEY, Retry, as_retry, as_timeout
from .serialize import MAX_KEY_BYTES, check_text, dump_json
from .sessions import SessionLike
from .sql import Statements

__all__ = [
    "CALL_ARGUMENTS",
    "Call",
    "Enqueuer",
    "as_time",
    "check_method",
    "check_priority",
    "collapse_rule",
    "merge_ids",
    "sorted_ids",
    "validate_call",
    "validate_call_item",
]

log = logging.getLogger(__name__)

# Columns a call fills itself; job_kwargs may set any other column of the job table.
_CALL_COLUMNS = frozenset(
    {
        "id",
        "state",
        "args",
        "trace",
        "created_time",
        "scheduled_time",
        "queue",
        "method",
        "cursor_key",
        "collapsible",
        "priority",
    }
)
#: The keyword arguments of ``call`` (and the keys of a ``call_many`` item, with queue, method, args).
CALL_ARGUMENTS = frozenset(
    {
        "when",
        "now",
        "cursor_key",
        "collapse_on_cursor",
        "conflict_resolver",
        "trace",
        "job_kwargs",
        "schedule_ids",
        "listener_ids",
        "retry",
        "timeout",
        "priority",
    }
)
#: The range of ``priority`` (the column is a SMALLINT).
PRIORITY_RANGE = (-32768, 32767)
_ITEM_KEYS = CALL_ARGUMENTS | {"queue", "method", "args"}


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """A validated call: the new job's columns, its JSON already encoded and checked."""

    queue: str
    method: str
    created_time: datetime.datetime
    scheduled_time: datetime.datetime
    cursor_key: str | None
    collapsible: bool
    args_json: str
    trace_json: str
    #: Other columns of the job table, from ``job_kwargs``.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    conflict_resolver: Callable[[Any], Any] | None = None
    schedule_ids: tuple[int, ...] = ()
    listener_ids: tuple[int, ...] = ()
    #: Higher is claimed first among a queue's due jobs (0: the column's default, left out of the INSERT).
    priority: int = 0

    @property
    def linked(self) -> bool:
        """Whether the job gets link rows (to schedules or listeners)."""
        return bool(self.schedule_ids or self.listener_ids)

    @property
    def bulk_insertable(self) -> bool:
        """Whether the multi-row INSERT can take it: no collapse slot, no extra columns, no link rows."""
        return not self.collapsible and not self.extra and not self.linked

    @property
    def slot(self) -> tuple[str, str, str]:
        """The lock order of collapsing calls in a batch: (cursor_key, queue, method)."""
        return (self.cursor_key or "", self.queue, self.method)

    def params(self) -> dict[str, Any]:
        """The parameters of the enqueue statements."""
        extra = {**self.extra, "priority": self.priority} if self.priority else self.extra
        return {
            **extra,
            "created_time": self.created_time,
            "scheduled_time": self.scheduled_time,
            "queue": self.queue,
            "method": self.method,
            "cursor_key": self.cursor_key,
            "collapsible": self.collapsible,
            "args_json": self.args_json,
            "trace_json": self.trace_json,
        }


def as_time(value: Any, now: datetime.datetime | None, what: str) -> datetime.datetime:
    """A datetime as naive UTC, or a timedelta from ``now`` (None: the current time)."""
    if isinstance(value, datetime.datetime):
        return to_naive_utc(value)
    if isinstance(value, datetime.timedelta):
        return (utcnow() if now is None else now) + value
    raise TypeError(f"{what} must be a datetime or a timedelta, got {type(value).__name__}")


def merge_ids(trace: Any, key: str, ids: Iterable[int] | None) -> Any:
    """``trace`` with ``ids`` merged into the sorted list under ``key`` (a copy; unchanged without ids)."""
    if not ids:
        return trace
    trace = dict(trace) if isinstance(trace, dict) else {}
    trace[key] = sorted(set(trace.get(key) or ()) | {int(i) for i in ids})
    return trace


def sorted_ids(ids: Iterable[int] | None) -> tuple[int, ...]:
    """Provenance ids, sorted and unique: they are read more than once (trace, links)."""
    return () if ids is None else tuple(sorted({int(i) for i in ids}))


def check_method(method: object) -> None:
    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be a non-empty string, got {method!r}")
    check_text(method, "method", max_bytes=MAX_KEY_BYTES)


def check_priority(priority: object, job_columns: Any) -> int:
    low, high = PRIORITY_RANGE
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise TypeError(f"priority must be an integer, got {type(priority).__name__}")
    if not low <= priority <= high:
        raise ValueError(f"priority must be from {low} to {high}, got {priority}")
    if priority and "priority" not in job_columns:
        raise ValueError("priority needs a priority column on the job table, and this model has none")
    return priority


def collapse_rule(collapse_on_cursor: bool | None, cursor_key: str | None) -> bool:
    """``collapse_on_cursor=None`` means True with a cursor (the seed's rule); True needs a cursor."""
    if cursor_key is not None:
        if not isinstance(cursor_key, str):
            raise TypeError(f"cursor_key must be a string, got {type(cursor_key).__name__}")
        check_text(cursor_key, "cursor_key", max_bytes=MAX_KEY_BYTES)
    if collapse_on_cursor is None:
        return cursor_key is not None
    if collapse_on_cursor and cursor_key is None:
        raise ValueError("collapse_on_cursor=True needs a cursor_key")
    return bool(collapse_on_cursor)


def validate_call(
    job_columns: Any,
    queue: str,
    method: str,
    args: Any,
    *,
    when: datetime.datetime | datetime.timedelta | None = None,
    now: datetime.datetime | None = None,
    cursor_key: str | None = None,
    collapse_on_cursor: bool | None = None,
    conflict_resolver: Callable[[Any], Any] | None = None,
    trace: Any = None,
    job_kwargs: Mapping[str, Any] | None = None,
    schedule_ids: Iterable[int] | None = None,
    listener_ids: Iterable[int] | None = None,
    retry: Retry | int | None = None,
    timeout: float | datetime.timedelta | None = None,
    priority: int = 0,
) -> Call:
    """``call``'s arguments checked and encoded; ``job_columns`` is the job table's ``.c``."""
    check_queue_name(queue)
    check_method(method)
    check_priority(priority, job_columns)
    collapse = collapse_rule(collapse_on_cursor, cursor_key)
    now = utcnow() if now is None else as_time(now, None, "now")
    when = now if when is None else as_time(when, now, "when")
    args_json = dump_json({} if args is None else args, "args")
    schedules, listeners = sorted_ids(schedule_ids), sorted_ids(listener_ids)
    trace = merge_ids(trace, "mq_schedule_ids", schedules)
    trace = merge_ids(trace, "mq_listener_ids", listeners)
    trace = with_policy(trace, as_retry(retry), as_timeout(timeout))
    trace_json = "null" if trace is None else dump_json(trace, "trace")
    extra = dict(job_kwargs or {})
    for key in extra:
        if key in _CALL_COLUMNS or key not in job_columns:
            raise ValueError(f"job_kwargs cannot set {key!r}: not a free column of the job table")
    if conflict_resolver is not None and not callable(conflict_resolver):
        raise TypeError("conflict_resolver must be callable")
    if (traced := tracing.producer_trace(trace, queue, method)) is not trace:  # a valid call: its span
        trace_json = dump_json(traced, "trace")
    return Call(
        queue=queue,
        method=method,
        created_time=now,
        scheduled_time=when,
        cursor_key=cursor_key,
        collapsible=collapse,
        args_json=args_json,
        trace_json=trace_json,
        extra=extra,
        conflict_resolver=conflict_resolver,
        schedule_ids=schedules,
        listener_ids=listeners,
        priority=priority,
    )


def with_policy(trace: Any, retry: Retry | None, timeout: float | None) -> Any:
    """``trace`` with the job's retry policy and timeout (a copy; unchanged when there are none)."""
    if retry is None and timeout is None:
        return trace
    if trace is not None and not isinstance(trace, dict):
        raise TypeError(
            f"trace must be a dict (or None) to carry a retry policy or a timeout, got {type(trace).__name__}"
        )
    trace = dict(trace or {})
    if retry is not None:
        trace[RETRY_KEY] = retry.to_trace()
    if timeout is not None:
        trace[TIMEOUT_KEY] = timeout
    return trace


def validate_call_item(job_columns: Any, index: int, item: Mapping[str, Any], now: datetime.datetime) -> Call:
    """One ``call_many`` item (a mapping of ``call``'s arguments), errors naming its position."""
    kw = dict(item)
    unknown = set(kw) - _ITEM_KEYS
    if unknown or "queue" not in kw or "method" not in kw:
        raise TypeError(
            f"call {index}: needs queue and method, and only call()'s arguments; unknown: {sorted(unknown)}"
        )
    queue, method, args = kw.pop("queue"), kw.pop("method"), kw.pop("args", None)
    try:
        return validate_call(job_columns, queue, method, args, **{"now": now, **kw})
    except (TypeError, ValueError) as ex:
        raise type(ex)(f"call {index}: {ex}") from ex


def retry_call(job: Any, now: datetime.datetime) -> Call:
    """A new job like ``job`` (an ORM row, any state) at its original scheduled time, as ``retry_job``
    makes it: not collapsible, its trace pointing back (``mq_source_job_id``)."""
    trace = copy.deepcopy(job.trace) if isinstance(job.trace, dict) else {}
    trace.pop(RETRIED_BY_KEY, None)  # the original's own retry is not this job's
    trace["mq_source_job_id"] = job.id
    trace = tracing.producer_trace(trace, job.queue, job.method, "retry_job")
    return Call(
        queue=job.queue,
        method=job.method,
        created_time=now,
        scheduled_time=job.scheduled_time,
        cursor_key=job.cursor_key,
        collapsible=False,
        args_json=dump_json(job.args, "args"),
        trace_json=dump_json(trace, "trace"),
        priority=getattr(job, "priority", 0) or 0,
    )


#: The earliest (epoch seconds, job id) per queue of a batch: one NOTIFY per queue at the end.
Hints = dict[str, tuple[int, int]]


class Enqueuer:
    """Inserts validated calls on a session, joining pending collapsible jobs, with their NOTIFYs."""

    def __init__(self, st: Statements) -> None:
        self._st = st
        self._prefix = st.parts.model.channel_prefix

    def enqueue_notify(self, call: Call) -> tuple[Any, dict[str, Any]]:
        """The INSERT-and-NOTIFY statement for ``call``, and its parameters."""
        params = call.params()
        statement = self._st.enqueue.enqueue_notify(params)
        params["channel"] = channels.queue_channel(self._prefix, call.queue)
        params["t"] = channels.epoch(call.scheduled_time)
        return statement, params

    async def notify_queue(self, session: SessionLike, queue: str, payload: str) -> None:
        channel = channels.queue_channel(self._prefix, queue)
        await session.execute(self._st.notify, {"channel": channel, "payload": payload})

    async def insert_or_join(self, session: SessionLike, call: Call, hints: Hints | None = None) -> QueuedJob:
        """Insert, or join the pending collapsible job of the slot. NOTIFY at once, or, given ``hints``,
        collect the earliest ``t`` per queue there for the caller to send once."""
        while True:
            if hints is None:  # the INSERT sends its own NOTIFY
                row = (await session.execute(*self.enqueue_notify(call))).first()
            else:
                row = (await session.execute(self._st.enqueue.enqueue, call.params())).first()
            if row is not None:
                await self.link(session, row.id, call)
                if hints is not None:
                    _collect(hints, call.queue, row.id, row.scheduled_time)
                return queued(call, row.id, row.scheduled_time)
            # A collapsible job is pending on this slot: join it. If it left pending between the two
            # statements (READ COMMITTED), insert again.
            slot = {"queue": call.queue, "method": call.method, "cursor_key": call.cursor_key}
            job = (await session.execute(self._st.enqueue.join, slot)).scalar_one_or_none()
            if job is not None:
                return await self._join(session, call, job, hints)

    async def _join(self, session: SessionLike, call: Call, job: Any, hints: Hints | None) -> QueuedJob:
        moved = call.scheduled_time < job.scheduled_time
        if moved:
            job.scheduled_time = call.scheduled_time
        if call.linked:
            trace = merge_ids(job.trace, "mq_schedule_ids", call.schedule_ids)
            job.trace = merge_ids(trace, "mq_listener_ids", call.listener_ids)
            await self.link(session, job.id, call)
        if call.conflict_resolver is not None:
            outcome = call.conflict_resolver(job)
            if inspect.isawaitable(outcome):
                await outcome
        await session.flush()
        if moved:
            if hints is None:
                await self.notify_queue(session, call.queue, channels.job_payload(job.id, job.scheduled_time))
            else:
                _collect(hints, call.queue, job.id, job.scheduled_time)
        log.info("joined job %s (%s.%s, cursor_key=%s)", job.id, call.queue, call.method, call.cursor_key)
        return QueuedJob(job.id, call.queue, call.method, call.cursor_key, job.scheduled_time, False)

    async def link(self, session: SessionLike, job_id: int, call: Call) -> None:
        """The job's link rows to the schedules and listeners it came from (where the model has them)."""
        enqueue = self._st.enqueue
        for statement, column, ids in (
            (enqueue.link_schedules, "schedule_id", call.schedule_ids),
            (enqueue.link_listeners, "listener_id", call.listener_ids),
        ):
            if statement is not None and ids:
                await session.execute(statement, [{"job_id": job_id, column: i} for i in ids])

    async def insert_many(self, session: SessionLike, calls: Sequence[Call]) -> list[QueuedJob]:
        """Insert many calls: one multi-row INSERT for those without a collapse slot, the others one by one
        in (cursor_key, queue, method) order, so two concurrent batches lock their slots in the same order
        and cannot deadlock; then one NOTIFY per queue, for its earliest job."""
        results: list[QueuedJob | None] = [None] * len(calls)
        hints: Hints = {}
        bulk = [i for i, call in enumerate(calls) if call.bulk_insertable]
        rest = sorted(
            (i for i, c in enumerate(calls) if not c.bulk_insertable), key=lambda i: (calls[i].slot, i)
        )
        if bulk:
            params = {
                "created": [calls[i].created_time for i in bulk],
                "scheduled": [calls[i].scheduled_time for i in bulk],
                "queues": [calls[i].queue for i in bulk],
                "methods": [calls[i].method for i in bulk],
                "cursor_keys": [calls[i].cursor_key for i in bulk],
                "args": [calls[i].args_json for i in bulk],
                "traces": [calls[i].trace_json for i in bulk],
            }
            statement = self._st.enqueue.enqueue_many
            if any(calls[i].priority for i in bulk):
                params["priorities"] = [calls[i].priority for i in bulk]
                statement = self._st.enqueue.enqueue_many_prioritized
            rows = list(await session.execute(statement, params))
            # ids come from the sequence in insertion order, and rows are inserted in call order
            for i, row in zip(bulk, sorted(rows, key=lambda r: r.id), strict=True):
                results[i] = queued(calls[i], row.id, row.scheduled_time, quiet=True)
                _collect(hints, calls[i].queue, row.id, row.scheduled_time)
        for i in rest:
            results[i] = await self.insert_or_join(session, calls[i], hints)
        for queue, (t, job_id) in sorted(hints.items()):
            await self.notify_queue(session, queue, channels.job_payload(job_id, t))
        log.info("queued %d calls in one batch", len(calls))
        return [r for r in results if r is not None]


def queued(call: Call, job_id: int, scheduled_time: datetime.datetime, *, quiet: bool = False) -> QueuedJob:
    """The ``QueuedJob`` of a new job (logged, unless one of a batch)."""
    if not quiet:
        log.info("queued job %s (%s.%s, cursor_key=%s)", job_id, call.queue, call.method, call.cursor_key)
    return QueuedJob(job_id, call.queue, call.method, call.cursor_key, scheduled_time, True)


def _collect(hints: Hints, queue: str, job_id: int, when: datetime.datetime) -> None:
    hint = (channels.epoch(when), job_id)
    current = hints.get(queue)
    if current is None or hint < current:  # one NOTIFY per queue, for its earliest job
        hints[queue] = hint
