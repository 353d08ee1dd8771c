"""wait_for_job: one LISTEN connection per engine serves every waiter of the process.

Workers send ``{"j": id, "s": state}`` on ``mq.job_finished`` in each finish transaction; a waiter also
re-reads the job every ``poll_interval`` seconds, so jobs finished by psycopg2_mq workers (which send no
such NOTIFY) and a lost connection cost latency, never a wrong answer.

The connection opens with the first waiter and stays open for :data:`LINGER` seconds after the last one
leaves, so a caller that waits for one job at a time (a test, a request handler) does not pay a new
connection per wait; it closes when the engine is disposed.

An engine behind a pooler in transaction mode (:mod:`aiomq.pooling`) gets no LISTEN: through the pooler
it would listen on a server session that other clients are handed next. Waiting then polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from .channels import FINISHED_CHANNEL, parse_finished
from .dsn import libpq_dsn
from .pooling import is_pooled

__all__ = ["wait_for_job"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds the LISTEN connection stays open after its last waiter left.
LINGER = 60.0


class _Hub:
    """The shared connection of one engine on one event loop, opened on first use, closed with the last."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: Any = None
        self._users = 0
        self._watchers: dict[int, set[asyncio.Event]] = {}
        self._lock = asyncio.Lock()
        self._closing: asyncio.TimerHandle | None = None

    async def enter(self) -> None:
        self._users += 1
        if self._closing is not None:
            self._closing.cancel()
            self._closing = None
        if self._conn is not None and not self._conn.is_closed():
            return  # the common case: no lock, no round trip
        async with self._lock:
            if self._conn is not None and not self._conn.is_closed():
                return
            try:
                conn = await asyncpg.connect(self._dsn, timeout=10)
                await conn.add_listener(FINISHED_CHANNEL, self._notified)
            except Exception as ex:  # waiting still works by polling
                log.warning("wait_for_job cannot LISTEN (%s); polling instead", ex)
                return
            self._conn = conn

    def leave(self) -> None:
        self._users -= 1
        if self._users == 0 and self._conn is not None and self._closing is None:
            self._closing = asyncio.get_running_loop().call_later(LINGER, self._close_idle)

    def _close_idle(self) -> None:
        self._closing = None
        if self._users == 0:
            asyncio.get_running_loop().create_task(self._close(), name="aiomq wait_for_job close")

    async def _close(self) -> None:
        async with self._lock:
            if self._users > 0 or self._conn is None:
                return
            conn, self._conn = self._conn, None
            try:
                await conn.close(timeout=5)
            except Exception:
                conn.terminate()

    def discard(self) -> None:
        """The engine is disposed: drop the connection now (no await: called from the dispose)."""
        if self._closing is not None:
            self._closing.cancel()
            self._closing = None
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                conn.terminate()
            except RuntimeError:  # its event loop is closed already: so is the connection's transport
                log.debug("wait_for_job's connection went with its event loop")

    def watch(self, job_id: int) -> asyncio.Event:
        event = asyncio.Event()
        self._watchers.setdefault(job_id, set()).add(event)
        return event

    def unwatch(self, job_id: int, event: asyncio.Event) -> None:
        events = self._watchers.get(job_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._watchers[job_id]

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            note = parse_finished(payload)
        except ValueError:
            log.debug("ignoring malformed %s payload %r", channel, payload)
            return
        for event in self._watchers.get(note.job_id, ()):
            event.set()


class _Polling(_Hub):
    """No LISTEN connection: its waiters poll."""

    def __init__(self) -> None:
        super().__init__("")

    async def enter(self) -> None:
        return None

    def leave(self) -> None:
        return None


_hubs: weakref.WeakKeyDictionary[AsyncEngine, dict[asyncio.AbstractEventLoop, _Hub]] = (
    weakref.WeakKeyDictionary()
)


def _disposed(engine: AsyncEngine) -> Callable[[Any], None]:
    ref = weakref.ref(engine)

    def disposed(_: Any) -> None:
        engine = ref()
        for hub in (_hubs.pop(engine, {}) if engine is not None else {}).values():
            hub.discard()

    return disposed


_watched: weakref.WeakSet[AsyncEngine] = weakref.WeakSet()


def _hub(engine: AsyncEngine) -> _Hub:
    loop = asyncio.get_running_loop()
    if engine not in _watched:
        _watched.add(engine)
        sa.event.listen(engine.sync_engine, "engine_disposed", _disposed(engine))
    per_loop = _hubs.setdefault(engine, {})
    for other in [lp for lp in per_loop if lp.is_closed()]:
        per_loop.pop(other).discard()
    hub = per_loop.get(loop)
    if hub is None:
        hub = per_loop[loop] = _Hub(libpq_dsn(engine.url))
    return hub


async def wait_for_job(
    engine: AsyncEngine,
    job_id: int,
    read: Callable[[], Awaitable[T | None]],
    is_done: Callable[[T], bool],
    *,
    timeout: float | None,
    poll_interval: float,
) -> T:
    if poll_interval <= 0:
        raise ValueError(f"poll_interval must be positive, got {poll_interval!r}")
    hub = _Polling() if await is_pooled(engine) else _hub(engine)
    await hub.enter()
    try:
        async with asyncio.timeout(timeout):
            while True:
                # Watch before reading, so a NOTIFY sent between the read and the wait is not missed.
                event = hub.watch(job_id)
                try:
                    info = await read()
                    if info is None:
                        raise LookupError("cannot find job (commit before waiting)", job_id)
                    if is_done(info):
                        return info
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(event.wait(), poll_interval)
                finally:
                    hub.unwatch(job_id, event)
    except TimeoutError:
        raise TimeoutError(f"job {job_id} did not finish within {timeout} seconds") from None
    finally:
        hub.leave()
