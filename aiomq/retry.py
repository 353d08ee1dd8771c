"""Retry policies (DESIGN §7.1): how many runs a job gets, and how long it waits between them.

A job's policy travels in its trace (``aiomq_retry``), its run number too (``aiomq_attempt``), so every
process that reads the row (a second worker, a psycopg2_mq process, the dashboard) sees the same thing.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

__all__ = [
    "ATTEMPT_KEY",
    "RETRIED_BY_KEY",
    "RETRY_KEY",
    "TIMEOUT_KEY",
    "Policies",
    "Retry",
    "as_retry",
    "as_timeout",
    "attempt_of",
    "retry_of",
    "timeout_of",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Trace keys aiomq writes and reads.
RETRY_KEY = "aiomq_retry"
ATTEMPT_KEY = "aiomq_attempt"
RETRIED_BY_KEY = "aiomq_retried_by"
TIMEOUT_KEY = "aiomq_timeout"


@dataclasses.dataclass(frozen=True)
class Retry:
    """A retry policy: ``max_attempts`` runs in all (the first included); the wait before run n + 1 is
    ``min(backoff * factor ** (n - 1), max_backoff)`` seconds, scaled by a uniform factor in
    ``[1 - jitter, 1 + jitter]``."""

    max_attempts: int = 3
    backoff: float = 1.0
    factor: float = 2.0
    max_backoff: float = 3600.0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError(f"Retry.max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        for name, low in (("backoff", 0.0), ("factor", 1.0), ("max_backoff", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"Retry.{name} must be a finite number, got {value!r}")
            if value < low:
                raise ValueError(f"Retry.{name} must be >= {low:g}, got {value!r}")
        jitter = self.jitter
        if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter <= 1:
            raise ValueError(f"Retry.jitter must be a number from 0 to 1, got {jitter!r}")

    def wait(self, attempt: int) -> float:
        """Seconds to wait after run ``attempt`` (1 for the first) failed, before the next run."""
        base = min(self.backoff * self.factor ** (attempt - 1), self.max_backoff)
        if self.jitter:
            base *= random.uniform(1 - self.jitter, 1 + self.jitter)
        return base

    def runs_left(self, attempt: int) -> bool:
        """Whether a job whose run ``attempt`` failed gets another."""
        return attempt < self.max_attempts

    def to_trace(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_trace(cls, value: Any) -> Retry | None:
        """The policy stored in a trace; None (with a warning) for one that is not valid."""
        if not isinstance(value, Mapping):
            return None
        fields = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in value.items() if k in fields})
        except (TypeError, ValueError) as ex:
            log.warning("ignoring an invalid retry policy %r in a job's trace: %s", value, ex)
            return None


def as_retry(value: Retry | int | None, what: str = "retry") -> Retry | None:
    """``call(retry=...)``: a ``Retry``, an int n meaning ``Retry(max_attempts=n)``, or None."""
    if value is None or isinstance(value, Retry):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return Retry(max_attempts=value)
    raise TypeError(
        f"{what} must be a Retry, an int (the number of runs) or None, got {type(value).__name__}"
    )


def as_timeout(value: float | datetime.timedelta | None, what: str = "timeout") -> float | None:
    """Seconds, from a number or a timedelta; ``ValueError`` unless positive and finite."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(f"{what} must be seconds (a number) or a timedelta, got {type(value).__name__}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return seconds


def attempt_of(trace: Any) -> int:
    """The run number a trace records (1 when absent or not a positive integer)."""
    if trace is None:  # most jobs: no trace at all
        return 1
    value = trace.get(ATTEMPT_KEY) if isinstance(trace, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else 1


def retry_of(trace: Any) -> Retry | None:
    """The policy a job's trace carries, if any."""
    return Retry.from_trace(trace.get(RETRY_KEY)) if isinstance(trace, Mapping) else None


def timeout_of(trace: Any) -> float | None:
    """The timeout a job's trace carries, in seconds, if any (an invalid one is ignored)."""
    if trace is None:
        return None
    value = trace.get(TIMEOUT_KEY) if isinstance(trace, Mapping) else None
    try:
        return as_timeout(value)
    except (TypeError, ValueError):
        return None


class Policies:
    """The retry policy and timeout of each job: its own (from its trace), else the worker's for its queue
    (``retry`` and ``job_timeout``: one value for every queue, or a mapping from queue name)."""

    def __init__(
        self,
        queues: Iterable[str],
        *,
        retry: Retry | int | Mapping[str, Retry | int] | None = None,
        job_timeout: float | datetime.timedelta | Mapping[str, float | datetime.timedelta] | None = None,
    ) -> None:
        names = list(queues)
        self._retry = {q: r for q, r in _per_queue(names, retry, "retry", as_retry).items() if r is not None}
        timeouts = _per_queue(names, job_timeout, "job_timeout", as_timeout)
        self._timeout = {q: t for q, t in timeouts.items() if t is not None}

    def retry_for(self, queue: str, trace: Any) -> Retry | None:
        return retry_of(trace) or self._retry.get(queue)

    def timeout_for(self, queue: str, trace: Any) -> float | None:
        return timeout_of(trace) or self._timeout.get(queue)


def _per_queue(queues: list[str], value: Any, what: str, convert: Callable[[Any, str], T]) -> dict[str, T]:
    if not isinstance(value, Mapping):
        one = convert(value, what)
        return dict.fromkeys(queues, one)
    unknown = sorted(set(value) - set(queues))
    if unknown:
        raise ValueError(f"{what} names queues this worker does not serve: {', '.join(map(repr, unknown))}")
    return {q: convert(v, f"{what}[{q!r}]") for q, v in value.items()}
