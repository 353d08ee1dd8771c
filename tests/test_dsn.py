"""Database URL handling, without a database (aiomq.dsn)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from aiomq.dsn import libpq_dsn, parse_database_url, redact, with_database
from aiomq.errors import UsageError


def test_libpq_dsn_from_an_sqlalchemy_url() -> None:
    url = "postgresql+asyncpg://u:p%40ss@h:5433/db?ssl=require&prepared_statement_cache_size=0&timeout=3"
    assert libpq_dsn(url) == "postgresql://u:p%40ss@h:5433/db?sslmode=require"
    assert libpq_dsn(sa.make_url("postgresql+asyncpg://u@h/db")) == "postgresql://u@h/db"
    assert (
        libpq_dsn("postgresql://u@h/db?sslmode=verify-full&ssl=x")
        == "postgresql://u@h/db?ssl=x&sslmode=verify-full"
    )


def test_with_database() -> None:
    assert with_database("postgresql://u:pw@h/a", driver="postgresql+asyncpg", database="b") == (
        "postgresql+asyncpg://u:pw@h/b"
    )
    assert with_database("postgresql+asyncpg://u@h/a", driver="postgresql") == "postgresql://u@h/a"


def test_libpq_urls_keep_libpq_meaning() -> None:
    db = parse_database_url("postgresql://u:pw@h:5/db?sslmode=require&connect_timeout=4")
    assert db.libpq
    assert db.connect_timeout == 4
    assert db.dsn == "postgresql://u:pw@h:5/db?sslmode=require"
    assert db.url.drivername == "postgresql+asyncpg"
    assert str(db) == "postgresql://u:***@h:5/db?sslmode=require"  # the timeout is the connect() argument
    assert parse_database_url("postgres://u@h/db?connect_timeout=0").connect_timeout == 10.0


def test_asyncpg_urls_keep_sqlalchemys_meaning() -> None:
    db = parse_database_url(" postgresql+asyncpg://u@h/db?ssl=require&timeout=2 ")
    assert not db.libpq
    assert db.connect_timeout == 2
    assert db.dsn == "postgresql://u@h/db?sslmode=require"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("", "empty"),
        ("mysql://u@h/db", "unsupported database URL scheme"),
        ("postgresql://u@h/db?connect_timeout=soon", "invalid connect_timeout"),
        ("::::", "invalid database URL"),
    ],
)
def test_bad_urls_are_usage_errors(raw: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_database_url(raw)


def test_redact() -> None:
    assert redact("postgresql://user:secret@host/db") == "postgresql://user:***@host/db"
    assert redact("postgresql://user@host/db") == "postgresql://user@host/db"
