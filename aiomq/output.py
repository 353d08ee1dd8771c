"""What the ``aiomq`` command prints about jobs: a table of many, every column of one."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from .model import Model
from .records import JobInfo

__all__ = ["format_job", "format_jobs"]


def _time(value: datetime.datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _cell(value: str | None, width: int = 32) -> str:
    if value is None:
        return "-"
    text = "".join(c if c.isprintable() else "?" for c in value)  # a newline would break the table
    return text if len(text) <= width else text[: width - 1] + "…"


def format_jobs(jobs: Sequence[JobInfo], *, limit: int | None = None) -> str:
    """A plain-text table, one job per line."""
    if not jobs:
        return "no jobs match"
    header = ("ID", "QUEUE", "METHOD", "STATE", "CURSOR", "SCHEDULED", "START", "END", "WORKER")
    rows = [
        (
            str(j.id),
            _cell(j.queue),
            _cell(j.method),
            j.state,
            _cell(j.cursor_key),
            _time(j.scheduled_time),
            _time(j.start_time),
            _time(j.end_time),
            _cell(j.worker, 40),
        )
        for j in jobs
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    more = f"; --limit {limit} reached" if limit is not None and len(jobs) >= limit else ""
    lines.append(f"{len(jobs)} job{'s' if len(jobs) != 1 else ''}, newest first; times in UTC{more}")
    return "\n".join(lines)


def format_job(row: Any, model: Model) -> str:
    """Every column of one job; JSON columns pretty-printed."""
    mapper = sa.inspect(model.Job)
    props = [(p.key, p.columns[0]) for p in mapper.column_attrs]
    width = max(len(key) for key, _ in props) + 2
    lines = []
    for key, column in props:
        value = getattr(row, key)
        if isinstance(column.type, sa.JSON):
            text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
            if "\n" in text:
                lines.append(f"{key}:")
                lines.extend("  " + line for line in text.splitlines())
                continue
        elif isinstance(value, datetime.datetime):
            text = value.isoformat(sep=" ")
        else:
            text = "-" if value is None else str(value)
        lines.append(f"{key + ':':<{width}}{text}")
    if row.start_time is not None and row.end_time is not None:
        lines.append(f"{'duration:':<{width}}{(row.end_time - row.start_time).total_seconds():.3f} s")
    return "\n".join(lines)
