"""SyncMQSource against a real PostgreSQL (psycopg 3, and psycopg2 once): the rows, NOTIFYs and errors of
AsyncMQSource, compared by running the same calls through both sources on two fresh databases."""

from __future__ import annotations

import asyncio
import datetime
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from aiomq import AsyncMQSource, AsyncMQWorker, JobInfo, QueuedJob, Retry, SyncMQSource, channels
from aiomq.model import Model
from aiomq.testing import RecordingHandler, drain

from .conftest import asyncpg_url, copied_database
from .pgserver import PgServer
from .test_source import T0, Notifications, insert_listener, insert_schedule, put_in_state

#: Every table a source writes, in a stable order.
TABLES = ("mq_job", "mq_job_schedule_link", "mq_job_listener_link", "aiomq_abort_request")
QUEUES = ("mail", "q", "other")
Run = Callable[..., Awaitable[Any]]


def sync_engine(url: str, driver: str = "psycopg") -> sa.Engine:
    return sa.create_engine(sa.make_url(url).set(drivername=f"postgresql+{driver}"))


@pytest.fixture
def psycopg_engine(database: str) -> Iterator[sa.Engine]:
    engine = sync_engine(database)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def sync_source(psycopg_engine: sa.Engine, model: Model) -> SyncMQSource:
    return SyncMQSource(engine=psycopg_engine, model=model)


@pytest.fixture
async def other_database(pg_server: PgServer, template_db: str) -> AsyncIterator[str]:
    async with copied_database(pg_server, template_db) as url:
        yield url


async def scenario(run: Run, db: Any) -> list[Any]:
    """The same calls, whichever source ``run`` drives: every kind of enqueue and state change."""
    schedule, listener = await insert_schedule(db), await insert_listener(db)
    out: list[Any] = [
        await run("call", "mail", "welcome", {"user": 1}, now=T0, cursor_key="u1"),
        # joins the pending job on u1, moves it earlier (a NOTIFY) and lets a resolver change it
        await run(
            "call",
            "mail",
            "welcome",
            {"user": 1},
            now=T0,
            when=T0 - datetime.timedelta(minutes=1),
            cursor_key="u1",
            conflict_resolver=lambda job: setattr(job, "args", {"user": 1, "joined": True}),
        ),
        await run(
            "call",
            "mail",
            "digest",
            [1, 2],
            now=T0,
            when=datetime.timedelta(seconds=30),
            priority=5,
            retry=Retry(max_attempts=3),
            timeout=10,
            trace={"request": "r1"},
            job_kwargs={"worker": "w"},
        ),
        await run("call", "q", "m", now=T0, schedule_ids=[schedule], listener_ids=[listener]),
        await run("call", "other", "x", None, now=T0, cursor_key="k2", collapse_on_cursor=False),
    ]
    batch = [
        {"queue": "mail", "method": "a", "args": {"i": i}, "now": T0, "priority": i % 2} for i in range(3)
    ]
    batch += [
        {"queue": "mail", "method": "c", "cursor_key": "k", "now": T0},
        {
            "queue": "mail",
            "method": "c",
            "cursor_key": "k",
            "now": T0,
            "when": T0 - datetime.timedelta(seconds=5),
        },
        {"queue": "other", "method": "x", "now": T0, "when": T0 + datetime.timedelta(hours=1)},
        {"queue": "q", "method": "n", "now": T0, "listener_ids": [listener]},
    ]
    many: list[QueuedJob] = await run("call_many", batch)
    out.append(many)
    digest, plain = out[2].id, many[0].id
    await run("cancel_job", plain, now=T0)
    out.append(await run("retry_job", plain, now=T0))
    await run("abort_job", many[1].id, now=T0)
    await put_in_state(db, digest, "running")
    await run("abort_job", digest, now=T0)
    job = await run("get_job", out[0].id)
    out.append({c.key: getattr(job, c.key) for c in sa.inspect(job).mapper.column_attrs})
    out.append(await run("get_job", 10_000, raises=False))
    out.append(await run("find_jobs", queue="mail"))
    out.append(await run("find_jobs", state="canceled", limit=1))
    return out


async def tables(db: Any) -> dict[str, list[dict[str, Any]]]:
    return {t: [dict(r) for r in await db.fetch(f"SELECT * FROM {t} ORDER BY 1, 2")] for t in TABLES}


async def run_scenario(url: str, model: Model, run_for: Callable[[str], Awaitable[Run]]) -> Any:
    db = await asyncpg.connect(url)
    try:
        notes = Notifications(db)
        prefix = model.channel_prefix
        await notes.listen(
            *(channels.queue_channel(prefix, q) for q in QUEUES),
            channels.FINISHED_CHANNEL,
            channels.ABORT_CHANNEL,
        )
        results = await scenario(await run_for(url), db)
        await notes.settle()
        received = [note for note in notes.received if note[0] != "aiomq_test_sentinel"]
        return results, await tables(db), received
    finally:
        await db.close()


@pytest.mark.parametrize("mode", ["engine", "dbsession"])
async def test_sync_and_async_sources_write_the_same_rows_and_notifies(
    database: str, other_database: str, model: Model, mode: str
) -> None:
    """Engine sources, or sources on a session of the caller's (one committed transaction per step)."""
    engines: list[Any] = []

    async def async_run(url: str) -> Run:
        engine = create_async_engine(asyncpg_url(url))
        engines.append(engine)
        source = AsyncMQSource(engine=engine, model=model)

        async def step(name: str, *args: Any, **kw: Any) -> Any:
            if mode == "engine":
                return await getattr(source, name)(*args, **kw)
            async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
                return await getattr(AsyncMQSource(dbsession=session, model=model), name)(*args, **kw)

        return step

    async def sync_run(url: str) -> Run:
        engine = sync_engine(url)
        engines.append(engine)
        source = SyncMQSource(engine=engine, model=model)

        def step(name: str, *args: Any, **kw: Any) -> Any:
            if mode == "engine":
                return getattr(source, name)(*args, **kw)
            with Session(engine, expire_on_commit=False) as session, session.begin():
                return getattr(SyncMQSource(dbsession=session, model=model), name)(*args, **kw)

        return lambda name, *args, **kw: asyncio.to_thread(step, name, *args, **kw)

    try:
        async_results, async_rows, async_notes = await run_scenario(database, model, async_run)
        sync_results, sync_rows, sync_notes = await run_scenario(other_database, model, sync_run)
    finally:
        for engine in engines:
            result = engine.dispose()
            if result is not None:
                await result
    assert len(async_rows["mq_job"]) == 11
    assert async_rows["aiomq_abort_request"]
    assert async_rows["mq_job_listener_link"]
    for table in TABLES:
        assert len(sync_rows[table]) == len(async_rows[table]), table
        for sync_row, async_row in zip(sync_rows[table], async_rows[table], strict=True):
            for column, value in async_row.items():
                assert sync_row[column] == value, (table, async_row.get("id"), column)
    assert sync_notes == async_notes
    assert len(async_notes) >= 8  # queue hints, the joined job's move, cancels, the abort
    assert sync_results == async_results


# ---------------------------------------------------------------------------------------------- bad input

BAD_CALLS: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "queue name": (("no spaces", "m"), {}),
    "empty method": (("q", ""), {}),
    "args not JSON": (("q", "m", {"x": object()}), {}),
    "NUL in args": (("q", "m", {"x": "a\x00b"}), {}),
    "priority range": (("q", "m"), {"priority": 40_000}),
    "priority type": (("q", "m"), {"priority": 1.5}),
    "collapse without cursor": (("q", "m"), {"collapse_on_cursor": True}),
    "job_kwargs column": (("q", "m"), {"job_kwargs": {"state": "running"}}),
    "when type": (("q", "m"), {"when": "tomorrow"}),
    "trace with retry": (("q", "m"), {"trace": [1], "retry": 2}),
    "resolver": (("q", "m"), {"cursor_key": "k", "conflict_resolver": 3}),
}


def error_of(action: Callable[[], Any]) -> tuple[type[BaseException], str]:
    try:
        action()
    except Exception as ex:
        return type(ex), str(ex)
    raise AssertionError("no error")


async def async_error_of(action: Callable[[], Awaitable[Any]]) -> tuple[type[BaseException], str]:
    try:
        await action()
    except Exception as ex:
        return type(ex), str(ex)
    raise AssertionError("no error")


async def test_bad_input_raises_what_async_raises_and_writes_nothing(
    source: AsyncMQSource, sync_source: SyncMQSource, db: Any
) -> None:
    pending = await source.call("q", "m", now=T0)
    done = await source.call("q", "m", now=T0)
    await put_in_state(db, done.id, "completed")
    actions: dict[str, tuple[Callable[[], Awaitable[Any]], Callable[[], Any]]] = {
        name: (
            functools.partial(source.call, *args, **kw),
            functools.partial(sync_source.call, *args, **kw),
        )
        for name, (args, kw) in BAD_CALLS.items()
    }
    others: list[tuple[str, str, tuple[Any, ...], dict[str, Any]]] = [
        ("bad batch item", "call_many", ([{"queue": "q", "method": "m"}, {"queue": "q", "method": 5}],), {}),
        ("unknown batch key", "call_many", ([{"queue": "q", "method": "m", "nope": 1}],), {}),
        ("missing job", "cancel_job", (10_000,), {}),
        ("cancel a completed job", "cancel_job", (done.id,), {}),
        ("abort a completed job", "abort_job", (done.id,), {}),
        ("retry a missing job", "retry_job", (10_000,), {}),
        ("get a missing job", "get_job", (10_000,), {}),
        ("get for update", "get_job", (pending.id,), {"for_update": True}),
        ("bad state", "find_jobs", (), {"state": "sleeping"}),
        ("bad limit", "find_jobs", (), {"limit": 0}),
    ]
    for name, method, args, kw in others:
        actions[name] = (
            functools.partial(getattr(source, method), *args, **kw),
            functools.partial(getattr(sync_source, method), *args, **kw),
        )
    before = await tables(db)
    for name, (async_action, sync_action) in actions.items():
        expected = await async_error_of(async_action)
        assert await asyncio.to_thread(error_of, sync_action) == expected, name
    assert await tables(db) == before


def test_constructor_errors(psycopg_engine: sa.Engine, engine: AsyncEngine, model: Model) -> None:
    with pytest.raises(ValueError, match="exactly one of"):
        SyncMQSource(model=model)
    with Session(psycopg_engine) as session, pytest.raises(ValueError, match="exactly one of"):
        SyncMQSource(model=model, engine=psycopg_engine, dbsession=session)
    with pytest.raises(ValueError, match="sync\\) Engine"):
        SyncMQSource(model=model, engine=engine)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sync\\) Session"):
        SyncMQSource(model=model, dbsession=object())  # type: ignore[arg-type]
    asyncpg_engine = sa.create_engine("postgresql+asyncpg://u@localhost/db")
    with pytest.raises(ValueError, match="sync PostgreSQL driver"):
        SyncMQSource(model=model, engine=asyncpg_engine)


def test_a_resolver_that_waits_for_the_loop_is_refused_and_changes_nothing(
    sync_source: SyncMQSource, psycopg_engine: sa.Engine
) -> None:
    first = sync_source.call("q", "m", {"n": 1}, cursor_key="k")

    async def waits(job: Any) -> None:
        job.args = {"n": 2}
        await asyncio.sleep(0)

    with pytest.raises(TypeError, match="sync callable"):  # refused before any SQL
        sync_source.call(
            "q", "m", cursor_key="k", when=datetime.timedelta(seconds=-5), conflict_resolver=waits
        )

    def returns_a_coroutine(job: Any) -> Any:  # not a coroutine function: found when it is called
        return waits(job)

    with pytest.raises(RuntimeError, match="sync callable"):
        sync_source.call(
            "q",
            "m",
            cursor_key="k",
            when=datetime.timedelta(seconds=-5),
            conflict_resolver=returns_a_coroutine,
        )
    job = sync_source.get_job(first.id)
    assert (job.args, job.scheduled_time) == ({"n": 1}, first.scheduled_time)


# ---------------------------------------------------------------------------------------------- sessions


def test_a_dbsession_source_writes_in_the_callers_transaction(
    psycopg_engine: sa.Engine, model: Model
) -> None:
    with Session(psycopg_engine) as session:
        with session.begin():
            queued = SyncMQSource(model=model, dbsession=session).call("q", "m", {"a": 1})
            job = SyncMQSource(model=model, dbsession=session).get_job(queued.id, for_update=True)
            assert job.state == "pending"
            session.rollback()
        source = SyncMQSource(model=model, dbsession=session)
        with session.begin():
            assert source.get_job(queued.id, raises=False) is None
            kept = source.call("q", "m", {"a": 2})
    assert SyncMQSource(model=model, engine=psycopg_engine).get_job(kept.id).args == {"a": 2}


async def test_psycopg2_jobs_are_run_by_an_aiomq_worker(
    database: str, source: AsyncMQSource, model: Model, db: Any
) -> None:
    engine = sync_engine(database, "psycopg2")
    try:
        sync = SyncMQSource(model=model, engine=engine)
        single = await asyncio.to_thread(sync.call, "mail", "welcome", {"user": 7}, cursor_key="user:7")
        joined = await asyncio.to_thread(sync.call, "mail", "welcome", {"user": 7}, cursor_key="user:7")
        batch = [{"queue": "mail", "method": "digest", "args": {"n": n}, "priority": n} for n in range(3)]
        many = await asyncio.to_thread(sync.call_many, batch)
        await asyncio.to_thread(sync.cancel_job, many[0].id)
        assert joined.id == single.id
        assert not joined.created
        handler = RecordingHandler(result="sent")
        await drain(AsyncMQWorker(engine=source.engine, queues={"mail": handler}, model=model))  # type: ignore[arg-type]
        assert sorted(handler.calls, key=repr) == [
            ("digest", {"n": 1}),
            ("digest", {"n": 2}),
            ("welcome", {"user": 7}),
        ]
        info = await source.wait_for_job(single.id, timeout=5)
        assert isinstance(info, JobInfo)
        assert info.result == "sent"
        found = await asyncio.to_thread(sync.find_jobs, queue="mail", state="canceled")
        assert [j.id for j in found] == [many[0].id]
    finally:
        engine.dispose()
