"""Reading rows back for assertions, shared by the test modules."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["fetch_job", "wait_for"]


async def fetch_job(db: Any, job_id: int) -> dict[str, Any]:
    """The job row, JSON columns decoded, plus whether ``result``/``cursor_snapshot`` are SQL NULL."""
    row = await db.fetchrow(
        "SELECT *, result IS NULL AS result_is_sql_null, cursor_snapshot IS NULL AS snapshot_is_sql_null "
        "FROM mq_job WHERE id = $1",
        job_id,
    )
    assert row is not None, f"no job {job_id}"
    out = dict(row)
    for column in ("args", "result", "cursor_snapshot", "trace"):
        if out[column] is not None:
            out[column] = json.loads(out[column])
    return out


async def wait_for(predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 5) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
