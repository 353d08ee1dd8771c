"""Worker lifecycle, liveness and failure handling against a real database (DESIGN §2, §4; reference §7).

Faults are injected the way production meets them: ``pg_terminate_backend`` on the worker's listener
connection (``application_name`` 'aiomq worker ...') or on the engine's pooled connections, advisory locks
taken and dropped by hand on the ``db`` connection, malformed NOTIFY payloads, and real signals to a worker
running in the main thread of a subprocess.
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import json
import logging
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext, SchemaMissingError
from aiomq.model import Model

from .conftest import asyncpg_url
from .pgserver import PgServer

MakeWorker = Callable[..., AsyncMQWorker]

LOCK_KEY = 1250360252
EPOCH = datetime.datetime(1970, 1, 1)


# ---------------------------------------------------------------------------------------------- helpers


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


async def wait_until(check: Callable[[], Any], *, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll ``check()`` (plain or async) until it is truthy; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def job_row(db: Any, job_id: int) -> Any:
    row = await db.fetchrow("SELECT * FROM mq_job WHERE id = $1", job_id)
    assert row is not None, f"job {job_id} does not exist"
    return row


async def wait_state(db: Any, job_id: int, state: str, *, timeout: float = 5.0) -> Any:
    """Wait until job ``job_id`` is in ``state``; return its row."""
    row: Any = None

    async def check() -> bool:
        nonlocal row
        row = await job_row(db, job_id)
        return bool(row["state"] == state)

    try:
        await wait_until(check, timeout=timeout, what=f"job {job_id} to be {state}")
    except AssertionError:
        raise AssertionError(f"job {job_id} is {row['state'] if row else None}, not {state}: {row}") from None
    return row


def loads(value: str | None) -> Any:
    return None if value is None else json.loads(value)


async def insert_job(
    db: Any,
    queue: str,
    *,
    method: str = "m",
    state: str = "pending",
    lock_id: int | None = None,
    worker: str | None = None,
    cursor_key: str | None = None,
    args: Any = None,
) -> int:
    """Insert a job row by hand, as another process would have left it."""
    now = utcnow() - datetime.timedelta(seconds=1)
    start = None if state == "pending" else now
    job_id = await db.fetchval(
        "INSERT INTO mq_job (state, created_time, scheduled_time, start_time, queue, method, args, trace, "
        "cursor_key, collapsible, lock_id, worker) "
        "VALUES ($1::mq_job_state, $2, $2, $3, $4, $5, $6::jsonb, 'null'::jsonb, $7, false, $8, $9) "
        "RETURNING id",
        state,
        now,
        start,
        queue,
        method,
        json.dumps({} if args is None else args),
        cursor_key,
        lock_id,
        worker,
    )
    return int(job_id)


async def enqueue_raw(db: Any, queue: str, *, method: str = "m", args: Any = None) -> int:
    """Enqueue with plain SQL and the reference's NOTIFY, bypassing the engine (whose pool we kill)."""
    async with db.transaction():
        job_id = await insert_job(db, queue, method=method, args=args)
        payload = {"j": job_id, "t": int((utcnow() - EPOCH).total_seconds())}
        await db.execute("SELECT pg_notify($1, $2)", f"mq_{queue}", json.dumps(payload))
    return job_id


async def listener_pids(db: Any) -> list[int]:
    """Backends of this test's database opened by a worker as its listener connection."""
    rows = await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'aiomq worker %'"
    )
    return [r["pid"] for r in rows]


async def pool_pids(db: Any) -> list[int]:
    """Client backends of this database that are neither a worker's listener nor the ``db`` connection."""
    rows = await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND backend_type = 'client backend' AND pid <> pg_backend_pid() "
        "AND coalesce(application_name, '') NOT LIKE 'aiomq worker %'"
    )
    return [r["pid"] for r in rows]


async def terminate(db: Any, pids: list[int]) -> None:
    for pid in pids:
        await db.fetchval("SELECT pg_terminate_backend($1)", pid)

    async def gone() -> bool:
        rows = await db.fetch("SELECT pid FROM pg_stat_activity WHERE pid = any($1::int[])", pids)
        return not rows

    await wait_until(gone, what=f"backends {pids} to exit")


async def holds_lock(db: Any, lock_id: int) -> bool:
    """Whether some session of this database holds the worker advisory lock (LOCK_KEY, lock_id)."""
    return bool(
        await db.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 2)",
            LOCK_KEY,
            lock_id,
        )
    )


async def worker_locks_in_db(db: Any) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND classid = $1::bigint::oid",
            LOCK_KEY,
        )
    )


async def start(worker: AsyncMQWorker) -> asyncio.Task[None]:
    """``run()`` as a task; returns once the worker holds its lock and LISTENs."""
    task = asyncio.create_task(worker.run())

    def ready() -> bool:
        if task.done():
            task.result()  # raise what run() raised
            raise AssertionError("run() returned before the worker was listening")
        status = worker.get_status()
        return status["lock_id"] is not None and bool(status["listener_connected"])

    await wait_until(ready, timeout=15, what="the worker to listen")
    return task


def lock_id_of(worker: AsyncMQWorker) -> int:
    lock_id = worker.get_status()["lock_id"]
    assert isinstance(lock_id, int)
    return lock_id


async def hold(event: asyncio.Event) -> None:
    """Block a handler until the test sets ``event``; bounded, so a failing test cannot hang in teardown."""
    await asyncio.wait_for(event.wait(), 10)


async def echo(job: JobContext) -> Any:
    return {"method": job.method, "args": job.args}


# ---------------------------------------------------------------------------------------------- lifecycle


async def test_async_with_returns_once_listening_and_leaving_stops(
    make_worker: MakeWorker, source: AsyncMQSource, db: Any
) -> None:
    ran: list[int] = []

    async def handler(job: JobContext) -> Any:
        ran.append(job.id)
        return job.args

    # timeout=60: no maintenance pass can pick the jobs up; only the NOTIFY hint (or the start-up pass)
    worker = make_worker({"q": handler}, timeout=60)
    async with worker:
        status = worker.get_status()
        assert status["running"] is True
        assert len(await listener_pids(db)) == 1
        assert await holds_lock(db, lock_id_of(worker))
        first = await source.call("q", "m", {"n": 1})  # committed right after entering
        row = await wait_state(db, first.id, "completed", timeout=3)
        assert loads(row["result"]) == {"n": 1}
        await asyncio.sleep(0.3)  # the worker is idle now: only the NOTIFY can wake it
        second = await source.call("q", "m", {"n": 2})
        await wait_state(db, second.id, "completed", timeout=2)
        lock_id = lock_id_of(worker)
    assert worker.get_status()["running"] is False
    assert ran == [first.id, second.id]
    await wait_until(lambda: _no_listener(db), what="the listener connection to close")
    assert not await holds_lock(db, lock_id)
    late = await source.call("q", "m", {"n": 3})
    await asyncio.sleep(0.3)
    assert (await job_row(db, late.id))["state"] == "pending"
    assert ran == [first.id, second.id]


async def _no_listener(db: Any) -> bool:
    return not await listener_pids(db)


async def test_run_task_and_shutdown_gracefully_returns_normally(
    make_worker: MakeWorker, source: AsyncMQSource, db: Any
) -> None:
    worker = make_worker({"q": echo}, timeout=60)
    task = await start(worker)
    job = await source.call("q", "m", {"a": 1})
    await wait_state(db, job.id, "completed")
    worker.shutdown_gracefully()
    worker.shutdown_gracefully()  # idempotent
    # timeout=60: if the wake-up were lost, run() would sleep a whole minute
    await asyncio.wait_for(task, 3)  # re-raises what run() raised
    assert worker.get_status()["running"] is False
    worker.shutdown_gracefully()  # still harmless once stopped
    await worker.stop()
    await wait_until(lambda: _no_listener(db), what="the listener connection to close")


async def test_shutdown_gracefully_from_another_thread(
    make_worker: MakeWorker, source: AsyncMQSource, db: Any
) -> None:
    worker = make_worker({"q": echo}, timeout=60)
    task = await start(worker)
    job = await source.call("q", "m")
    await wait_state(db, job.id, "completed")
    errors: list[BaseException] = []

    def from_thread() -> None:
        try:
            worker.shutdown_gracefully()
            worker.shutdown_gracefully()
        except BaseException as ex:  # pragma: no cover - reported below
            errors.append(ex)

    thread = threading.Thread(target=from_thread)
    thread.start()
    await asyncio.to_thread(thread.join, 5)
    assert not thread.is_alive()
    assert errors == []
    await asyncio.wait_for(task, 3)  # re-raises what run() raised
    assert worker.get_status()["running"] is False


async def test_shutdown_releases_mq_lock_rows_and_advisory_lock(make_worker: MakeWorker, db: Any) -> None:
    worker = make_worker({"q": echo}, name="w-locks", timeout=60)
    task = await start(worker)
    lock_id = lock_id_of(worker)
    assert await holds_lock(db, lock_id)
    # rows this worker owns (by its lock id), and one owned by another live worker (our db connection)
    other_lock = 777_001 if lock_id != 777_001 else 777_002
    await db.execute("SELECT pg_advisory_lock($1::int4, $2::int4)", LOCK_KEY, other_lock)
    await db.execute(
        "INSERT INTO mq_lock (ns, key, lock_id, worker) VALUES "
        "('queue-schedules', 'elsewhere', $1, 'w-locks'), ('aiomq-test', 'mine', $1, 'w-locks'), "
        "('aiomq-test', 'theirs', $2, 'other-worker')",
        lock_id,
        other_lock,
    )
    worker.shutdown_gracefully()
    await asyncio.wait_for(task, 5)
    assert await db.fetchval("SELECT count(*) FROM mq_lock WHERE lock_id = $1", lock_id) == 0
    assert await db.fetchval("SELECT key FROM mq_lock WHERE lock_id = $1", other_lock) == "theirs"
    await wait_until(lambda: _lock_released(db, lock_id), what="the worker's advisory lock to go")
    assert not await listener_pids(db)


async def _lock_released(db: Any, lock_id: int) -> bool:
    return not await holds_lock(db, lock_id)


async def test_graceful_shutdown_finishes_in_flight_and_claims_nothing_new(
    make_worker: MakeWorker, source: AsyncMQSource, db: Any
) -> None:
    """Reference §7.5: jobs in flight finish and are recorded; pending jobs stay pending."""
    release = asyncio.Event()
    sync_release = threading.Event()

    async def async_handler(job: JobContext) -> str:
        await hold(release)
        return "async done"

    def sync_handler(job: JobContext) -> str:
        sync_release.wait(5)
        return "sync done"

    worker = make_worker({"a": async_handler, "b": sync_handler}, concurrency=2, timeout=60)
    task = await start(worker)
    try:
        ja = await source.call("a", "m")
        jb = await source.call("b", "m")
        await wait_state(db, ja.id, "running")
        await wait_state(db, jb.id, "running")
        waiting = await source.call("a", "waiting")  # no free slot: stays pending
        await asyncio.sleep(0.2)
        assert (await job_row(db, waiting.id))["state"] == "pending"

        worker.shutdown_gracefully()
        assert worker.get_status()["running"] is False
        after = await source.call("a", "after")  # enqueued (and NOTIFYed) after the shutdown request
        await asyncio.sleep(0.3)
        assert not task.done(), "run() returned while jobs were still in flight"
        assert (await job_row(db, ja.id))["state"] == "running"
        assert (await job_row(db, jb.id))["state"] == "running"

        release.set()
        await wait_state(db, ja.id, "completed")
        await asyncio.sleep(0.2)  # a slot is free now: still no claim
        assert (await job_row(db, waiting.id))["state"] == "pending"
        assert not task.done()
        sync_release.set()
        await asyncio.wait_for(task, 5)  # re-raises what run() raised
    finally:
        release.set()
        sync_release.set()

    for job_id, result in ((ja.id, "async done"), (jb.id, "sync done")):
        row = await job_row(db, job_id)
        assert row["state"] == "completed"
        assert loads(row["result"]) == result
        assert row["end_time"] is not None
        assert row["lock_id"] is None
    for job_id in (waiting.id, after.id):
        row = await job_row(db, job_id)
        assert row["state"] == "pending"
        assert row["start_time"] is None
        assert row["lock_id"] is None
        assert row["worker"] is None


# ---------------------------------------------------------------------------------------------- stop(timeout)


async def test_stop_timeout_cancels_async_handler_and_requeues_its_job(
    make_worker: MakeWorker, source: AsyncMQSource, db: Any
) -> None:
    await db.execute("INSERT INTO mq_job_cursor (key, properties) VALUES ('c1', '{\"n\": 1}'::jsonb)")
    cancelled = asyncio.Event()

    async def stuck(job: JobContext) -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    finish_notices: list[str] = []
    await db.add_listener("mq.job_finished", lambda *a: finish_notices.append(a[3]))

    w1 = make_worker({"q": stuck}, name="w1", timeout=60)
    task = await start(w1)
    job = await source.call("q", "m", {"x": 1}, cursor_key="c1")
    row = await wait_state(db, job.id, "running")
    assert row["lock_id"] == lock_id_of(w1)
    assert row["worker"] == "w1"
    assert loads(row["cursor_snapshot"]) == {"n": 1}

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await w1.stop(timeout=0.3)
    assert loop.time() - t0 < 2.5
    assert cancelled.is_set()
    await asyncio.wait_for(task, 2)  # run() returns normally after cancelling handlers

    row = await job_row(db, job.id)
    assert row["state"] == "pending"
    assert row["lock_id"] is None
    assert row["start_time"] is None
    assert row["end_time"] is None
    assert row["worker"] is None
    assert row["cursor_snapshot"] is None
    assert row["result"] is None
    await asyncio.sleep(0.1)
    assert not any(json.loads(p).get("j") == job.id for p in finish_notices), finish_notices

    # the cursor is not blocked: another worker runs the job, with the saved cursor
    seen: list[Any] = []

    async def ok(job: JobContext) -> str:
        seen.append(job.cursor)
        return "second run"

    w2 = make_worker({"q": ok}, name="w2", timeout=60)
    async with w2:
        row = await wait_state(db, job.id, "completed", timeout=3)
    assert row["worker"] == "w2"
    assert loads(row["result"]) == "second run"
    assert seen == [{"n": 1}]


async def test_stop_timeout_marks_uninterruptible_sync_handler_lost(
    make_worker: MakeWorker, source: AsyncMQSource, db: Any
) -> None:
    gate = threading.Event()
    entered = threading.Event()

    def sleepy(job: JobContext) -> str:
        entered.set()
        gate.wait(3)  # time.sleep(3) that the test can cut short at the end
        return "late"

    finish_notices: list[str] = []
    await db.add_listener("mq.job_finished", lambda *a: finish_notices.append(a[3]))
    worker = make_worker({"q": sleepy}, timeout=60)
    task = await start(worker)
    try:
        job = await source.call("q", "m", cursor_key="sync-cursor")
        await wait_state(db, job.id, "running")
        await asyncio.to_thread(entered.wait, 3)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await worker.stop(timeout=0.3)
        assert loop.time() - t0 < 1.5, "stop() waited for the sync handler"
        await asyncio.wait_for(task, 2)  # re-raises what run() raised
        row = await job_row(db, job.id)
        assert row["state"] == "lost"
        assert row["end_time"] is not None
        assert row["lock_id"] is None
        await wait_until(
            lambda: {"j": job.id, "s": "lost"} in [json.loads(p) for p in finish_notices],
            timeout=2,
            what="the lost notification",
        )
    finally:
        gate.set()
    await asyncio.sleep(0.3)  # the thread returns now: its late result is discarded
    row = await job_row(db, job.id)
    assert row["state"] == "lost"
    assert row["result"] is None


# ------------------------------------------------------------------------------------------- run_until_idle


async def test_run_until_idle_connects_maintains_drains_and_returns(
    make_worker: MakeWorker, source: AsyncMQSource, db: Any
) -> None:
    orphan = await insert_job(db, "q", state="running", lock_id=424_242, worker="crashed")
    follow_ups: list[int] = []

    async def handler(job: JobContext) -> str:
        if job.method == "first":
            queued = await source.call("q", "second", {"parent": job.id})
            follow_ups.append(queued.id)
        return job.method

    delayed = await source.call("q", "later", when=datetime.timedelta(hours=1))
    first = await source.call("q", "first")
    worker = make_worker({"q": handler}, timeout=60)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(worker.run_until_idle(), 10)
    assert loop.time() - t0 < 5

    row = await job_row(db, orphan)
    assert row["state"] == "lost"
    assert row["end_time"] is not None
    assert row["lock_id"] is None
    assert loads((await job_row(db, first.id))["result"]) == "first"
    assert len(follow_ups) == 1
    row = await job_row(db, follow_ups[0])
    assert row["state"] == "completed"
    assert loads(row["result"]) == "second"
    assert (await job_row(db, delayed.id))["state"] == "pending"
    assert worker.get_status()["running"] is False
    await wait_until(lambda: _no_listener(db), what="the listener connection to close")
    assert await worker_locks_in_db(db) == 0


async def test_run_until_idle_raises_while_run_is_active(
    make_worker: MakeWorker, source: AsyncMQSource, db: Any
) -> None:
    worker = make_worker({"q": echo}, timeout=60)
    task = await start(worker)
    with pytest.raises(RuntimeError):
        await worker.run_until_idle()
    assert worker.get_status()["running"] is True
    assert not task.done()
    job = await source.call("q", "m")
    await wait_state(db, job.id, "completed")
    worker.shutdown_gracefully()
    await asyncio.wait_for(task, 3)  # re-raises what run() raised


# ---------------------------------------------------------------------------------------------- get_status


async def test_get_status_reports_active_jobs(
    make_worker: MakeWorker, source: AsyncMQSource, db: Any
) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def handler(job: JobContext) -> None:
        entered.set()
        await hold(release)

    worker = make_worker({"q": handler, "r": handler}, name="status-worker", concurrency=3, timeout=60)
    status = worker.get_status()
    assert status["name"] == "status-worker"
    assert status["running"] is False
    assert status["concurrency"] == 3
    assert status["active_jobs"] == []
    async with worker:
        assert worker.get_status()["running"] is True
        job = await source.call("q", "m", {"x": [1, 2]}, cursor_key="k1")
        await asyncio.wait_for(entered.wait(), 3)
        status = worker.get_status()
        assert status["name"] == "status-worker"
        assert status["running"] is True
        assert status["concurrency"] == 3
        assert status["active_jobs"] == [
            {"id": job.id, "queue": "q", "method": "m", "args": {"x": [1, 2]}, "cursor_key": "k1"}
        ]
        json.dumps(status)  # SIGUSR1 logs it as JSON
        release.set()
        await wait_state(db, job.id, "completed")
        await wait_until(lambda: worker.get_status()["active_jobs"] == [], what="no active jobs")
    assert worker.get_status()["running"] is False


# ---------------------------------------------------------------------------------------------- lost jobs


async def test_lost_jobs_are_marked_at_start(make_worker: MakeWorker, db: Any) -> None:
    """Reference §7.3: only the worker's own queues; live locks protect; stale mq_lock rows go."""
    live, dead = 515_151, 616_161
    await db.execute("SELECT pg_advisory_lock($1::int4, $2::int4)", LOCK_KEY, live)
    gone = await insert_job(db, "q", state="running", lock_id=dead, worker="dead-worker")
    alive = await insert_job(db, "q", state="running", lock_id=live, worker="live-worker")
    foreign = await insert_job(db, "other", state="running", lock_id=dead, worker="dead-worker")
    await db.execute(
        "INSERT INTO mq_lock (ns, key, lock_id, worker) VALUES "
        "('queue-schedules', 'other', $1, 'dead-worker'), ('aiomq-test', 'stale', $2, 'dead-worker'), "
        "('aiomq-test', 'held', $3, 'live-worker')",
        dead,
        dead + 1,
        live,
    )
    worker = make_worker({"q": echo}, timeout=60)  # only the start-up pass runs during the test
    async with worker:
        row = await wait_state(db, gone, "lost", timeout=3)
        assert row["end_time"] is not None
        assert row["lock_id"] is None
        row = await job_row(db, alive)
        assert (row["state"], row["lock_id"], row["end_time"]) == ("running", live, None)
        row = await job_row(db, foreign)
        assert (row["state"], row["lock_id"], row["end_time"]) == ("running", dead, None)
        rows = await db.fetch("SELECT ns, key FROM mq_lock WHERE lock_id <> $1", lock_id_of(worker))
        assert {(r["ns"], r["key"]) for r in rows} == {("aiomq-test", "held")}


async def test_maintenance_repeats_every_timeout(make_worker: MakeWorker, db: Any) -> None:
    held = 717_171
    await db.execute("SELECT pg_advisory_lock($1::int4, $2::int4)", LOCK_KEY, held)
    job_id = await insert_job(db, "q", state="running", lock_id=held, worker="slow-worker")
    worker = make_worker({"q": echo}, timeout=0.5)
    async with worker:
        await asyncio.sleep(1.2)  # a few maintenance passes with the lock held
        assert (await job_row(db, job_id))["state"] == "running"
        await db.execute("SELECT pg_advisory_unlock($1::int4, $2::int4)", LOCK_KEY, held)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        row = await wait_state(db, job_id, "lost", timeout=3)
        assert loop.time() - t0 < 1.5
        assert row["lock_id"] is None
        assert row["end_time"] is not None


# ---------------------------------------------------------------------------------------------- rotation


async def test_listener_rotation_restamps_running_job(
    make_worker: MakeWorker, source: AsyncMQSource, db: Any
) -> None:
    """Reference §7.4: kill the listener backend while a job runs; new lock_id, job re-stamped, completes."""
    release = asyncio.Event()

    async def handler(job: JobContext) -> str:
        if job.method == "block":
            await hold(release)
        return job.method

    worker = make_worker({"q": handler}, timeout=1)
    async with worker:
        blocked = await source.call("q", "block")
        row = await wait_state(db, blocked.id, "running")
        old = lock_id_of(worker)
        assert row["lock_id"] == old
        pids = await listener_pids(db)
        assert len(pids) == 1
        await terminate(db, pids)

        def rotated() -> bool:
            status = worker.get_status()
            return status["lock_id"] not in (None, old) and bool(status["listener_connected"])

        await wait_until(rotated, timeout=5, what="the worker to reconnect with a new lock_id")
        new = lock_id_of(worker)
        assert await holds_lock(db, new)
        assert not await holds_lock(db, old)
        assert len(await listener_pids(db)) == 1
        row = await job_row(db, blocked.id)
        assert (row["state"], row["lock_id"]) == ("running", new)

        quick = await source.call("q", "quick")  # woken by a NOTIFY on the new connection
        assert loads((await wait_state(db, quick.id, "completed", timeout=3))["result"]) == "quick"
        await asyncio.sleep(1.2)  # a maintenance pass: the re-stamped job is not lost
        assert (await job_row(db, blocked.id))["state"] == "running"
        release.set()
        row = await wait_state(db, blocked.id, "completed")
        assert loads(row["result"]) == "block"
        assert row["lock_id"] is None


async def test_listener_rotation_recovers_job_marked_lost_meanwhile(
    make_worker: MakeWorker, source: AsyncMQSource, db: Any, pg_server: PgServer
) -> None:
    """While the listener is down another worker marks the job lost; the reconnect makes it running again."""
    release = asyncio.Event()

    async def handler(job: JobContext) -> str:
        await hold(release)
        return "survived"

    async def never(job: JobContext) -> str:  # pragma: no cover - w2 runs maintenance only
        return "stolen"

    dbname = await db.fetchval("SELECT current_database()")
    admin = await asyncpg.connect(pg_server.dsn)  # ALTER DATABASE must run from another database
    w1 = make_worker({"q": handler}, name="w1", timeout=60)
    w2 = make_worker({"q": never}, name="w2", timeout=0.3)
    try:
        async with w1:
            job = await source.call("q", "m")
            await wait_state(db, job.id, "running")  # claimed by w1: w2 (same queue) is not up yet
            await w2.__aenter__()
            old = lock_id_of(w1)
            # keep w1 from reconnecting (open connections stay) while w2's maintenance sees its lock gone
            await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            try:
                w1_listener = [
                    r["pid"]
                    for r in await db.fetch(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND application_name = 'aiomq worker w1'"
                    )
                ]
                assert len(w1_listener) == 1
                await terminate(db, w1_listener)
                row = await wait_state(db, job.id, "lost", timeout=3)
                assert row["lock_id"] is None
                assert row["end_time"] is not None
                await asyncio.sleep(0.3)
                assert w1.get_status()["lock_id"] in (None, old)
                assert (await job_row(db, job.id))["state"] == "lost"
            finally:
                await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')

            def rotated() -> bool:
                status = w1.get_status()
                return status["lock_id"] not in (None, old) and bool(status["listener_connected"])

            await wait_until(rotated, timeout=5, what="w1 to reconnect")
            new = lock_id_of(w1)
            row = await job_row(db, job.id)
            assert (row["state"], row["lock_id"], row["worker"], row["end_time"]) == (
                "running",
                new,
                "w1",
                None,
            )
            await asyncio.sleep(0.5)  # w2 keeps maintaining: the job holds a live lock now
            assert (await job_row(db, job.id))["state"] == "running"
            release.set()
            row = await wait_state(db, job.id, "completed")
            await w2.stop()
    finally:
        release.set()
        await admin.close()
    assert loads(row["result"]) == "survived"
    assert row["worker"] == "w1"


# ---------------------------------------------------------------------------------------------- pool faults


def _worker_db_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("aiomq.") and r.levelno >= logging.INFO and ("fail" in r.getMessage())
    ]


async def test_terminated_pool_connections_between_jobs(
    make_worker: MakeWorker, db: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiomq")

    async def handler(job: JobContext) -> Any:
        return job.args["n"]

    worker = make_worker({"q": handler}, timeout=0.5)
    async with worker:
        for n in range(4):
            job_id = await enqueue_raw(db, "q", args={"n": n})
            row = await wait_state(db, job_id, "completed", timeout=5)
            assert loads(row["result"]) == n
            pids = await pool_pids(db)
            assert pids, "the engine should hold pooled connections by now"
            await terminate(db, pids)
            await asyncio.sleep(0.1)
        status = worker.get_status()
        assert status["running"] is True
        assert status["listener_connected"] is True
    # the failures were logged (not swallowed silently), and the worker went on
    assert _worker_db_errors(caplog), [r.getMessage() for r in caplog.records]


async def test_terminated_pool_connections_during_a_job(
    make_worker: MakeWorker, db: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiomq")
    release = asyncio.Event()

    async def handler(job: JobContext) -> str:
        if job.method == "block":
            await hold(release)
        return job.method

    worker = make_worker({"q": handler}, timeout=60)
    async with worker:
        job_id = await enqueue_raw(db, "q", method="block")
        await wait_state(db, job_id, "running")
        await terminate(db, await pool_pids(db))
        release.set()  # the finish meets dead pooled connections first
        row = await wait_state(db, job_id, "completed", timeout=5)
        assert loads(row["result"]) == "block"
        assert row["lock_id"] is None
        later = await enqueue_raw(db, "q", method="later")
        await wait_state(db, later, "completed", timeout=5)
        assert worker.get_status()["running"] is True
    assert _worker_db_errors(caplog), [r.getMessage() for r in caplog.records]


async def test_shutdown_releases_locks_after_pool_connections_died(
    make_worker: MakeWorker, source: AsyncMQSource, db: Any
) -> None:
    """The teardown DELETE of this worker's mq_lock rows meets a dead pooled connection: it is retried."""
    worker = make_worker({"q": echo}, name="w-dead-pool", timeout=60)
    task = await start(worker)
    lock_id = lock_id_of(worker)
    job = await source.call("q", "m")
    await wait_state(db, job.id, "completed")
    await asyncio.sleep(0.2)  # start-up maintenance and the finish are over: the pool is idle
    await db.execute(
        "INSERT INTO mq_lock (ns, key, lock_id, worker) VALUES ('aiomq-test', 'mine', $1, 'w-dead-pool')",
        lock_id,
    )
    pids = await pool_pids(db)
    assert pids
    await terminate(db, pids)
    worker.shutdown_gracefully()
    await asyncio.wait_for(task, 5)  # re-raises what run() raised
    rows = await db.fetch("SELECT ns, key FROM mq_lock WHERE lock_id = $1", lock_id)
    assert [(r["ns"], r["key"]) for r in rows] == []


async def test_stop_timeout_requeue_survives_dead_pool_connections(
    make_worker: MakeWorker, source: AsyncMQSource, db: Any
) -> None:
    """Putting a cancelled job back to pending is a database write like any other: retried."""

    async def stuck(job: JobContext) -> None:
        await asyncio.sleep(30)

    worker = make_worker({"q": stuck}, timeout=60)
    task = await start(worker)
    job = await source.call("q", "m")
    await wait_state(db, job.id, "running")
    await terminate(db, await pool_pids(db))
    await worker.stop(timeout=0.3)
    await asyncio.wait_for(task, 2)  # re-raises what run() raised
    row = await job_row(db, job.id)
    assert (row["state"], row["lock_id"], row["worker"]) == ("pending", None, None)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("url", ["postgresql+psycopg2://u@localhost/x", "sqlite://"])
def test_sync_engine_is_rejected(url: str, model: Model) -> None:
    if "psycopg2" in url:
        pytest.importorskip("psycopg2")
    engine = sa.create_engine(url)
    try:
        with pytest.raises(ValueError, match="asyncpg"):
            AsyncMQWorker(engine=engine, queues={"q": echo}, model=model)  # type: ignore[arg-type]
    finally:
        engine.dispose()


async def test_async_engine_without_asyncpg_is_rejected(model: Model) -> None:
    engine = create_async_engine("sqlite+aiosqlite://")
    try:
        with pytest.raises(ValueError, match="asyncpg"):
            AsyncMQWorker(engine=engine, queues={"q": echo}, model=model)
    finally:
        await engine.dispose()


@pytest.fixture
async def offline_engine() -> AsyncIterator[AsyncEngine]:
    """An asyncpg engine whose server does not exist: validation must happen before any connection."""
    engine = create_async_engine("postgresql+asyncpg://nobody@127.0.0.1:9/nowhere")
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.mark.parametrize(
    "queue", ["bad-name", "1queue", "", "has space", "x" * 61, "mq.finished", "naïve", 7]
)
async def test_invalid_queue_names_are_rejected(
    queue: Any, offline_engine: AsyncEngine, model: Model
) -> None:
    with pytest.raises(ValueError, match="queue"):
        AsyncMQWorker(engine=offline_engine, queues={queue: echo}, model=model)


async def test_constructor_validation(offline_engine: AsyncEngine, model: Model) -> None:
    def make(queues: dict[Any, Any], **kw: Any) -> AsyncMQWorker:
        return AsyncMQWorker(engine=offline_engine, queues=queues, model=model, **kw)

    with pytest.raises(ValueError, match="queue"):
        make({})
    for concurrency in (0, -1):
        with pytest.raises(ValueError, match="concurrency"):
            make({"q": echo}, concurrency=concurrency)
    for handler in (object(), 42, "q"):
        with pytest.raises(TypeError):
            make({"q": handler})

    class WithExecuteJob:
        def execute_job(self, job: JobContext) -> None:
            return None

    def plain(job: JobContext) -> None:
        return None

    worker = make({"x" * 60: WithExecuteJob(), "Mixed_Case_1": plain, "_a": echo})
    assert worker.get_status()["running"] is False


async def test_missing_schema_raises_schema_missing_error(empty_database: str, model: Model) -> None:
    engine = create_async_engine(asyncpg_url(empty_database))
    try:
        worker = AsyncMQWorker(
            engine=engine, queues={"q": echo}, model=model, timeout=1, retry_intervals=(0.05, 0.1)
        )
        with pytest.raises(SchemaMissingError, match="mq_job") as info:
            await asyncio.wait_for(worker.run(), 10)
        assert info.value.table == "mq_job"
        assert worker.get_status()["running"] is False
        with pytest.raises(SchemaMissingError):
            async with worker:
                pytest.fail("entered a worker without a schema")
    finally:
        await engine.dispose()


async def test_listener_dsn_on_another_database_is_refused(
    make_worker: MakeWorker, empty_database: str, source: AsyncMQSource, db: Any
) -> None:
    job = await source.call("q", "m")
    worker = make_worker({"q": echo}, listener_dsn=empty_database)
    with pytest.raises(ValueError, match="same database"):
        await asyncio.wait_for(worker.run(), 30)
    assert worker.get_status()["running"] is False
    row = await job_row(db, job.id)
    assert row["state"] == "pending"


@pytest.mark.parametrize("form", ["libpq", "sqlalchemy"])
async def test_listener_dsn_forms(
    form: str, database: str, make_worker: MakeWorker, source: AsyncMQSource, db: Any
) -> None:
    dsn = database if form == "libpq" else asyncpg_url(database)
    assert dsn.startswith("postgresql://" if form == "libpq" else "postgresql+asyncpg://")
    worker = make_worker({"q": echo}, listener_dsn=dsn, timeout=60)
    async with worker:
        assert len(await listener_pids(db)) == 1
        job = await source.call("q", "m", {"form": form})
        row = await wait_state(db, job.id, "completed", timeout=3)
    assert loads(row["result"]) == {"method": "m", "args": {"form": form}}


# ---------------------------------------------------------------------------------------------- NOTIFY


MALFORMED = [
    "not json",
    "{}",
    '{"j": 1}',
    "[1]",
    "null",
    '"a string"',
    '{"j": 1, "t": "soon"}',
    '{"j": 1, "t": 1e400}',
    '{"j": 1, "t": -99999999999999}',
]


async def test_malformed_notifications_are_logged_and_ignored(
    make_worker: MakeWorker, source: AsyncMQSource, db: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiomq")
    worker = make_worker({"q": echo}, timeout=60)
    async with worker:
        for payload in MALFORMED:
            await db.execute("SELECT pg_notify('mq_q', $1)", payload)

        def all_logged() -> bool:
            messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            return all(any(p in m for m in messages) for p in MALFORMED)

        await wait_until(all_logged, timeout=3, what="a warning for every malformed payload")
        status = worker.get_status()
        assert status["running"] is True
        assert status["listener_connected"] is True
        await asyncio.sleep(0.3)
        job = await source.call("q", "m", {"after": "garbage"})
        row = await wait_state(db, job.id, "completed", timeout=3)
    assert loads(row["result"]) == {"method": "m", "args": {"after": "garbage"}}


async def test_a_burst_of_hints_is_all_honoured(
    make_worker: MakeWorker, engine: AsyncEngine, model: Model, db: Any
) -> None:
    ran: list[int] = []

    async def handler(job: JobContext) -> None:
        ran.append(job.args["i"])

    worker = make_worker({"q": handler}, concurrency=4, timeout=60)
    async with worker:
        await asyncio.sleep(0.3)  # idle: from now on only hints can wake the worker within the test
        async with AsyncSession(engine) as session, session.begin():
            src = AsyncMQSource(model=model, dbsession=session)
            early_future = await src.call("q", "later", {"i": -1}, when=datetime.timedelta(hours=1))
            ids = [(await src.call("q", "m", {"i": i})).id for i in range(20)]
            # the last hint of the batch points an hour ahead: it must not hide the 20 due ones
            late_future = await src.call("q", "later", {"i": -2}, when=datetime.timedelta(hours=2))

        async def all_done() -> bool:
            n = await db.fetchval(
                "SELECT count(*) FROM mq_job WHERE id = any($1::bigint[]) AND state = 'completed'", ids
            )
            return bool(n == len(ids))

        await wait_until(all_done, timeout=5, what="all 20 jobs to complete")
    assert sorted(ran) == list(range(20))
    for job_id in (early_future.id, late_future.id):
        assert (await job_row(db, job_id))["state"] == "pending"


# ---------------------------------------------------------------------------------------------- signals


SIGNAL_SCRIPT = textwrap.dedent(
    """
    import asyncio
    import logging
    import os
    import sys

    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine

    from aiomq import AsyncMQWorker, make_default_model


    async def handler(job):
        print(f"job {job.id} started", flush=True)
        await asyncio.sleep(float(job.args.get("sleep", 0)))
        print(f"job {job.id} done", flush=True)
        return "slept"


    async def main():
        engine = create_async_engine(os.environ["AIOMQ_LIFECYCLE_URL"])
        worker = AsyncMQWorker(
            engine=engine,
            queues={"sig": handler},
            model=make_default_model(sa.MetaData()),
            capture_signals=True,
            timeout=60,
            name="signal-worker",
        )
        task = asyncio.create_task(worker.run())
        while worker.get_status()["lock_id"] is None:
            if task.done():
                task.result()
                raise SystemExit("run() returned before listening")
            await asyncio.sleep(0.02)
        print("ready", flush=True)
        await task
        print("run returned", flush=True)
        await engine.dispose()


    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(main())
    """
)


async def _spawn_signal_worker(tmp_path: Path, database: str) -> asyncio.subprocess.Process:
    script = tmp_path / "signal_worker.py"
    script.write_text(SIGNAL_SCRIPT)
    env = {**os.environ, "AIOMQ_LIFECYCLE_URL": asyncpg_url(database)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
    except TimeoutError:
        proc.kill()
        raise
    if line != b"ready\n":
        proc.kill()
        _, err = await proc.communicate()
        raise AssertionError(f"worker subprocess did not start: {line!r}\n{err.decode(errors='replace')}")
    return proc


async def _finish(proc: asyncio.subprocess.Process, timeout: float = 10) -> tuple[str, str]:
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        raise AssertionError(f"worker subprocess did not exit:\n{err.decode(errors='replace')}") from None
    return out.decode(errors="replace"), err.decode(errors="replace")


async def test_sigterm_while_idle_shuts_down_gracefully(tmp_path: Path, database: str, db: Any) -> None:
    proc = await _spawn_signal_worker(tmp_path, database)
    assert len(await listener_pids(db)) == 1
    proc.send_signal(signal.SIGTERM)
    out, err = await _finish(proc)
    assert proc.returncode == 0, err
    assert "run returned" in out, (out, err)
    await wait_until(lambda: _no_listener(db), what="the subprocess's listener to close")


async def test_sigint_while_a_job_runs_lets_it_complete(
    tmp_path: Path, database: str, db: Any, source: AsyncMQSource
) -> None:
    proc = await _spawn_signal_worker(tmp_path, database)
    job = await source.call("sig", "nap", {"sleep": 1.0})
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 5)
    assert line.decode().strip() == f"job {job.id} started"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = await _finish(proc)
    assert proc.returncode == 0, err
    assert f"job {job.id} done" in out, (out, err)
    assert "run returned" in out, (out, err)
    assert time.monotonic() - t0 < 5
    row = await job_row(db, job.id)
    assert row["state"] == "completed"
    assert loads(row["result"]) == "slept"
    assert row["worker"] == "signal-worker"
