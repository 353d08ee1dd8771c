"""When the worker's loop wakes up next, as a pure function of what it is waiting for."""

from __future__ import annotations

import datetime

__all__ = ["sleep_delay"]


def sleep_delay(
    now: datetime.datetime,
    *,
    maintenance_in: float,
    next_due: datetime.datetime | None,
    next_schedule: datetime.datetime | None,
) -> float:
    """Seconds until the first of: the next maintenance (``maintenance_in`` seconds from now), the next due
    job (None when no slot is free or nothing is known to be due), the next schedule. May be negative
    (overdue); a hint or a finished job wakes the loop earlier."""
    delay = maintenance_in
    for when in (next_due, next_schedule):
        if when is not None:
            delay = min(delay, (when - now).total_seconds())
    return delay
