"""Helpers for testing code that uses aiomq, on a real PostgreSQL, and a pytest plugin built on them.

Plain helpers (any test framework):

- :func:`temporary_database`: a fresh database with the queue's tables, dropped afterwards;
- :class:`RecordingHandler`: a handler that records the jobs it ran and returns a canned result;
- :func:`drain`: run every due job (and the follow-ups they cause), then return;
- :func:`wait_for_completed`: await a job and fail with its error result if it did not complete;
- :func:`hook_listener_statements`: fault injection around the statements a worker runs on its own
  connection, for tests that must order events exactly.

The pytest plugin (loaded automatically when aiomq is installed; needs pytest-asyncio) provides the
fixtures ``aiomq_server_url`` (from ``AIOMQ_TEST_SERVER_URL``; override it to use your own server),
``aiomq_metadata``, ``aiomq_model``, ``aiomq_database_url``, ``aiomq_engine``, ``aiomq_source`` and
``aiomq_worker`` (a factory; its workers are stopped at teardown).
"""

from __future__ import annotations

import contextlib
import copy
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .dsn import with_database
from .link import StatementHook
from .model import Model, make_default_model
from .records import JobContext, JobInfo
from .source import AsyncMQSource
from .worker import AsyncMQWorker

__all__ = [
    "RecordingHandler",
    "drain",
    "hook_listener_statements",
    "temporary_database",
    "wait_for_completed",
]


@contextlib.asynccontextmanager
async def temporary_database(
    server_url: str, *, metadata: sa.MetaData | None = None, prefix: str = "aiomq_test"
) -> AsyncIterator[str]:
    """Create a database on ``server_url`` (the user needs CREATEDB), create ``metadata``'s tables in it
    (the queue's tables when ``metadata`` comes from ``make_default_model``), yield its
    ``postgresql+asyncpg://`` URL, and drop it afterwards, whatever is still connected."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(with_database(server_url, driver="postgresql"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(server_url, driver="postgresql+asyncpg", database=name)
    try:
        if metadata is not None:
            engine = create_async_engine(url)
            try:
                async with engine.begin() as conn:
                    await conn.run_sync(metadata.create_all)
            finally:
                await engine.dispose()
        yield url
    finally:
        admin = await asyncpg.connect(with_database(server_url, driver="postgresql"))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


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

    @pytest.fixture
    def aiomq_server_url() -> str:
        """A PostgreSQL server where tests may create databases. Override to use your own."""
        url = os.environ.get("AIOMQ_TEST_SERVER_URL")
        if not url:
            pytest.skip("set AIOMQ_TEST_SERVER_URL or override the aiomq_server_url fixture")
        return url

    @pytest.fixture
    def aiomq_metadata() -> sa.MetaData:
        """The metadata holding the queue's tables (override with your own model's)."""
        return _DEFAULT_METADATA

    @pytest.fixture
    def aiomq_model() -> Model:
        return _DEFAULT_MODEL

    @pytest_asyncio.fixture
    async def aiomq_database_url(aiomq_server_url: str, aiomq_metadata: sa.MetaData) -> AsyncIterator[str]:
        """A fresh database with the queue's tables, dropped after the test."""
        async with temporary_database(aiomq_server_url, metadata=aiomq_metadata) as url:
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
