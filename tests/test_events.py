"""Listeners and events (reference §11).

``add_listener`` and ``emit_event`` run with an injected ``now``; the ``mq.job_finished.*`` events run
through real workers (``run_until_idle()`` with an injected clock) and real state changes, in their
transactions.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import random
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from aiomq import AsyncMQSource, AsyncMQWorker, FailedJobError, JobContext, QueuedJob
from aiomq.model import Model

from .conftest import Clock

MakeWorker = Callable[..., AsyncMQWorker]

LOCK_KEY = 1250360252
T0 = datetime.datetime(2030, 1, 1, 12, 0, 30, 123000)
EVENT = "thing.happened"
FINISHED_KEYS = {"id", "queue", "method", "start_time", "end_time", "result"}
LOST_KEYS = {"job", "queue", "method", "start_time", "end_time"}


def stamp(now: datetime.datetime) -> str:
    """The event envelope's ``now``: ISO 8601 with ``+00:00``."""
    return now.replace(tzinfo=datetime.UTC).isoformat()


def envelope(listener_id: int, now: datetime.datetime, data: Any, name: str = EVENT) -> dict[str, Any]:
    return {"name": name, "listener_id": listener_id, "now": stamp(now), "data": data}


# ---------------------------------------------------------------------------------------------- helpers


def _decode(row: Any) -> dict[str, Any]:
    out = dict(row)
    for key in ("args", "trace", "result", "cursor_snapshot"):
        if out.get(key) is not None:
            out[key] = json.loads(out[key])
    return out


async def jobs_in(db: Any, queue: str) -> list[dict[str, Any]]:
    rows = await db.fetch("SELECT * FROM mq_job WHERE queue = $1 ORDER BY id", queue)
    return [_decode(r) for r in rows]


async def job_row(db: Any, job_id: int) -> dict[str, Any]:
    row = await db.fetchrow("SELECT * FROM mq_job WHERE id = $1", job_id)
    assert row is not None, f"no job {job_id}"
    return _decode(row)


async def listener_row(db: Any, listener_id: int) -> dict[str, Any]:
    row = await db.fetchrow("SELECT * FROM mq_job_listener WHERE id = $1", listener_id)
    assert row is not None, f"no listener {listener_id}"
    out = dict(row)
    out["args"] = json.loads(out["args"])
    return out


async def listener_links(db: Any) -> list[tuple[int, int]]:
    rows = await db.fetch("SELECT job_id, listener_id FROM mq_job_listener_link ORDER BY job_id, listener_id")
    return [(r["job_id"], r["listener_id"]) for r in rows]


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


async def make_lost(db: Any, job_id: int, start: datetime.datetime, end: datetime.datetime) -> None:
    """Leave a job as maintenance leaves a lost one: state lost, no lock, end_time set."""
    status = await db.execute(
        "UPDATE mq_job SET state = 'lost', lock_id = NULL, worker = 'ghost', start_time = $2, end_time = $3 "
        "WHERE id = $1",
        job_id,
        start,
        end,
    )
    assert status == "UPDATE 1"


async def echo(job: JobContext) -> Any:
    return {"echo": job.args}


async def boom(job: JobContext) -> Any:
    raise ValueError("boom", 3)


async def refuse(job: JobContext) -> Any:
    raise FailedJobError({"code": 7})


# ---------------------------------------------------------------------------------------------- add_listener


async def test_add_listener_stores_the_row(source: AsyncMQSource, db: Any) -> None:
    plain = await source.add_listener(EVENT, "ev", "on_thing", {"a": 1}, now=T0)
    assert await listener_row(db, plain.id) == {
        "id": plain.id,
        "created_time": T0,
        "is_enabled": True,
        "event": EVENT,
        "queue": "ev",
        "method": "on_thing",
        "args": {"a": 1},
        "context_arg_key": "event",
        "when": None,
        "cursor_key": None,
        "collapse_on_cursor": False,
    }
    assert (plain.id, plain.context_arg_key, plain.collapse_on_cursor) == (plain.id, "event", False)

    delayed = await source.add_listener(
        EVENT, "ev", "later", when=datetime.timedelta(minutes=1, seconds=30), is_enabled=False, now=T0
    )
    row = await listener_row(db, delayed.id)
    assert (row["when"], row["is_enabled"], row["args"]) == (datetime.timedelta(seconds=90), False, {})
    assert await db.fetchval(
        'SELECT pg_typeof("when")::text FROM mq_job_listener WHERE id = $1', delayed.id
    ) == ("interval")

    # aiomq collapses by default when a cursor is given, so such listeners get a list of events.
    collapsing = await source.add_listener(EVENT, "ev", "batch", cursor_key="c", now=T0)
    row = await listener_row(db, collapsing.id)
    assert (row["cursor_key"], row["collapse_on_cursor"], row["context_arg_key"]) == ("c", True, "events")

    explicit = await source.add_listener(EVENT, "ev", "one", cursor_key="c", collapse_on_cursor=False, now=T0)
    row = await listener_row(db, explicit.id)
    assert (row["cursor_key"], row["collapse_on_cursor"], row["context_arg_key"]) == ("c", False, "event")

    custom = await source.add_listener(EVENT, "ev", "custom", context_arg_key="ctx", cursor_key="d", now=T0)
    row = await listener_row(db, custom.id)
    assert (row["collapse_on_cursor"], row["context_arg_key"]) == (True, "ctx")


async def test_add_listener_rejects_bad_input_and_writes_nothing(source: AsyncMQSource, db: Any) -> None:
    for when in (5, 2.5, T0, "PT5M"):
        with pytest.raises(TypeError):
            await source.add_listener(EVENT, "ev", "m", when=when, now=T0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cursor"):
        await source.add_listener(EVENT, "ev", "m", collapse_on_cursor=True, now=T0)
    with pytest.raises(ValueError, match="queue"):
        await source.add_listener(EVENT, "not-a-queue", "m", now=T0)
    with pytest.raises(TypeError):
        await source.add_listener(EVENT, "ev", "m", {"x": {1, 2}}, now=T0)
    assert await db.fetchval("SELECT count(*) FROM mq_job_listener") == 0


async def test_get_enable_disable_listener(source: AsyncMQSource, db: Any) -> None:
    listener = await source.add_listener(EVENT, "ev", "m", {"a": 1}, now=T0)
    got = await source.get_listener(listener.id)
    assert (got.id, got.event, got.queue, got.method, got.args, got.is_enabled) == (
        listener.id,
        EVENT,
        "ev",
        "m",
        {"a": 1},
        True,
    )
    with pytest.raises(LookupError):
        await source.get_listener(listener.id + 1000)
    assert await source.get_listener(listener.id + 1000, raises=False) is None

    await source.disable_listener(listener.id)
    assert (await listener_row(db, listener.id))["is_enabled"] is False
    assert await source.emit_event(EVENT, {"n": 1}, now=T0) == []
    await source.disable_listener(listener.id)  # a no-op
    assert (await listener_row(db, listener.id))["is_enabled"] is False

    await source.enable_listener(listener.id, now=T0)
    assert (await listener_row(db, listener.id))["is_enabled"] is True
    await source.enable_listener(listener.id)  # a no-op
    [queued] = await source.emit_event(EVENT, {"n": 2}, now=T0)
    assert (await job_row(db, queued.id))["args"]["event"]["data"] == {"n": 2}
    assert len(await jobs_in(db, "ev")) == 1

    for toggle in (source.enable_listener, source.disable_listener):
        with pytest.raises(LookupError):
            await toggle(listener.id + 1000)


# ---------------------------------------------------------------------------------------------- emit_event


async def test_emit_event_makes_one_job_per_enabled_matching_listener(source: AsyncMQSource, db: Any) -> None:
    plain = await source.add_listener(EVENT, "ev", "plain", {"a": 1}, now=T0)
    delayed = await source.add_listener(EVENT, "ev", "delayed", when=datetime.timedelta(seconds=30), now=T0)
    clash = await source.add_listener(EVENT, "ev", "clash", {"event": "mine", "b": 2}, now=T0)
    custom = await source.add_listener(EVENT, "ev", "custom", context_arg_key="ctx", now=T0)
    await source.add_listener("thing", "ev", "prefix", now=T0)  # no wildcards, no prefixes
    await source.add_listener(EVENT + ".more", "ev", "longer", now=T0)
    await source.add_listener("Thing.Happened", "ev", "case", now=T0)
    await source.add_listener(EVENT, "ev", "disabled", is_enabled=False, now=T0)

    now = T0 + datetime.timedelta(hours=1)
    data = {"x": [1, 2], "y": None}
    queued = await source.emit_event(EVENT, data, now=now, trace={"request": "abc"})
    assert all(isinstance(q, QueuedJob) and q.created for q in queued)
    jobs = await jobs_in(db, "ev")
    assert sorted(q.id for q in queued) == [j["id"] for j in jobs]
    by_method = {j["method"]: j for j in jobs}
    assert sorted(by_method) == ["clash", "custom", "delayed", "plain"]

    assert by_method["plain"]["args"] == {"event": envelope(plain.id, now, data), "a": 1}
    assert by_method["delayed"]["args"] == {"event": envelope(delayed.id, now, data)}
    assert by_method["custom"]["args"] == {"ctx": envelope(custom.id, now, data)}
    assert by_method["clash"]["args"] == {"event": "mine", "b": 2}, "the listener's args win over the event"

    listeners = {"plain": plain, "delayed": delayed, "clash": clash, "custom": custom}
    for method, job in by_method.items():
        listener_id = listeners[method].id
        assert job["state"] == "pending"
        assert job["created_time"] == now
        expected = now + datetime.timedelta(seconds=30) if method == "delayed" else now
        assert job["scheduled_time"] == expected, method
        assert job["trace"] == {"request": "abc", "mq_listener_ids": [listener_id]}
        assert job["collapsible"] is False
        assert (job["id"], listener_id) in await listener_links(db)
    assert len(await listener_links(db)) == 4
    returned = {q.id: q for q in queued}
    assert returned[by_method["delayed"]["id"]].scheduled_time == now + datetime.timedelta(seconds=30)

    assert await source.emit_event("nobody.listens", {"x": 1}, now=now) == []
    assert len(await jobs_in(db, "ev")) == 4


async def test_emit_event_without_trace_or_data(source: AsyncMQSource, db: Any) -> None:
    listener = await source.add_listener(EVENT, "ev", "m", now=T0)
    [queued] = await source.emit_event(EVENT, now=T0)
    job = await job_row(db, queued.id)
    assert job["args"] == {"event": envelope(listener.id, T0, None)}
    assert job["trace"] == {"mq_listener_ids": [listener.id]}


async def test_emit_event_with_an_aware_now(source: AsyncMQSource, db: Any) -> None:
    listener = await source.add_listener(EVENT, "ev", "m", when=datetime.timedelta(seconds=5), now=T0)
    paris = datetime.timezone(datetime.timedelta(hours=1))
    [queued] = await source.emit_event(EVENT, 1, now=datetime.datetime(2030, 1, 1, 13, 0, tzinfo=paris))
    utc = datetime.datetime(2030, 1, 1, 12, 0)
    job = await job_row(db, queued.id)
    assert (job["created_time"], job["scheduled_time"]) == (utc, utc + datetime.timedelta(seconds=5))
    assert job["args"]["event"] == envelope(listener.id, utc, 1)
    assert job["args"]["event"]["now"] == "2030-01-01T12:00:00+00:00"


async def test_rows_without_collapse_on_cursor_do_not_collapse(source: AsyncMQSource, db: Any) -> None:
    """Listener and schedule rows made by other code may hold NULL there: treated as False."""
    listener_id = await db.fetchval(
        "INSERT INTO mq_job_listener (created_time, is_enabled, event, queue, method, args, "
        "context_arg_key, cursor_key, collapse_on_cursor) "
        "VALUES ($1, true, $2, 'ev', 'm', '{}', 'event', 'c', NULL) RETURNING id",
        T0,
        EVENT,
    )
    first = await source.emit_event(EVENT, 1, now=T0)
    second = await source.emit_event(EVENT, 2, now=T0)
    assert [q.created for q in first + second] == [True, True]
    jobs = await jobs_in(db, "ev")
    assert [(j["args"], j["collapsible"], j["cursor_key"]) for j in jobs] == [
        ({"event": envelope(listener_id, T0, 1)}, False, "c"),
        ({"event": envelope(listener_id, T0, 2)}, False, "c"),
    ]
    schedule_id = await db.fetchval(
        "INSERT INTO mq_job_schedule (created_time, is_enabled, rrule, queue, method, args, cursor_key, "
        "collapse_on_cursor, next_execution_time) "
        "VALUES ($1, true, 'FREQ=DAILY', 'sq', 'm', '{}', 'c', NULL, NULL) RETURNING id",
        T0,
    )
    a = await source.call_schedule(schedule_id, now=T0)
    b = await source.call_schedule(schedule_id, now=T0)
    assert (a.created, b.created, a.id != b.id) == (True, True, True)
    assert [j["collapsible"] for j in await jobs_in(db, "sq")] == [False, False]


async def test_emit_event_rejects_unstorable_data_and_writes_nothing(source: AsyncMQSource, db: Any) -> None:
    await source.add_listener(EVENT, "ev", "m", now=T0)
    with pytest.raises(TypeError):
        await source.emit_event(EVENT, {"when": T0}, now=T0)
    with pytest.raises(TypeError):
        await source.emit_event(EVENT, {}, now=T0, trace={"s": {1}})
    assert await jobs_in(db, "ev") == []


async def test_collapsing_listener_appends_events_to_the_pending_job(source: AsyncMQSource, db: Any) -> None:
    listener = await source.add_listener(
        EVENT, "ev", "batch", {"a": 1}, cursor_key="c", when=datetime.timedelta(minutes=5), now=T0
    )
    t1, t2, t3 = T0, T0 + datetime.timedelta(seconds=10), T0 + datetime.timedelta(seconds=20)
    [first] = await source.emit_event(EVENT, {"n": 1}, now=t1)
    [second] = await source.emit_event(EVENT, {"n": 2}, now=t2, trace={"ignored": True})
    [third] = await source.emit_event(EVENT, {"n": 3}, now=t3)
    assert (first.created, second.created, third.created) == (True, False, False)
    assert first.id == second.id == third.id
    assert third.scheduled_time == t1 + datetime.timedelta(minutes=5)
    [job] = await jobs_in(db, "ev")
    assert job["args"] == {
        "events": [
            envelope(listener.id, t1, {"n": 1}),
            envelope(listener.id, t2, {"n": 2}),
            envelope(listener.id, t3, {"n": 3}),
        ],
        "a": 1,
    }
    # The job keeps the first event's time: a window anchored at the first event.
    assert (job["created_time"], job["scheduled_time"]) == (t1, t1 + datetime.timedelta(minutes=5))
    assert (job["cursor_key"], job["collapsible"]) == ("c", True)
    assert job["trace"] == {"mq_listener_ids": [listener.id]}
    assert await listener_links(db) == [(job["id"], listener.id)]


async def test_collapsing_listener_starts_a_new_job_once_the_pending_one_runs(
    source: AsyncMQSource, make_worker: MakeWorker, clock: Clock, db: Any
) -> None:
    listener = await source.add_listener(EVENT, "ev", "batch", cursor_key="c", now=clock.now)
    await source.emit_event(EVENT, 1, now=clock.now)
    await source.emit_event(EVENT, 2, now=clock.now)
    await make_worker({"ev": echo}, clock=clock).run_until_idle()
    await source.emit_event(EVENT, 3, now=clock.now)
    jobs = await jobs_in(db, "ev")
    assert [[e["data"] for e in j["args"]["events"]] for j in jobs] == [[1, 2], [3]]
    assert [j["state"] for j in jobs] == ["completed", "pending"]
    assert jobs[0]["result"] == {"echo": {"events": [envelope(listener.id, clock.now, d) for d in (1, 2)]}}


# ---------------------------------------------------------------------------------------------- worker events


@pytest.mark.parametrize(
    ("handler", "state"),
    [(echo, "completed"), (boom, "failed"), (refuse, "failed")],
)
async def test_worker_emits_job_finished_events(
    source: AsyncMQSource,
    make_worker: MakeWorker,
    clock: Clock,
    db: Any,
    handler: Callable[[JobContext], Any],
    state: str,
) -> None:
    clock.now = clock.now.replace(microsecond=250000)
    name = f"mq.job_finished.{state}.src.echo"
    listener = await source.add_listener(name, "ev", "on_finished", {"k": "v"}, now=clock.now)
    other = "failed" if state == "completed" else "completed"
    await source.add_listener(f"mq.job_finished.{other}.src.echo", "ev", "never", now=clock.now)
    await source.add_listener(f"mq.job_finished.{state}.src.other", "ev", "never", now=clock.now)
    queued = await source.call("src", "echo", {"x": 1}, now=clock.now, trace={"origin": "test"})
    clock.advance(seconds=2)

    await make_worker({"src": handler}, clock=clock).run_until_idle()  # serves src only: ev stays pending
    done = await job_row(db, queued.id)
    assert done["state"] == state
    [job] = await jobs_in(db, "ev")
    assert job["method"] == "on_finished"
    event = job["args"]["event"]
    assert job["args"] == {"event": event, "k": "v"}
    assert (event["name"], event["listener_id"], event["now"]) == (name, listener.id, stamp(clock.now))
    data = event["data"]
    assert set(data) == FINISHED_KEYS
    assert (data["id"], data["queue"], data["method"]) == (queued.id, "src", "echo")
    # Naive isoformat strings, without an offset.
    assert data["start_time"] == done["start_time"].isoformat() == clock.now.isoformat()
    assert data["end_time"] == done["end_time"].isoformat() == clock.now.isoformat()
    assert "+" not in data["start_time"]
    assert data["result"] == done["result"]
    if handler is echo:
        assert data["result"] == {"echo": {"x": 1}}
    elif handler is boom:
        assert (data["result"]["exc"], data["result"]["args"]) == ("ValueError", ["'boom'", "3"])
    else:
        assert data["result"] == {"code": 7}
    assert (job["scheduled_time"], job["created_time"]) == (clock.now, clock.now)
    # Events from the worker do not carry the finished job's trace.
    assert job["trace"] == {"mq_listener_ids": [listener.id]}
    assert await listener_links(db) == [(job["id"], listener.id)]


async def test_worker_emits_lost_event_with_job_key_and_no_result(
    source: AsyncMQSource, make_worker: MakeWorker, clock: Clock, db: Any
) -> None:
    listener = await source.add_listener("mq.job_finished.lost.src.echo", "ev", "on_lost", now=clock.now)
    await source.add_listener("mq.job_finished.failed.src.echo", "ev", "never", now=clock.now)
    queued = await source.call("src", "echo", now=clock.now)
    start = clock.now.replace(microsecond=500000)
    status = await db.execute(
        "UPDATE mq_job SET state = 'running', lock_id = $2, worker = 'ghost', start_time = $3 WHERE id = $1",
        queued.id,
        await unheld_lock_id(db),
        start,
    )
    assert status == "UPDATE 1"
    clock.advance(seconds=30)

    await make_worker({"src": echo}, clock=clock).run_until_idle()
    lost = await job_row(db, queued.id)
    assert (lost["state"], lost["end_time"], lost["result"]) == ("lost", clock.now, None)
    [job] = await jobs_in(db, "ev")
    event = job["args"]["event"]
    assert (event["name"], event["listener_id"], event["now"]) == (
        "mq.job_finished.lost.src.echo",
        listener.id,
        stamp(clock.now),
    )
    assert event["data"] == {
        "job": queued.id,
        "queue": "src",
        "method": "echo",
        "start_time": start.isoformat(),
        "end_time": clock.now.isoformat(),
    }
    assert set(event["data"]) == LOST_KEYS
    assert job["trace"] == {"mq_listener_ids": [listener.id]}


async def test_fail_lost_job_emits_failed_with_its_result(source: AsyncMQSource, db: Any) -> None:
    listener = await source.add_listener("mq.job_finished.failed.src.echo", "ev", "on_failed", now=T0)
    for result in ({"why": "gone"}, None):
        await db.execute("DELETE FROM mq_job WHERE queue = 'ev'")
        queued = await source.call("src", "echo", now=T0)
        start, end = T0 + datetime.timedelta(seconds=1), T0 + datetime.timedelta(seconds=9, microseconds=5)
        await make_lost(db, queued.id, start, end)
        await source.fail_lost_job(queued.id, result=result)
        failed = await job_row(db, queued.id)
        assert (failed["state"], failed["result"], failed["end_time"]) == ("failed", result, end)
        [job] = await jobs_in(db, "ev")
        event = job["args"]["event"]
        assert (event["name"], event["listener_id"]) == ("mq.job_finished.failed.src.echo", listener.id)
        assert event["now"].endswith("+00:00")
        assert event["data"] == {
            "id": queued.id,
            "queue": "src",
            "method": "echo",
            "start_time": start.isoformat(),
            "end_time": end.isoformat(),
            "result": result,
        }
        assert job["trace"] == {"mq_listener_ids": [listener.id]}
        assert await listener_links(db) == [(job["id"], listener.id)]


async def test_cancel_job_emits_nothing(source: AsyncMQSource, make_worker: MakeWorker, db: Any) -> None:
    for state in ("canceled", "failed", "completed", "lost"):
        await source.add_listener(f"mq.job_finished.{state}.src.echo", "ev", f"on_{state}", now=T0)
    pending = await source.call("src", "echo", now=T0)
    await source.cancel_job(pending.id)
    assert (await job_row(db, pending.id))["state"] == "canceled"
    assert await jobs_in(db, "ev") == []

    lost = await source.call("src", "echo", now=T0)
    await make_lost(db, lost.id, T0, T0)
    await source.fail_lost_job(lost.id)
    assert [j["method"] for j in await jobs_in(db, "ev")] == ["on_failed"]
    await source.cancel_job(lost.id)  # a failed job may be canceled: still no event
    assert (await job_row(db, lost.id))["state"] == "canceled"
    assert [j["method"] for j in await jobs_in(db, "ev")] == ["on_failed"]


async def test_fail_lost_job_event_commits_or_rolls_back_with_the_state_change(
    engine: AsyncEngine, model: Model, db: Any
) -> None:
    source = AsyncMQSource(engine=engine, model=model)
    await source.add_listener("mq.job_finished.failed.src.echo", "ev", "on_failed", now=T0)
    queued = await source.call("src", "echo", now=T0)
    await make_lost(db, queued.id, T0, T0)
    job = model.Job

    async with AsyncSession(engine) as session:
        await AsyncMQSource(dbsession=session, model=model).fail_lost_job(queued.id, result="x")
        inside = await session.scalar(sa.select(sa.func.count()).where(job.queue == "ev"))
        assert inside == 1, "the listener job is written in the caller's transaction"
        assert await jobs_in(db, "ev") == [], "and is not visible before it commits"
        await session.rollback()
    assert (await job_row(db, queued.id))["state"] == "lost"
    assert await jobs_in(db, "ev") == [], "a listener job exists only if the state change committed"
    assert await listener_links(db) == []

    async with AsyncSession(engine) as session, session.begin():
        await AsyncMQSource(dbsession=session, model=model).fail_lost_job(queued.id, result="x")
    assert (await job_row(db, queued.id))["state"] == "failed"
    [event_job] = await jobs_in(db, "ev")
    assert event_job["args"]["event"]["data"]["result"] == "x"


async def test_a_listener_row_with_a_queue_aiomq_refuses_does_not_change_the_job_outcome(
    source: AsyncMQSource, make_worker: MakeWorker, clock: Clock, db: Any
) -> None:
    """psycopg2_mq's add_listener stores any queue string (here one with a hyphen). Such a row must not turn
    a job that succeeded into a failed one, nor leave it running: the outcome is the handler's, and the
    other listeners still get their jobs."""
    for state in ("completed", "failed"):
        await db.execute(
            "INSERT INTO mq_job_listener (created_time, is_enabled, event, queue, method, args, "
            "context_arg_key, cursor_key, collapse_on_cursor) "
            "VALUES ($1, true, $2, 'legacy-queue', 'm', '{}', 'event', NULL, false)",
            clock.now,
            f"mq.job_finished.{state}.src.echo",
        )
    good = await source.add_listener("mq.job_finished.completed.src.echo", "ev", "on_done", now=clock.now)
    queued = await source.call("src", "echo", {"x": 1}, now=clock.now)
    await make_worker({"src": echo}, clock=clock).run_until_idle()
    done = await job_row(db, queued.id)
    assert (done["state"], done["result"]) == ("completed", {"echo": {"x": 1}})
    assert [j["args"]["event"]["listener_id"] for j in await jobs_in(db, "ev")] == [good.id]


async def test_listener_job_appears_atomically_with_the_finished_state(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    await source.add_listener("mq.job_finished.completed.src.slow", "ev", "on_done", now=T0)

    async def slow(job: JobContext) -> str:
        await asyncio.sleep(0.3)
        return "done"

    async with make_worker({"src": slow}):
        queued = await source.call("src", "slow")
        snapshots: list[tuple[str, int]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:
            # One statement, one snapshot: the job's state and the number of listener jobs together.
            row = await db.fetchrow(
                "SELECT (SELECT state::text FROM mq_job WHERE id = $1) AS state, "
                "(SELECT count(*) FROM mq_job WHERE queue = 'ev') AS n",
                queued.id,
            )
            snapshots.append((row["state"], row["n"]))
            if row["state"] == "completed":
                break
            assert loop.time() < deadline, snapshots[-5:]
    states = {s for s, _ in snapshots}
    assert "running" in states
    assert all(n == (1 if s == "completed" else 0) for s, n in snapshots), sorted(set(snapshots))


async def test_listener_chain_runs_to_completion(
    source: AsyncMQSource, make_worker: MakeWorker, clock: Clock, db: Any
) -> None:
    """Upstream test_listener_integration: a completed echo job's listener job runs and completes."""
    listener = await source.add_listener(
        "mq.job_finished.completed.dummy.echo", "listener", "listener_echo", {"a": 1}, now=clock.now
    )
    queued = await source.call("dummy", "echo", {"name": "Andy"}, now=clock.now, trace={"t": 1})
    handled: list[tuple[str, list[int] | None]] = []

    async def handler(job: JobContext) -> Any:
        handled.append((job.queue, job.listener_ids))
        return {"queue": job.queue, "method": job.method, "args": job.args}

    await make_worker({"dummy": handler, "listener": handler}, clock=clock).run_until_idle()
    echo_job = await job_row(db, queued.id)
    [chained] = await jobs_in(db, "listener")
    assert (echo_job["state"], chained["state"]) == ("completed", "completed")
    assert chained["method"] == "listener_echo"
    assert chained["args"] == {
        "a": 1,
        "event": {
            "name": "mq.job_finished.completed.dummy.echo",
            "listener_id": listener.id,
            "now": stamp(clock.now),
            "data": {
                "id": queued.id,
                "queue": "dummy",
                "method": "echo",
                "start_time": clock.now.isoformat(),
                "end_time": clock.now.isoformat(),
                "result": {"queue": "dummy", "method": "echo", "args": {"name": "Andy"}},
            },
        },
    }
    assert chained["result"] == {"queue": "listener", "method": "listener_echo", "args": chained["args"]}
    assert chained["trace"] == {"mq_listener_ids": [listener.id]}
    assert handled == [("dummy", None), ("listener", [listener.id])]
    assert await listener_links(db) == [(chained["id"], listener.id)]
