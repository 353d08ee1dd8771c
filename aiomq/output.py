"""What the ``aiomq`` command prints: a table of jobs, every column of one, the queues' statistics."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from .model import Model
from .queues import QueueStats
from .records import JobInfo

__all__ = ["format_age", "format_job", "format_jobs", "format_queue_stats"]


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


def format_age(age: datetime.timedelta | None) -> str:
    """A wait as a person reads it: ``0.4s``, ``2m05s``, ``3h12m``, ``2d03h``; ``-`` for none."""
    if age is None:
        return "-"
    seconds = age.total_seconds()
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def format_queue_stats(stats: Sequence[QueueStats]) -> str:
    """``aiomq queues``: one line per queue."""
    if not stats:
        return "no queues: no job and no pause in this database"
    header = ("QUEUE", "DUE", "LATER", "RUNNING", "LOST", "PAUSED", "OLDEST DUE")
    rows = [
        (
            _cell(s.queue, 60),
            f"{s.pending_due:,}",
            f"{s.pending_later:,}",
            f"{s.running:,}",
            f"{s.lost:,}",
            "paused" if s.paused else "-",
            format_age(s.oldest_due_age),
        )
        for s in stats
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {1, 2, 3, 4}  # counts line up on the right

    def line(row: Sequence[str]) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(cells)).rstrip()

    lines = [line(r) for r in [header, *rows]]
    lines.append("DUE and LATER are pending jobs; OLDEST DUE is how long the oldest due job has waited")
    return "\n".join(lines)
