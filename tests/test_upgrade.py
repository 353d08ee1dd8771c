"""Upgrading a database that psycopg2_mq (or aiomq 0.1) created: ``aiomq schema --upgrade`` prints what
``aiomq schema --create`` adds, ``--create`` adds it idempotently, the result is exactly aiomq's own schema,
and until then a worker refuses to start, naming what is missing and the command that adds it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext, SchemaMissingError
from aiomq.model import Model
from aiomq.schema import create_schema, upgrade_ddl

from .conftest import asyncpg_url
from .test_cli import cli, ok
from .test_schema import create_with_aiomq, create_with_psycopg2_mq, new_database, snapshot

__all__ = ["new_database"]  # a fixture, imported for these tests

NewDatabase = Callable[[], Awaitable[str]]


async def done(job: JobContext) -> str:
    return "done"


@pytest.fixture
async def p2_database(new_database: NewDatabase) -> str:
    """A database whose tables psycopg2_mq 0.13.6 created, with one of its jobs pending."""
    url = await new_database()
    await create_with_psycopg2_mq(url)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO mq_job (state, created_time, scheduled_time, queue, method, args, collapsible) "
            "VALUES ('pending', now() at time zone 'utc', now() at time zone 'utc', 'up', 'old', "
            "'{}'::jsonb, false)"
        )
    finally:
        await conn.close()
    return url


@pytest.fixture
async def p2_engine(p2_database: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(asyncpg_url(p2_database))
    try:
        yield engine
    finally:
        await engine.dispose()


async def test_a_worker_refuses_a_database_that_lacks_aiomqs_column(
    p2_engine: AsyncEngine, model: Model
) -> None:
    worker = AsyncMQWorker(
        engine=p2_engine, queues={"up": done}, model=model, timeout=1, retry_intervals=(0.05, 0.1)
    )
    with pytest.raises(SchemaMissingError) as info:
        await asyncio.wait_for(worker.run(), 10)
    assert (info.value.table, info.value.column) == ("mq_job", "priority")
    assert "column mq_job.priority does not exist" in str(info.value)
    assert "aiomq schema --create" in str(info.value)
    assert worker.get_status()["running"] is False


async def test_a_source_names_what_it_lacks(p2_engine: AsyncEngine, model: Model) -> None:
    source = AsyncMQSource(engine=p2_engine, model=model)
    # What psycopg2_mq's own rows allow goes on working: a plain call writes no aiomq column.
    queued = await source.call("up", "new", {"n": 1})
    assert queued.created
    with pytest.raises(SchemaMissingError, match=r"mq_job\.priority .*aiomq schema --create"):
        await source.get_job(queued.id)
    with pytest.raises(SchemaMissingError, match=r"mq_job\.priority .*aiomq schema --create"):
        await source.call("up", "urgent", priority=5)
    with pytest.raises(SchemaMissingError, match="aiomq_queue_pause") as info:
        await source.pause_queue("up")
    assert info.value.column is None


async def test_the_cli_worker_refuses_it_in_one_line(p2_database: str, tmp_path: Any) -> None:
    (tmp_path / "upjobs.py").write_text("async def done(job):\n    return 1\n\nQUEUES = {'up': done}\n")
    from .test_cli import cli_env, one_line_error

    proc = await cli(
        "worker", "upjobs:QUEUES", "--database-url", p2_database, env=cli_env(PYTHONPATH=str(tmp_path))
    )
    one_line_error(proc, 1, "column mq_job.priority does not exist", "aiomq schema --create")


async def test_upgrade_prints_the_ddl_and_create_applies_it(
    p2_database: str, p2_engine: AsyncEngine, model: Model, new_database: NewDatabase
) -> None:
    printed = ok(await cli("schema", "--upgrade", "--database-url", p2_database))
    assert "ALTER TABLE mq_job ADD COLUMN priority SMALLINT DEFAULT 0 NOT NULL;" in printed
    for made in (
        "CREATE TABLE aiomq_abort_request (",
        "CREATE TABLE aiomq_queue_pause (",
        "CREATE INDEX ix_aiomq_job_pending_priority ON mq_job",
        "CREATE INDEX ix_aiomq_job_pending_due ON mq_job",
        "CREATE INDEX ix_aiomq_job_cursor_updated_job ON mq_job_cursor",
        "CREATE INDEX ix_aiomq_job_pending_cursor_due ON mq_job",
    ):
        assert made in printed, made
    assert "CREATE TYPE" not in printed, "psycopg2_mq made the enum"
    assert "CREATE TABLE mq_job " not in printed
    assert printed == await upgrade_ddl(p2_engine, model), "the CLI prints what the library computes"
    assert ok(await cli("schema", "--upgrade", "--database-url", p2_database)) == printed, "changes nothing"

    out = ok(await cli("schema", "--create", "--database-url", p2_database))
    assert "added column mq_job.priority" in out
    assert "created table aiomq_queue_pause" in out
    assert "created index ix_aiomq_job_pending_priority on mq_job" in out
    assert ok(await cli("schema", "--create", "--database-url", p2_database)).startswith("nothing to create")
    assert ok(await cli("schema", "--upgrade", "--database-url", p2_database)).startswith("-- nothing to add")

    # Exactly aiomq's own schema now, down to the catalogs.
    fresh = await new_database()
    await create_with_aiomq(fresh)
    assert await snapshot(p2_database) == await snapshot(fresh)

    # psycopg2_mq's pending job got the default priority and runs on an aiomq worker.
    source = AsyncMQSource(engine=p2_engine, model=model)
    [old] = await source.find_jobs(method="old")
    assert (await source.get_job(old.id)).priority == 0
    worker = AsyncMQWorker(engine=p2_engine, queues={"up": done}, model=model, timeout=5)
    await worker.run_until_idle()
    assert (await source.get_job(old.id)).state == "completed"


async def test_printed_upgrade_runs_as_a_script(p2_database: str, new_database: NewDatabase) -> None:
    printed = ok(await cli("schema", "--upgrade", "--database-url", p2_database))
    conn = await asyncpg.connect(p2_database)
    try:
        await conn.execute(printed)
    finally:
        await conn.close()
    fresh = await new_database()
    await create_with_aiomq(fresh)
    assert await snapshot(p2_database) == await snapshot(fresh)


async def test_an_aiomq_0_1_database_is_upgraded(new_database: NewDatabase, model: Model) -> None:
    url = await new_database()
    await create_with_aiomq(url)
    conn = await asyncpg.connect(url)
    try:  # what aiomq 0.1 made: no priority, no pause table, no priority index, 0.1's cursor index
        await conn.execute("DROP TABLE aiomq_queue_pause")
        await conn.execute("ALTER TABLE mq_job DROP COLUMN priority")  # its index goes with it
        await conn.execute("DROP INDEX ix_aiomq_job_cursor_updated_job")
        await conn.execute("DROP INDEX ix_aiomq_job_pending_cursor_due")
        await conn.execute(
            "CREATE INDEX ix_aiomq_job_pending_cursor ON mq_job (cursor_key) "
            "WHERE state = 'pending' AND cursor_key IS NOT NULL"
        )
    finally:
        await conn.close()
    engine = create_async_engine(asyncpg_url(url))
    try:
        # Two creators at once (two services deploying together) take turns; both succeed.
        first, second = await asyncio.gather(create_schema(engine, model), create_schema(engine, model))
        made = sorted([*first, *second])
        assert made == [
            ("column", "priority", "mq_job"),
            ("drop index", "ix_aiomq_job_pending_cursor", "mq_job"),
            ("index", "ix_aiomq_job_cursor_updated_job", "mq_job_cursor"),
            ("index", "ix_aiomq_job_pending_cursor_due", "mq_job"),
            ("index", "ix_aiomq_job_pending_priority", "mq_job"),
            ("table", "aiomq_queue_pause", None),
        ]
        assert await create_schema(engine, model) == []
    finally:
        await engine.dispose()
    fresh = await new_database()
    await create_with_aiomq(fresh)
    mine, theirs = await snapshot(url), await snapshot(fresh)
    # Dropping a column leaves its attnum behind; everything else is the same.
    assert {k: v for k, v in mine.items() if k != "columns"} == {
        k: v for k, v in theirs.items() if k != "columns"
    }
    assert {(r[0], r[2], *r[3:]) for r in mine["columns"]} == {
        (r[0], r[2], *r[3:]) for r in theirs["columns"]
    }
