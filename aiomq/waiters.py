"""wait_for_job: one LISTEN connection per engine serves every waiter of the process.

Workers send ``{"j": id, "s": state}`` on ``mq.job_finished`` in each finish transaction; a waiter also
re-reads the job every ``poll_interval`` seconds, so jobs finished by psycopg2_mq workers (which send no
such NOTIFY) and a lost connection cost latency, never a wrong answer.

The connection opens with the first waiter and stays open for :data:`LINGER` seconds after the last one
leaves, so a caller that waits for one job at a time (a test, a request handler) does not pay a new
connection per wait; it closes when the engine is disposed.

Waiters read their jobs on that same connection too, in batches: every read asked for while one runs goes
into the next single ``id = ANY($1)`` query. Fifty waiters woken by one burst of NOTIFYs then cost one
round trip rather than fifty pool checkouts and transactions. Without the connection (LISTEN failed, or
it dropped) waiters read through the engine's pool as before.

An engine behind a pooler in transaction mode (:mod:`aiomq.pooling`) gets no LISTEN: through the pooler
it would listen on a server session that other clients are handed next. Waiting then polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from .channels import FINISHED_CHANNEL, parse_finished
from .dsn import libpq_dsn
from .listener import set_client_keepalive
from .pooling import is_pooled

__all__ = ["HubRead", "wait_for_job"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds the LISTEN connection stays open after its last waiter left.
LINGER = 60.0

#: The ``application_name`` of the shared connection, as ``pg_stat_activity`` shows it.
APPLICATION_NAME = "aiomq wait_for_job"

#: Seconds a batched read may take before the connection is given up (waiters then read through the
#: pool, and the next ensure() reconnects).
READ_TIMEOUT = 5.0

#: Seconds after a failed connect before waiters try to connect again.
RECONNECT_AFTER = 10.0

_REGCLASS = "SELECT to_regclass($1)::oid"
_REGCLASS_TEXT = "SELECT to_regclass(:name)::oid"

#: A batched read that could not run (the connection broke): the waiter reads through the pool instead.
_FAILED: Any = object()


@dataclasses.dataclass(frozen=True)
class HubRead(Generic[T]):
    """How to read waited-for jobs on the hub's connection: ``sql`` takes one ``bigint[]`` of ids and
    returns rows with an ``id`` column; ``convert`` makes a row what the waiter returns."""

    sql: str
    convert: Callable[[Any], T]
    #: The table ``sql`` reads, as the engine names it: the hub reads on its own connection only when
    #: the name finds the same table there (its search path comes from the URL alone, not from the
    #: engine's ``connect_args``).
    table: str


class _Watch:
    """One waiter's job: set when its NOTIFY arrives."""

    __slots__ = ("job_id", "notified")

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self.notified = asyncio.Event()


class _Hub:
    """The shared connection of one engine on one event loop, opened on first use, closed with the last."""

    def __init__(self, dsn: str, json_deserializer: Callable[[str], Any]) -> None:
        self._dsn = dsn
        self._json_deserializer = json_deserializer
        self._conn: Any = None
        self._users = 0
        self._watches: dict[int, set[_Watch]] = {}
        self._lock = asyncio.Lock()
        self._closing: asyncio.TimerHandle | None = None
        self._wanted: dict[HubRead[Any], dict[int, list[asyncio.Future[Any]]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._failed_at = -math.inf  # when connecting last failed (loop time)
        self._discarded = False
        self._tables: dict[str, bool] = {}  # table name -> the same table as the engine's

    async def enter(self) -> None:
        self._users += 1
        if self._closing is not None:
            self._closing.cancel()
            self._closing = None
        await self.ensure()

    async def ensure(self) -> None:
        """Connect and LISTEN unless connected (again, after the connection broke). Never waits for
        another waiter's attempt, and tries at most every :data:`RECONNECT_AFTER` seconds after a
        failure: meanwhile waiters poll through the engine's pool."""
        if self._conn is not None and not self._conn.is_closed():
            return  # the common case: no lock, no round trip
        loop = asyncio.get_running_loop()
        if self._discarded or self._lock.locked() or loop.time() - self._failed_at < RECONNECT_AFTER:
            return
        async with self._lock:
            try:
                conn = await asyncpg.connect(
                    self._dsn, timeout=10, server_settings={"application_name": APPLICATION_NAME}
                )
                set_client_keepalive(conn)  # a peer gone silent (NAT, load balancer) is noticed
                for type_name in ("json", "jsonb"):  # decoded as the engine decodes them
                    await conn.set_type_codec(
                        type_name, encoder=str, decoder=self._json_deserializer, schema="pg_catalog"
                    )
                await conn.add_listener(FINISHED_CHANNEL, self._notified)
            except Exception as ex:  # waiting still works by polling
                self._failed_at = loop.time()
                log.warning("wait_for_job cannot LISTEN (%s); polling instead", ex)
                return
            if self._discarded:  # the engine was disposed meanwhile
                conn.terminate()
                return
            self._conn = conn

    async def usable(self, how: HubRead[Any], engine: AsyncEngine) -> bool:
        """Whether ``how.table`` names the same table on this connection as through ``engine`` (checked
        once per table)."""
        known = self._tables.get(how.table)
        if known is None:
            conn = self._conn
            if conn is None or conn.is_closed():
                return False
            try:
                here = await asyncio.wait_for(conn.fetchval(_REGCLASS, how.table), READ_TIMEOUT)
                async with engine.connect() as through_engine:
                    there = await through_engine.scalar(sa.text(_REGCLASS_TEXT), {"name": how.table})
            except Exception as ex:
                log.debug("wait_for_job cannot compare its table (%s); reading through the pool", ex)
                return False
            known = self._tables[how.table] = here is not None and here == there
            if not known:
                log.info(
                    "wait_for_job's connection sees another %s than the engine (connect_args?): "
                    "waiters read through the engine's pool",
                    how.table,
                )
        return known

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
            if self._reader is not None:  # a read for a waiter that left; let it end first
                await asyncio.wait([self._reader])
                if self._users > 0 or self._conn is None:  # a waiter came, or the engine went
                    return
            conn, self._conn = self._conn, None
            try:
                await conn.close(timeout=5)
            except Exception:
                conn.terminate()

    def discard(self) -> None:
        """The engine is disposed: drop the connection now (no await: called from the dispose)."""
        self._discarded = True
        if self._closing is not None:
            self._closing.cancel()
            self._closing = None
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                conn.terminate()
            except RuntimeError:  # its event loop is closed already: so is the connection's transport
                log.debug("wait_for_job's connection went with its event loop")

    def watch(self, job_id: int) -> _Watch:
        watch = _Watch(job_id)
        self._watches.setdefault(job_id, set()).add(watch)
        return watch

    def unwatch(self, watch: _Watch) -> None:
        watches = self._watches.get(watch.job_id)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[watch.job_id]

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            note = parse_finished(payload)
        except ValueError:
            log.debug("ignoring malformed %s payload %r", channel, payload)
            return
        for watch in self._watches.get(note.job_id, ()):
            watch.notified.set()

    async def read(self, how: HubRead[T], job_id: int) -> T | None:
        """The job read on this connection, batched with the other waiters' reads; None when no committed
        job has the id. ``_FAILED`` when there is no connection to read on."""
        if self._conn is None or self._conn.is_closed():
            return _FAILED  # type: ignore[no-any-return]
        future: asyncio.Future[T | None] = asyncio.get_running_loop().create_future()
        self._wanted.setdefault(how, {}).setdefault(job_id, []).append(future)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_all(), name="aiomq waiters read")
        return await future

    async def _read_all(self) -> None:
        while self._wanted:
            batch, self._wanted = self._wanted, {}
            for how, wanted in batch.items():
                conn = self._conn
                try:
                    rows = await asyncio.wait_for(conn.fetch(how.sql, list(wanted)), READ_TIMEOUT)
                    found = {row["id"]: how.convert(row) for row in rows}
                except Exception as ex:  # the waiters read through the pool instead
                    log.debug("wait_for_job's read failed (%s); reading through the pool", ex)
                    found, missing = {}, _FAILED
                    if isinstance(ex, TimeoutError) and conn is not None:
                        conn.terminate()  # a silent peer: a later ensure() connects afresh
                else:
                    missing = None
                for job_id, futures in wanted.items():
                    for future in futures:
                        if not future.done():
                            future.set_result(found.get(job_id, missing))


class _Polling(_Hub):
    """No LISTEN connection: its waiters poll."""

    def __init__(self) -> None:
        super().__init__("", json.loads)

    async def enter(self) -> None:
        return None

    async def ensure(self) -> None:
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
        deserializer = getattr(engine.dialect, "_json_deserializer", None) or json.loads
        hub = per_loop[loop] = _Hub(libpq_dsn(engine.url), deserializer)
    return hub


async def wait_for_job(
    engine: AsyncEngine,
    job_id: int,
    read: Callable[[], Awaitable[T | None]],
    is_done: Callable[[T], bool],
    *,
    timeout: float | None,
    poll_interval: float,
    hub_read: HubRead[T] | None = None,
) -> T:
    """Read the job (``hub_read`` on the shared connection when it is up, else ``read``) until
    ``is_done``; re-read on its finish NOTIFY and every ``poll_interval`` seconds."""
    if poll_interval <= 0:
        raise ValueError(f"poll_interval must be positive, got {poll_interval!r}")
    hub = _Polling() if await is_pooled(engine) else _hub(engine)
    await hub.enter()
    watch = hub.watch(job_id)
    info: T | None
    try:
        async with asyncio.timeout(timeout):
            while True:
                # Cleared before reading, so a NOTIFY that arrives during the read is not missed.
                watch.notified.clear()
                await hub.ensure()
                use_hub = hub_read is not None and await hub.usable(hub_read, engine)
                got: Any = await hub.read(hub_read, job_id) if use_hub and hub_read else _FAILED
                info = await read() if got is _FAILED else got  # _FAILED: no shared connection to read on
                if info is None:
                    raise LookupError("cannot find job (commit before waiting)", job_id)
                if is_done(info):
                    return info
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(watch.notified.wait(), poll_interval)
    except TimeoutError:
        raise TimeoutError(f"job {job_id} did not finish within {timeout} seconds") from None
    finally:
        hub.unwatch(watch)
        hub.leave()
