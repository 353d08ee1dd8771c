"""Fixtures: one PostgreSQL server per session, a fresh database per test (copied from a template)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aiomq import AsyncMQSource, AsyncMQWorker, make_default_model
from aiomq.model import Model
from aiomq.schema import create_schema
from aiomq.testing import TemplateDatabases
from aiomq.testing_server import create_database as _create_database
from aiomq.testing_server import drop_database as _drop_database
from aiomq.testing_server import run_blocking

from .pgserver import PgServer, PgUnavailable, start_pg_server

METADATA = sa.MetaData()
MODEL = make_default_model(METADATA)


def with_database(dsn: str, database: str) -> str:
    return sa.make_url(dsn).set(database=database).render_as_string(hide_password=False)


def asyncpg_url(dsn: str) -> str:
    return sa.make_url(dsn).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    # Not under pytest's basetemp: pytest prunes old basetemps, also those of a concurrent session.
    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="aiomq-test-pg-"))
    try:
        try:
            server = start_pg_server(data_dir)
        except PgUnavailable as ex:
            if os.environ.get("CI"):
                pytest.fail(f"no PostgreSQL for the tests: {ex}")
            pytest.skip(f"no PostgreSQL for the tests: {ex}")
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
def aiomq_server_url(pg_server: PgServer) -> str:
    """aiomq's pytest plugin (aiomq.testing) creates its databases on the suite's server."""
    return pg_server.dsn


@contextlib.contextmanager
def _template(pg_server: PgServer, prefix: str, fill: Callable[[str], Awaitable[None]]) -> Iterator[str]:
    """A session's template database, filled by ``fill(url)``, dropped at the end."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        await _create_database(pg_server.dsn, name)
        await fill(with_database(pg_server.dsn, name))

    asyncio.run(create())
    try:
        yield name
    finally:
        asyncio.run(_drop_database(pg_server.dsn, name))


@pytest.fixture(scope="session")
def template_db(pg_server: PgServer) -> Iterator[str]:
    """A database holding the schema; every test's database is a copy of it (as aiomq.testing's are)."""
    templates = TemplateDatabases()
    try:
        yield run_blocking(lambda: templates.template_for(pg_server.dsn, METADATA))
    finally:
        run_blocking(templates.drop_all)


@pytest.fixture(scope="session")
def upgraded_template_db(pg_server: PgServer) -> Iterator[str]:
    """psycopg2_mq 0.13.6's own schema, then what ``aiomq schema --create`` adds to it (DESIGN §1.2)."""

    def create_with_psycopg2_mq(url: str) -> None:
        import psycopg2_mq  # a test dependency; only this fixture needs it

        metadata = sa.MetaData()
        psycopg2_mq.make_default_model(metadata)
        engine = sa.create_engine(sa.make_url(url).set(drivername="postgresql+psycopg2"))
        try:
            metadata.create_all(engine)
        finally:
            engine.dispose()

    async def fill(url: str) -> None:
        await asyncio.to_thread(create_with_psycopg2_mq, url)
        engine = create_async_engine(asyncpg_url(url))
        try:
            created = await create_schema(engine, MODEL)
        finally:
            await engine.dispose()
        assert ("column", "priority", "mq_job") in created, created

    with _template(pg_server, "aiomq_tpl_up", fill) as name:
        yield name


@contextlib.asynccontextmanager
async def copied_database(pg_server: PgServer, template: str) -> AsyncIterator[str]:
    """A libpq URL of a fresh copy of ``template``, dropped afterwards."""
    name = f"aiomq_t_{uuid.uuid4().hex[:12]}"
    await _create_database(pg_server.dsn, name, template)
    try:
        yield with_database(pg_server.dsn, name)
    finally:
        await _drop_database(pg_server.dsn, name)


@pytest.fixture
async def database(pg_server: PgServer, template_db: str) -> AsyncIterator[str]:
    """A libpq URL of a fresh database with the schema, dropped after the test."""
    async with copied_database(pg_server, template_db) as url:
        yield url


@pytest.fixture
async def empty_database(pg_server: PgServer) -> AsyncIterator[str]:
    """A fresh database without the schema."""
    name = f"aiomq_e_{uuid.uuid4().hex[:12]}"
    await _create_database(pg_server.dsn, name)
    try:
        yield with_database(pg_server.dsn, name)
    finally:
        await _drop_database(pg_server.dsn, name)


@pytest.fixture
def model() -> Model:
    return MODEL


@pytest.fixture
async def engine(database: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(asyncpg_url(database), pool_size=20, max_overflow=10)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest.fixture
async def db(database: str) -> AsyncIterator[Any]:
    """A raw asyncpg connection to the test database, for assertions."""
    conn = await asyncpg.connect(database)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def source(engine: AsyncEngine, model: Model) -> AsyncMQSource:
    return AsyncMQSource(engine=engine, model=model)


class Clock:
    """An injectable naive-UTC clock, starting now, moved by hand."""

    def __init__(self) -> None:
        self.now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None, microsecond=0)

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, **kw: float) -> datetime.datetime:
        self.now += datetime.timedelta(**kw)
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def make_worker(engine: AsyncEngine, model: Model) -> AsyncIterator[Callable[..., AsyncMQWorker]]:
    """Build workers on the test database; any still running are stopped at teardown."""
    workers: list[AsyncMQWorker] = []

    def make(queues: dict[str, Any], **kw: Any) -> AsyncMQWorker:
        kw.setdefault("timeout", 5)
        kw.setdefault("retry_intervals", (0.05, 0.1, 0.2, 0.5))
        worker = AsyncMQWorker(engine=kw.pop("engine", engine), queues=queues, model=model, **kw)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        await worker.stop(timeout=5)
