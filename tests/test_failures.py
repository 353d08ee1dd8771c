"""When jobs fail (DESIGN §7.1, §7.3, §7.5): retries with backoff, timeouts, middleware, on a database."""

from __future__ import annotations

import asyncio
import datetime
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from aiomq import AsyncMQSource, AsyncMQWorker, FailedJobError, JobContext, Retry

from .conftest import Clock
from .dbhelpers import fetch_job

MakeWorker = Callable[..., AsyncMQWorker]
SEC = datetime.timedelta(seconds=1)


async def jobs_by_id(db: Any) -> list[dict[str, Any]]:
    return [await fetch_job(db, row["id"]) for row in await db.fetch("SELECT id FROM mq_job ORDER BY id")]


class FailTimes:
    """An async handler that raises ``times`` times, then returns the attempt it succeeded on."""

    def __init__(self, times: int) -> None:
        self.times = times
        self.attempts: list[int] = []

    async def __call__(self, job: JobContext) -> Any:
        self.attempts.append(job.attempt)
        if len(self.attempts) <= self.times:
            raise RuntimeError(f"failure {len(self.attempts)}")
        return {"succeeded_on": job.attempt}


# ------------------------------------------------------------------------------------------ the Retry record


def test_retry_validation() -> None:
    assert Retry() == Retry(max_attempts=3, backoff=1.0, factor=2.0, max_backoff=3600.0, jitter=0.0)
    for kwargs, message in (
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 1.5}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"backoff": -1}, "backoff"),
        ({"factor": 0.5}, "factor"),
        ({"max_backoff": float("inf")}, "max_backoff"),
        ({"jitter": 1.5}, "jitter"),
        ({"jitter": "x"}, "jitter"),
    ):
        with pytest.raises(ValueError, match=message):
            Retry(**kwargs)


def test_retry_waits() -> None:
    policy = Retry(max_attempts=6, backoff=2, factor=3, max_backoff=50)
    assert [policy.wait(n) for n in range(1, 6)] == [2, 6, 18, 50, 50]
    assert policy.runs_left(5)
    assert not policy.runs_left(6)
    jittered = Retry(backoff=10, jitter=0.2)
    assert all(8 <= jittered.wait(1) <= 12 for _ in range(100))


async def test_bad_policies_are_refused_before_any_sql(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    with pytest.raises(TypeError, match="retry must be a Retry"):
        await source.call("q", "m", retry="twice")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_attempts"):
        await source.call("q", "m", retry=0)
    with pytest.raises(ValueError, match="timeout must be positive"):
        await source.call("q", "m", timeout=0)
    with pytest.raises(ValueError, match="timeout must be positive"):
        await source.call("q", "m", timeout=datetime.timedelta(seconds=-1))
    with pytest.raises(TypeError, match="trace must be a dict"):
        await source.call("q", "m", trace=["not", "a", "dict"], retry=2)
    with pytest.raises(ValueError, match="call 1: timeout must be positive"):
        await source.call_many([{"queue": "q", "method": "m"}, {"queue": "q", "method": "m", "timeout": -2}])
    assert await db.fetchval("SELECT count(*) FROM mq_job") == 0
    with pytest.raises(ValueError, match="retry names queues this worker does not serve: 'other'"):
        make_worker({"q": FailTimes(0)}, retry={"other": Retry()})
    with pytest.raises(ValueError, match="job_timeout must be positive"):
        make_worker({"q": FailTimes(0)}, job_timeout=0)
    with pytest.raises(TypeError, match=r"middleware\[1\] must be callable"):
        make_worker({"q": FailTimes(0)}, middleware=[_passthrough, "not callable"])
    with pytest.raises(ValueError, match="lost_grace"):
        make_worker({"q": FailTimes(0)}, lost_grace=-1)


# ------------------------------------------------------------------------------------------ retries


async def test_a_failing_job_is_retried_with_backoff_and_the_chain_is_in_the_trace(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any, clock: Clock
) -> None:
    handler = FailTimes(2)
    policy = Retry(max_attempts=3, backoff=10, factor=3)
    first = await source.call("q", "m", {"x": 1}, retry=policy, trace={"request": "r1"}, now=clock.now)
    worker = make_worker({"q": handler}, clock=clock)
    await worker.run_until_idle()
    rows = await jobs_by_id(db)
    assert [(r["id"], r["state"]) for r in rows] == [(first.id, "failed"), (first.id + 1, "pending")]
    failed, retry = rows
    assert failed["result"]["message"] == "failure 1"
    assert failed["trace"]["aiomq_retried_by"] == retry["id"]
    assert retry["trace"] == {
        "request": "r1",
        "aiomq_retry": {"max_attempts": 3, "backoff": 10, "factor": 3, "max_backoff": 3600.0, "jitter": 0.0},
        "mq_source_job_id": first.id,
        "aiomq_attempt": 2,
    }
    assert (retry["queue"], retry["method"], retry["args"], retry["collapsible"]) == (
        "q",
        "m",
        {"x": 1},
        False,
    )
    assert retry["scheduled_time"] == failed["end_time"] + 10 * SEC

    clock.advance(seconds=9)  # not due yet
    await worker.run_until_idle()
    assert handler.attempts == [1]
    clock.advance(seconds=1)
    await worker.run_until_idle()
    rows = await jobs_by_id(db)
    assert [r["state"] for r in rows] == ["failed", "failed", "pending"]
    assert rows[2]["scheduled_time"] == rows[1]["end_time"] + 30 * SEC  # backoff * factor
    assert rows[2]["trace"]["aiomq_attempt"] == 3
    assert rows[2]["trace"]["mq_source_job_id"] == rows[1]["id"]
    clock.advance(seconds=30)
    await worker.run_until_idle()
    rows = await jobs_by_id(db)
    assert [r["state"] for r in rows] == ["failed", "failed", "completed"]
    assert rows[2]["result"] == {"succeeded_on": 3}
    assert "aiomq_retried_by" not in rows[2]["trace"]
    assert handler.attempts == [1, 2, 3]


async def test_the_last_attempt_fails_for_good(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any, clock: Clock
) -> None:
    await source.call("q", "m", retry=2, now=clock.now)
    worker = make_worker({"q": FailTimes(5)}, clock=clock)
    await worker.run_until_idle()
    clock.advance(seconds=1)
    await worker.run_until_idle()
    rows = await jobs_by_id(db)
    assert [r["state"] for r in rows] == ["failed", "failed"]
    assert "aiomq_retried_by" not in rows[1]["trace"]
    assert rows[1]["result"]["message"] == "failure 2"


async def test_failed_job_error_is_never_retried_and_no_policy_means_no_retry(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    async def refuse(job: JobContext) -> None:
        raise FailedJobError({"why": "bad input"})

    await source.call("refuse", "m", retry=5)
    await source.call("plain", "m")
    await make_worker({"refuse": refuse, "plain": FailTimes(1)}).run_until_idle()
    rows = await jobs_by_id(db)
    assert [(r["queue"], r["state"]) for r in rows] == [("refuse", "failed"), ("plain", "failed")]


async def test_the_workers_policy_per_queue_and_the_jobs_own_first(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    fast = Retry(max_attempts=2, backoff=0)
    a = await source.call("a", "m")
    b = await source.call("b", "m")
    own = await source.call("b", "m", retry=Retry(max_attempts=3, backoff=0))
    worker = make_worker({"a": FailTimes(99), "b": FailTimes(99)}, retry={"a": fast})
    await worker.run_until_idle()
    rows = await jobs_by_id(db)
    chains: dict[int, int] = {}
    for row in rows:
        root = row["trace"].get("mq_source_job_id") if isinstance(row["trace"], dict) else None
        chains[row["id"]] = chains.get(root, row["id"]) if root else row["id"]
    runs = {job.id: sum(1 for r in rows if chains[r["id"]] == job.id) for job in (a, b, own)}
    assert runs == {a.id: 2, b.id: 1, own.id: 3}
    everyone = make_worker({"a": FailTimes(99)}, retry=Retry(max_attempts=2, backoff=0))
    c = await source.call("a", "m")
    await everyone.run_until_idle()
    assert (await fetch_job(db, c.id))["trace"]["aiomq_retried_by"] > c.id


async def test_the_failed_event_names_the_retry_and_waiting_follows_the_chain(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    listener = await source.add_listener("mq.job_finished.failed.q.m", "events", "seen")
    seen: list[Any] = []

    async def record_event(job: JobContext) -> None:
        seen.append(job.args["event"]["data"])

    first = await source.call("q", "m", retry=Retry(max_attempts=2, backoff=0.2))
    async with make_worker({"q": FailTimes(1), "events": record_event}):
        info = await source.wait_for_job(first.id, timeout=10, follow_retries=True)
        assert (info.state, info.result) == ("completed", {"succeeded_on": 2})
        assert info.id != first.id
        plain = await source.wait_for_job(first.id, timeout=5)
        assert plain.state == "failed"

        async def event_seen() -> bool:
            return bool(seen)

        for _ in range(100):
            if await event_seen():
                break
            await asyncio.sleep(0.05)
    assert listener.id
    assert seen[0]["id"] == first.id
    assert seen[0]["retry_job_id"] == info.id


async def test_a_batch_of_failures_with_retries(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    """Many failures recorded at once each get their retry, with a cursor's retry kept on its cursor."""
    now_retry = Retry(max_attempts=2, backoff=0)
    jobs = await source.call_many(
        [{"queue": "q", "method": "m", "args": {"i": i}, "retry": now_retry} for i in range(40)]
        + [{"queue": "q", "method": "c", "cursor_key": "k", "collapse_on_cursor": False, "retry": now_retry}]
    )
    handler = FailTimes(41)
    await make_worker({"q": handler}, concurrency=20, retry_intervals=(0.05,)).run_until_idle()
    rows = await jobs_by_id(db)
    assert len(rows) == 82
    originals = {job.id for job in jobs}
    retried = [r for r in rows if r["id"] not in originals]
    assert sorted(r["trace"]["mq_source_job_id"] for r in retried) == sorted(originals)
    assert all(r["trace"]["aiomq_attempt"] == 2 for r in retried)
    assert sum(1 for r in rows if r["state"] == "completed") == 41
    cursor_retry = next(r for r in retried if r["method"] == "c")
    assert cursor_retry["cursor_key"] == "k"


async def test_a_retry_keeps_its_jobs_priority(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    first = await source.call("q", "m", retry=Retry(max_attempts=2, backoff=0), priority=-7)
    await make_worker({"q": FailTimes(1)}, retry_intervals=(0.05,)).run_until_idle()
    rows = await jobs_by_id(db)
    assert [(r["id"] == first.id, r["state"], r["priority"]) for r in rows] == [
        (True, "failed", -7),
        (False, "completed", -7),
    ]


# ------------------------------------------------------------------------------------------ timeouts


async def test_an_async_handler_past_its_timeout_is_cancelled_and_retried(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    cleaned_up = asyncio.Event()

    async def slow_then_fast(job: JobContext) -> str:
        if job.attempt == 1:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cleaned_up.set()
                raise
        return "done"

    job = await source.call("q", "m", timeout=0.3, retry=Retry(max_attempts=2, backoff=0))
    started = time.monotonic()
    async with make_worker({"q": slow_then_fast}):
        info = await source.wait_for_job(job.id, timeout=10, poll_interval=0.1)
        elapsed = time.monotonic() - started
        final = await source.wait_for_job(job.id, timeout=10, follow_retries=True)
    assert cleaned_up.is_set()
    assert info.state == "failed"
    assert info.result["exc"] == "TimeoutError"
    assert "exceeded its timeout of 0.3 s" in info.result["message"]
    assert elapsed < 0.3 + 2
    assert (final.state, final.result) == ("completed", "done")


async def test_a_handlers_own_timeout_error_is_an_ordinary_failure(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    async def raises(job: JobContext) -> None:
        raise TimeoutError("the upstream API timed out")

    job = await source.call("q", "m", timeout=30)
    await make_worker({"q": raises}).run_until_idle()
    row = await fetch_job(db, job.id)
    assert row["result"]["message"] == "the upstream API timed out"


async def test_the_workers_job_timeout(source: AsyncMQSource, make_worker: MakeWorker, db: Any) -> None:
    async def sleepy(job: JobContext) -> None:
        await asyncio.sleep(30)

    job = await source.call("slow", "m")
    quick = await source.call("slow", "m", timeout=0.2)
    await make_worker({"slow": sleepy}, job_timeout={"slow": 0.4}).run_until_idle()
    assert "0.4 s" in (await fetch_job(db, job.id))["result"]["message"]
    assert "0.2 s" in (await fetch_job(db, quick.id))["result"]["message"]


async def test_a_sync_handler_past_its_timeout_is_overdue_and_keeps_its_cursor(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()

    def blocking(job: JobContext) -> str:
        if job.method == "block":
            release.wait(10)
        return "returned"

    blocked = await source.call("q", "block", cursor_key="k", collapse_on_cursor=False, timeout=0.2)
    behind = await source.call("q", "next", cursor_key="k", collapse_on_cursor=False)
    worker = make_worker({"q": blocking})
    async with worker:
        for _ in range(100):
            if worker.get_status()["overdue"]:
                break
            await asyncio.sleep(0.05)
        assert worker.get_status()["overdue"] == [blocked.id]
        await asyncio.sleep(0.3)
        assert (await fetch_job(db, behind.id))["state"] == "pending"  # the cursor is still held
        release.set()
        info = await source.wait_for_job(blocked.id, timeout=5, poll_interval=0.1)
        assert (await source.wait_for_job(behind.id, timeout=5, poll_interval=0.1)).state == "completed"
    assert info.state == "failed"
    assert "exceeded its timeout of 0.2 s" in info.result["message"]
    assert worker.get_status()["overdue"] == []
    assert "cannot be interrupted" in caplog.text


# ------------------------------------------------------------------------------------------ middleware


async def _passthrough(job: JobContext, call_next: Callable[[], Any]) -> Any:
    return await call_next()


async def test_middleware_wraps_every_handler_outermost_first(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    order: list[str] = []

    def named(name: str) -> Any:
        async def mw(job: JobContext, call_next: Callable[[], Any]) -> Any:
            order.append(f"{name} in {job.method}")
            result = await call_next()
            order.append(f"{name} out")
            return result

        return mw

    async def replace(job: JobContext, call_next: Callable[[], Any]) -> Any:
        result = await call_next()
        return {"wrapped": result} if job.method == "wrap" else result

    async def handler(job: JobContext) -> str:
        order.append("handler")
        return "result"

    def sync_handler(job: JobContext) -> str:
        order.append("sync handler")
        return "sync result"

    a = await source.call("a", "wrap")
    worker = make_worker(
        {"a": handler, "s": sync_handler}, middleware=[named("outer"), named("inner"), replace]
    )
    await worker.run_until_idle()
    s = await source.call("s", "plain")
    await worker.run_until_idle()
    assert order == [
        "outer in wrap", "inner in wrap", "handler", "inner out", "outer out",
        "outer in plain", "inner in plain", "sync handler", "inner out", "outer out",
    ]  # fmt: skip
    assert (await fetch_job(db, a.id))["result"] == {"wrapped": "result"}
    assert (await fetch_job(db, s.id))["result"] == "sync result"


async def test_a_middleware_that_raises_fails_the_job(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    async def guard(job: JobContext, call_next: Callable[[], Any]) -> Any:
        if job.args.get("forbidden"):
            raise PermissionError("not allowed")
        return await call_next()

    ran: list[int] = []

    async def handler(job: JobContext) -> None:
        ran.append(job.id)

    bad = await source.call("q", "m", {"forbidden": True})
    good = await source.call("q", "m")
    await make_worker({"q": handler}, middleware=[guard]).run_until_idle()
    assert (await fetch_job(db, bad.id))["result"]["exc"] == "PermissionError"
    assert ran == [good.id]


async def test_retry_job_of_a_retried_job_does_not_copy_its_retry_pointer(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any, clock: Clock
) -> None:
    first = await source.call("q", "m", retry=Retry(max_attempts=2, backoff=60), now=clock.now)
    await make_worker({"q": FailTimes(9)}, clock=clock).run_until_idle()
    failed = await fetch_job(db, first.id)
    assert "aiomq_retried_by" in failed["trace"]
    manual = await source.retry_job(first.id, now=clock.now)
    trace = (await fetch_job(db, manual.id))["trace"]
    assert "aiomq_retried_by" not in trace
    assert trace["mq_source_job_id"] == first.id
    # A stale pointer (psycopg2_mq's retry_job copies the trace whole) is not followed.
    await db.execute(
        "UPDATE mq_job SET state = 'failed', "
        "trace = trace || jsonb_build_object('aiomq_retried_by', $2::bigint) WHERE id = $1",
        manual.id,
        failed["trace"]["aiomq_retried_by"],
    )
    info = await source.wait_for_job(manual.id, timeout=5, follow_retries=True)
    assert info.id == manual.id
