"""Recurring schedules: RRULE arithmetic (RFC 5545, through dateutil), with no backfill."""

from __future__ import annotations

import datetime
from typing import Any

from dateutil import rrule as du_rrule

__all__ = ["check_rrule", "next_rrule_time"]


def _rule(rrule: str, dtstart: datetime.datetime) -> Any:
    # dateutil drops microseconds from dtstart itself; a DTSTART inside the text wins over dtstart.
    return du_rrule.rrulestr(rrule, dtstart=dtstart)


def check_rrule(rrule: object, dtstart: datetime.datetime) -> str:
    """``rrule`` if dateutil can parse it, else ``ValueError`` naming the problem."""
    if not isinstance(rrule, str) or not rrule.strip():
        raise ValueError(f"rrule must be a non-empty RFC 5545 RRULE string, got {rrule!r}")
    try:
        _rule(rrule, dtstart)
    except (ValueError, TypeError, KeyError) as ex:
        raise ValueError(f"invalid rrule {rrule!r}: {ex}") from ex
    return rrule


def next_rrule_time(
    rrule: str, dtstart: datetime.datetime, after: datetime.datetime
) -> datetime.datetime | None:
    """The first occurrence strictly after ``after`` (naive UTC), or None once the rule is exhausted.

    A ``DTSTART;TZID=...`` rule yields aware times: they are compared with ``after`` as UTC and returned
    as naive UTC.
    """
    rule = _rule(rrule, dtstart)
    try:
        found = rule.after(after, inc=False)
    except TypeError:  # the rule carries its own time zone
        found = rule.after(after.replace(tzinfo=datetime.UTC), inc=False)
    if found is None:
        return None
    if found.tzinfo is not None:
        found = found.astimezone(datetime.UTC).replace(tzinfo=None)
    return found  # type: ignore[no-any-return]
