"""The worker's dedicated asyncpg connection: LISTEN, the advisory lock that is its liveness, keepalive,
and the claims. (:mod:`aiomq.link` keeps one open, replacing it when it dies.)

Never taken from a pool: the session advisory lock ``(lock_key, lock_id)`` lives exactly as long as this
connection, and every other worker reads its absence from ``pg_locks`` as "this worker's jobs are lost".
Claims run here too, so a claim can only commit while the lock it stamps on the jobs is held.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import asyncpg

from .compiled import Compiled

__all__ = ["Listener", "set_client_keepalive"]

log = logging.getLogger(__name__)

# The server drops a silent peer after about 30 + 3 * 10 seconds, which releases a dead host's advisory
# lock (and so lets other workers mark its jobs lost) in about a minute instead of the kernel's 2 hours.
_KEEPALIVE_SETTINGS = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
}
# The claim and next-due statements walk one index per queue whatever their parameters, and planning
# them anew each time (PostgreSQL's choice for them) costs more than running them: about 0.2 ms a claim.
# JIT off: a generic plan's estimates (an unknown LIMIT, a whole backlog) can pass jit_above_cost, and
# compiling then costs tens of milliseconds for a statement that runs in well under one.
_PLAN_SETTINGS = {"plan_cache_mode": "force_generic_plan", "jit": "off"}


def set_client_keepalive(conn: Any) -> None:
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    except OSError:  # some transports (proxies, odd platforms) refuse; the server side still applies
        log.debug("could not set TCP keepalive on the listener socket", exc_info=True)


class Listener:
    """One connection: LISTENs on ``channels``, holds ``(lock_key, lock_id)``, reports its own death.

    ``on_notify(channel, payload)`` runs on the event loop for every notification; ``on_lost()`` runs once
    when the connection is gone (server shutdown, ``pg_terminate_backend``, network).
    """

    def __init__(
        self,
        *,
        dsn: str,
        channels: Iterable[str],
        lock_key: int,
        application_name: str,
        on_notify: Callable[[str, str], None],
        on_lost: Callable[[], None],
        try_lock: Compiled,
        keepalive: Compiled,
        json_deserializer: Callable[[str], Any] = json.loads,
    ) -> None:
        self._dsn = dsn
        self._channels = list(channels)
        self._lock_key = lock_key
        self._application_name = application_name
        self._on_notify = on_notify
        self._on_lost = on_lost
        self._json_deserializer = json_deserializer
        self._try_lock = try_lock
        self._keepalive = keepalive
        self._conn: Any = None
        self._deferred_settings: dict[str, str] = {}
        self.lock_id: int | None = None

    @property
    def alive(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def open(self, timeout: float = 10.0) -> int:
        """Connect, take a fresh advisory lock id, LISTEN. Returns the lock id."""
        conn = await self._connect(timeout)
        try:
            set_client_keepalive(conn)
            for type_name in ("json", "jsonb"):  # decoded as the engine decodes them
                await conn.set_type_codec(
                    type_name, encoder=str, decoder=self._json_deserializer, schema="pg_catalog"
                )
            lock_id = None
            for _ in range(3):
                candidate = random.randint(1, 2**31 - 1)
                params = {"lock_key": self._lock_key, "lock_id": candidate}
                if await conn.fetchval(self._try_lock.sql, *self._try_lock.args(params)):
                    lock_id = candidate
                    break
            if lock_id is None:
                raise RuntimeError("could not take a unique worker advisory lock after 3 attempts")
            for channel in self._channels:
                await conn.add_listener(channel, self._notified)
            conn.add_termination_listener(self._terminated)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn
        self.lock_id = lock_id
        return lock_id

    async def _connect(self, timeout: float) -> Any:
        settings = {**_KEEPALIVE_SETTINGS, **_PLAN_SETTINGS}
        name = {"application_name": self._application_name}
        try:
            return await asyncpg.connect(self._dsn, timeout=timeout, server_settings={**settings, **name})
        except asyncpg.ProtocolViolationError as ex:
            if "unsupported startup parameter" not in str(ex):
                raise
            # A pooler (PgBouncer) passes only a few startup parameters on. Behind one in session mode
            # the listener still has a session of its own (the worker's start-up proof checks that), so
            # connect without them and SET them once that is proven: SET on a pooled server session
            # would change it for the pooler's other clients.
            log.info("listener_dsn refused startup settings (%s): setting them after connecting", ex)
        self._deferred_settings = settings
        return await asyncpg.connect(self._dsn, timeout=timeout, server_settings=name)

    async def settle(self) -> None:
        """Apply the session settings a pooler refused at connect (a no-op otherwise)."""
        if not self._deferred_settings or not self.alive:
            return
        items = list(self._deferred_settings.items())
        calls = ", ".join(f"set_config(${2 * i + 1}, ${2 * i + 2}, false)" for i in range(len(items)))
        await self._conn.execute(f"SELECT {calls}", *[v for item in items for v in item])

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._on_notify(channel, payload)

    def _terminated(self, conn: Any) -> None:
        if conn is self._conn:
            log.warning("listener connection lost (lock_id=%s)", self.lock_id)
            self._on_lost()

    async def keepalive(self, timeout: float) -> bool:
        """One round trip; False (and the connection dropped) if it fails."""
        if not self.alive:
            return False
        try:
            await self._conn.fetchval(self._keepalive.sql, timeout=timeout)
        except Exception:
            log.warning("listener keepalive failed (lock_id=%s)", self.lock_id, exc_info=True)
            self.abort()
            return False
        return True

    async def fetch(self, sql: str, args: Sequence[Any]) -> list[Any]:
        """Run one statement (autocommit), return its rows; ``ConnectionError`` if the connection is gone."""
        if not self.alive:
            raise ConnectionError("the worker's listener connection is closed")
        rows: list[Any] = await self._conn.fetch(sql, *args)
        return rows

    async def probe(self, notify: Callable[[str, str], Any], timeout: float) -> bool:
        """True if a NOTIFY sent by ``notify(channel, payload)`` (another connection) arrives here."""
        channel = f"aiomq_probe_{random.getrandbits(64):016x}"
        arrived = asyncio.Event()

        def got(conn: Any, pid: int, ch: str, payload: str) -> None:
            arrived.set()

        await self._conn.add_listener(channel, got)
        try:
            await notify(channel, json.dumps({"probe": True}))
            try:
                await asyncio.wait_for(arrived.wait(), timeout)
            except TimeoutError:
                return False
            return True
        finally:
            if self.alive:
                await self._conn.remove_listener(channel, got)

    def abort(self) -> None:
        """Drop the connection at once (its advisory lock goes with it)."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        try:
            await conn.close(timeout=5)
        except Exception:
            conn.terminate()
