"""Operating queues (DESIGN §7.6): pausing and resuming, priorities and queue statistics, on a real database.

Pruning is in ``test_prune.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from aiomq import AsyncMQSource, AsyncMQWorker, FailedJobError, JobContext, QueueStats
from aiomq.model import Model

from .conftest import Clock
from .dbhelpers import wait_for

MakeWorker = Callable[..., AsyncMQWorker]
SEC = datetime.timedelta(seconds=1)


class Runs:
    """An async handler recording the jobs it runs, in order, and when each started; with a ``gate``, each
    run waits for it to open (10 s at most)."""

    def __init__(self, gate: asyncio.Event | None = None) -> None:
        self.gate = gate
        self.ids: list[int] = []
        self.started: dict[int, float] = {}

    async def __call__(self, job: JobContext) -> None:
        self.ids.append(job.id)
        self.started[job.id] = time.monotonic()
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), 10)  # (a failing test must not hang the worker's stop)

    def count(self, n: int) -> Callable[[], Awaitable[bool]]:
        async def done() -> bool:
            return len(self.ids) >= n

        return done


async def state_of(db: Any, job_id: int) -> str:
    state: str = await db.fetchval("SELECT state::text FROM mq_job WHERE id = $1", job_id)
    return state


async def paused_rows(db: Any) -> list[str]:
    return [row["queue"] for row in await db.fetch("SELECT queue FROM aiomq_queue_pause ORDER BY queue")]


def paused_in(worker: AsyncMQWorker, *queues: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool(worker.get_status()["paused_queues"] == list(queues))

    return check


# ------------------------------------------------------------------------------------------ pause and resume


async def test_a_paused_queue_keeps_its_jobs_while_the_others_run(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any, clock: Clock
) -> None:
    assert await source.pause_queue("a", now=clock.now) is True
    assert await source.pause_queue("a") is False  # paused already
    assert await db.fetchval("SELECT paused_time FROM aiomq_queue_pause WHERE queue = 'a'") == clock.now
    held = await source.call("a", "m")  # enqueueing goes on
    free = await source.call("b", "m")
    runs = Runs()
    worker = make_worker({"a": runs, "b": runs})
    await worker.run_until_idle()
    assert runs.ids == [free.id]
    assert await state_of(db, held.id) == "pending"
    assert worker.get_status()["paused_queues"] == ["a"]

    assert await source.resume_queue("a") is True
    assert await source.resume_queue("a") is False  # not paused
    assert await paused_rows(db) == []
    await worker.run_until_idle()
    assert runs.ids == [free.id, held.id]
    assert await state_of(db, held.id) == "completed"


async def test_a_queue_paused_mid_run_finishes_its_running_job_and_claims_no_more(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    gate = asyncio.Event()
    runs_a, runs_b = Runs(gate), Runs()
    first = await source.call("a", "m")
    # A long maintenance interval: only the pause's NOTIFY can tell the worker.
    async with make_worker({"a": runs_a, "b": runs_b}, timeout=60) as worker:
        await wait_for(runs_a.count(1), "the first job to start")
        assert await source.pause_queue("a")
        held = await source.call("a", "m")  # at once: the pause's NOTIFY arrives before the job's
        other = await source.call("b", "m")
        assert (await source.wait_for_job(other.id, timeout=5, poll_interval=0.1)).state == "completed"
        assert worker.get_status()["paused_queues"] == ["a"]
        gate.set()
        assert (await source.wait_for_job(first.id, timeout=5, poll_interval=0.1)).state == "completed"
        await asyncio.sleep(0.5)  # a free slot, a hint, and still nothing for a paused queue
        assert runs_a.ids == [first.id]
        assert await state_of(db, held.id) == "pending"

        assert await source.resume_queue("a")
        assert (await source.wait_for_job(held.id, timeout=5, poll_interval=0.1)).state == "completed"
        assert worker.get_status()["paused_queues"] == []
    assert runs_a.ids == [first.id, held.id]
    assert runs_b.ids == [other.id]


async def test_resume_wakes_a_running_worker_through_its_notify(
    source: AsyncMQSource, make_worker: MakeWorker
) -> None:
    assert await source.pause_queue("a")
    jobs = [await source.call("a", "m", {"n": n}) for n in range(3)]
    runs = Runs()
    async with make_worker({"a": runs}, timeout=60) as worker:  # no maintenance during the test
        await asyncio.sleep(0.3)
        assert runs.ids == []
        assert worker.get_status()["paused_queues"] == ["a"]
        assert await source.resume_queue("a")
        resumed = time.monotonic()
        await wait_for(runs.count(3), "the resumed jobs to start")
    took = max(runs.started.values()) - resumed
    assert took < 1, f"the resumed jobs started {took:.3f}s after resume_queue"  # DESIGN: within 100 ms
    assert sorted(runs.ids) == [job.id for job in jobs]


async def test_the_pause_outlives_the_worker(source: AsyncMQSource, make_worker: MakeWorker, db: Any) -> None:
    runs = Runs()
    async with make_worker({"a": runs}, timeout=60):
        assert await source.pause_queue("a")
    job = await source.call("a", "m")
    async with make_worker({"a": runs}, timeout=0.1) as worker:  # maintenance rereads the row, often
        await asyncio.sleep(0.5)
        assert worker.get_status()["paused_queues"] == ["a"]
    await make_worker({"a": runs}).run_until_idle()
    assert runs.ids == []
    assert await state_of(db, job.id) == "pending"
    assert await paused_rows(db) == ["a"]


async def test_a_missed_pause_or_resume_notify_is_made_up_by_maintenance(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    runs = Runs()
    async with make_worker({"a": runs}, timeout=0.2) as worker:
        # The rows without their NOTIFY, as if the worker had missed it.
        await db.execute("INSERT INTO aiomq_queue_pause (queue, paused_time) VALUES ('a', now())")
        await wait_for(paused_in(worker, "a"), "maintenance to read the pause")
        job = await source.call("a", "m")
        await asyncio.sleep(0.5)
        assert runs.ids == []
        await db.execute("DELETE FROM aiomq_queue_pause WHERE queue = 'a'")
        assert (await source.wait_for_job(job.id, timeout=5, poll_interval=0.1)).state == "completed"
        assert worker.get_status()["paused_queues"] == []
    assert runs.ids == [job.id]


async def test_a_pause_in_a_session_is_committed_or_rolled_back_with_it(
    engine: AsyncEngine, model: Model, source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    runs = Runs()
    async with make_worker({"a": runs}, timeout=60) as worker:
        async with AsyncSession(engine) as session:
            assert await AsyncMQSource(dbsession=session, model=model).pause_queue("a")
            assert await paused_rows(db) == []  # not committed
            await session.rollback()
        assert await paused_rows(db) == []
        job = await source.call("a", "m")  # the rolled-back pause never reached the worker
        assert (await source.wait_for_job(job.id, timeout=5, poll_interval=0.1)).state == "completed"
        assert worker.get_status()["paused_queues"] == []

        async with AsyncSession(engine) as session:
            assert await AsyncMQSource(dbsession=session, model=model).pause_queue("a")
            await session.commit()
        assert await paused_rows(db) == ["a"]
        await wait_for(paused_in(worker, "a"), "the committed pause to reach the worker")
    assert runs.ids == [job.id]


async def test_bad_queue_names_are_refused_and_nothing_is_paused(source: AsyncMQSource, db: Any) -> None:
    for bad in ("bad name!", "1x", "", "q" * 61, "mq.queue_pause"):
        with pytest.raises(ValueError, match="invalid queue name"):
            await source.pause_queue(bad)
        with pytest.raises(ValueError, match="invalid queue name"):
            await source.resume_queue(bad)
    assert await paused_rows(db) == []


# ------------------------------------------------------------------------------------------ priorities


async def test_higher_priorities_run_first_then_in_due_order(
    source: AsyncMQSource, make_worker: MakeWorker, clock: Clock
) -> None:
    t = clock.now
    ids: dict[str, int] = {}
    for name, priority, when, created in (
        ("low", -2, t - 20 * SEC, t - 30 * SEC),
        ("normal_late", 0, t - 5 * SEC, t - 30 * SEC),
        ("normal_created_late", 0, t - 10 * SEC, t - 20 * SEC),
        ("normal_created_early", 0, t - 10 * SEC, t - 25 * SEC),  # inserted later, created earlier
        ("high_late", 5, t - 1 * SEC, t - 30 * SEC),
        ("high_early", 5, t - 3 * SEC, t - 30 * SEC),
        ("highest_not_due", 9, t + 60 * SEC, t - 30 * SEC),
    ):
        ids[name] = (await source.call("q", "m", priority=priority, when=when, now=created)).id
    runs = Runs()
    await make_worker({"q": runs}, concurrency=1, clock=clock).run_until_idle()
    names = {job_id: name for name, job_id in ids.items()}
    assert [names[job_id] for job_id in runs.ids] == [
        "high_early",
        "high_late",
        "normal_created_early",
        "normal_created_late",
        "normal_late",
        "low",
    ]


async def test_call_many_items_carry_their_priority(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    queued = await source.call_many(
        [
            {"queue": "q", "method": "m", "args": {"n": 0}},
            {"queue": "q", "method": "m", "args": {"n": 1}, "priority": 3},
            {"queue": "q", "method": "m", "args": {"n": 2}, "priority": -1},
            {"queue": "q", "method": "m", "args": {"n": 3}, "priority": 7, "cursor_key": "c"},  # collapsible
        ]
    )
    plain = await source.call_many([{"queue": "q", "method": "m", "args": {"n": 4}}])
    ids = [job.id for job in (*queued, *plain)]
    rows = await db.fetch("SELECT id, priority FROM mq_job WHERE id = ANY($1::bigint[])", ids)
    assert {row["id"]: row["priority"] for row in rows} == dict(zip(ids, (0, 3, -1, 7, 0), strict=True))
    runs = Runs()
    await make_worker({"q": runs}, concurrency=1).run_until_idle()
    assert runs.ids == [ids[3], ids[1], ids[0], ids[4], ids[2]]


async def test_the_priority_column_defaults_to_zero(source: AsyncMQSource, db: Any) -> None:
    plain = await source.call("q", "m")
    top = await source.call("q", "m", priority=32767)
    bottom = await source.call("q", "m", priority=-32768)
    # As psycopg2_mq inserts: no priority column named.
    raw = await db.fetchval(
        "INSERT INTO mq_job (state, created_time, scheduled_time, queue, method, args)"
        " VALUES ('pending', now(), now(), 'q', 'm', '{}') RETURNING id"
    )
    rows = await db.fetch("SELECT id, priority FROM mq_job ORDER BY id")
    assert [(row["id"], row["priority"]) for row in rows] == [
        (plain.id, 0),
        (top.id, 32767),
        (bottom.id, -32768),
        (raw, 0),
    ]


async def test_a_cursors_jobs_keep_their_order_whatever_their_priorities(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any, clock: Clock
) -> None:
    t = clock.now
    on_cursor = [
        # Without collapsing, so all four are pending on the cursor at once; the later the higher.
        (
            await source.call(
                "q", "m", cursor_key="k", collapse_on_cursor=False, priority=p, when=t - (40 - 10 * p) * SEC
            )
        ).id
        for p in range(4)
    ]
    free = (await source.call("q", "m", priority=1, when=t - 5 * SEC)).id
    runs = Runs()
    worker = make_worker({"q": runs}, concurrency=1, clock=clock)
    await worker.run_until_idle()
    # Only the cursor's first job is claimable at a time; among those claimable, priority decides.
    assert runs.ids == [free, *on_cursor]

    # The same with many slots and a backlog of higher priorities behind the cursor's first job.
    first = (await source.call("q", "m", cursor_key="j", collapse_on_cursor=False, when=t - 60 * SEC)).id
    behind = [
        (
            await source.call(
                "q", "m", cursor_key="j", collapse_on_cursor=False, priority=9, when=t - 50 * SEC
            )
        ).id
        for _ in range(4)
    ]
    await make_worker({"q": runs}, concurrency=2, clock=clock).run_until_idle()
    assert runs.ids[5:] == [first, *behind]
    assert await db.fetchval("SELECT count(*) FROM mq_job WHERE state <> 'completed'") == 0


async def test_retry_job_keeps_the_priority(source: AsyncMQSource, make_worker: MakeWorker, db: Any) -> None:
    async def fail(job: JobContext) -> None:
        raise FailedJobError({"no": job.id})

    urgent = await source.call("q", "m", priority=4)
    humble = await source.call("q", "m", priority=-3)
    await make_worker({"q": fail}).run_until_idle()
    assert [await state_of(db, job.id) for job in (urgent, humble)] == ["failed", "failed"]
    for job, priority in ((urgent, 4), (humble, -3)):
        again = await source.retry_job(job.id)
        assert await db.fetchval("SELECT priority FROM mq_job WHERE id = $1", again.id) == priority


async def test_bad_priorities_are_refused_before_any_sql(source: AsyncMQSource, db: Any) -> None:
    for bad in (1.5, "3", True, None):
        with pytest.raises(TypeError, match="priority must be an integer"):
            await source.call("q", "m", priority=bad)  # type: ignore[arg-type]
    for bad in (-32769, 32768):
        with pytest.raises(ValueError, match=f"priority must be from -32768 to 32767, got {bad}"):
            await source.call("q", "m", priority=bad)
    ok = {"queue": "q", "method": "m"}
    with pytest.raises(TypeError, match="call 1: priority must be an integer"):
        await source.call_many([{**ok, "priority": 2}, {**ok, "priority": "high"}])
    with pytest.raises(ValueError, match="call 2: priority must be from"):
        await source.call_many([ok, {**ok, "priority": 1}, {**ok, "priority": 40000}])
    assert await db.fetchval("SELECT count(*) FROM mq_job") == 0


# ------------------------------------------------------------------------------------------ queue_stats


async def set_state(db: Any, job_id: int, state: str, at: datetime.datetime) -> None:
    """Put a job in ``state`` as a worker would have (running: stamped; finished or lost: ended ``at``)."""
    await db.execute(
        "UPDATE mq_job SET state = $2::text::mq_job_state, lock_id = 1, worker = 'w', start_time = $3,"
        " end_time = CASE WHEN $2::text = 'running' THEN NULL ELSE $3::timestamp END WHERE id = $1",
        job_id,
        state,
        at,
    )


async def test_queue_stats_counts_each_queue_at_the_given_time(
    source: AsyncMQSource, db: Any, clock: Clock
) -> None:
    now = clock.now
    for queue, offset, state in (
        ("alpha", -10, "pending"),
        ("alpha", -5, "pending"),
        ("alpha", 0, "pending"),  # due at exactly now
        ("alpha", 1, "pending"),
        ("alpha", 3600, "pending"),
        ("alpha", -100, "running"),
        ("alpha", -100, "lost"),
        ("alpha", -100, "lost"),
        ("alpha", -100, "completed"),
        ("alpha", -100, "failed"),
        ("beta", -100, "completed"),
        ("beta", -100, "failed"),
        ("beta", -100, "canceled"),
        ("delta", -30, "pending"),
    ):
        job = await source.call(queue, "m", when=now + offset * SEC, now=now - 200 * SEC)
        if state != "pending":
            await set_state(db, job.id, state, now - 50 * SEC)
    assert await source.pause_queue("delta")
    assert await source.pause_queue("gamma")  # a pause, no jobs
    assert await source.queue_stats(now=now) == [
        QueueStats("alpha", 3, 2, 1, 2, False, 10 * SEC),
        QueueStats("beta", 0, 0, 0, 0, False, None),  # only finished jobs
        QueueStats("delta", 1, 0, 0, 0, True, 30 * SEC),
        QueueStats("gamma", 0, 0, 0, 0, True, None),
    ]
    later = now + 2 * SEC
    expected_later = [
        QueueStats("alpha", 4, 1, 1, 2, False, 12 * SEC),
        QueueStats("beta", 0, 0, 0, 0, False, None),
        QueueStats("delta", 1, 0, 0, 0, True, 32 * SEC),
        QueueStats("gamma", 0, 0, 0, 0, True, None),
    ]
    assert await source.queue_stats(now=later) == expected_later
    aware = later.replace(tzinfo=datetime.UTC).astimezone(datetime.timezone(datetime.timedelta(hours=2)))
    assert await source.queue_stats(now=aware) == expected_later
    earlier = await source.queue_stats(now=now - 7 * SEC)
    assert earlier[0] == QueueStats("alpha", 1, 4, 1, 2, False, 3 * SEC)


async def test_queue_stats_of_an_empty_database_and_its_record(source: AsyncMQSource) -> None:
    assert await source.queue_stats() == []
    assert await source.pause_queue("p")
    assert await source.queue_stats() == [QueueStats("p", 0, 0, 0, 0, True, None)]  # no job at all
    assert await source.resume_queue("p")
    await source.call("q", "m", when=datetime.timedelta(seconds=-5))
    (stats,) = await source.queue_stats()
    assert (stats.queue, stats.pending_due, stats.pending_later, stats.paused) == ("q", 1, 0, False)
    assert stats.oldest_due_age is not None
    assert 5 * SEC <= stats.oldest_due_age < 60 * SEC  # from the real clock
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.pending_due = 0  # type: ignore[misc]
