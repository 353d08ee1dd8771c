"""Aborting jobs (DESIGN §7.4) and lost jobs that resolve themselves (§7.2), on a real database."""

from __future__ import annotations

import asyncio
import datetime
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext, Retry
from aiomq.maintenance import marking_window

from .conftest import Clock
from .dbhelpers import fetch_job, wait_for

MakeWorker = Callable[..., AsyncMQWorker]
SEC = datetime.timedelta(seconds=1)


async def make_lost(db: Any, job_id: int, lost_at: datetime.datetime, worker: str = "gone.1") -> None:
    """Make a pending job look like one a dead worker was running (as maintenance marks it)."""
    await db.execute(
        "UPDATE mq_job SET state = 'lost', worker = $2, start_time = $3, end_time = $4 WHERE id = $1",
        job_id,
        worker,
        lost_at - 5 * SEC,
        lost_at,
    )


# ------------------------------------------------------------------------------------------ abort


async def test_abort_of_a_pending_job_cancels_it(source: AsyncMQSource, db: Any) -> None:
    job = await source.call("q", "m")
    await source.abort_job(job.id)
    row = await fetch_job(db, job.id)
    assert row["state"] == "canceled"
    assert row["end_time"] is not None
    assert await db.fetchval("SELECT count(*) FROM aiomq_abort_request") == 0


async def test_abort_of_finished_lost_or_unknown_jobs_changes_nothing(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any, clock: Clock
) -> None:
    async def ok(job: JobContext) -> None:
        return None

    done = await source.call("q", "m")
    await make_worker({"q": ok}).run_until_idle()
    lost = await source.call("q", "m", when=datetime.timedelta(hours=1))
    await make_lost(db, lost.id, clock.now)
    for job_id, state in ((done.id, "completed"), (lost.id, "lost")):
        with pytest.raises(RuntimeError, match="not pending or running") as info:
            await source.abort_job(job_id)
        assert info.value.args[2] == state
        assert (await fetch_job(db, job_id))["state"] == state
    with pytest.raises(LookupError):
        await source.abort_job(10**9)
    assert await db.fetchval("SELECT count(*) FROM aiomq_abort_request") == 0


async def test_abort_cancels_a_running_async_handler_at_once(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    started, cleaned_up = asyncio.Event(), asyncio.Event()

    async def long(job: JobContext) -> str:
        if job.method == "next":
            return "next ran"
        assert job.cursor is not None
        job.cursor["touched"] = True
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cleaned_up.set()
            raise
        return "not reached"

    job = await source.call(
        "q", "long", cursor_key="k", collapse_on_cursor=False, retry=Retry(max_attempts=5)
    )
    behind = await source.call("q", "next", cursor_key="k", collapse_on_cursor=False)
    async with make_worker({"q": long}, timeout=60):
        await asyncio.wait_for(started.wait(), 5)
        asked = time.monotonic()
        await source.abort_job(job.id)
        info = await source.wait_for_job(job.id, timeout=5, poll_interval=10)
        took = time.monotonic() - asked
        assert (await source.wait_for_job(behind.id, timeout=5, poll_interval=0.1)).result == "next ran"
    assert cleaned_up.is_set()
    assert (info.state, info.result) == ("canceled", None)
    assert took < 2, f"the abort took {took:.3f}s"  # a generous bound: DESIGN's target is 100 ms
    row = await fetch_job(db, job.id)
    assert "aiomq_retried_by" not in row["trace"]  # no retry
    assert await db.fetchval("SELECT count(*) FROM mq_job") == 2
    assert await source.get_cursor("k") == {}  # the aborted job's cursor change was not saved


async def test_abort_sets_abort_requested_for_a_sync_handler(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    started = threading.Event()
    saw: list[bool] = []

    def polite(job: JobContext) -> str:
        started.set()
        deadline = time.monotonic() + 10
        while not job.abort_requested and time.monotonic() < deadline:
            time.sleep(0.01)
        saw.append(job.abort_requested)
        return "stopped early"

    job = await source.call("q", "m")
    async with make_worker({"q": polite}, timeout=60):
        assert await asyncio.to_thread(started.wait, 5)
        await source.abort_job(job.id)
        info = await source.wait_for_job(job.id, timeout=5, poll_interval=0.1)
    assert saw == [True]
    assert (info.state, info.result) == ("canceled", None)


async def test_a_missed_abort_notify_is_found_at_maintenance(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    started = asyncio.Event()

    async def long(job: JobContext) -> None:
        started.set()
        await asyncio.sleep(60)

    job = await source.call("q", "m")
    async with make_worker({"q": long}, timeout=0.5):
        await asyncio.wait_for(started.wait(), 5)
        # The request without its NOTIFY, as if the worker had missed it.
        await db.execute(
            "INSERT INTO aiomq_abort_request (job_id, requested_time) VALUES ($1, now())", job.id
        )
        info = await source.wait_for_job(job.id, timeout=5, poll_interval=0.1)
    assert info.state == "canceled"

    async def purged() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM aiomq_abort_request") == 0)

    async with make_worker({"q": long}, timeout=0.2):
        await wait_for(purged, "maintenance to drop the finished job's request")


async def test_aiomq_abort_on_the_command_line(source: AsyncMQSource, db: Any, database: str) -> None:
    job = await source.call("q", "m")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiomq",
        "abort",
        str(job.id),
        "--database-url",
        database,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert f"canceled job {job.id}" in out.decode()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiomq", "abort", str(job.id), "--database-url", database,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 1
    expected = f"cannot abort job {job.id}: it is canceled; only pending or running jobs can be aborted"
    assert err.decode().strip() == f"aiomq: error: {expected}"


# ------------------------------------------------------------------------------------------ lost jobs


async def test_a_lost_job_with_a_policy_fails_and_is_retried_after_the_grace(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any, clock: Clock
) -> None:
    ran: list[int] = []

    async def handler(job: JobContext) -> str:
        ran.append(job.attempt)
        return "second run"

    await source.add_listener("mq.job_finished.failed.q.m", "events", "seen")
    events: list[Any] = []

    async def seen(job: JobContext) -> None:
        events.append(job.args["event"]["data"])

    with_policy = await source.call("q", "m", retry=Retry(max_attempts=2, backoff=0), cursor_key="c")
    without = await source.call("q", "plain")
    for job in (with_policy, without):
        await make_lost(db, job.id, clock.now)
    worker = make_worker({"q": handler, "events": seen}, clock=clock, lost_grace=120)
    clock.advance(seconds=119)
    await worker.run_until_idle()
    assert (await fetch_job(db, with_policy.id))["state"] == "lost"  # within the grace
    clock.advance(seconds=2)
    await worker.run_until_idle()
    failed = await fetch_job(db, with_policy.id)
    assert failed["state"] == "failed"
    assert failed["result"]["exc"] == "LostJobError"
    assert failed["result"]["worker"] == "gone.1"
    assert failed["end_time"] == clock.now - 121 * SEC  # kept, as fail_lost_job keeps it
    retry = await fetch_job(db, failed["trace"]["aiomq_retried_by"])
    assert (retry["state"], retry["result"], retry["trace"]["aiomq_attempt"]) == (
        "completed",
        "second run",
        2,
    )
    assert ran == [2]
    assert events[0]["id"] == with_policy.id
    assert events[0]["retry_job_id"] == retry["id"]
    assert events[0]["result"]["exc"] == "LostJobError"
    assert (await fetch_job(db, without.id))["state"] == "lost"  # no policy: a person decides


async def test_the_workers_default_policy_resolves_lost_jobs_too(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any, clock: Clock
) -> None:
    async def handler(job: JobContext) -> None:
        return None

    job = await source.call("q", "m")
    await make_lost(db, job.id, clock.now - 10 * SEC)
    await make_worker({"q": handler}, clock=clock, lost_grace=5, retry=Retry(max_attempts=1)).run_until_idle()
    row = await fetch_job(db, job.id)
    assert row["state"] == "failed"  # max_attempts=1: failed, no run left
    assert row["trace"] is None  # no retry recorded


async def test_a_lost_job_with_an_abort_request_ends_canceled(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any, clock: Clock
) -> None:
    async def handler(job: JobContext) -> None:
        return None

    job = await source.call("q", "m")  # no policy: the request is a person's decision
    await make_lost(db, job.id, clock.now - 200 * SEC)
    await db.execute("INSERT INTO aiomq_abort_request (job_id, requested_time) VALUES ($1, now())", job.id)
    await make_worker({"q": handler}, clock=clock).run_until_idle()
    assert (await fetch_job(db, job.id))["state"] == "canceled"
    assert await db.fetchval("SELECT count(*) FROM mq_job") == 1


async def test_many_workers_resolve_each_lost_job_once(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any, clock: Clock
) -> None:
    async def handler(job: JobContext) -> None:
        await asyncio.sleep(0.01)

    jobs = await source.call_many(
        [
            {"queue": "q", "method": "m", "args": {"i": i}, "retry": Retry(max_attempts=2, backoff=60)}
            for i in range(60)
        ]
    )
    for job in jobs:
        await make_lost(db, job.id, clock.now - 300 * SEC)
    workers = [make_worker({"q": handler}, clock=clock, name=f"w{i}") for i in range(3)]
    await asyncio.gather(*(w.run_until_idle() for w in workers))
    rows = await db.fetch("SELECT id, state, trace FROM mq_job ORDER BY id")
    originals = {job.id for job in jobs}
    assert all(r["state"] == "failed" for r in rows if r["id"] in originals)
    retries = [json.loads(r["trace"])["mq_source_job_id"] for r in rows if r["id"] not in originals]
    assert sorted(retries) == sorted(originals)  # exactly one retry each


def test_the_marking_window() -> None:
    assert marking_window(30, server_uptime=3600, since_reconnect=None) == 0
    assert marking_window(30, server_uptime=10, since_reconnect=None) == 20
    assert marking_window(30, server_uptime=3600, since_reconnect=5) == 25
    assert marking_window(30, server_uptime=25, since_reconnect=1) == 29
    assert marking_window(30, server_uptime=3600, since_reconnect=40) == 0


async def test_a_worker_on_a_database_that_has_been_up_marks_dead_workers_jobs_lost_at_once(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    """Outside the window nothing changes: a dead worker's running job is marked lost at start."""
    job = await source.call("q", "m")
    await db.execute(
        "UPDATE mq_job SET state = 'running', lock_id = 12345, worker = 'dead' WHERE id = $1", job.id
    )
    uptime = await db.fetchval("SELECT extract(epoch FROM now() - pg_postmaster_start_time())")
    if uptime < 0.1:
        pytest.skip("the test server has just started")
    worker = make_worker({"q": lambda job: None}, retry_intervals=(0.05, 0.1))
    await worker.run_until_idle()
    assert (await fetch_job(db, job.id))["state"] == "lost"
