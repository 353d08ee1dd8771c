"""The NOTIFY protocol: every channel aiomq uses, every payload, encoded and parsed here and nowhere else.

psycopg2_mq's payloads (reference §6), on the channel ``<prefix><queue>`` (``mq_<queue>`` by default):

- ``{"j": <job id>, "t": <epoch seconds>}``: a job of the queue is due at ``t`` (a new job, a job moved
  earlier, the next job of a freed cursor);
- ``{"s": null, "t": <epoch seconds>}``: the queue's schedules changed; the next one is due at ``t``.

aiomq's own, on ``mq.job_finished`` (the dot keeps it apart from every queue channel, whose names are
identifiers): ``{"j": <job id>, "s": "<state>"}``, sent in the transaction that finishes the job; it wakes
``wait_for_job``. On ``mq.job_abort``: ``{"j": <job id>}``, an abort request. On ``mq.queue_pause``:
``{"q": "<queue>", "p": true | false}``, a queue paused or resumed (DESIGN §7.6).

Times are whole seconds since the epoch of naive UTC datetimes, rounded down, as psycopg2_mq writes them.
The SQL builders here write the same payloads inside statements, so a statement and Python agree.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any, Literal

import sqlalchemy as sa

__all__ = [
    "ABORT_CHANNEL",
    "FINISHED_CHANNEL",
    "PAUSE_CHANNEL",
    "FinishedNote",
    "PauseNote",
    "QueueNote",
    "abort_payload",
    "epoch",
    "finished_payload",
    "finished_payload_sql",
    "from_epoch",
    "job_payload",
    "job_payload_sql",
    "parse_finished",
    "parse_pause",
    "parse_queue_note",
    "pause_payload",
    "queue_channel",
    "queue_channel_sql",
    "schedule_payload",
]

#: wait_for_job's channel.
FINISHED_CHANNEL = "mq.job_finished"
#: Workers LISTEN here for abort requests: ``{"j": <job id>}`` (aiomq's own; the dot as above).
ABORT_CHANNEL = "mq.job_abort"

#: Workers LISTEN here for queues paused and resumed (aiomq's own).
PAUSE_CHANNEL = "mq.queue_pause"

_EPOCH = datetime.datetime(1970, 1, 1)


def epoch(when: datetime.datetime) -> int:
    """Whole epoch seconds of a naive UTC datetime (rounded down, as ``floor(extract(epoch ...))``)."""
    return int((when - _EPOCH).total_seconds())


def from_epoch(seconds: float) -> datetime.datetime:
    """The naive UTC datetime of whole epoch seconds (a fraction is dropped)."""
    return _EPOCH + datetime.timedelta(seconds=int(seconds))


def queue_channel(prefix: str, queue: str) -> str:
    return f"{prefix}{queue}"


def queue_channel_sql(prefix: str, queue: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """:func:`queue_channel` inside a statement, for a queue column."""
    return sa.literal(prefix, sa.Text) + queue


def job_payload(job_id: int, when: datetime.datetime | int) -> str:
    """``{"j": id, "t": epoch}`` (``when`` as a datetime or as epoch seconds), byte for byte as
    psycopg2_mq's ``json.dumps`` writes it."""
    return json.dumps({"j": job_id, "t": when if isinstance(when, int) else epoch(when)})


def job_payload_sql(
    job_id: sa.ColumnElement[Any], when_epoch: sa.ColumnElement[Any]
) -> sa.ColumnElement[Any]:
    """:func:`job_payload` inside a statement: the same text, from the job's id and the epoch seconds."""
    return sa.func.concat('{"j": ', job_id, ', "t": ', when_epoch, "}")


def schedule_payload(when: datetime.datetime) -> str:
    """``{"s": null, "t": epoch}``: re-read the queue's schedules; the next one is due at ``when``."""
    return json.dumps({"s": None, "t": epoch(when)})


def abort_payload(job_id: int) -> str:
    return json.dumps({"j": job_id})


def finished_payload(job_id: int, state: str) -> str:
    return json.dumps({"j": job_id, "s": state})


def finished_payload_sql(
    job_id: sa.ColumnElement[Any], state: sa.ColumnElement[Any]
) -> sa.ColumnElement[Any]:
    """:func:`finished_payload` inside a statement (PostgreSQL's spacing; parsers read JSON, not bytes)."""
    return sa.cast(sa.func.json_build_object("j", job_id, "s", sa.cast(state, sa.Text)), sa.Text)


@dataclasses.dataclass(frozen=True, slots=True)
class QueueNote:
    """A parsed queue payload: ``kind`` is ``"job"`` (a job is due at ``when``), ``"schedule"`` (the
    queue's schedules changed; the next is due at ``when``) or ``"other"`` (neither key: ignored)."""

    when: datetime.datetime
    kind: Literal["job", "schedule", "other"]


def parse_queue_note(payload: str) -> QueueNote:
    """Parse a queue channel's payload; ``ValueError`` naming what is wrong with it."""
    try:
        data = json.loads(payload)
    except ValueError as ex:
        raise ValueError(f"not JSON ({ex})") from None
    if not isinstance(data, dict) or not isinstance(data.get("t"), int | float):
        raise ValueError("no numeric 't'")
    try:
        when = from_epoch(data["t"])
    except (OverflowError, ValueError) as ex:
        raise ValueError(f"'t' out of range ({ex})") from None
    if "j" in data:
        return QueueNote(when, "job")
    return QueueNote(when, "schedule" if "s" in data else "other")


@dataclasses.dataclass(frozen=True, slots=True)
class FinishedNote:
    job_id: int
    state: str | None


def parse_finished(payload: str) -> FinishedNote:
    """Parse a ``mq.job_finished`` (or ``mq.job_abort``) payload; ``ValueError`` if it is not one."""
    try:
        data = json.loads(payload)
    except ValueError as ex:
        raise ValueError(f"not JSON ({ex})") from None
    if not isinstance(data, dict) or isinstance(data.get("j"), bool) or not isinstance(data.get("j"), int):
        raise ValueError("no integer 'j'")
    state = data.get("s")
    return FinishedNote(data["j"], state if isinstance(state, str) else None)


def pause_payload(queue: str, paused: bool) -> str:
    return json.dumps({"q": queue, "p": paused})


@dataclasses.dataclass(frozen=True, slots=True)
class PauseNote:
    queue: str
    paused: bool


def parse_pause(payload: str) -> PauseNote:
    """Parse a ``mq.queue_pause`` payload; ``ValueError`` if it is not one."""
    try:
        data = json.loads(payload)
    except ValueError as ex:
        raise ValueError(f"not JSON ({ex})") from None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("q"), str)
        or not isinstance(data.get("p"), bool)
    ):
        raise ValueError("needs a string 'q' and a boolean 'p'")
    return PauseNote(data["q"], data["p"])
