"""Events: what a job's state change sends, decided in one place.

That is the event ``mq.job_finished.<state>.<queue>.<method>`` (when a listener waits for it), the
``mq.job_finished`` NOTIFY that wakes waiters, and the hint to whoever serves the next job of a cursor the
change frees; all of it in the state change's transaction.

The worker's batched finishes send the NOTIFY and hints from inside their statement
(:mod:`aiomq.sql.outcomes`); they follow :func:`announcement` too. :func:`emit_to_listeners` turns an
event into jobs, one per enabled listener.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from . import channels
from .enqueue import Enqueuer, validate_call
from .model import JobStates
from .records import QueuedJob, check_queue_name
from .sessions import SessionLike
from .sql import Statements

__all__ = [
    "Announcement",
    "Announcer",
    "Emit",
    "announce",
    "announcement",
    "emit_to_listeners",
    "finished_event",
    "iso",
]

log = logging.getLogger(__name__)

#: ``emit(name, data)``: emit an event in the state change's transaction (jobs for its listeners).
Emit = Callable[[str, dict[str, Any]], Awaitable[Any]]
#: ``execute(statement, params)``: a session's or connection's ``execute``, in that transaction.
Execute = Callable[[Any, Mapping[str, Any]], Awaitable[Any]]


def iso(value: datetime.datetime | None) -> str | None:
    """Naive ``isoformat()``, as psycopg2_mq writes times in event data."""
    return None if value is None else value.isoformat()


def finished_event(
    state: str, row: Any, *, result: Any = None, lost: bool = False
) -> tuple[str, dict[str, Any]]:
    """The event name and data for ``row`` (a job) entering ``state``.

    Lost events carry the job id under ``job`` and no result, as psycopg2_mq's do.
    """
    name = f"mq.job_finished.{state}.{row.queue}.{row.method}"
    data: dict[str, Any] = {"job" if lost else "id": row.id, "queue": row.queue, "method": row.method}
    data["start_time"] = iso(row.start_time)
    data["end_time"] = iso(row.end_time)
    if not lost:
        data["result"] = result
    return name, data


@dataclasses.dataclass(frozen=True, slots=True)
class Announcement:
    """What a state change sends: the finished event, the ``mq.job_finished`` NOTIFY, a successor hint."""

    event: bool
    finished_note: bool
    successor_hint: bool


def announcement(
    states: type[JobStates],
    state: str,
    *,
    cursor_key: str | None,
    has_listeners: bool,
    held_cursor: bool = True,
) -> Announcement:
    """The rule (reference §11 for events): completed, failed and lost jobs emit their event, canceled ones
    do not; every finished state wakes waiters; a job that held its cursor (it was running or lost) frees
    it unless it becomes lost, so the queue of the cursor's next job is told."""
    return Announcement(
        event=has_listeners and state in (states.COMPLETED, states.FAILED, states.LOST),
        finished_note=True,
        successor_hint=cursor_key is not None and held_cursor and state != states.LOST,
    )


async def announce(
    execute: Execute,
    st: Statements,
    row: Any,
    state: str,
    *,
    cursor_key: str | None,
    has_listeners: bool,
    emit: Emit,
    result: Any = None,
    retry_job_id: int | None = None,
    held_cursor: bool = True,
) -> None:
    """Send what ``row`` (a job: ``id``, ``queue``, ``method``, ``start_time``, ``end_time``) entering
    ``state`` sends, in the caller's transaction. A failure retried as job ``retry_job_id`` says so in its
    event's data."""
    states = st.parts.model.JobStates
    plan = announcement(
        states, state, cursor_key=cursor_key, has_listeners=has_listeners, held_cursor=held_cursor
    )
    if plan.event:
        name, data = finished_event(state, row, result=result, lost=state == states.LOST)
        if retry_job_id is not None:
            data["retry_job_id"] = retry_job_id
        await emit(name, data)
    if plan.finished_note:
        payload = channels.finished_payload(row.id, state)
        await execute(st.notify, {"channel": channels.FINISHED_CHANNEL, "payload": payload})
    if plan.successor_hint:
        await execute(st.outcomes.notify_successors, {"keys": [cursor_key]})


async def emit_to_listeners(
    session: SessionLike,
    st: Statements,
    enqueuer: Enqueuer,
    name: str,
    data: Any,
    *,
    now: datetime.datetime,
    trace: Any,
) -> list[QueuedJob]:
    """One job per enabled listener of event ``name`` (reference §11), in the session's transaction."""
    listeners = (await session.scalars(st.lookups.listeners_of, {"event": name})).all()
    stamp = now.replace(tzinfo=datetime.UTC).isoformat()
    columns = st.parts.job.c
    jobs = []
    for listener in listeners:
        try:  # rows written by other code (psycopg2_mq stores any queue string)
            check_queue_name(listener.queue)
        except ValueError as ex:
            log.warning("listener %s skipped for event %s: %s", listener.id, name, ex)
            continue
        event = {"name": name, "listener_id": listener.id, "now": stamp, "data": data}
        key = listener.context_arg_key
        collapse = bool(listener.collapse_on_cursor)
        resolver = None
        if collapse:
            args = {key: [event], **listener.args}
            resolver = _append_event(key, event)
        else:
            args = {key: event, **listener.args}
        call = validate_call(
            columns,
            listener.queue,
            listener.method,
            args,
            when=now + (listener.when or datetime.timedelta(0)),
            now=now,
            cursor_key=listener.cursor_key,
            collapse_on_cursor=collapse,
            conflict_resolver=resolver,
            listener_ids=[listener.id],
            trace=copy.deepcopy(trace),
        )
        jobs.append(await enqueuer.insert_or_join(session, call))
    return jobs


def _append_event(key: str, event: dict[str, Any]) -> Callable[[Any], None]:
    """The conflict resolver of a collapsing listener: the joined job's events list gets this event."""

    def resolve(job: Any) -> None:
        args = copy.deepcopy(job.args) if isinstance(job.args, dict) else {}
        events = args.setdefault(key, [])
        if isinstance(events, list):
            events.append(event)
            job.args = args

    return resolve


class Announcer:
    """:func:`announce` for the worker's own transactions (on an ``AsyncConnection``): events go through
    ``source_for(session)`` (the worker's ``mq_source_factory``, so a subclass may change ``emit_event``)."""

    def __init__(
        self,
        st: Statements,
        source_for: Callable[[AsyncSession], Any],
        clock: Callable[[], datetime.datetime],
    ) -> None:
        self._st = st
        self._source_for = source_for
        self._clock = clock

    async def emit(self, conn: AsyncConnection, name: str, data: dict[str, Any]) -> None:
        """Emit event ``name`` in ``conn``'s transaction."""
        async with AsyncSession(bind=conn) as session:
            await self._source_for(session).emit_event(name, data, now=self._clock())
            await session.flush()

    async def announce(
        self,
        conn: AsyncConnection,
        row: Any,
        state: str,
        cursor_key: str | None,
        *,
        result: Any = None,
        retry_job_id: int | None = None,
    ) -> None:
        """What ``row`` (a state change's returned row, with ``has_listeners``) entering ``state`` sends."""

        async def emit(name: str, data: dict[str, Any]) -> None:
            await self.emit(conn, name, data)

        await announce(
            conn.execute,
            self._st,
            row,
            state,
            cursor_key=cursor_key,
            has_listeners=row.has_listeners,
            emit=emit,
            result=result,
            retry_job_id=retry_job_id,
        )
