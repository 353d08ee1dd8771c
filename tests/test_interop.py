"""aiomq and the real psycopg2_mq 0.13.6 on one database, at the same time.

psycopg2_mq runs synchronously (a psycopg2 engine, ORM sessions, a worker thread); its calls are made
through ``asyncio.to_thread`` so the event loop, which runs the aiomq workers, is never blocked.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import functools
import itertools
import json
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import psycopg2_mq
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext

from .conftest import copied_database
from .pgserver import PgServer

pytestmark = pytest.mark.interop

LOCK_KEY = 1250360252  # the default of both libraries
MakeWorker = Callable[..., AsyncMQWorker]


@pytest.fixture(params=["aiomq-schema", "upgraded-psycopg2_mq-schema"])
async def database(
    request: pytest.FixtureRequest, pg_server: PgServer, template_db: str, upgraded_template_db: str
) -> AsyncIterator[str]:
    """Every interop test runs twice: on tables aiomq created, and on tables psycopg2_mq created and
    ``aiomq schema --create`` upgraded (the way a team that migrates gets there)."""
    template = upgraded_template_db if request.param == "upgraded-psycopg2_mq-schema" else template_db
    async with copied_database(pg_server, template) as url:
        yield url


# ------------------------------------------------------------------------------------------ psycopg2_mq side


@functools.cache
def p2_model() -> Any:
    """psycopg2_mq's model on a MetaData of its own: only used to query the tables the template made."""
    return psycopg2_mq.make_default_model(sa.MetaData())


@pytest.fixture
def sync_engine(database: str) -> Iterator[sa.Engine]:
    url = sa.make_url(database).set(drivername="postgresql+psycopg2")
    engine = sa.create_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def _p2(engine: sa.Engine, fn: Callable[[Any, Session], Any]) -> Any:
    """Run ``fn(source, session)`` with a psycopg2_mq ``MQSource`` in one committed transaction."""
    with Session(engine) as session, session.begin():
        return fn(psycopg2_mq.MQSource(dbsession=session, model=p2_model()), session)


async def p2(engine: sa.Engine, fn: Callable[[Any, Session], Any]) -> Any:
    return await asyncio.to_thread(_p2, engine, fn)


async def p2_call(engine: sa.Engine, queue: str, method: str, args: Any, **kw: Any) -> int:
    job_id = await p2(engine, lambda src, _: src.call(queue, method, args, **kw))
    assert isinstance(job_id, int)
    return job_id


async def p2_job(engine: sa.Engine, job_id: int) -> dict[str, Any]:
    """The job as psycopg2_mq's ``MQSource.get_job`` sees it, as a dict of its columns."""
    columns = [c.key for c in p2_model().Job.__table__.columns]

    def read(src: Any, _: Session) -> dict[str, Any]:
        job = src.get_job(job_id)
        return {name: getattr(job, name) for name in columns}

    result: dict[str, Any] = await p2(engine, read)
    return result


async def p2_add_listener(engine: sa.Engine, event: str, queue: str, method: str, **kw: Any) -> int:
    listener_id = await p2(engine, lambda src, _: src.add_listener(event, queue, method, {}, **kw).id)
    assert isinstance(listener_id, int)
    return listener_id


class P2Worker:
    """A psycopg2_mq ``MQWorker`` in a daemon thread."""

    def __init__(self, engine: sa.Engine, queues: dict[str, Any], *, name: str, timeout: float) -> None:
        self.name = name
        self.worker = psycopg2_mq.MQWorker(
            engine=engine,
            queues=queues,
            model=p2_model(),
            capture_signals=False,
            jitter=0,
            timeout=timeout,
            threads=4,
            retry_intervals=(0.1, 0.2, 0.5, 1),
            name=name,
        )
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"psycopg2_mq {name}", daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as ex:  # reported by stop()
            self.error = ex

    async def start(self) -> None:
        """Start and return once the worker LISTENs and holds its advisory lock."""
        self.thread.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while self.worker._lock_id is None:  # set after LISTEN, with the advisory lock
            assert self.thread.is_alive(), f"psycopg2_mq worker died: {self.error!r}"
            assert loop.time() < deadline, "psycopg2_mq worker did not start"
            await asyncio.sleep(0.02)

    @property
    def lock_id(self) -> int:
        lock_id = self.worker._lock_id
        assert isinstance(lock_id, int)
        return lock_id

    async def stop(self) -> None:
        self.worker.shutdown_gracefully()
        await asyncio.to_thread(self.thread.join, 10)
        assert not self.thread.is_alive(), "psycopg2_mq worker did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
async def p2_workers(sync_engine: sa.Engine) -> Any:
    """Start psycopg2_mq workers: ``await p2_workers(queues, name=..., timeout=...)``; stopped at teardown."""
    started: list[P2Worker] = []

    async def start(queues: dict[str, Any], *, name: str = "p2", timeout: float = 2) -> P2Worker:
        worker = P2Worker(sync_engine, queues, name=name, timeout=timeout)
        started.append(worker)
        await worker.start()
        return worker

    yield start
    errors = []
    for worker in started:
        if worker.thread.is_alive() or worker.error is not None:
            try:
                await worker.stop()
            except BaseException as ex:
                errors.append(ex)
    assert not errors, errors


# -------------------------------------------------------------------------------------------------- handlers


def echo_result(job: Any) -> dict[str, Any]:
    name = job.args.get("name") if isinstance(job.args, dict) else None
    return {"queue": job.queue, "method": job.method, "args": job.args, "greeting": f"hello {name}"}


def count_on_cursor(job: Any) -> None:
    if job.cursor is not None:
        job.cursor["count"] = job.cursor.get("count", 0) + 1
        job.cursor.setdefault("ids", []).append(job.id)


def seen(job: Any, library: str) -> dict[str, Any]:
    return {
        "library": library,
        "id": job.id,
        "cursor_key": job.cursor_key,
        "cursor": copy.deepcopy(job.cursor),
        "trace": copy.deepcopy(job.trace),
        "listener_ids": job.listener_ids,
        "schedule_ids": job.schedule_ids,
    }


class EchoQueue:
    """A psycopg2_mq handler (runs in the worker's thread pool)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def execute_job(self, job: Any) -> Any:
        with self._lock:
            self.seen.append(seen(job, "psycopg2_mq"))
        if job.method == "boom":
            raise ValueError("boom", job.args)
        count_on_cursor(job)
        return echo_result(job)


class AsyncEcho:
    """The same handler for aiomq, as a coroutine."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def execute_job(self, job: JobContext) -> Any:
        self.seen.append(seen(job, "aiomq"))
        if job.method == "boom":
            raise ValueError("boom", job.args)
        await asyncio.sleep(0)
        count_on_cursor(job)
        return echo_result(job)


# --------------------------------------------------------------------------------------------------- helpers


async def fetch_job(db: Any, job_id: int) -> dict[str, Any]:
    """The job row, every column, from the catalog's point of view (JSON decoded, times as ISO text)."""
    text = await db.fetchval("SELECT to_jsonb(j) FROM mq_job j WHERE id = $1", job_id)
    assert text is not None, f"no job {job_id}"
    row: dict[str, Any] = json.loads(text)
    return row


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def unheld_lock_id(db: Any) -> int:
    while True:
        lock_id = random.randint(1, 2**31 - 1)
        held = await db.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::int::oid "
            "AND objid = $2::int::oid",
            LOCK_KEY,
            lock_id,
        )
        if held == 0:
            return lock_id


async def make_running(db: Any, job_id: int, lock_id: int, worker: str = "ghost") -> None:
    """Turn a pending job into one a worker (that may be gone) claimed: by hand, as a crash would leave it."""
    status = await db.execute(
        "UPDATE mq_job SET state = 'running', lock_id = $2, worker = $3, "
        "start_time = (now() AT TIME ZONE 'utc') WHERE id = $1 AND state = 'pending'",
        job_id,
        lock_id,
        worker,
    )
    assert status == "UPDATE 1"


async def events_for(db: Any, queue: str) -> list[dict[str, Any]]:
    """The ``args`` of the listener jobs in ``queue``, oldest first."""
    rows = await db.fetch("SELECT args::text FROM mq_job WHERE queue = $1 ORDER BY id", queue)
    return [json.loads(r[0]) for r in rows]


def _iso(value: Any) -> datetime.datetime:
    assert isinstance(value, str)
    parsed = datetime.datetime.fromisoformat(value)
    assert parsed.tzinfo is None, f"{value!r} should be naive UTC"
    return parsed


# -------------------------------------------------------------------------------------------- a) p2 -> aiomq


async def test_psycopg2_mq_source_jobs_run_on_aiomq_worker(
    sync_engine: sa.Engine, source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    handler = AsyncEcho()
    # timeout=5: a job found within 3 s was found through psycopg2_mq's NOTIFY, not by maintenance.
    async with make_worker({"echo": handler}, name="aiomq-a", timeout=5):
        plain = await p2_call(sync_engine, "echo", "hello", {"name": "x"})
        info = await source.wait_for_job(plain, timeout=3)
        assert info.state == "completed"
        assert info.result == {
            "queue": "echo",
            "method": "hello",
            "args": {"name": "x"},
            "greeting": "hello x",
        }

        first = await p2_call(sync_engine, "echo", "hello", {"name": "c-1"}, cursor_key="c1")
        second = await p2_call(sync_engine, "echo", "hello", {"name": "c-2"}, cursor_key="c1")
        for job_id in (first, second):
            assert (await source.wait_for_job(job_id, timeout=5)).state == "completed"

    # What psycopg2_mq reads back.
    job = await p2_job(sync_engine, plain)
    assert job["state"] == "completed"
    assert job["result"]["greeting"] == "hello x"
    assert job["worker"] == "aiomq-a"
    assert job["lock_id"] is None
    assert job["start_time"] is not None
    assert job["end_time"] is not None
    assert job["scheduled_time"] <= job["start_time"] <= job["end_time"]
    assert job["collapsible"] is False  # psycopg2_mq 0.13's default
    assert job["trace"] is None
    assert await db.fetchval("SELECT trace = 'null'::jsonb FROM mq_job WHERE id = $1", plain)

    # The handler got psycopg2_mq's job as psycopg2_mq's own worker would hand it over.
    by_id = {s["id"]: s for s in handler.seen}
    assert set(by_id) == {plain, first, second}
    assert by_id[plain]["cursor"] is None
    assert by_id[plain]["trace"] is None
    assert by_id[plain]["listener_ids"] is None
    assert by_id[plain]["schedule_ids"] is None
    assert by_id[first]["cursor"] == {}  # 0.13.6: {} on a new cursor
    assert by_id[second]["cursor"] == {"count": 1, "ids": [first]}

    # The cursor is saved where both libraries read it.
    assert await source.get_cursor("c1") == {"count": 2, "ids": [first, second]}

    def read_cursor(_: Any, session: Session) -> tuple[Any, Any]:
        cursor = session.get(p2_model().JobCursor, "c1")
        assert cursor is not None
        return cursor.properties, cursor.updated_job_id

    assert await p2(sync_engine, read_cursor) == ({"count": 2, "ids": [first, second]}, second)
    assert await db.fetchval("SELECT cursor_snapshot IS NULL FROM mq_job WHERE id = $1", first)
    snapshot = await db.fetchval("SELECT cursor_snapshot::text FROM mq_job WHERE id = $1", second)
    assert json.loads(snapshot) == {"count": 1, "ids": [first]}
    assert (await p2_job(sync_engine, second))["cursor_snapshot"] == {"count": 1, "ids": [first]}


async def test_psycopg2_mq_schedule_and_listener_provenance_reach_aiomq_handler(
    sync_engine: sa.Engine, source: AsyncMQSource, make_worker: MakeWorker
) -> None:
    """psycopg2_mq writes provenance into ``trace`` (mq_listener_ids, mq_schedule_ids); aiomq reads it."""
    handler = AsyncEcho()
    listener_id = await p2_add_listener(sync_engine, "thing.happened", "echo", "hello")

    def emit(src: Any, _: Session) -> list[int]:
        return list(src.emit_event("thing.happened", {"name": "evt"}, trace={"request": "r-1"}))

    (job_id,) = await p2(sync_engine, emit)

    def add_and_call_schedule(src: Any, _: Session) -> int:
        schedule = src.add_schedule("echo", "hello", {"name": "sch"}, rrule="FREQ=DAILY", reload=False)
        return int(src.call_schedule(schedule.id, reload=False))

    schedule_job = await p2(sync_engine, add_and_call_schedule)
    async with make_worker({"echo": handler}, name="aiomq-prov"):
        for jid in (job_id, schedule_job):
            assert (await source.wait_for_job(jid, timeout=5)).state == "completed"
    by_id = {s["id"]: s for s in handler.seen}
    assert by_id[job_id]["listener_ids"] == [listener_id]
    assert by_id[job_id]["schedule_ids"] is None
    assert by_id[job_id]["trace"] == {"request": "r-1", "mq_listener_ids": [listener_id]}
    assert by_id[schedule_job]["listener_ids"] is None
    assert isinstance(by_id[schedule_job]["schedule_ids"], list)
    assert len(by_id[schedule_job]["schedule_ids"]) == 1


# -------------------------------------------------------------------------------------------- b) aiomq -> p2


async def test_aiomq_source_jobs_run_on_psycopg2_mq_worker(
    sync_engine: sa.Engine, source: AsyncMQSource, p2_workers: Any, make_worker: MakeWorker, db: Any
) -> None:
    handler = EchoQueue()
    # A psycopg2_mq listener on its own finished event: the event job proves the event was emitted as usual.
    listener_id = await p2_add_listener(sync_engine, "mq.job_finished.completed.echo.hello", "audit", "seen")
    # timeout=5: completing within 3 s means aiomq's NOTIFY woke psycopg2_mq's worker.
    worker = await p2_workers({"echo": handler}, name="p2-b", timeout=5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    plain = await source.call("echo", "hello", {"name": "y"}, trace={"request": "r-2"})
    info = await source.wait_for_job(plain.id, timeout=3, poll_interval=0.2)
    assert loop.time() - started < 3
    assert info.state == "completed"
    assert info.result == {"queue": "echo", "method": "hello", "args": {"name": "y"}, "greeting": "hello y"}
    assert info.worker == "p2-b"
    assert info.start_time is not None
    assert info.end_time is not None
    assert info.scheduled_time <= info.start_time <= info.end_time

    first = await source.call("echo", "hello", {"name": "c-1"}, cursor_key="c2")
    second = await source.call("echo", "hello", {"name": "c-2"}, cursor_key="c2", collapse_on_cursor=False)
    assert first.created
    assert second.created
    assert first.id != second.id
    for job in (first, second):
        done = await source.wait_for_job(job.id, timeout=8, poll_interval=0.2)
        assert done.state == "completed"
        assert done.result["greeting"] == f"hello {done.args['name']}"

    await worker.stop()
    assert await db.fetchval("SELECT count(*) FROM mq_lock WHERE worker = 'p2-b'") == 0

    by_id = {s["id"]: s for s in handler.seen}
    assert set(by_id) == {plain.id, first.id, second.id}
    assert by_id[plain.id]["trace"] == {"request": "r-2"}
    assert by_id[plain.id]["cursor"] is None
    assert by_id[first.id]["cursor"] == {}
    assert by_id[second.id]["cursor"] == {"count": 1, "ids": [first.id]}
    assert await source.get_cursor("c2") == {"count": 2, "ids": [first.id, second.id]}
    row = await fetch_job(db, second.id)
    assert row["cursor_snapshot"] == {"count": 1, "ids": [first.id]}
    assert row["lock_id"] is None

    # aiomq sees what psycopg2_mq recorded, through every read path.
    job = await source.get_job(plain.id)
    assert job.state == "completed"
    assert job.result == info.result
    found = await source.find_jobs(queue="echo", state="completed")
    assert {j.id for j in found} == {plain.id, first.id, second.id}

    # psycopg2_mq's finished events, made from aiomq's jobs, have the reference's shape.
    events = await events_for(db, "audit")
    assert len(events) == 3
    assert {e["event"]["data"]["id"] for e in events} == {plain.id, first.id, second.id}
    for event in events:
        assert set(event) == {"event"}
        assert event["event"]["name"] == "mq.job_finished.completed.echo.hello"
        assert event["event"]["listener_id"] == listener_id
        assert set(event["event"]["data"]) == {"id", "queue", "method", "start_time", "end_time", "result"}
        _iso(event["event"]["data"]["start_time"])
    audit = await source.find_jobs(queue="audit")
    assert all(j.trace == {"mq_listener_ids": [listener_id]} for j in audit)

    # An aiomq worker runs psycopg2_mq's event jobs and sees their provenance.
    audit_handler = AsyncEcho()
    audit_worker = make_worker({"audit": lambda job: audit_handler.seen.append(seen(job, "aiomq"))})
    await audit_worker.run_until_idle()
    assert sorted(s["id"] for s in audit_handler.seen) == sorted(j.id for j in audit)
    assert all(s["listener_ids"] == [listener_id] for s in audit_handler.seen)
    assert {j.state for j in await source.find_jobs(queue="audit")} == {"completed"}


async def test_psycopg2_mq_worker_fails_aiomq_job_with_reference_error_result(
    source: AsyncMQSource, p2_workers: Any
) -> None:
    handler = EchoQueue()
    worker = await p2_workers({"echo": handler}, name="p2-fail")
    queued = await source.call("echo", "boom", {"name": "z"})
    info = await source.wait_for_job(queued.id, timeout=5, poll_interval=0.2)
    await worker.stop()
    assert info.state == "failed"
    assert info.result["exc"] == "ValueError"
    assert info.result["message"] == "('boom', {'name': 'z'})"
    assert set(info.result) == {"exc", "message", "args", "tb"}


async def test_aiomq_finished_events_reach_psycopg2_mq_listeners(
    sync_engine: sa.Engine, source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    """aiomq emits psycopg2_mq's ``mq.job_finished.<state>.<queue>.<method>`` events (reference §11)."""
    listeners = {
        state: await p2_add_listener(sync_engine, f"mq.job_finished.{state}.echo.{method}", "audit", state)
        for state, method in (("completed", "hello"), ("failed", "boom"), ("lost", "hello"))
    }
    fail_lost = await p2_add_listener(sync_engine, "mq.job_finished.failed.echo.hello", "audit", "fail_lost")
    ok = await p2_call(sync_engine, "echo", "hello", {"name": "ok"})
    boom = await p2_call(sync_engine, "echo", "boom", {"name": "b"})
    orphan = await p2_call(sync_engine, "echo", "hello", {"name": "o"})
    await make_running(db, orphan, await unheld_lock_id(db))
    async with make_worker({"echo": AsyncEcho()}, timeout=5):
        states = {
            j: (await source.wait_for_job(j, timeout=4, poll_interval=0.2)).state for j in (ok, boom, orphan)
        }
    assert states == {ok: "completed", boom: "failed", orphan: "lost"}
    await source.fail_lost_job(orphan, result={"why": "gone"})

    audit = await db.fetch(
        "SELECT id, method, args::text, trace::text, state::text FROM mq_job "
        "WHERE queue = 'audit' ORDER BY id"
    )
    by_method = {r["method"]: r for r in audit}
    assert sorted(by_method) == ["completed", "fail_lost", "failed", "lost"]
    assert len(audit) == 4
    rows = {j: await fetch_job(db, j) for j in (ok, boom, orphan)}

    def check(method: str, listener_id: int, name: str, job_id: int) -> dict[str, Any]:
        record = by_method[method]
        assert record["state"] == "pending"
        assert json.loads(record["trace"]) == {"mq_listener_ids": [listener_id]}
        args = json.loads(record["args"])
        assert set(args) == {"event"}
        event = args["event"]
        assert set(event) == {"name", "listener_id", "now", "data"}
        assert (event["name"], event["listener_id"]) == (name, listener_id)
        assert event["now"].endswith("+00:00")
        data: dict[str, Any] = event["data"]
        row = rows[job_id]
        assert (data["queue"], data["method"]) == (row["queue"], row["method"])
        assert _iso(data["start_time"]) == _iso(row["start_time"])
        assert _iso(data["end_time"]) == _iso(row["end_time"])
        return data

    completed = check("completed", listeners["completed"], "mq.job_finished.completed.echo.hello", ok)
    assert set(completed) == {"id", "queue", "method", "start_time", "end_time", "result"}
    assert completed["id"] == ok
    assert completed["result"] == rows[ok]["result"]
    failed = check("failed", listeners["failed"], "mq.job_finished.failed.echo.boom", boom)
    assert set(failed) == {"id", "queue", "method", "start_time", "end_time", "result"}
    assert failed["id"] == boom
    assert failed["result"] == rows[boom]["result"]
    assert failed["result"]["exc"] == "ValueError"
    lost = check("lost", listeners["lost"], "mq.job_finished.lost.echo.hello", orphan)
    assert set(lost) == {"job", "queue", "method", "start_time", "end_time"}  # `job`, not `id`; no result
    assert lost["job"] == orphan
    # fail_lost_job: the failed event with the given result (the lost end_time is kept).
    resolved = check("fail_lost", fail_lost, "mq.job_finished.failed.echo.hello", orphan)
    assert set(resolved) == {"id", "queue", "method", "start_time", "end_time", "result"}
    assert (resolved["id"], resolved["result"]) == (orphan, {"why": "gone"})

    links = await db.fetch("SELECT job_id, listener_id FROM mq_job_listener_link ORDER BY job_id")
    assert [tuple(r) for r in links] == [
        (by_method[m]["id"], lid)
        for m, lid in sorted(
            [*((k, v) for k, v in listeners.items()), ("fail_lost", fail_lost)],
            key=lambda kv: by_method[kv[0]]["id"],
        )
    ]


# ----------------------------------------------------------------------------------------------- c) liveness


async def test_aiomq_maintenance_marks_lost_a_running_job_whose_lock_nobody_holds(
    sync_engine: sa.Engine, source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    orphan = await p2_call(sync_engine, "echo", "hello", {"name": "o"}, cursor_key="c3")
    await make_running(db, orphan, await unheld_lock_id(db), worker="crashed-p2-worker")
    # A job of the same cursor, waiting behind the orphan.
    follower = await source.call("echo", "hello", {"name": "f"}, cursor_key="c3")
    # A running job whose lock is held, in psycopg2_mq's two-key form, by a live session: not lost.
    alive = await p2_call(sync_engine, "echo", "hello", {"name": "a"})
    alive_lock = await unheld_lock_id(db)
    assert await db.fetchval("SELECT pg_try_advisory_lock($1::int4, $2::int4)", LOCK_KEY, alive_lock)
    await make_running(db, alive, alive_lock, worker="live-p2-worker")

    handler = AsyncEcho()
    async with make_worker({"echo": handler}, timeout=1):
        info = await source.wait_for_job(orphan, timeout=4, poll_interval=0.2)
        assert info.state == "lost"
        row = await fetch_job(db, orphan)
        assert row["lock_id"] is None
        assert row["end_time"] is not None
        assert row["worker"] == "crashed-p2-worker"

        # Two more maintenance passes: the live job stays running, the lost one keeps its cursor blocked.
        await asyncio.sleep(2.2)
        assert (await fetch_job(db, alive))["state"] == "running"
        assert (await fetch_job(db, alive))["lock_id"] == alive_lock
        assert (await fetch_job(db, follower.id))["state"] == "pending"
        assert handler.seen == []

        # The live session goes away: its job is lost at the next maintenance.
        assert await db.fetchval("SELECT pg_advisory_unlock($1::int4, $2::int4)", LOCK_KEY, alive_lock)
        assert (await source.wait_for_job(alive, timeout=4, poll_interval=0.2)).state == "lost"

    # psycopg2_mq resolves a job aiomq marked lost.
    await p2(sync_engine, lambda src, _: src.fail_lost_job(orphan, result={"why": "host died"}))
    job = await p2_job(sync_engine, orphan)
    assert job["state"] == "failed"
    assert job["result"] == {"why": "host died"}
    assert (await fetch_job(db, follower.id))["state"] == "pending"
    assert handler.seen == []


@pytest.mark.parametrize("resolver", ["psycopg2_mq", "aiomq"])
async def test_cursor_successor_runs_once_its_lost_job_is_failed(
    sync_engine: sa.Engine, source: AsyncMQSource, make_worker: MakeWorker, db: Any, resolver: str
) -> None:
    """A lost job blocks its cursor; once someone fails it, the next job on the cursor runs.

    Nothing sends the queue a NOTIFY here (psycopg2_mq's fail_lost_job sends none), so the worker must
    find the job by itself: "NOTIFY is a hint, never the only path" (DESIGN §1.4). Maintenance runs every
    second; four seconds is plenty.
    """
    orphan = await p2_call(sync_engine, "echo", "hello", {"name": "o"}, cursor_key="c4")
    await make_running(db, orphan, await unheld_lock_id(db))
    follower = await p2_call(sync_engine, "echo", "hello", {"name": "f"}, cursor_key="c4")
    handler = AsyncEcho()
    async with make_worker({"echo": handler}, timeout=1):
        assert (await source.wait_for_job(orphan, timeout=4, poll_interval=0.2)).state == "lost"
        if resolver == "psycopg2_mq":
            await p2(sync_engine, lambda src, _: src.fail_lost_job(orphan))
        else:
            await source.fail_lost_job(orphan)
        assert (await fetch_job(db, orphan))["state"] == "failed"
        info = await source.wait_for_job(follower, timeout=4, poll_interval=0.2)
        assert info.state == "completed"
    assert [s["id"] for s in handler.seen] == [follower]


async def test_each_library_honours_the_others_advisory_lock(
    sync_engine: sa.Engine,
    source: AsyncMQSource,
    make_worker: MakeWorker,
    p2_workers: Any,
    db: Any,
    pg_server: Any,
) -> None:
    """A running job is not lost while its worker lives, whichever library runs it or checks it."""
    # psycopg2_mq runs a job; an aiomq worker serving the same queue checks it at every maintenance.
    release_p2 = threading.Event()

    class Blocking:
        def execute_job(self, job: Any) -> Any:
            release_p2.wait(10)
            return "p2 done"

    p2_worker = await p2_workers({"slow": Blocking()}, name="p2-slow", timeout=1)
    p2_job_id = (await source.call("slow", "wait")).id

    async def p2_running() -> bool:
        return bool((await fetch_job(db, p2_job_id))["state"] == "running")

    await wait_until(p2_running, 5, "psycopg2_mq to claim the job")
    assert (await fetch_job(db, p2_job_id))["lock_id"] == p2_worker.lock_id
    async with make_worker({"slow": AsyncEcho()}, name="aiomq-watcher", timeout=1):
        await asyncio.sleep(2.5)
        row = await fetch_job(db, p2_job_id)
        assert (row["state"], row["lock_id"], row["worker"]) == ("running", p2_worker.lock_id, "p2-slow")
    release_p2.set()
    assert (await source.wait_for_job(p2_job_id, timeout=5, poll_interval=0.2)).result == "p2 done"

    # aiomq runs a job; a psycopg2_mq worker serving the same queue checks it at every maintenance.
    release = asyncio.Event()

    async def blocking(job: JobContext) -> str:
        await release.wait()
        return "aiomq done"

    aiomq_worker = make_worker({"held": blocking}, name="aiomq-held", timeout=5)
    async with aiomq_worker:
        queued = await source.call("held", "wait")

        async def aiomq_running() -> bool:
            return bool((await fetch_job(db, queued.id))["state"] == "running")

        await wait_until(aiomq_running, 5, "aiomq to claim the job")
        lock_id = (await fetch_job(db, queued.id))["lock_id"]
        # Held in the two-key form (classid, objid, objsubid=2) psycopg2_mq's lost-job join looks for.
        held = await db.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid = $1::int::oid AND objid = $2::int::oid AND objsubid = 2",
            LOCK_KEY,
            lock_id,
        )
        assert held == 1
        p2_watcher = await p2_workers({"held": EchoQueue()}, name="p2-watcher", timeout=1)
        await asyncio.sleep(2.5)
        row = await fetch_job(db, queued.id)
        assert (row["state"], row["lock_id"]) == ("running", lock_id)

        # The aiomq worker's listener connection dies and cannot come back: psycopg2_mq marks its job lost.
        aiomq_worker.listener_dsn = (
            sa.make_url(pg_server.dsn).set(port=1).render_as_string(hide_password=False)
        )
        killed = await db.fetchval(
            "SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l "
            "WHERE l.locktype = 'advisory' AND l.classid = $1::int::oid AND l.objid = $2::int::oid",
            LOCK_KEY,
            lock_id,
        )
        assert killed == 1

        async def marked_lost() -> bool:
            return bool((await fetch_job(db, queued.id))["state"] == "lost")

        await wait_until(marked_lost, 5, "psycopg2_mq to mark the aiomq job lost")
        await p2_watcher.stop()
        # The handler finishes after all: the worker that did the work records it (DESIGN §3).
        release.set()
        await wait_until(lambda: _state_is(db, queued.id, "completed"), 5, "aiomq to record the finished job")
    row = await fetch_job(db, queued.id)
    assert (row["state"], row["result"], row["lock_id"]) == ("completed", "aiomq done", None)


async def _state_is(db: Any, job_id: int, state: str) -> bool:
    return bool((await fetch_job(db, job_id))["state"] == state)


# ----------------------------------------------------------------------------------------------- c) collapse


async def test_collapse_across_libraries(sync_engine: sa.Engine, source: AsyncMQSource, db: Any) -> None:
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None, microsecond=0)
    later = now + datetime.timedelta(minutes=10)

    # aiomq first (collapsible by default with a cursor), then psycopg2_mq joins it.
    queued = await source.call("echo", "hello", {"n": 1}, cursor_key="k", when=later)
    assert queued.created
    joined = await p2_call(
        sync_engine, "echo", "hello", {"n": 2}, cursor_key="k", collapse_on_cursor=True, when=later
    )
    assert joined == queued.id
    # An earlier time from psycopg2_mq moves the shared job earlier.
    earlier = now + datetime.timedelta(minutes=5)
    assert (
        await p2_call(
            sync_engine, "echo", "hello", {"n": 3}, cursor_key="k", collapse_on_cursor=True, when=earlier
        )
        == queued.id
    )
    row = await fetch_job(db, queued.id)
    assert row["args"] == {"n": 1}
    assert row["collapsible"] is True
    assert _iso(row["scheduled_time"]) == earlier

    # psycopg2_mq's default (no collapse) adds a job; aiomq's next call still joins the collapsible one.
    separate = await p2_call(sync_engine, "echo", "hello", {"n": 4}, cursor_key="k")
    assert separate != queued.id
    again = await source.call("echo", "hello", {"n": 5}, cursor_key="k", when=later)
    assert (again.id, again.created) == (queued.id, False)
    assert again.scheduled_time == earlier

    # psycopg2_mq first, then aiomq joins it; a different method is a different collapse slot.
    p2_first = await p2_call(sync_engine, "echo", "other", {"n": 6}, cursor_key="k2", collapse_on_cursor=True)
    from_aiomq = await source.call("echo", "other", {"n": 7}, cursor_key="k2")
    assert (from_aiomq.id, from_aiomq.created) == (p2_first, False)
    other_method = await source.call("echo", "third", {"n": 8}, cursor_key="k2")
    assert other_method.created

    # aiomq's conflict resolver sees psycopg2_mq's row and its changes are committed.
    def resolver(job: Any) -> None:
        job.args = {**job.args, "merged": True}

    merged = await source.call("echo", "other", {"n": 9}, cursor_key="k2", conflict_resolver=resolver)
    assert merged.id == p2_first
    assert (await p2_job(sync_engine, p2_first))["args"] == {"n": 6, "merged": True}

    counts = await db.fetch("SELECT cursor_key, count(*) FROM mq_job GROUP BY cursor_key ORDER BY cursor_key")
    assert [tuple(r) for r in counts] == [("k", 2), ("k2", 2)]


# ---------------------------------------------------------------------------------------------- both workers


async def test_both_workers_share_one_queue(
    sync_engine: sa.Engine, source: AsyncMQSource, make_worker: MakeWorker, p2_workers: Any, db: Any
) -> None:
    """Jobs from both sources, run by both workers at once: each once, one at a time per cursor.

    Cursor jobs take 30 ms here. psycopg2_mq's claim reads the cursor in a SELECT and marks the job running
    in a later UPDATE; if another worker claims, runs and finishes the cursor's previous job in between,
    psycopg2_mq starts from the cursor as it was before that job (its own race, between its own workers
    too, but aiomq finishes a no-op job in about a millisecond). README, "Differences from psycopg2_mq".
    """

    class SlowEcho(EchoQueue):
        def execute_job(self, job: Any) -> Any:
            if job.cursor_key is not None:
                time.sleep(0.03)
            return super().execute_job(job)

    class SlowAsyncEcho(AsyncEcho):
        async def execute_job(self, job: JobContext) -> Any:
            if job.cursor_key is not None:
                await asyncio.sleep(0.03)
            return await super().execute_job(job)

    p2_handler, aiomq_handler = SlowEcho(), SlowAsyncEcho()
    await p2_workers({"echo": p2_handler}, name="p2-shared", timeout=1)
    async with make_worker({"echo": aiomq_handler}, name="aiomq-shared", timeout=1, concurrency=4):
        ids: list[int] = []
        for i in range(6):
            for cursor in ("s1", "s2", None):
                args = {"name": f"{cursor}-{i}"}
                if i % 2:
                    ids.append(await p2_call(sync_engine, "echo", "hello", args, cursor_key=cursor))
                else:
                    queued = await source.call(
                        "echo", "hello", args, cursor_key=cursor, collapse_on_cursor=False
                    )
                    ids.append(queued.id)
        for job_id in ids:
            assert (await source.wait_for_job(job_id, timeout=15, poll_interval=0.2)).state == "completed"

    runs = p2_handler.seen + aiomq_handler.seen
    assert sorted(r["id"] for r in runs) == sorted(ids)  # every job ran exactly once
    rows = {job_id: await fetch_job(db, job_id) for job_id in ids}
    assert {r["worker"] for r in rows.values()} <= {"p2-shared", "aiomq-shared"}
    for cursor in ("s1", "s2"):
        mine = sorted(job_id for job_id, r in rows.items() if r["cursor_key"] == cursor)
        saved = await source.get_cursor(cursor)
        assert saved is not None
        # Each job saw the cursor its predecessor saved, whichever library ran either of them: the ids
        # appended to it are the order the jobs ran in (enqueue order, except where two workers raced for
        # one cursor, which the reference does not order either).
        history = [
            (j, rows[j]["worker"], rows[j]["cursor_snapshot"], rows[j]["start_time"], rows[j]["end_time"])
            for j in mine
        ]
        assert saved["count"] == 6, (saved, history)
        assert sorted(saved["ids"]) == mine
        for position, job_id in enumerate(saved["ids"]):
            snapshot = rows[job_id]["cursor_snapshot"]
            if position == 0:
                assert snapshot is None
            else:
                assert snapshot == {"count": position, "ids": saved["ids"][:position]}
        # start_time and end_time are worker clocks read just before the claim and the finish statements
        # (both libraries): the database orders the two, the clocks may disagree by a little.
        for before, after in itertools.pairwise(saved["ids"]):
            skew = _iso(rows[before]["end_time"]) - _iso(rows[after]["start_time"])
            assert skew <= datetime.timedelta(milliseconds=50), history


async def test_cursor_shared_by_queues_that_different_libraries_serve(
    sync_engine: sa.Engine, source: AsyncMQSource, make_worker: MakeWorker, p2_workers: Any, db: Any
) -> None:
    """One cursor, queue ``a`` served by psycopg2_mq and queue ``b`` by aiomq (a migration half done).

    psycopg2_mq sends no hint when its cursor job finishes, so aiomq must find ``b``'s job on its own
    timer (maintenance every second here); aiomq's finish hints queue ``a`` (DESIGN §2).
    """
    release = threading.Event()

    class First:
        def execute_job(self, job: Any) -> Any:
            if job.args["n"] == 1:
                release.wait(10)
            count_on_cursor(job)
            return job.args["n"]

    a1 = await p2_call(sync_engine, "a", "step", {"n": 1}, cursor_key="x")
    b2 = await source.call("b", "step", {"n": 2}, cursor_key="x")
    a3 = await p2_call(sync_engine, "a", "step", {"n": 3}, cursor_key="x")
    await p2_workers({"a": First()}, name="p2-a", timeout=5)
    await wait_until(lambda: _state_is(db, a1, "running"), 5, "psycopg2_mq to start the first job")

    async def second(job: JobContext) -> Any:
        count_on_cursor(job)
        return job.args["n"]

    async with make_worker({"b": second}, name="aiomq-b", timeout=1):
        await asyncio.sleep(1.5)  # aiomq has looked at queue b (its job is blocked by the cursor) and idles
        assert await _state_is(db, b2.id, "pending")
        release.set()
        for job_id in (a1, b2.id, a3):
            info = await source.wait_for_job(job_id, timeout=4, poll_interval=0.2)
            assert info.state == "completed"
    assert await source.get_cursor("x") == {"count": 3, "ids": [a1, b2.id, a3]}
    assert [(await fetch_job(db, j))["worker"] for j in (a1, b2.id, a3)] == ["p2-a", "aiomq-b", "p2-a"]
