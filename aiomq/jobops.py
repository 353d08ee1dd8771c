"""What a source does to jobs, in a session it is given: look them up, retry, cancel, abort, fail lost ones.

Written once, for both sources: ``AsyncMQSource`` awaits these on its ``AsyncSession``, ``SyncMQSource``
runs them on a sync session (:mod:`aiomq.sessions`). Arguments are checked before any SQL.
"""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

from . import channels
from .enqueue import Enqueuer, retry_call
from .events import announce, emit_to_listeners
from .model import all_states
from .records import JobInfo, QueuedJob, utcnow
from .serialize import dump_json
from .sessions import SessionLike
from .sql import Statements

__all__ = [
    "abort_job",
    "cancel_job",
    "check_for_update",
    "fail_lost_job",
    "find_jobs",
    "get_row",
    "job_filters",
    "retry_job",
]

log = logging.getLogger(__name__)


def check_for_update(for_update: bool, owns_transaction: bool, what: str = "job") -> None:
    """A row lock taken in a transaction of the source's own would be released at once."""
    if for_update and owns_transaction:
        raise ValueError(
            f"get_{what}(for_update=True) needs a dbsession source: "
            "an engine source would release the lock at once"
        )


async def get_row(
    session: SessionLike,
    cls: type[Any],
    what: str,
    row_id: int,
    *,
    for_update: bool,
    raises: bool,
    detach: bool,
) -> Any:
    """The ORM row ``row_id`` of ``cls`` (detached if ``detach``); if missing, ``LookupError`` or None."""
    row = await session.get(cls, row_id, with_for_update=for_update or None, populate_existing=True)
    if row is None:
        if raises:
            raise LookupError(f"cannot find {what}", row_id)
        return None
    if detach:
        session.expunge(row)
    return row


def job_filters(
    st: Statements,
    *,
    queue: str | None,
    method: str | None,
    state: str | None,
    cursor_key: str | None,
    limit: int,
) -> dict[str, Any]:
    """``find_jobs``'s arguments checked: the filters given."""
    states = all_states(st.parts.model.JobStates)
    if state is not None and state not in states:
        raise ValueError(f"unknown job state {state!r}; one of {', '.join(states)}")
    if not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")
    given = {"queue": queue, "method": method, "state": state, "cursor_key": cursor_key}
    return {k: v for k, v in given.items() if v is not None}


async def find_jobs(
    session: SessionLike, st: Statements, filters: dict[str, Any], limit: int
) -> list[JobInfo]:
    """Jobs matching every filter (from :func:`job_filters`), newest first."""
    rows = (await session.execute(st.lookups.find_jobs(filters), {**filters, "limit": limit})).all()
    return [JobInfo.from_row(r) for r in rows]


async def retry_job(
    session: SessionLike, st: Statements, enqueuer: Enqueuer, job_id: int, now: datetime.datetime
) -> QueuedJob:
    """Enqueue a new job like ``job_id`` (any state), at its original scheduled time."""
    job = await session.get(st.parts.model.Job, job_id)
    if job is None:
        raise LookupError("cannot find job", job_id)
    return await enqueuer.insert_or_join(session, retry_call(job, now))


async def cancel_job(
    session: SessionLike, st: Statements, enqueuer: Enqueuer, job_id: int, now: datetime.datetime
) -> None:
    """Cancel a ``pending`` or ``failed`` job; anything else raises ``RuntimeError``."""
    states = st.parts.model.JobStates
    job = await _locked(session, st, job_id)
    if job.state not in (states.PENDING, states.FAILED):
        raise RuntimeError("job is not in a valid state", job_id, job.state)
    await _cancel(session, st, enqueuer, job, now)


async def abort_job(
    session: SessionLike, st: Statements, enqueuer: Enqueuer, job_id: int, now: datetime.datetime
) -> None:
    """Cancel a ``pending`` job, or store an abort request for a ``running`` one and wake its worker."""
    states = st.parts.model.JobStates
    job = await _locked(session, st, job_id)
    if job.state == states.PENDING:
        await _cancel(session, st, enqueuer, job, now)
        return
    if job.state != states.RUNNING:
        raise RuntimeError("job is not pending or running", job_id, job.state)
    if st.aborts is None:
        raise RuntimeError("this model has no abort table (Model(AbortRequest=...))", job_id)
    await session.execute(st.aborts.request, {"job_id": job_id, "now": now})
    payload = channels.abort_payload(job_id)
    await session.execute(st.notify, {"channel": channels.ABORT_CHANNEL, "payload": payload})
    log.info("asked the worker running job %s to abort it", job_id)


async def fail_lost_job(
    session: SessionLike, st: Statements, enqueuer: Enqueuer, job_id: int, result: Any
) -> None:
    """Move a ``lost`` job to ``failed`` (freeing its cursor), optionally with a ``result``."""
    states = st.parts.model.JobStates
    result_json = None if result is None else dump_json(result, "result")
    job = await _locked(session, st, job_id)
    if job.state != states.LOST:
        raise RuntimeError("job is not in a lost state", job_id, job.state)
    job.state = states.FAILED
    if result_json is not None:
        job.result = json.loads(result_json)
    await session.flush()
    await _announce(session, st, enqueuer, job, states.FAILED, result=result)
    log.info("failed lost job %s", job_id)


async def _cancel(
    session: SessionLike, st: Statements, enqueuer: Enqueuer, job: Any, now: datetime.datetime
) -> None:
    canceled = st.parts.model.JobStates.CANCELED
    job.state = canceled
    if job.end_time is None:
        job.end_time = now
    await session.flush()
    await _announce(session, st, enqueuer, job, canceled, held_cursor=False)
    log.info("canceled job %s", job.id)


async def _announce(
    session: SessionLike,
    st: Statements,
    enqueuer: Enqueuer,
    job: Any,
    state: str,
    result: Any = None,
    held_cursor: bool = True,
) -> None:
    async def emit(name: str, data: dict[str, Any]) -> None:
        await emit_to_listeners(session, st, enqueuer, name, data, now=utcnow(), trace=None)

    await announce(
        session.execute,
        st,
        job,
        state,
        cursor_key=job.cursor_key,
        has_listeners=True,  # emit_to_listeners finds them, or none
        emit=emit,
        result=result,
        held_cursor=held_cursor,
    )


async def _locked(session: SessionLike, st: Statements, job_id: int) -> Any:
    job = await session.get(st.parts.model.Job, job_id, with_for_update=True, populate_existing=True)
    if job is None:
        raise LookupError("cannot find job", job_id)
    return job
