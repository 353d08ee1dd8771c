"""The ``mq.job_finished.<state>.<queue>.<method>`` events, emitted in the state change's transaction."""

from __future__ import annotations

import datetime
from typing import Any

__all__ = ["finished_event", "iso"]


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
