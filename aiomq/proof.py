"""At a worker's start: its listener connection is a PostgreSQL session of its own, on the engine's database.

The listener's LISTEN and its session advisory lock (the worker's liveness) only mean something on a
server session that lives as long as the connection. A pooler in transaction or statement mode (PgBouncer
``pool_mode=transaction``) runs each statement on whichever server connection is free: the lock stays
behind on a pooled server session, and notifications go to whoever holds that session next. So the worker
checks what it relies on, by behaviour rather than by host names or ports (a Docker port mapping or a
pooler in session mode is a session of its own, and passes):

1. The engine sees the worker's lock held by the very process that serves the listener's statements, in
   the engine's database. The engine's side runs inside one open transaction, which pins the engine's
   server session (through a pooler too), so a pooled listener cannot be served by the same process
   unnoticed; when it is, that alone proves pooling.
2. A NOTIFY sent through the engine arrives on the listener within :data:`PROBE_TIMEOUT` seconds.

Either failing is a ``ValueError`` naming what was seen; the worker does not start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from .compiled import Compiled
from .listener import Listener
from .sql import Statements

__all__ = ["PROBE_TIMEOUT", "check_session", "prove_session"]

#: How long the probe NOTIFY may take to arrive (it takes about a millisecond on a direct connection).
PROBE_TIMEOUT = 10.0

_NEEDS_SESSION = (
    "the listener (LISTEN and the session advisory lock that is the worker's liveness) needs a PostgreSQL "
    "session of its own: point listener_dsn at PostgreSQL directly or at a pooler in session mode; the "
    "engine may stay behind PgBouncer in transaction mode (README: Behind PgBouncer)"
)


def check_session(
    *,
    listener: tuple[int, str],
    engine: tuple[int, str],
    holders: Sequence[tuple[int, str | None]],
) -> None:
    """``ValueError`` unless ``listener`` (its process id and database) is a session of its own that holds
    the worker's lock, as the engine (``engine``: process id, database) sees the lock's ``holders``."""
    (listener_pid, listener_db), (engine_pid, engine_db) = listener, engine
    if listener_db != engine_db:
        raise ValueError(
            "the listener connection and the engine do not reach the same database "
            f"(listener_dsn reaches {listener_db!r}, the engine {engine_db!r})"
        )
    if listener_pid == engine_pid:
        raise ValueError(
            f"the listener's statements ran in the server process ({listener_pid}) of the engine's open "
            "transaction: listener_dsn goes through a connection pooler in transaction or statement "
            f"mode; {_NEEDS_SESSION}"
        )
    if not holders:
        raise ValueError(
            "the listener connection and the engine do not reach the same database: the engine does not "
            "see the worker's advisory lock (another server?)"
        )
    if listener_pid not in {pid for pid, _ in holders}:
        others = ", ".join(str(pid) for pid, _ in holders)
        raise ValueError(
            f"the worker's session advisory lock is held by server process {others}, but the listener's "
            f"next statement ran in process {listener_pid}: listener_dsn goes through a connection pooler "
            f"in transaction or statement mode; {_NEEDS_SESSION}"
        )


async def prove_session(listener: Listener, engine: AsyncEngine, st: Statements, *, lock_key: int) -> None:
    """Run both checks of the module's docstring on a freshly opened ``listener``; ``ValueError`` if not."""
    whoami = Compiled(st.claims.whoami, engine.dialect)

    async def check_then_notify(channel: str, payload: str) -> None:
        async with engine.begin() as conn:
            engine_row = (await conn.execute(st.claims.whoami)).one()
            rows: list[Any] = await listener.fetch(whoami.sql, whoami.args({}))
            params = {"lock_key": lock_key, "lock_id": listener.lock_id}
            holders = (await conn.execute(st.claims.lock_holders, params)).all()
            check_session(
                listener=(rows[0]["pid"], rows[0]["database"]),
                engine=(engine_row.pid, engine_row.database),
                holders=[(h.pid, h.database) for h in holders],
            )
            await conn.execute(st.notify, {"channel": channel, "payload": payload})

    if not await listener.probe(check_then_notify, timeout=PROBE_TIMEOUT):
        raise ValueError(
            f"a NOTIFY sent through the engine did not arrive on the listener within {PROBE_TIMEOUT:g} "
            "seconds: the listener connection and the engine do not reach the same database as one "
            f"session (a pooler in transaction or statement mode on listener_dsn?); {_NEEDS_SESSION}"
        )
