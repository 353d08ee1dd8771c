"""Helpers for testing code that uses aiomq, on a real PostgreSQL, and a pytest plugin built on them.

Plain helpers (any test framework):

- :func:`temporary_database`: a fresh database with the queue's tables, dropped afterwards;
- :class:`RecordingHandler`: a handler that records the jobs it ran and returns a canned result;
- :func:`drain`: run every due job (and the follow-ups they cause), then return;
- :func:`wait_for_completed`: await a job and fail with its error result if it did not complete;
- :func:`hook_listener_statements`: fault injection around the statements a worker runs on its own
  connection, for tests that must order events exactly.

The pytest plugin (loaded automatically when aiomq is installed; ``pip install 'aiomq[testing]'`` brings
pytest-asyncio and an embedded PostgreSQL) provides the fixtures ``aiomq_server_url`` (from
``AIOMQ_TEST_SERVER_URL``; without it, a server the plugin starts once per test session: the embedded one,
else the system's PostgreSQL; override the fixture to use your own server), ``aiomq_metadata``,
``aiomq_model``, ``aiomq_database_url`` (a fresh copy of a template database per test), ``aiomq_engine``,
``aiomq_source`` and ``aiomq_worker`` (a factory; its workers are stopped at teardown).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .dsn import with_database
from .link import StatementHook
from .model import Model, make_default_model
from .records import JobContext, JobInfo
from .source import AsyncMQSource
from .testing_server import (
    PgServer,
    PgUnavailable,
    create_database,
    drop_database,
    run_blocking,
    start_local_server,
)
from .worker import AsyncMQWorker

__all__ = [
    "RecordingHandler",
    "TemplateDatabases",
    "drain",
    "hook_listener_statements",
    "temporary_database",
    "wait_for_completed",
]

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def temporary_database(
    server_url: str,
    *,
    metadata: sa.MetaData | None = None,
    prefix: str = "aiomq_test",
    template: str | None = None,
) -> AsyncIterator[str]:
    """Create a database on ``server_url`` (the user needs CREATEDB), as a copy of ``template`` if given,
    create ``metadata``'s tables in it (the queue's tables when ``metadata`` comes from
    ``make_default_model``), yield its ``postgresql+asyncpg://`` URL, and drop it afterwards, whatever is
    still connected."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin_url = with_database(server_url, driver="postgresql")
    await create_database(admin_url, name, template or "template0")
    url = with_database(server_url, driver="postgresql+asyncpg", database=name)
    try:
        if metadata is not None:
            await _create_tables(url, metadata)
        yield url
    finally:
        await drop_database(admin_url, name)


async def _create_tables(url: str, metadata: sa.MetaData) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
    finally:
        await engine.dispose()


class TemplateDatabases:
    """One template database per (server, metadata), made on first use, holding that metadata's tables:
    a test's database is a copy of it (``CREATE DATABASE ... TEMPLATE``), much faster than creating the
    tables each time. :meth:`drop_all` drops them."""

    def __init__(self) -> None:
        self._names: dict[tuple[str, int], tuple[str, sa.MetaData]] = {}

    async def template_for(self, server_url: str, metadata: sa.MetaData) -> str:
        """The name of the template database of ``metadata`` on ``server_url``."""
        key = (server_url, id(metadata))
        if key not in self._names:
            name = f"aiomq_tpl_{uuid.uuid4().hex[:12]}"
            async with contextlib.AsyncExitStack() as undo:
                await create_database(with_database(server_url, driver="postgresql"), name)
                undo.push_async_callback(drop_database, with_database(server_url, driver="postgresql"), name)
                engine = create_async_engine(
                    with_database(server_url, driver="postgresql+asyncpg", database=name)
                )
                try:
                    async with engine.begin() as conn:
                        await conn.run_sync(metadata.create_all)
                finally:
                    await engine.dispose()
                undo.pop_all()
            self._names[key] = (name, metadata)  # the metadata is kept so that its id stays unique
        return self._names[key][0]

    async def drop_all(self) -> None:
        for (server_url, _), (name, _) in self._names.items():
            try:
                await drop_database(with_database(server_url, driver="postgresql"), name)
            except (OSError, asyncpg.PostgresError) as ex:  # the server may be gone already
                log.warning("could not drop template database %s: %s", name, ex)
        self._names.clear()


class RecordingHandler:
    """A queue handler that records every job it runs (``jobs``) and returns ``result``.

    ``result`` may be a callable taking the job (sync); raise inside it to fail the job.
    """

    def __init__(self, result: Any = None) -> None:
        self.result = result
        self.jobs: list[JobContext] = []

    async def execute_job(self, job: JobContext) -> Any:
        self.jobs.append(job)
        if callable(self.result):
            return self.result(job)
        return copy.deepcopy(self.result)

    @property
    def calls(self) -> list[tuple[str, Any]]:
        """``(method, args)`` of each job run, in order."""
        return [(job.method, job.args) for job in self.jobs]


async def drain(worker: AsyncMQWorker) -> None:
    """Run every due job, including follow-ups (cursor successors, listener jobs), and return."""
    await worker.run_until_idle()


async def wait_for_completed(source: AsyncMQSource, job_id: int, *, timeout: float = 10) -> JobInfo:
    """Await the job; ``AssertionError`` with its result if it ended in any state but completed."""
    info = await source.wait_for_job(job_id, timeout=timeout, poll_interval=0.1)
    if info.state != source.model.JobStates.COMPLETED:
        raise AssertionError(f"job {job_id} ended {info.state}: {info.result!r}")
    return info


def hook_listener_statements(
    worker: AsyncMQWorker,
    *,
    before: Callable[[str], Awaitable[None]] | None = None,
    after: Callable[[str], Awaitable[None]] | None = None,
) -> Callable[[], None]:
    """Await ``before(sql)`` / ``after(sql)`` around each statement ``worker`` runs on its listener
    connection (the claim, the next-due query, adoption); the statement itself runs for real, so a test
    can kill a connection, commit a job or wait at an exact point. Returns a function that removes the
    hook. Raising from ``before`` makes the statement fail as a dead connection would."""

    async def hook(sql: str, run: Callable[[], Awaitable[list[Any]]]) -> list[Any]:
        if before is not None:
            await before(sql)
        rows = await run()
        if after is not None:
            await after(sql)
        return rows

    hooks: list[StatementHook] = worker._link.hooks
    hooks.append(hook)
    return lambda: hooks.remove(hook)


# ------------------------------------------------------------------------------------ pytest plugin

try:  # the plugin needs pytest and pytest-asyncio; the helpers above need neither
    import pytest
    import pytest_asyncio
except ImportError:  # pragma: no cover
    pass
else:
    _DEFAULT_METADATA = sa.MetaData()
    _DEFAULT_MODEL = make_default_model(_DEFAULT_METADATA)

    @pytest.fixture(scope="session")
    def aiomq_pg_server() -> Iterator[PgServer]:
        """A throwaway PostgreSQL for the whole test session, started on first use (when no
        ``AIOMQ_TEST_SERVER_URL`` is set): the embedded one of ``aiomq[testing]``, else the system's."""
        data_dir = pathlib.Path(tempfile.mkdtemp(prefix="aiomq-pytest-pg-"))
        try:
            try:
                server = start_local_server(data_dir)
            except PgUnavailable as ex:
                pytest.fail(f"aiomq's test fixtures need PostgreSQL. {ex}", pytrace=False)
            try:
                yield server
            finally:
                server.stop()
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)

    @pytest.fixture
    def aiomq_server_url(request: pytest.FixtureRequest) -> str:
        """A PostgreSQL server where tests may create databases: ``AIOMQ_TEST_SERVER_URL``, else the
        session's own (``aiomq_pg_server``). Override to use your own."""
        url = os.environ.get("AIOMQ_TEST_SERVER_URL")
        if url:
            return url
        server: PgServer = request.getfixturevalue("aiomq_pg_server")
        return server.dsn

    @pytest.fixture(scope="session")
    def aiomq_templates() -> Iterator[TemplateDatabases]:
        """The session's template databases; dropped at its end."""
        templates = TemplateDatabases()
        yield templates
        run_blocking(templates.drop_all)

    @pytest.fixture
    def aiomq_metadata() -> sa.MetaData:
        """The metadata holding the queue's tables (override with your own model's)."""
        return _DEFAULT_METADATA

    @pytest.fixture
    def aiomq_model() -> Model:
        return _DEFAULT_MODEL

    @pytest_asyncio.fixture
    async def aiomq_database_url(
        aiomq_server_url: str, aiomq_metadata: sa.MetaData, aiomq_templates: TemplateDatabases
    ) -> AsyncIterator[str]:
        """A fresh database with the queue's tables (a copy of the session's template), dropped after."""
        template = await aiomq_templates.template_for(aiomq_server_url, aiomq_metadata)
        async with temporary_database(aiomq_server_url, template=template) as url:
            yield url

    @pytest_asyncio.fixture
    async def aiomq_engine(aiomq_database_url: str) -> AsyncIterator[AsyncEngine]:
        engine = create_async_engine(aiomq_database_url)
        try:
            yield engine
        finally:
            await engine.dispose()

    @pytest.fixture
    def aiomq_source(aiomq_engine: AsyncEngine, aiomq_model: Model) -> AsyncMQSource:
        return AsyncMQSource(engine=aiomq_engine, model=aiomq_model)

    @pytest_asyncio.fixture
    async def aiomq_worker(
        aiomq_engine: AsyncEngine, aiomq_model: Model
    ) -> AsyncIterator[Callable[..., AsyncMQWorker]]:
        """``aiomq_worker(queues, **kw)`` builds a worker on the test database; stopped at teardown."""
        workers: list[AsyncMQWorker] = []

        def make(queues: dict[str, Any], **kw: Any) -> AsyncMQWorker:
            kw.setdefault("timeout", 5)
            worker = AsyncMQWorker(engine=aiomq_engine, queues=queues, model=aiomq_model, **kw)
            workers.append(worker)
            return worker

        yield make
        for worker in workers:
            await worker.stop(timeout=5)
