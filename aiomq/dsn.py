"""Database URLs: the SQLAlchemy form of the engine and the libpq form of asyncpg's own connections.

The worker's listener and ``wait_for_job``'s LISTEN connection are plain asyncpg connections, which take
libpq URLs; the engine takes ``postgresql+asyncpg://``. Every conversion between the two is here.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .errors import CliError, UsageError

__all__ = [
    "ASYNCPG_ONLY",
    "CONNECT_TIMEOUT",
    "DatabaseURL",
    "check_connection",
    "libpq_dsn",
    "make_engine",
    "one_line",
    "parse_database_url",
    "reason",
    "redact",
    "with_database",
]

CONNECT_TIMEOUT = 10.0

# Query keys of a SQLAlchemy asyncpg URL that are connect() arguments, not libpq settings: left in a
# libpq URL, asyncpg would send them to the server as (unknown) run-time settings.
ASYNCPG_ONLY = frozenset(
    {
        "prepared_statement_cache_size",
        "statement_cache_size",
        "max_cached_statement_lifetime",
        "max_cacheable_statement_size",
        "command_timeout",
        "timeout",
        "prepared_statement_name_func",
    }
)


def _libpq_query(query: dict[str, Any]) -> dict[str, Any]:
    """A SQLAlchemy asyncpg URL's query as libpq options: asyncpg-only keys dropped, ``ssl`` spelled
    ``sslmode``."""
    out = {k: v for k, v in query.items() if k not in ASYNCPG_ONLY}
    if "ssl" in out and "sslmode" not in out and isinstance(out["ssl"], str):
        out["sslmode"] = out.pop("ssl")
    return out


def libpq_dsn(url: str | sa.URL) -> str:
    """A URL asyncpg's connect() accepts: ``postgresql+asyncpg://`` becomes ``postgresql://``, password
    kept, SQLAlchemy's ``ssl`` spelled ``sslmode``, asyncpg-only options dropped."""
    if isinstance(url, str):
        url = sa.make_url(url)
    query = _libpq_query(dict(url.query))
    return url.set(drivername="postgresql", query=query).render_as_string(hide_password=False)


def with_database(url: str | sa.URL, *, driver: str, database: str | None = None) -> str:
    """``url`` with another driver (``postgresql``, ``postgresql+asyncpg``) and, given, another database."""
    parsed = sa.make_url(url).set(drivername=driver)
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


@dataclasses.dataclass(frozen=True)
class DatabaseURL:
    """A database URL in the two forms aiomq needs.

    ``url`` is the SQLAlchemy ``postgresql+asyncpg`` URL of the engine; ``dsn`` the libpq URL for asyncpg's
    own connections (the worker's listener). A libpq URL (``postgresql://``) is parsed by asyncpg itself,
    so its libpq query parameters (``sslmode``, ``host`` for a socket directory, ...) mean what they mean
    to psql; a ``postgresql+asyncpg://`` URL keeps SQLAlchemy's meaning (``?ssl=require``).
    """

    url: sa.URL
    dsn: str
    libpq: bool
    connect_timeout: float

    def __str__(self) -> str:
        return self.url.set(drivername="postgresql").render_as_string(hide_password=True)


def redact(raw: str) -> str:
    """A URL string with its password replaced by ``***``."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", raw)


def one_line(ex: BaseException) -> str:
    """An exception's text on one line, at most 500 characters."""
    text = " ".join(str(ex).split())
    return text[:500] if text else type(ex).__name__


def parse_database_url(raw: str) -> DatabaseURL:
    """Accept ``postgresql://`` (libpq), ``postgres://`` and ``postgresql+asyncpg://`` URLs.

    ``UsageError`` (a ``CliError``) names what is wrong with any other.
    """
    raw = raw.strip()
    if not raw:
        raise UsageError("the database URL is empty")
    try:
        url = sa.make_url(raw)
    except (sa.exc.ArgumentError, ValueError) as ex:
        raise UsageError(
            f"invalid database URL {redact(raw)!r} ({one_line(ex)}): "
            "expected postgresql://user:password@host:port/database"
        ) from ex
    backend, _, driver = url.drivername.partition("+")
    if backend not in ("postgresql", "postgres"):
        raise UsageError(
            f"unsupported database URL scheme {url.drivername!r}: "
            "use postgresql://... or postgresql+asyncpg://..."
        )
    # Another driver's URL (a psycopg2_mq configuration) carries libpq parameters: read it as libpq.
    libpq = driver != "asyncpg"
    query = dict(url.query)
    timeout = CONNECT_TIMEOUT
    key = "connect_timeout" if libpq else "timeout"
    if key in query:
        try:
            timeout = float(str(query[key])) or CONNECT_TIMEOUT  # libpq: 0 means "wait forever"
        except ValueError:
            raise UsageError(f"invalid {key} in the database URL: {query[key]!r}") from None
    if libpq:
        # asyncpg would send connect_timeout to the server as a setting; it is the connect timeout here.
        query.pop("connect_timeout", None)
        dsn_query = query
    else:
        dsn_query = _libpq_query(query)
    engine_url = url.set(drivername="postgresql+asyncpg", query=query)
    dsn = url.set(drivername="postgresql", query=dsn_query).render_as_string(hide_password=False)
    return DatabaseURL(url=engine_url, dsn=dsn, libpq=libpq, connect_timeout=timeout)


def make_engine(db: DatabaseURL, **kw: Any) -> AsyncEngine:
    """An asyncpg engine on ``db``, failing within ``db.connect_timeout`` when the server does not answer."""
    if db.libpq:

        async def connect() -> Any:
            return await asyncpg.connect(db.dsn, timeout=db.connect_timeout)

        return create_async_engine(db.url, async_creator=connect, **kw)
    connect_args = {} if "timeout" in db.url.query else {"timeout": db.connect_timeout}
    return create_async_engine(db.url, connect_args=connect_args, **kw)


def reason(ex: BaseException) -> str:
    """The driver's own message of a database error, on one line."""
    orig = ex.orig if isinstance(ex, sa.exc.DBAPIError) and ex.orig is not None else ex
    return one_line(orig)


async def check_connection(engine: AsyncEngine, db: DatabaseURL) -> None:
    """Connect once, so an unreachable server is one clear error instead of the worker's retries."""
    try:
        async with engine.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
    except Exception as ex:  # refused, unknown host, bad credentials, bad URL parameters: "cannot connect"
        raise CliError(f"cannot connect to the database {db}: {reason(ex)}") from ex
