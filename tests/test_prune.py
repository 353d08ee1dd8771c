"""Pruning finished jobs (DESIGN §7.6): ``prune_jobs`` and the worker's ``prune_after``, on a database."""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable
from typing import Any

import pytest

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext

from .conftest import Clock
from .dbhelpers import wait_for

MakeWorker = Callable[..., AsyncMQWorker]
MINUTE = datetime.timedelta(minutes=1)
HOUR = datetime.timedelta(hours=1)
DAY = datetime.timedelta(days=1)


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


async def noop(job: JobContext) -> None:
    return None


async def make_job(
    source: AsyncMQSource, db: Any, state: str, at: datetime.datetime, queue: str = "q", **kw: Any
) -> int:
    """A job created a minute before ``at`` and, unless pending, started then and ended (or lost) at
    ``at``; running: started at ``at``. Only for queues no worker serves while it is made."""
    job = await source.call(queue, "m", when=at - MINUTE, now=at - MINUTE, **kw)
    if state != "pending":
        await db.execute(
            "UPDATE mq_job SET state = $2::text::mq_job_state, lock_id = 1, worker = 'w', start_time = $3,"
            " end_time = CASE WHEN $2::text = 'running' THEN NULL ELSE $3::timestamp END WHERE id = $1",
            job.id,
            state,
            at,
        )
    return job.id


async def make_jobs(source: AsyncMQSource, db: Any, state: str, at: datetime.datetime, n: int) -> list[int]:
    """``n`` jobs of queue ``old`` that ended in ``state`` at ``at``, in one statement or two."""
    queued = await source.call_many([{"queue": "old", "method": "m", "now": at - MINUTE}] * n)
    ids = [job.id for job in queued]
    await db.execute(
        "UPDATE mq_job SET state = $2::text::mq_job_state, start_time = $3, end_time = $3"
        " WHERE id = ANY($1::bigint[])",
        ids,
        state,
        at,
    )
    return ids


async def job_ids(db: Any) -> list[int]:
    return [row["id"] for row in await db.fetch("SELECT id FROM mq_job ORDER BY id")]


# ------------------------------------------------------------------------------------------ prune_jobs


async def test_prune_deletes_old_completed_and_canceled_jobs_and_nothing_else(
    source: AsyncMQSource, db: Any, clock: Clock
) -> None:
    now = clock.now
    old, recent = now - 2 * DAY, now - HOUR
    for state in ("completed", "canceled", "completed"):
        await make_job(source, db, state, old)
    kept = {
        "failed": await make_job(source, db, "failed", old),
        "lost": await make_job(source, db, "lost", old),
        "running": await make_job(source, db, "running", old),
        "pending": await make_job(source, db, "pending", old),
        "recent completed": await make_job(source, db, "completed", recent),
        "recent canceled": await make_job(source, db, "canceled", recent),
    }
    assert await source.prune_jobs(older_than=DAY, now=now, dry_run=True) == 3
    assert len(await job_ids(db)) == 9  # a dry run deletes nothing
    assert await source.prune_jobs(older_than=DAY, now=now) == 3
    assert await job_ids(db) == sorted(kept.values())
    assert await source.prune_jobs(older_than=DAY, now=now) == 0

    assert await source.prune_jobs(older_than=DAY, now=now, states=["failed"]) == 1
    del kept["failed"]
    assert await job_ids(db) == sorted(kept.values())
    states = ("completed", "failed", "canceled")
    assert await source.prune_jobs(older_than=30 * MINUTE, now=now, states=states) == 2
    assert await job_ids(db) == [kept["lost"], kept["running"], kept["pending"]]


async def test_prune_of_one_queue_leaves_the_others(source: AsyncMQSource, db: Any, clock: Clock) -> None:
    old = clock.now - 2 * DAY
    await make_job(source, db, "completed", old, queue="a")
    await make_job(source, db, "canceled", old, queue="a")
    other = await make_job(source, db, "completed", old, queue="b")
    assert await source.prune_jobs(older_than=DAY, queue="b", dry_run=True) == 1
    assert await source.prune_jobs(older_than=DAY, queue="a") == 2
    assert await job_ids(db) == [other]


async def test_prune_keeps_the_job_a_cursor_points_to_and_every_schedule_and_listener(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    async def count(job: JobContext) -> None:
        assert job.cursor is not None
        job.cursor["n"] = job.cursor.get("n", 0) + 1

    schedule = await source.add_schedule("q", "m", rrule="FREQ=DAILY", is_enabled=False)
    listener = await source.add_listener("some.event", "q", "m")
    links: dict[str, Any] = {"schedule_ids": [schedule.id], "listener_ids": [listener.id]}
    jobs = [(await source.call("q", "m", cursor_key="k", collapse_on_cursor=False, **links)).id for _ in "ab"]
    await make_worker({"q": count}).run_until_idle()
    await db.execute(
        "UPDATE mq_job SET created_time = created_time - interval '3 days',"
        " start_time = start_time - interval '2 days', end_time = end_time - interval '2 days'"
    )

    async def rows(table: str) -> list[dict[str, Any]]:
        return [dict(row) for row in await db.fetch(f"SELECT * FROM {table} ORDER BY 1")]

    cursors = await rows("mq_job_cursor")
    assert [(c["key"], c["properties"], c["updated_job_id"]) for c in cursors] == [("k", '{"n": 2}', jobs[1])]
    schedules, listeners = await rows("mq_job_schedule"), await rows("mq_job_listener")
    assert await source.prune_jobs(older_than=DAY) == 1
    assert await job_ids(db) == [jobs[1]]
    assert await rows("mq_job_cursor") == cursors
    assert await rows("mq_job_schedule") == schedules
    assert await rows("mq_job_listener") == listeners
    assert [r["job_id"] for r in await rows("mq_job_schedule_link")] == [jobs[1]]
    assert [r["job_id"] for r in await rows("mq_job_listener_link")] == [jobs[1]]


async def test_prune_walks_every_batch(source: AsyncMQSource, db: Any, clock: Clock) -> None:
    now = clock.now
    old, recent = now - 2 * DAY, now - HOUR
    doomed: list[int] = []
    kept: list[int] = []
    for n in range(20):
        if n % 5 == 4:
            kept.append(await make_job(source, db, "pending", old))
        elif n % 7 == 6:
            kept.append(await make_job(source, db, "failed", old))
        else:
            doomed.append(await make_job(source, db, ("completed", "canceled")[n % 2], old))
    # Whole batches with nothing to delete, then more to delete: the walk goes on.
    kept += [await make_job(source, db, "pending", old) for _ in range(7)]
    doomed += [await make_job(source, db, "completed", old) for _ in range(2)]
    kept += [await make_job(source, db, "completed", recent) for _ in range(4)]
    everything = await job_ids(db)
    assert await source.prune_jobs(older_than=DAY, now=now, batch_size=3, dry_run=True) == len(doomed)
    assert await job_ids(db) == everything
    assert await source.prune_jobs(older_than=DAY, now=now, batch_size=3) == len(doomed) == 16
    assert await job_ids(db) == sorted(kept)
    assert await source.prune_jobs(older_than=DAY, now=now, batch_size=1) == 0


async def test_prune_older_than_a_datetime_naive_or_aware(
    source: AsyncMQSource, db: Any, clock: Clock
) -> None:
    now = clock.now
    ended = {hours: await make_job(source, db, "completed", now - hours * HOUR) for hours in (3, 2, 1)}
    # Naive UTC, and strictly older: the job that ended at the cutoff stays.
    assert await source.prune_jobs(older_than=now - 2 * HOUR) == 1
    assert await job_ids(db) == [ended[2], ended[1]]
    aware = (now - 90 * MINUTE).replace(tzinfo=datetime.UTC).astimezone(datetime.timezone(-5 * HOUR))
    assert await source.prune_jobs(older_than=aware) == 1
    assert await job_ids(db) == [ended[1]]
    assert await source.prune_jobs(older_than=30 * MINUTE) == 1  # before the real now
    assert await job_ids(db) == []


async def test_bad_prune_arguments_are_refused_and_nothing_is_deleted(
    source: AsyncMQSource, db: Any, clock: Clock
) -> None:
    now = clock.now
    for state in ("completed", "canceled", "failed"):
        await make_job(source, db, state, now - 2 * DAY)
    future = (now + HOUR).replace(tzinfo=datetime.UTC).astimezone(datetime.timezone(2 * HOUR))
    cases: list[tuple[type[Exception], str, dict[str, Any]]] = [
        (ValueError, "cannot prune jobs in state 'pending'", {"states": ("pending",)}),
        (ValueError, "cannot prune jobs in state 'running'", {"states": ["completed", "running"]}),
        (ValueError, "cannot prune jobs in state 'lost'", {"states": ("lost",)}),
        (TypeError, "got the string 'completed'", {"states": "completed"}),
        (ValueError, "at least one state", {"states": ()}),
        (ValueError, "older_than is in the future", {"older_than": now + DAY}),
        (ValueError, "older_than is in the future", {"older_than": future}),
        (ValueError, "older_than must not be negative", {"older_than": -DAY}),
        (TypeError, "older_than must be a timedelta or a datetime, got int", {"older_than": 7}),
        (TypeError, "older_than must be a timedelta or a datetime, got str", {"older_than": "7d"}),
        (ValueError, "batch_size must be an integer", {"batch_size": 0}),
        (ValueError, "batch_size must be an integer", {"batch_size": -5}),
        (ValueError, "batch_size must be an integer", {"batch_size": 2.5}),
        (ValueError, "invalid queue name 'bad name!'", {"queue": "bad name!"}),
    ]
    for error, message, kwargs in cases:
        for dry_run in (False, True):
            with pytest.raises(error, match=message):
                await source.prune_jobs(**{"older_than": DAY, "dry_run": dry_run, **kwargs})
    assert len(await job_ids(db)) == 3
    assert await source.prune_jobs(older_than=DAY, states=("completed", "canceled", "failed")) == 3


# ------------------------------------------------------------------------------------------ prune_after


async def test_a_worker_with_prune_after_prunes_at_each_maintenance(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    async with make_worker({"q": noop}, timeout=0.2, prune_after=HOUR):
        await asyncio.sleep(0.3)  # past the first maintenance: what follows is pruned by a later one
        now = utcnow()
        old = await make_jobs(source, db, "completed", now - 2 * HOUR, 5)
        old += await make_jobs(source, db, "canceled", now - 2 * HOUR, 2)
        kept = await make_jobs(source, db, "completed", now - 30 * MINUTE, 3)
        kept += await make_jobs(source, db, "failed", now - 2 * HOUR, 2)

        async def pruned() -> bool:
            left = await db.fetchval("SELECT count(*) FROM mq_job WHERE id = ANY($1::bigint[])", old)
            return bool(left == 0)

        await wait_for(pruned, "maintenance to prune the old jobs")
        ran = await source.call("q", "m")
        assert (await source.wait_for_job(ran.id, timeout=5, poll_interval=0.1)).state == "completed"
        await asyncio.sleep(0.5)  # more passes
    assert await job_ids(db) == sorted([*kept, ran.id])


async def test_run_until_idle_prunes_too(source: AsyncMQSource, make_worker: MakeWorker, db: Any) -> None:
    now = utcnow()
    await make_jobs(source, db, "completed", now - 2 * DAY, 3)
    kept = await make_jobs(source, db, "completed", now - 2 * HOUR, 2)
    await make_worker({"q": noop}, prune_after=DAY).run_until_idle()
    assert await job_ids(db) == kept


async def test_two_workers_with_prune_after_prune_side_by_side(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiomq")
    now = utcnow()
    old = await make_jobs(source, db, "completed", now - 2 * HOUR, 300)
    kept = await make_jobs(source, db, "completed", now - 30 * MINUTE, 5)
    old += await make_jobs(source, db, "canceled", now - 3 * HOUR, 300)

    async def pruned() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM mq_job") == len(kept))

    first = make_worker({"q": noop}, timeout=0.1, prune_after=HOUR, name="w1")
    second = make_worker({"q": noop}, timeout=0.1, prune_after=HOUR, name="w2")
    async with first, second:
        await wait_for(pruned, "the workers to prune the old jobs")
        await asyncio.sleep(0.3)  # more passes of both
        assert first.get_status()["running"]
        assert second.get_status()["running"]
    assert await job_ids(db) == kept
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    # Each old job deleted once, by one worker or the other.
    deleted = 0
    for record in caplog.records:
        if record.msg == "pruned %d jobs that ended before %s" and isinstance(record.args, tuple):
            deleted += int(str(record.args[0]))
    assert deleted == len(old)


async def test_the_prune_duty_skips_its_turn_while_another_prune_holds_the_lock(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    old = await make_jobs(source, db, "completed", utcnow() - 2 * DAY, 3)
    # What a worker's prune holds for its whole run (all batches): a session advisory lock.
    assert await db.fetchval("SELECT pg_try_advisory_lock(hashtext('aiomq prune'))")
    try:
        await make_worker({"q": noop}, prune_after=DAY).run_until_idle()
        assert await job_ids(db) == old, "pruned while another prune held the lock"
    finally:
        assert await db.fetchval("SELECT pg_advisory_unlock(hashtext('aiomq prune'))")
    await make_worker({"q": noop}, prune_after=DAY).run_until_idle()
    assert await job_ids(db) == []
    # The lock is released when the prune ends.
    assert await db.fetchval("SELECT pg_try_advisory_lock(hashtext('aiomq prune'))")
    await db.execute("SELECT pg_advisory_unlock_all()")


async def test_prune_after_must_be_a_positive_duration(make_worker: MakeWorker) -> None:
    for bad in (0, -1, 0.0, datetime.timedelta(0), -HOUR):
        with pytest.raises(ValueError, match="prune_after must be a positive duration"):
            make_worker({"q": noop}, prune_after=bad)
