"""Whether an engine's transactions may each run on another server session (a pooler in transaction mode).

Behind PgBouncer in ``pool_mode=transaction`` asyncpg must run with its statement cache off
(``statement_cache_size=0``, and SQLAlchemy's ``prepared_statement_cache_size=0``): a prepared statement
lives in one server session, and the next transaction may get another. aiomq reads that setting as "this
engine is pooled" and then relies on no session on it: no statement outside a transaction through
SQLAlchemy (which prepares, then executes, in two round trips a pooler may send to two server sessions),
no session advisory lock held across transactions, no LISTEN. A direct engine with its cache off is only
a little slower for it (a BEGIN and a COMMIT around a one-statement enqueue), never wrong.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["is_pooled", "statement_cache_off"]

log = logging.getLogger(__name__)

_known: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def statement_cache_off(dbapi_connection: Any) -> bool:
    """Whether a SQLAlchemy asyncpg connection (``raw.dbapi_connection``) has a statement cache off:
    asyncpg's own (``statement_cache_size=0``) or SQLAlchemy's (``prepared_statement_cache_size=0``)."""
    driver = getattr(dbapi_connection, "driver_connection", None)
    config = getattr(driver, "_config", None)  # asyncpg keeps connect()'s options there; no public getter
    asyncpg_off = getattr(config, "statement_cache_size", None) == 0
    sqlalchemy_off = getattr(dbapi_connection, "_prepared_statement_cache", False) is None
    return asyncpg_off or sqlalchemy_off


async def is_pooled(engine: AsyncEngine) -> bool:
    """Whether ``engine``'s statement cache is off (see the module's docstring); read once per pool, on
    one of its connections, then remembered."""
    pool = engine.sync_engine.pool  # shared by the engine's execution_options() copies
    known = _known.get(pool)
    if known is None:
        async with engine.connect() as conn:
            raw = await conn.get_raw_connection()
            known = _known[pool] = statement_cache_off(raw.dbapi_connection)
        if known:
            log.warning(  # a warning: a direct engine configured so loses wait_for_job's LISTEN
                "the engine on %s has its statement cache off: aiomq takes it for one behind a pooler in "
                "transaction mode (no statement outside a transaction, no session lock on it, and "
                "wait_for_job polls instead of LISTENing)",
                engine.url.render_as_string(hide_password=True),
            )
    return known
