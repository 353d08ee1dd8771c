"""AsyncMQSource.call_many: call()'s semantics per item, few statements, one NOTIFY per queue."""

from __future__ import annotations

import asyncio
import datetime
import json
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from aiomq import AsyncMQSource
from aiomq.model import Model


async def collect(db: Any, *channels: str) -> list[tuple[str, Any]]:
    got: list[tuple[str, Any]] = []

    def on(conn: Any, pid: int, channel: str, payload: str) -> None:
        got.append((channel, json.loads(payload)))

    for channel in channels:
        await db.add_listener(channel, on)
    return got


async def test_plain_jobs_in_order_with_one_notify_per_queue(source: AsyncMQSource, db: Any) -> None:
    notes = await collect(db, "mq_a", "mq_b")
    now = datetime.datetime(2030, 1, 1, 12, 0, 0)
    calls = [
        {
            "queue": "a" if i % 2 else "b",
            "method": "m",
            "args": {"i": i},
            "now": now,
            "when": now + datetime.timedelta(seconds=10 - i),
        }
        for i in range(10)
    ]
    jobs = await source.call_many(calls)
    assert [j.created for j in jobs] == [True] * 10
    rows = {r["id"]: r for r in await db.fetch("SELECT * FROM mq_job")}
    assert len(rows) == 10
    for i, job in enumerate(jobs):  # each QueuedJob matches its own call
        row = rows[job.id]
        assert json.loads(row["args"]) == {"i": i}
        assert row["queue"] == ("a" if i % 2 else "b")
        assert row["scheduled_time"] == now + datetime.timedelta(seconds=10 - i) == job.scheduled_time
        assert row["created_time"] == now
        assert row["collapsible"] is False
        assert row["trace"] == "null"
    await db.execute("SELECT pg_notify('mq_a', $1)", json.dumps({"marker": 1}))
    for _ in range(100):
        if any("marker" in p for _, p in notes):
            break
        await asyncio.sleep(0.02)
    hints = [(c, p) for c, p in notes if "marker" not in p]
    assert sorted(c for c, _ in hints) == ["mq_a", "mq_b"]  # one per queue
    for channel, payload in hints:  # each queue's hint names its earliest job
        naive = datetime.datetime(1970, 1, 1) + datetime.timedelta(seconds=payload["t"])
        assert naive == min(rows[j.id]["scheduled_time"] for j in jobs if f"mq_{j.queue}" == channel)
        assert rows[payload["j"]]["scheduled_time"] == naive


async def test_calls_sharing_a_collapse_slot_join_the_first(source: AsyncMQSource, db: Any) -> None:
    now = datetime.datetime(2030, 1, 1)
    seen: list[int] = []

    def resolver(job: Any) -> None:
        seen.append(job.id)
        job.args = {**job.args, "joined": job.args.get("joined", 0) + 1}

    jobs = await source.call_many(
        [
            {
                "queue": "q",
                "method": "m",
                "args": {"n": 1},
                "cursor_key": "k",
                "now": now,
                "when": now + datetime.timedelta(seconds=30),
            },
            {
                "queue": "q",
                "method": "m",
                "args": {"n": 2},
                "cursor_key": "k",
                "now": now,
                "conflict_resolver": resolver,
                "when": now + datetime.timedelta(seconds=5),
            },
            {"queue": "q", "method": "other", "args": {"n": 3}, "cursor_key": "k", "now": now},
            {
                "queue": "q",
                "method": "m",
                "args": {"n": 4},
                "cursor_key": "k",
                "collapse_on_cursor": False,
                "now": now,
            },
        ]
    )
    assert [j.created for j in jobs] == [True, False, True, True]
    assert jobs[0].id == jobs[1].id
    assert seen == [jobs[0].id]
    assert jobs[1].scheduled_time == now + datetime.timedelta(seconds=5)  # moved earlier by the join
    row = await db.fetchrow("SELECT args, scheduled_time FROM mq_job WHERE id = $1", jobs[0].id)
    assert json.loads(row["args"]) == {"n": 1, "joined": 1}
    assert row["scheduled_time"] == now + datetime.timedelta(seconds=5)
    assert await db.fetchval("SELECT count(*) FROM mq_job") == 3


async def test_joins_a_job_committed_earlier(source: AsyncMQSource) -> None:
    first = await source.call("q", "m", cursor_key="k")
    again = await source.call_many(
        [{"queue": "q", "method": "m", "cursor_key": "k"}, {"queue": "q", "method": "x"}]
    )
    assert (again[0].id, again[0].created) == (first.id, False)
    assert again[1].created


async def test_bad_item_raises_naming_it_and_writes_nothing(source: AsyncMQSource, db: Any) -> None:
    good = {"queue": "q", "method": "m"}
    with pytest.raises(TypeError, match=r"call 1: args cannot be stored as JSON"):
        await source.call_many([good, {"queue": "q", "method": "m", "args": {"s": {1}}}])
    with pytest.raises(ValueError, match=r"call 2: invalid queue name"):
        await source.call_many([good, good, {"queue": "no-dashes", "method": "m"}])
    with pytest.raises(TypeError, match="needs queue and method"):
        await source.call_many([{"queue": "q"}])
    with pytest.raises(TypeError, match="unknown"):
        await source.call_many([{"queue": "q", "method": "m", "bogus": 1}])
    assert await db.fetchval("SELECT count(*) FROM mq_job") == 0


async def test_in_the_callers_transaction(engine: AsyncEngine, model: Model, db: Any) -> None:
    sessions = async_sessionmaker(engine)
    async with sessions() as session, session.begin():
        jobs = await AsyncMQSource(dbsession=session, model=model).call_many(
            [{"queue": "q", "method": "m"}, {"queue": "q", "method": "m", "cursor_key": "c"}]
        )
        assert await db.fetchval("SELECT count(*) FROM mq_job") == 0  # not committed yet
        await session.rollback()
    assert len(jobs) == 2
    assert await db.fetchval("SELECT count(*) FROM mq_job") == 0
    async with sessions() as session, session.begin():
        await AsyncMQSource(dbsession=session, model=model).call_many([{"queue": "q", "method": "m"}] * 3)
    assert await db.fetchval("SELECT count(*) FROM mq_job") == 3


async def test_provenance_and_job_kwargs_items(source: AsyncMQSource, db: Any, model: Model) -> None:
    jobs = await source.call_many(
        [
            {"queue": "q", "method": "m", "job_kwargs": {"worker": "w9"}},
            {"queue": "q", "method": "m", "trace": {"a": 1}},
        ]
    )
    rows = {r["id"]: r for r in await db.fetch("SELECT id, worker, trace FROM mq_job")}
    assert rows[jobs[0].id]["worker"] == "w9"
    assert json.loads(rows[jobs[1].id]["trace"]) == {"a": 1}


async def test_concurrent_batches_on_the_same_cursors_do_not_deadlock(
    engine: AsyncEngine, model: Model
) -> None:
    sessions = async_sessionmaker(engine)

    async def batch(keys: list[str]) -> None:
        async with sessions() as session, session.begin():
            await AsyncMQSource(dbsession=session, model=model).call_many(
                [{"queue": "q", "method": "m", "cursor_key": k} for k in keys]
            )
            await asyncio.sleep(0.2)  # hold the slots while the other batch runs

    # opposite orders: call() in these orders would deadlock (reference §8.8)
    await asyncio.wait_for(
        asyncio.gather(batch([f"k{i}" for i in range(5)]), batch([f"k{i}" for i in reversed(range(5))])),
        timeout=20,
    )
