"""Reading rows back for assertions, shared by the test modules."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["fetch_job"]


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
