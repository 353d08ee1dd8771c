"""Behind a real PgBouncer in transaction mode (DESIGN §9): the engine through it, the listener direct.

This module overrides the ``engine`` fixture (and so ``source``) with an engine through a PgBouncer of
the suite's own, and ``make_worker`` so that workers' listeners go direct (``listener_dsn``). The tests
imported below then run again here, unchanged, through the pooler: enqueue, claims and finishes, cursors,
retries, schedules, events, pauses, pruning and ``wait_for_job``. PgBouncer runs with round-robin server
connections, so consecutive transactions of one client land on different server sessions and nothing
that relies on a session passes by luck. Skipped (saying why) where pgbouncer is not installed.
"""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext
from aiomq.model import Model
from aiomq.pooling import is_pooled
from aiomq.proof import check_session

from .conftest import asyncpg_url
from .dbhelpers import fetch_job
from .pgbouncer import PgBouncer, find_pgbouncer, start_pgbouncer
from .pgserver import PgServer

# The representative part of the suite, collected again in this module (with its fixtures).
from .test_call_many import test_calls_sharing_a_collapse_slot_join_the_first  # noqa: F401
from .test_events import test_listener_chain_runs_to_completion, test_worker_emits_job_finished_events  # noqa: F401
from .test_failures import (  # noqa: F401
    test_a_batch_of_failures_with_retries,
    test_a_failing_job_is_retried_with_backoff_and_the_chain_is_in_the_trace,
)
from .test_prune import test_a_worker_with_prune_after_prunes_at_each_maintenance  # noqa: F401
from .test_queues import test_a_paused_queue_keeps_its_jobs_while_the_others_run  # noqa: F401
from .test_schedules import test_worker_fires_a_due_schedule_once_without_backfill  # noqa: F401
from .test_source import (  # noqa: F401
    notes,
    test_collapse_joins_the_pending_job,
    test_engine_source_commits_each_method,
    test_wait_for_job_returns_at_once_for_a_finished_job,
    test_wait_for_job_times_out,
)
from .test_worker import (  # noqa: F401
    test_claim_order_scheduled_then_created,
    test_cursor_saved_on_success,
    test_next_job_on_cursor_starts_at_once,
    test_one_job_per_cursor_across_queues,
    test_results_and_error_results,
    test_two_workers_race_on_few_cursors,
)

MakeWorker = Callable[..., AsyncMQWorker]

#: What an asyncpg engine needs behind PgBouncer in transaction mode (README: Behind PgBouncer).
POOLED_CONNECT_ARGS: dict[str, Any] = {
    "statement_cache_size": 0,
    "prepared_statement_cache_size": 0,
    "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
}


@pytest.fixture(scope="session")
def bouncers(pg_server: PgServer) -> Iterator[Callable[..., PgBouncer]]:
    """``bouncers(pool_mode="transaction", **settings)``: a PgBouncer in front of the suite's server,
    started on first use and shared by the session."""
    if find_pgbouncer() is None:
        pytest.skip("PgBouncer is not installed (Debian: apt-get install pgbouncer)")
    base = pathlib.Path(tempfile.mkdtemp(prefix="aiomq-pgbouncer-"))
    base.chmod(0o755)  # PgBouncer runs as another user when the suite runs as root
    started: dict[tuple[Any, ...], PgBouncer] = {}

    def get(pool_mode: str = "transaction", **settings: Any) -> PgBouncer:
        key = (pool_mode, *sorted(settings.items()))
        if key not in started:
            started[key] = start_pgbouncer(
                pg_server.dsn, base / f"bouncer{len(started)}", pool_mode=pool_mode, **settings
            )
        return started[key]

    try:
        yield get
    finally:
        for bouncer in started.values():
            bouncer.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def engine(database: str, bouncers: Callable[..., PgBouncer]) -> AsyncIterator[AsyncEngine]:
    """The test database through PgBouncer in transaction mode."""
    url = asyncpg_url(bouncers().url(database))
    eng = create_async_engine(url, connect_args=POOLED_CONNECT_ARGS, pool_size=20, max_overflow=10)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest.fixture
async def make_worker(
    engine: AsyncEngine, model: Model, database: str
) -> AsyncIterator[Callable[..., AsyncMQWorker]]:
    """Workers on the pooled engine whose listeners go direct."""
    workers: list[AsyncMQWorker] = []

    def make(queues: dict[str, Any], **kw: Any) -> AsyncMQWorker:
        kw.setdefault("timeout", 5)
        kw.setdefault("retry_intervals", (0.05, 0.1, 0.2, 0.5))
        kw.setdefault("listener_dsn", database)
        worker = AsyncMQWorker(engine=kw.pop("engine", engine), queues=queues, model=model, **kw)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        await worker.stop(timeout=5)


async def echo(job: JobContext) -> Any:
    return {"echo": job.args}


async def test_the_engine_really_goes_through_pgbouncer(engine: AsyncEngine, db: Any) -> None:
    """Consecutive transactions of one pooled connection run on different server sessions: what the
    tests of this module run on is transaction pooling, not a session that happens to be kept."""

    async def hold() -> None:  # several transactions at once: PgBouncer opens several server sessions
        async with engine.begin() as conn:
            await conn.execute(sa.text("SELECT pg_sleep(0.2)"))

    await asyncio.gather(*(hold() for _ in range(3)))
    async with engine.connect() as conn:
        driver = (await conn.get_raw_connection()).driver_connection
        assert driver is not None
        pids = {await driver.fetchval("SELECT pg_backend_pid()") for _ in range(8)}
    assert len(pids) > 1, pids
    assert await db.fetchval("SELECT pg_backend_pid()") not in pids


async def test_many_calls_and_jobs_at_once(source: AsyncMQSource, make_worker: MakeWorker, db: Any) -> None:
    """Concurrent enqueues (one autocommit statement each), claims and batched finishes through the
    pooler, with server sessions shared between them."""
    jobs = await asyncio.gather(*(source.call("q", "m", {"i": i}) for i in range(60)))
    async with make_worker({"q": echo}, concurrency=8):
        done = await asyncio.gather(*(source.wait_for_job(j.id, timeout=30) for j in jobs))
    assert [info.state for info in done] == ["completed"] * 60
    assert [info.result for info in done] == [{"echo": {"i": i}} for i in range(60)]
    assert await db.fetchval("SELECT count(*) FROM mq_job WHERE state <> 'completed'") == 0


async def test_wait_for_job_polls_and_never_listens_through_the_pooler(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    """A LISTEN through transaction pooling would stay behind on a server session that other clients
    are handed next, and hear nothing itself: the pooled engine's waiters poll instead."""
    job = await source.call("q", "m", {"n": 2})
    waiting = asyncio.create_task(source.wait_for_job(job.id, timeout=30, poll_interval=0.1))
    await asyncio.sleep(0.3)  # the waiter has read the job a few times by now
    listening = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND query LIKE 'LISTEN %mq.job_finished%'"
    )
    assert listening == 0
    async with make_worker({"q": echo}):
        info = await waiting
    assert (info.state, info.result) == ("completed", {"echo": {"n": 2}})


@pytest.mark.parametrize(
    "settings",
    [
        {},  # PgBouncer refuses the listener's startup settings: it connects without them
        {
            "ignore_startup_parameters": "tcp_keepalives_idle,tcp_keepalives_interval,"
            "tcp_keepalives_count,plan_cache_mode,jit"
        },
    ],
    ids=["default", "ignoring-startup-settings"],
)
async def test_a_listener_through_transaction_pooling_is_refused_at_start(
    settings: dict[str, str],
    database: str,
    bouncers: Callable[..., PgBouncer],
    make_worker: MakeWorker,
    source: AsyncMQSource,
    db: Any,
) -> None:
    job = await source.call("q", "m")
    worker = make_worker({"q": echo}, listener_dsn=bouncers(**settings).url(database))
    with pytest.raises(ValueError, match="transaction or statement mode") as info:
        await asyncio.wait_for(worker.run(), 60)
    assert "listener_dsn" in str(info.value)
    assert worker.get_status()["running"] is False
    assert (await fetch_job(db, job.id))["state"] == "pending"


async def test_a_worker_on_a_pooled_engine_without_listener_dsn_is_refused_at_start(
    make_worker: MakeWorker, source: AsyncMQSource, db: Any
) -> None:
    """The mistake to expect: listener_dsn left out, so the listener follows the engine's URL into the
    pooler. The engine's open transaction pins a server session, and the listener is served by another."""
    job = await source.call("q", "m")
    worker = make_worker({"q": echo}, listener_dsn=None)
    with pytest.raises(ValueError, match="transaction or statement mode"):
        await asyncio.wait_for(worker.run(), 60)
    assert (await fetch_job(db, job.id))["state"] == "pending"


async def test_a_listener_through_transaction_pooling_is_refused_with_a_direct_engine(
    database: str, bouncers: Callable[..., PgBouncer], model: Model, db: Any
) -> None:
    """No engine transaction to pin a server session: the lock's holder or the NOTIFY probe tells."""
    direct = create_async_engine(asyncpg_url(database))
    try:
        worker = AsyncMQWorker(
            engine=direct,
            queues={"q": echo},
            model=model,
            listener_dsn=bouncers().url(database),
            retry_intervals=(0.05,),
        )
        with pytest.raises(ValueError, match="transaction or statement mode"):
            await asyncio.wait_for(worker.run(), 60)
    finally:
        await direct.dispose()


async def test_a_listener_through_session_pooling_works(
    database: str,
    bouncers: Callable[..., PgBouncer],
    make_worker: MakeWorker,
    source: AsyncMQSource,
    db: Any,
) -> None:
    """Session pooling gives the listener a session of its own: no false alarm. PgBouncer refuses the
    listener's startup settings, so they are SET once the session is proven."""
    listener_dsn = bouncers("session").url(database)
    job = await source.call("q", "m", {"n": 1})
    async with make_worker({"q": echo}, listener_dsn=listener_dsn) as worker:
        info = await source.wait_for_job(job.id, timeout=30)
        lock_id = worker.get_status()["lock_id"]
    assert info.result == {"echo": {"n": 1}}
    assert lock_id is not None


async def test_a_direct_listener_given_in_the_sqlalchemy_form_passes(
    database: str, make_worker: MakeWorker, source: AsyncMQSource
) -> None:
    """The proof looks at behaviour, not addresses: the direct listener of every test here passes (its
    URL and the engine's share nothing but the database name), in either form of URL."""
    job = await source.call("q", "m")
    async with make_worker({"q": echo}, listener_dsn=asyncpg_url(database)):
        assert (await source.wait_for_job(job.id, timeout=30)).state == "completed"


@pytest.mark.parametrize(
    ("connect_args", "pooled"),
    [({}, False), ({"statement_cache_size": 0}, True), ({"prepared_statement_cache_size": 0}, True)],
)
async def test_an_engine_with_its_statement_cache_off_is_taken_for_a_pooled_one(
    connect_args: dict[str, Any], pooled: bool, database: str
) -> None:
    engine = create_async_engine(asyncpg_url(database), connect_args=connect_args)
    try:
        assert await is_pooled(engine) is pooled
        assert await is_pooled(engine.execution_options(isolation_level="AUTOCOMMIT")) is pooled
    finally:
        await engine.dispose()


def test_check_session_names_what_it_saw() -> None:
    ok = {"listener": (10, "d"), "engine": (11, "d"), "holders": [(10, "d")]}
    check_session(**ok)  # type: ignore[arg-type]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"listener": (10, "other")}, r"same database \(listener_dsn reaches 'other', the engine 'd'\)"),
        ({"listener": (11, "d")}, r"server process \(11\) of the engine's open transaction"),
        ({"holders": []}, "does not see the worker's advisory lock"),
        ({"holders": [(12, "d")]}, "held by server process 12, but the listener's next statement ran in"),
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            check_session(**{**ok, **change})


async def test_pgbouncer_refuses_what_the_listener_sends_at_connect(
    database: str, bouncers: Callable[..., PgBouncer]
) -> None:
    """Why the listener connects again without its startup settings behind a pooler."""
    with pytest.raises(asyncpg.ProtocolViolationError, match="unsupported startup parameter"):
        await asyncpg.connect(bouncers().url(database), server_settings={"jit": "off"})
