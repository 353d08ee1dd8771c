"""Which database errors are worth retrying, and the one loop that retries them."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["Backoff", "GiveUp", "Transactions", "is_retryable", "is_unique_violation", "retrying", "sqlstate"]

T = TypeVar("T")

log = logging.getLogger(__name__)

# Serialization failure, deadlock, unique violation (a claim race), and the server going away.
_RETRYABLE_STATES = {"40001", "40P01", "23505", "57P01", "57P02", "57P03", "55006", "53300"}


def sqlstate(ex: BaseException) -> str | None:
    """The SQLSTATE of a driver error, wrapped by SQLAlchemy or not."""
    seen: set[int] = set()
    current: BaseException | None = ex
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "sqlstate", None)
        if isinstance(code, str):
            return code
        current = getattr(current, "orig", None) or current.__cause__
    return None


def is_unique_violation(ex: BaseException) -> bool:
    return sqlstate(ex) == "23505"


def is_retryable(ex: BaseException) -> bool:
    """Lost connections, admin shutdowns, serialization failures, deadlocks and unique violations."""
    if isinstance(ex, sa.exc.DBAPIError) and ex.connection_invalidated:
        return True
    code = sqlstate(ex)
    if code is not None:
        return code in _RETRYABLE_STATES or code.startswith("08")
    if isinstance(ex, sa.exc.InterfaceError | sa.exc.OperationalError):
        return True
    # asyncpg raises these (unwrapped by SQLAlchemy in some paths) when the connection dies.
    cause: BaseException | None = ex
    while cause is not None:
        if isinstance(cause, OSError | ConnectionError | TimeoutError):
            return True
        name = type(cause).__name__
        if name in {"ConnectionDoesNotExistError", "InterfaceError", "ConnectionFailureError"}:
            return True
        cause = cause.__cause__
    return False


class Backoff:
    """Waits between attempts: ``intervals[attempt]`` (the last one for every later attempt), plus up to
    ``jitter`` seconds at random so workers that failed together do not retry together."""

    def __init__(self, intervals: Sequence[float], jitter: float = 0.0) -> None:
        self.intervals = list(intervals) or [1.0]
        self.jitter = jitter

    @property
    def cap(self) -> float:
        """The longest wait (before jitter)."""
        return self.intervals[-1]

    def __len__(self) -> int:
        return len(self.intervals)

    def delay(self, attempt: int) -> float:
        base = self.intervals[min(attempt, len(self.intervals) - 1)]
        return base + random.uniform(0, self.jitter)


#: ``give_up(failures_so_far, error)``: True to raise ``error`` instead of trying again.
GiveUp = Callable[[int, BaseException], bool]


async def retrying(
    op: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff,
    give_up: GiveUp,
    on_retry: Callable[[BaseException, int, float], None],
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> T:
    """``await op()`` until it returns. After a failure, ``give_up`` decides whether to raise; otherwise
    ``on_retry(error, attempt, delay)`` is told (to log it) and the next attempt waits ``delay``.

    The one backoff loop of aiomq: each caller's rule for giving up is its own (a claim tries a few times,
    recording an outcome tries until the worker stops, a first connection gives up on a bad URL at once).
    """
    attempt = 0
    while True:
        try:
            return await op()
        except Exception as ex:
            if give_up(attempt, ex):
                raise
            delay = backoff.delay(attempt)
            on_retry(ex, attempt, delay)
            attempt += 1
            await sleep(delay)


class Transactions:
    """Short transactions on the engine's pool, retried per ``backoff`` while retryable.

    Retries stop at shutdown (``stopping()``) unless asked otherwise: shutdown's own writes must still land.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        backoff: Backoff,
        is_retryable: Callable[[BaseException], bool],
        stopping: Callable[[], bool],
    ) -> None:
        self.engine = engine
        self._backoff = backoff
        self._is_retryable = is_retryable
        self._stopping = stopping

    async def run(
        self, what: str, op: Callable[[AsyncConnection], Awaitable[T]], *, while_stopping: bool = False
    ) -> T:
        """``op(conn)`` in a transaction; at most ``len(backoff)`` attempts."""

        async def attempt() -> T:
            async with self.engine.begin() as conn:
                return await op(conn)

        def give_up(failures: int, ex: BaseException) -> bool:
            stopped = self._stopping() and not while_stopping
            return failures + 1 >= len(self._backoff) or not self._is_retryable(ex) or stopped

        def on_retry(ex: BaseException, failures: int, delay: float) -> None:
            log.info("%s failed (%s); retry %d in %.1fs", what, ex, failures + 1, delay)

        return await retrying(attempt, backoff=self._backoff, give_up=give_up, on_retry=on_retry)
