"""Helpers with no import beyond the standard library, so the raw baselines' processes stay lean."""

from __future__ import annotations

import datetime
import os

__all__ = ["QUEUE", "SYNC_QUEUE", "peak_rss_kib", "plain_dsn", "rss_kib", "utcnow"]

#: The queue every scenario uses; the sync-handler scenario adds the second one.
QUEUE = "bench"
SYNC_QUEUE = "bench_sync"


def plain_dsn(url: str) -> str:
    """The ``postgresql://`` form asyncpg accepts, from a SQLAlchemy URL of any PostgreSQL driver."""
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme.startswith("postgres"):
        raise ValueError(f"not a PostgreSQL URL: {url!r}")
    return f"postgresql://{rest}"


def utcnow() -> datetime.datetime:
    """Now as a naive UTC datetime, as aiomq stores times."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


def rss_kib() -> int:
    """This process's resident set size now, in KiB (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def peak_rss_kib() -> int:
    """This process's peak RSS in KiB: ``VmHWM``, which starts afresh at ``exec``.

    ``getrusage().ru_maxrss`` would do on most systems, but Linux carries the parent's peak over fork and
    exec into it, so a child of a 60 MiB parent reports at least 60 MiB. Falls back to ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
