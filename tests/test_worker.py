"""The worker running jobs against a real database: claim order, cursors, concurrency, results and errors.

Ordering and delay rules run through ``run_until_idle()`` with an injected clock; the live path (NOTIFY
wake-ups, follow-ups, timers) runs with ``async with worker`` and ``wait_for_job``.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import datetime
import itertools
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from aiomq import AsyncMQSource, AsyncMQWorker, FailedJobError, JobContext
from aiomq.model import Model
from aiomq.testing import hook_listener_statements

from .conftest import Clock
from .dbhelpers import fetch_job

MakeWorker = Callable[..., AsyncMQWorker]
LOCK_KEY = 1250360252
EPOCH = datetime.datetime(1970, 1, 1)
FINISHED_CHANNEL = "mq.job_finished"


# ------------------------------------------------------------------------------------------ helpers


async def fetch_cursor(db: Any, key: str) -> tuple[Any, int | None] | None:
    """``(properties, updated_job_id)`` of a cursor row, or None when there is no row."""
    row = await db.fetchrow("SELECT properties, updated_job_id FROM mq_job_cursor WHERE key = $1", key)
    if row is None:
        return None
    return json.loads(row["properties"]), row["updated_job_id"]


async def job_state(db: Any, job_id: int) -> str:
    state = await db.fetchval("SELECT state FROM mq_job WHERE id = $1", job_id)
    assert isinstance(state, str)
    return state


def epoch(when: datetime.datetime) -> int:
    return int((when - EPOCH).total_seconds())


async def set_running_by_hand(db: Any, job_id: int, lock_id: int, worker: str = "elsewhere") -> None:
    """Make a pending job look claimed by another worker holding ``(LOCK_KEY, lock_id)``."""
    await db.execute(
        "UPDATE mq_job SET state = 'running', lock_id = $2, worker = $3, "
        "start_time = now() AT TIME ZONE 'utc' WHERE id = $1",
        job_id,
        lock_id,
        worker,
    )


# ------------------------------------------------------------------------------------------ claim order


@pytest.mark.parametrize("cursor_key", [None, "k"], ids=["no-cursor", "one-cursor"])
async def test_claim_order_scheduled_then_created(
    source: AsyncMQSource, make_worker: MakeWorker, clock: Clock, db: Any, cursor_key: str | None
) -> None:
    ran: list[str] = []

    async def handler(job: JobContext) -> None:
        ran.append(job.args["name"])

    t = clock.now
    sec = datetime.timedelta(seconds=1)
    # (name, created offset, scheduled offset), enqueued in an order unlike the expected run order
    spec = [
        ("a", -10, -5),
        ("d", -1, -1),
        ("c", -30, 60),  # created before most, but delayed: must not hold back the later-created due ones
        ("g", -60, 0),  # created earliest, scheduled latest of the due ones (exactly now)
        ("b", -20, -5),
        ("e", -40, -8),
    ]
    ids: dict[str, int] = {}
    for name, created, scheduled in spec:
        queued = await source.call(
            "q",
            "m",
            {"name": name},
            now=t + created * sec,
            when=t + scheduled * sec,
            cursor_key=cursor_key,
            collapse_on_cursor=False if cursor_key else None,
        )
        ids[name] = queued.id

    worker = make_worker({"q": handler}, clock=clock, concurrency=1 if cursor_key is None else 10)
    await worker.run_until_idle()
    assert ran == ["e", "b", "a", "d", "g"]
    assert await job_state(db, ids["c"]) == "pending"

    clock.advance(seconds=59)
    await worker.run_until_idle()
    assert ran == ["e", "b", "a", "d", "g"], "a future job ran before the clock reached it"
    assert await job_state(db, ids["c"]) == "pending"

    clock.advance(seconds=1)
    await worker.run_until_idle()
    assert ran == ["e", "b", "a", "d", "g", "c"]

    for name, job_id in ids.items():
        row = await fetch_job(db, job_id)
        assert row["state"] == "completed", name
        assert row["start_time"] >= row["scheduled_time"], name
    assert (await fetch_job(db, ids["c"]))["start_time"] == t + 60 * sec


# ------------------------------------------------------------------------------------------ cursor rules


async def test_one_job_per_cursor_across_queues(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    active: collections.Counter[str] = collections.Counter()
    most: collections.Counter[str] = collections.Counter()
    in_flight = 0
    most_in_flight = 0
    order: dict[str, list[int]] = collections.defaultdict(list)

    async def handler(job: JobContext) -> str:
        nonlocal in_flight, most_in_flight
        key = job.cursor_key or "-"
        order[key].append(job.id)
        active[key] += 1
        most[key] = max(most[key], active[key])
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        try:
            await asyncio.sleep(0.02)
        finally:
            active[key] -= 1
            in_flight -= 1
        return job.queue

    ids: dict[str, list[int]] = collections.defaultdict(list)
    for i in range(30):
        queue = "qa" if i % 2 else "qb"
        key = f"c{i % 3}" if i % 5 else None
        queued = await source.call(queue, "m", {"i": i}, cursor_key=key, collapse_on_cursor=False)
        ids[key or "-"].append(queued.id)

    worker = make_worker({"qa": handler, "qb": handler}, concurrency=10)
    await worker.run_until_idle()
    left = await db.fetchval("SELECT count(*) FROM mq_job WHERE state <> 'completed'")
    assert left == 0, f"run_until_idle() returned with {left} due job(s) left (see the claim-race tests)"

    for key in ("c0", "c1", "c2"):
        assert most[key] == 1, f"cursor {key} had {most[key]} jobs running at once"
        assert order[key] == ids[key], f"cursor {key} ran out of order"
    assert most["-"] > 1
    assert most_in_flight >= 4, "the worker never ran jobs side by side: this test proves nothing"


async def test_running_job_blocks_its_cursor_in_other_queues(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    lock_id = 987_654
    assert await db.fetchval("SELECT pg_try_advisory_lock($1::int4, $2::int4)", LOCK_KEY, lock_id)
    held = await source.call("qa", "m", cursor_key="c")
    await set_running_by_hand(db, held.id, lock_id)

    same_cursor = await source.call("qb", "m", cursor_key="c")
    other_cursor = await source.call("qb", "m", cursor_key="d")
    no_cursor = await source.call("qb", "m")
    ran: list[int] = []

    async def handler(job: JobContext) -> None:
        ran.append(job.id)

    worker = make_worker({"qa": handler, "qb": handler})
    await worker.run_until_idle()
    assert sorted(ran) == sorted([other_cursor.id, no_cursor.id])
    assert await job_state(db, held.id) == "running", "the live holder's job must not be marked lost"
    assert await job_state(db, same_cursor.id) == "pending"
    assert await job_state(db, other_cursor.id) == "completed"
    assert await job_state(db, no_cursor.id) == "completed"

    # The holder finishes: the cursor is free again.
    await db.execute(
        "UPDATE mq_job SET state = 'completed', lock_id = NULL, end_time = start_time WHERE id = $1", held.id
    )
    await db.execute("SELECT pg_advisory_unlock($1::int4, $2::int4)", LOCK_KEY, lock_id)
    await worker.run_until_idle()
    assert ran[-1] == same_cursor.id
    assert await job_state(db, same_cursor.id) == "completed"


async def test_lost_job_blocks_its_cursor_until_failed(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    orphan = await source.call("q", "m", cursor_key="c")
    # Claimed by a worker whose advisory lock nobody holds any more: maintenance marks it lost.
    await set_running_by_hand(db, orphan.id, lock_id=13_579, worker="dead")
    waiting = await source.call("q", "m", cursor_key="c", collapse_on_cursor=False)
    unrelated = await source.call("q", "m", cursor_key="d")
    ran: list[int] = []

    async def handler(job: JobContext) -> None:
        ran.append(job.id)

    worker = make_worker({"q": handler})
    await worker.run_until_idle()
    row = await fetch_job(db, orphan.id)
    assert row["state"] == "lost"
    assert row["lock_id"] is None
    assert row["end_time"] is not None
    assert ran == [unrelated.id]
    assert await job_state(db, waiting.id) == "pending"

    await worker.run_until_idle()  # still lost, still blocking
    assert ran == [unrelated.id]
    assert await job_state(db, waiting.id) == "pending"

    await source.fail_lost_job(orphan.id)
    await worker.run_until_idle()
    assert ran == [unrelated.id, waiting.id]
    assert await job_state(db, waiting.id) == "completed"
    assert await job_state(db, orphan.id) == "failed"


async def test_cursor_snapshot_and_job_cursor(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    seen: dict[int, Any] = {}

    async def handler(job: JobContext) -> None:
        seen[job.id] = copy.deepcopy(job.cursor)
        if job.cursor is not None:
            job.cursor["n"] = job.cursor.get("n", 0) + 1

    first = await source.call("q", "m", cursor_key="k", collapse_on_cursor=False)
    second = await source.call("q", "m", cursor_key="k", collapse_on_cursor=False)
    plain = await source.call("q", "m")
    await make_worker({"q": handler}).run_until_idle()

    assert seen[first.id] == {}
    assert seen[second.id] == {"n": 1}
    assert seen[plain.id] is None
    row = await fetch_job(db, first.id)
    assert row["snapshot_is_sql_null"], f"first job on a new cursor: snapshot {row['cursor_snapshot']!r}"
    row = await fetch_job(db, second.id)
    assert row["cursor_snapshot"] == {"n": 1}
    assert (await fetch_job(db, plain.id))["snapshot_is_sql_null"]
    assert await fetch_cursor(db, "k") == ({"n": 2}, second.id)


async def test_cursor_saved_on_success(source: AsyncMQSource, make_worker: MakeWorker, db: Any) -> None:
    async def handler(job: JobContext) -> None:
        assert job.cursor is not None
        job.cursor.update(job.args)

    untouched = await source.call("q", "m", {}, cursor_key="k", collapse_on_cursor=False)
    same = await source.call("q", "m", {}, cursor_key="k", collapse_on_cursor=False)
    changed = await source.call("q", "m", {"x": 1}, cursor_key="k", collapse_on_cursor=False)
    same_again = await source.call("q", "m", {"x": 1}, cursor_key="k", collapse_on_cursor=False)
    worker = make_worker({"q": handler}, concurrency=1)

    await worker.run_until_idle()
    for job in (untouched, same, changed, same_again):
        assert await job_state(db, job.id) == "completed"
    # created even when {} (by the first job); an unchanged cursor does not move updated_job_id
    assert await fetch_cursor(db, "k") == ({"x": 1}, changed.id)
    assert await source.get_cursor("k") == {"x": 1}


async def test_cursor_created_empty_by_first_job(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    async def handler(job: JobContext) -> None:
        pass

    first = await source.call("q", "m", cursor_key="k")
    await make_worker({"q": handler}).run_until_idle()
    assert await fetch_cursor(db, "k") == ({}, first.id)
    second = await source.call("q", "m", cursor_key="k")
    await make_worker({"q": handler}).run_until_idle()
    assert await job_state(db, second.id) == "completed"
    assert await fetch_cursor(db, "k") == ({}, first.id)


async def test_cursor_saved_only_on_success_or_update_cursor(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    seen: dict[int, Any] = {}

    async def handler(job: JobContext) -> str:
        assert job.cursor is not None
        seen[job.id] = dict(job.cursor)
        job.cursor["v"] = job.args["v"]
        how: str = job.args["how"]
        if how == "raise":
            raise ValueError("no cursor for you")
        if how == "failed-update":
            raise FailedJobError({"r": "kept"}, update_cursor=True)
        if how == "failed-no-update":
            raise FailedJobError({"r": "dropped"}, update_cursor=False)
        return how

    jobs = [
        await source.call("q", "m", {"v": v, "how": how}, cursor_key="k", collapse_on_cursor=False)
        for v, how in [(0, "ok"), (1, "raise"), (2, "failed-update"), (3, "failed-no-update"), (4, "ok")]
    ]
    await make_worker({"q": handler}).run_until_idle()

    states = [await job_state(db, j.id) for j in jobs]
    assert states == ["completed", "failed", "failed", "failed", "completed"]
    assert [seen[j.id] for j in jobs] == [{}, {"v": 0}, {"v": 0}, {"v": 2}, {"v": 2}]
    assert (await fetch_job(db, jobs[2].id))["result"] == {"r": "kept"}
    assert (await fetch_job(db, jobs[3].id))["result"] == {"r": "dropped"}
    assert await fetch_cursor(db, "k") == ({"v": 4}, jobs[4].id)


async def test_cursor_of_a_job_without_cursor_key_is_not_saved(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    async def handler(job: JobContext) -> str:
        assert job.cursor is None
        job.cursor = {"sneaky": True}
        return "ok"

    queued = await source.call("q", "m")
    await make_worker({"q": handler}).run_until_idle()
    assert await job_state(db, queued.id) == "completed"
    assert await db.fetchval("SELECT count(*) FROM mq_job_cursor") == 0


async def test_next_job_on_cursor_starts_at_once(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    async def handler(job: JobContext) -> None:
        await asyncio.sleep(0.1)

    # timeout=30: maintenance cannot be what starts the follow-ups
    async with make_worker({"q": handler}, timeout=30):
        started = time.monotonic()
        jobs = [
            await source.call("q", "m", {"i": i}, cursor_key="k", collapse_on_cursor=False) for i in range(3)
        ]
        infos = await asyncio.gather(*(source.wait_for_job(j.id, timeout=5, poll_interval=0.1) for j in jobs))
        elapsed = time.monotonic() - started
    assert [i.state for i in infos] == ["completed"] * 3
    assert elapsed < 2.0, f"three 0.1 s jobs on one cursor took {elapsed:.2f}s"
    for before, after in itertools.pairwise(infos):
        assert before.end_time is not None
        assert after.start_time is not None
        assert after.start_time >= before.end_time


# ------------------------------------------------------------------------------------------ delayed jobs


async def test_delayed_job_starts_on_time(source: AsyncMQSource, make_worker: MakeWorker) -> None:
    async def handler(job: JobContext) -> None:
        pass

    async with make_worker({"q": handler}, timeout=30):
        queued = await source.call("q", "m", when=datetime.timedelta(seconds=1))
        info = await source.wait_for_job(queued.id, timeout=5, poll_interval=0.1)
    assert info.state == "completed"
    assert info.start_time is not None
    late = (info.start_time - info.scheduled_time).total_seconds()
    assert 0 <= late < 0.5, f"started {late:.3f}s after its scheduled time"


# ------------------------------------------------------------------------------------------ concurrency


async def test_concurrency_limit(source: AsyncMQSource, make_worker: MakeWorker) -> None:
    in_flight = 0
    most = 0

    async def handler(job: JobContext) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0.2)
        finally:
            in_flight -= 1

    jobs = [await source.call("q", "m", {"i": i}) for i in range(6)]
    await make_worker({"q": handler}, concurrency=3).run_until_idle()
    assert most == 3
    for job in jobs:
        assert (await source.wait_for_job(job.id, timeout=1)).state == "completed"


async def test_slot_frees_when_the_handler_returns_not_when_its_outcome_is_recorded(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    """With concurrency=1, job B starts while job A's finish is still blocked (a row lock held here)."""
    first = await source.call("q", "m", {"n": 0})
    second = await source.call("q", "m", {"n": 1})
    blocker = db.transaction()
    seen: dict[str, Any] = {}

    async def handler(job: JobContext) -> None:
        if job.args["n"] == 0:  # hold A's row, so recording A's outcome waits
            await blocker.start()
            await db.execute("SELECT 1 FROM mq_job WHERE id = $1 FOR UPDATE", job.id)
        else:
            seen["first_state_when_second_ran"] = await db.fetchval(
                "SELECT state FROM mq_job WHERE id = $1", first.id
            )
            await blocker.rollback()

    run = asyncio.create_task(make_worker({"q": handler}, concurrency=1).run_until_idle())
    await asyncio.wait({run}, timeout=20)
    if not run.done():  # B never started: release A so the worker can finish, then fail
        await blocker.rollback()
        await run
    assert seen == {"first_state_when_second_ran": "running"}
    for job in (first, second):
        assert await job_state(db, job.id) == "completed"


async def test_sync_handler_runs_in_a_thread_and_loop_stays_responsive(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    sync_started = threading.Event()
    sync_done = threading.Event()

    def slow(job: JobContext) -> dict[str, Any]:
        sync_started.set()
        time.sleep(1)
        sync_done.set()
        return {"main_thread": threading.current_thread() is threading.main_thread()}

    async def fast(job: JobContext) -> dict[str, bool]:
        for _ in range(150):
            if sync_started.is_set():
                break
            await asyncio.sleep(0.01)
        return {"sync_started": sync_started.is_set(), "sync_done": sync_done.is_set()}

    slow_job = await source.call("slow", "m")
    fast_job = await source.call("fast", "m")
    await make_worker({"slow": slow, "fast": fast}).run_until_idle()

    slow_row = await fetch_job(db, slow_job.id)
    fast_row = await fetch_job(db, fast_job.id)
    assert slow_row["result"] == {"main_thread": False}
    assert fast_row["result"] == {"sync_started": True, "sync_done": False}
    assert fast_row["end_time"] < slow_row["end_time"]


class AsyncMethodHandler:
    async def execute_job(self, job: JobContext) -> dict[str, Any]:
        return where(job, "async-method")


class SyncMethodHandler:
    def execute_job(self, job: JobContext) -> dict[str, Any]:
        return where(job, "sync-method")


async def async_function_handler(job: JobContext) -> dict[str, Any]:
    return where(job, "async-function")


def sync_function_handler(job: JobContext) -> dict[str, Any]:
    return where(job, "sync-function")


class SyncCallableHandler:
    def __call__(self, job: JobContext) -> dict[str, Any]:
        return where(job, "sync-callable")


class AsyncCallableHandler:
    async def __call__(self, job: JobContext) -> dict[str, Any]:
        return where(job, "async-callable")


def where(job: JobContext, form: str) -> dict[str, Any]:
    thread = threading.current_thread()
    return {"form": form, "main_thread": thread is threading.main_thread(), "thread_name": thread.name}


@pytest.mark.parametrize(
    ("handler", "form", "is_async"),
    [
        pytest.param(AsyncMethodHandler(), "async-method", True, id="async-method"),
        pytest.param(SyncMethodHandler(), "sync-method", False, id="sync-method"),
        pytest.param(async_function_handler, "async-function", True, id="async-function"),
        pytest.param(sync_function_handler, "sync-function", False, id="sync-function"),
        pytest.param(SyncCallableHandler(), "sync-callable", False, id="sync-callable"),
        pytest.param(AsyncCallableHandler(), "async-callable", True, id="async-callable"),
    ],
)
async def test_handler_forms(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any, handler: Any, form: str, is_async: bool
) -> None:
    queued = await source.call("q", "m")
    worker = make_worker({"q": handler}, name="forms")
    await worker.run_until_idle()
    row = await fetch_job(db, queued.id)
    assert row["state"] == "completed", row["result"]
    assert row["result"]["form"] == form
    assert row["result"]["main_thread"] is is_async
    if not is_async:
        assert row["result"]["thread_name"] == f"forms,job={queued.id}"


# ------------------------------------------------------------------------------------------ the job object


async def test_job_context_fields(source: AsyncMQSource, make_worker: MakeWorker, db: Any) -> None:
    seen: dict[int, dict[str, Any]] = {}

    async def handler(job: JobContext) -> None:
        job.extend(tenant="acme", attempt=2)
        seen[job.id] = {
            "id": job.id,
            "queue": job.queue,
            "method": job.method,
            "args": copy.deepcopy(job.args),
            "cursor_key": job.cursor_key,
            "cursor": copy.deepcopy(job.cursor),
            "trace": copy.deepcopy(job.trace),
            "schedule_ids": job.schedule_ids,
            "listener_ids": job.listener_ids,
            "extended": (getattr(job, "tenant", None), getattr(job, "attempt", None)),
        }
        job.args["mutated"] = True  # no effect on the database

    trace = {"mq_schedule_ids": [4, 5], "mq_listener_ids": [7], "who": "me"}
    rich = await source.call("ctx", "do", {"a": [1, 2]}, cursor_key="k", trace=trace)
    bare = await source.call("ctx", "other")
    await make_worker({"ctx": handler}).run_until_idle()

    assert seen[rich.id] == {
        "id": rich.id,
        "queue": "ctx",
        "method": "do",
        "args": {"a": [1, 2]},
        "cursor_key": "k",
        "cursor": {},
        "trace": trace,
        "schedule_ids": [4, 5],
        "listener_ids": [7],
        "extended": ("acme", 2),
    }
    assert seen[bare.id] == {
        "id": bare.id,
        "queue": "ctx",
        "method": "other",
        "args": {},
        "cursor_key": None,
        "cursor": None,
        "trace": None,
        "schedule_ids": None,
        "listener_ids": None,
        "extended": ("acme", 2),
    }
    assert (await fetch_job(db, rich.id))["args"] == {"a": [1, 2]}


# -------------------------------------------------------------------------------------- results and errors


class Outer:
    class BoomError(Exception):
        pass


async def test_results_and_error_results(source: AsyncMQSource, make_worker: MakeWorker, db: Any) -> None:
    async def handler(job: JobContext) -> Any:
        if job.method == "value":
            return {"a": [1, "two", None], "b": 1.5}
        if job.method == "none":
            return None
        if job.method == "builtin":
            raise ValueError("boom", b"\x00bytes")
        if job.method == "custom":
            raise Outer.BoomError("custom", {"k": (1, 2)})
        if job.method == "nul-message":
            raise RuntimeError("nul\x00here")
        if job.method == "failed":
            raise FailedJobError({"verbatim": [1, {"x": None}]})
        raise AssertionError(job.method)

    methods = ["value", "none", "builtin", "custom", "nul-message", "failed"]
    ids = {m: (await source.call("q", m)).id for m in methods}
    await make_worker({"q": handler}).run_until_idle()
    rows = {m: await fetch_job(db, i) for m, i in ids.items()}

    assert rows["value"]["state"] == "completed"
    assert rows["value"]["result"] == {"a": [1, "two", None], "b": 1.5}
    assert rows["none"]["state"] == "completed"
    assert rows["none"]["result_is_sql_null"], "a None result must stay SQL NULL, not JSON null"

    builtin = rows["builtin"]
    assert builtin["state"] == "failed"
    result = builtin["result"]
    assert set(result) == {"exc", "message", "args", "tb"}
    assert result["exc"] == "ValueError"
    assert result["message"] == "('boom', b'\\x00bytes')"
    assert result["args"] == ["'boom'", "'\\x00bytes'"]
    assert isinstance(result["tb"], list)
    assert all(isinstance(line, str) for line in result["tb"])
    assert any("in handler" in line for line in result["tb"])
    assert result["tb"][-1].startswith("ValueError: ")

    custom = rows["custom"]["result"]
    assert rows["custom"]["state"] == "failed"
    assert custom["exc"] == f"{__name__}.Outer.BoomError"
    assert custom["args"] == ["'custom'", {"k": ["1", "2"]}]

    nul = rows["nul-message"]
    assert nul["state"] == "failed"
    assert nul["result"]["exc"] == "RuntimeError"
    assert nul["result"]["message"] == "nul\\x00here"

    assert rows["failed"]["state"] == "failed"
    assert rows["failed"]["result"] == {"verbatim": [1, {"x": None}]}


async def test_unstorable_results_fail_the_job_and_the_worker_goes_on(
    source: AsyncMQSource, make_worker: MakeWorker
) -> None:
    values: dict[str, Any] = {
        "a-set": {1, 2},
        "an-object": object(),
        "nested-set": {"k": [{3}]},
        "nan": float("nan"),
        "nul": "a\x00b",
        "nested-nul": {"k": ["\x00"]},
        "nul-key": {"a\x00": 1},
    }

    async def handler(job: JobContext) -> Any:
        return values.get(job.method, "fine")

    async with make_worker({"q": handler}, concurrency=1):
        for method in values:
            bad = await source.call("q", method)
            info = await source.wait_for_job(bad.id, timeout=5, poll_interval=0.1)
            assert info.state == "failed", method
            assert isinstance(info.result, dict), method
            message = info.result["message"]
            assert "\x00" not in message
            if "nul" in method:
                assert "NUL" in message, message
                assert "store" in message, message
            else:
                assert "JSON" in message, message
            if method == "a-set":
                assert "set" in message, message
            # the worker goes on: the next job runs
            good = await source.call("q", "fine")
            info = await source.wait_for_job(good.id, timeout=5, poll_interval=0.1)
            assert (info.state, info.result) == ("completed", "fine"), method


async def test_unstorable_cursor_fails_the_job(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    async def handler(job: JobContext) -> str:
        assert job.cursor is not None
        job.cursor["bad"] = {1} if job.args["bad"] == "set" else "\x00"
        return "ok"

    kinds = ["set", "nul"]
    ids = [(await source.call("q", "m", {"bad": b}, cursor_key=f"k-{b}")).id for b in kinds]
    await make_worker({"q": handler}).run_until_idle()
    for job_id in ids:
        row = await fetch_job(db, job_id)
        assert row["state"] == "failed"
        assert "cursor" in row["result"]["message"]
    assert await db.fetchval("SELECT count(*) FROM mq_job_cursor") == 0


class CustomErrorWorker(AsyncMQWorker):
    def result_from_error(self, ex: BaseException) -> Any:
        return {"custom": type(ex).__name__, "text": str(ex)}


async def test_result_from_error_override(
    source: AsyncMQSource, engine: AsyncEngine, model: Model, db: Any
) -> None:
    async def handler(job: JobContext) -> None:
        if job.method == "failed":
            raise FailedJobError(["as", "given"])
        raise KeyError("missing")

    raised = await source.call("q", "raise")
    failed = await source.call("q", "failed")
    worker = CustomErrorWorker(engine=engine, model=model, queues={"q": handler}, retry_intervals=(0.05, 0.1))
    await worker.run_until_idle()
    assert (await fetch_job(db, raised.id))["result"] == {"custom": "KeyError", "text": "'missing'"}
    assert (await fetch_job(db, failed.id))["result"] == ["as", "given"]


# ------------------------------------------------------------------------------------------ finish rules


async def test_late_finish_after_fail_lost_job_is_discarded(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    async def handler(job: JobContext) -> str:
        await db.execute(
            "UPDATE mq_job SET state = 'lost', lock_id = NULL, end_time = now() AT TIME ZONE 'utc' "
            "WHERE id = $1",
            job.id,
        )
        await source.fail_lost_job(job.id, result={"by": "operator"})
        assert job.cursor is not None
        job.cursor["late"] = True
        return "late result"

    queued = await source.call("q", "m", cursor_key="k")
    await make_worker({"q": handler}).run_until_idle()
    row = await fetch_job(db, queued.id)
    assert row["state"] == "failed"
    assert row["result"] == {"by": "operator"}
    assert await fetch_cursor(db, "k") is None, "a discarded finish must not save the cursor"


async def test_job_marked_lost_while_running_ends_completed(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    async def handler(job: JobContext) -> str:
        await db.execute(
            "UPDATE mq_job SET state = 'lost', lock_id = NULL, end_time = now() AT TIME ZONE 'utc' "
            "WHERE id = $1",
            job.id,
        )
        return "done anyway"

    queued = await source.call("q", "m", cursor_key="k")
    await make_worker({"q": handler}).run_until_idle()
    row = await fetch_job(db, queued.id)
    assert (row["state"], row["result"], row["lock_id"]) == ("completed", "done anyway", None)
    assert await fetch_cursor(db, "k") == ({}, queued.id)


async def test_claim_commits_before_handler_starts(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    seen: dict[str, Any] = {}

    async def handler(job: JobContext) -> None:
        seen.update(await fetch_job(db, job.id))
        seen["lock_held"] = await db.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid::bigint = $1 "
            "AND objid::bigint = $2 AND objsubid = 2 AND granted",
            LOCK_KEY,
            seen["lock_id"],
        )

    queued = await source.call("q", "m", cursor_key="k")
    worker = make_worker({"q": handler}, name="claimer")
    await worker.run_until_idle()
    assert seen["state"] == "running"
    assert seen["start_time"] is not None
    assert seen["start_time"] >= seen["scheduled_time"]
    assert seen["end_time"] is None
    assert seen["worker"] == "claimer"
    assert seen["lock_id"] is not None
    assert seen["lock_held"] == 1, "lock_id must be the worker's live advisory lock"
    assert (await fetch_job(db, queued.id))["state"] == "completed"


# ------------------------------------------------------------------------------------------ claim race


async def test_a_cursor_whose_first_job_is_being_claimed_elsewhere_is_left_alone(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    """Another worker holds the row lock of a cursor's first job (its claim is in flight): SKIP LOCKED
    passes over it, but the cursor's second job must not be taken, or it would run first, and a
    psycopg2_mq claim (SELECT, then UPDATE) could start the first one from a cursor about to change."""
    first = await source.call("q", "m", {"n": 1}, cursor_key="k", collapse_on_cursor=False)
    second = await source.call("q", "m", {"n": 2}, cursor_key="k", collapse_on_cursor=False)
    plain = await source.call("q", "m", {"n": 3})
    ran: list[int] = []

    async def handler(job: JobContext) -> None:
        ran.append(job.args["n"])

    other = db.transaction()
    await other.start()
    await db.execute("SELECT 1 FROM mq_job WHERE id = $1 FOR UPDATE", first.id)
    try:
        await make_worker({"q": handler}).run_until_idle()
        assert ran == [3]
        assert await job_state(db, second.id) == "pending"
    finally:
        await other.rollback()
    await make_worker({"q": handler}).run_until_idle()
    assert ran == [3, 1, 2]
    for job in (first, second, plain):
        assert await job_state(db, job.id) == "completed"


async def test_two_workers_race_on_few_cursors(
    source: AsyncMQSource, make_worker: MakeWorker, engine: AsyncEngine, model: Model, db: Any
) -> None:
    calls: collections.Counter[int] = collections.Counter()
    active: collections.Counter[str] = collections.Counter()
    overlaps: list[str] = []
    per_worker: collections.Counter[str] = collections.Counter()

    def handler_for(name: str) -> Callable[[JobContext], Any]:
        async def handler(job: JobContext) -> str:
            calls[job.id] += 1
            per_worker[name] += 1
            key = job.cursor_key
            if key is not None:
                active[key] += 1
                if active[key] > 1:
                    overlaps.append(key)
            try:
                await asyncio.sleep(0.005 if key else 0.05)
            finally:
                if key is not None:
                    active[key] -= 1
            return name

        return handler

    w1 = make_worker({"race": handler_for("w1")}, name="w1", concurrency=4)
    w2 = make_worker({"race": handler_for("w2")}, name="w2", concurrency=4)
    async with w1, w2:
        # one commit: every hint arrives at once, both workers claim side by side
        async with AsyncSession(engine) as session, session.begin():
            batch = AsyncMQSource(dbsession=session, model=model)
            ids = [
                (
                    await batch.call(
                        "race",
                        "m",
                        {"i": i},
                        cursor_key=f"c{i % 3}" if i % 4 else None,
                        collapse_on_cursor=False,
                    )
                ).id
                for i in range(48)
            ]
        infos = await asyncio.gather(*(source.wait_for_job(i, timeout=10, poll_interval=0.2) for i in ids))

    assert overlaps == []
    assert [i.state for i in infos] == ["completed"] * len(ids)
    assert {i: calls[i] for i in ids} == dict.fromkeys(ids, 1)
    assert sum(calls.values()) == len(ids)
    assert per_worker["w1"] > 0, per_worker
    assert per_worker["w2"] > 0, per_worker
    assert await db.fetchval("SELECT count(*) FROM mq_job WHERE state <> 'completed'") == 0


# ------------------------------------------------------------------------------------------ NOTIFY


async def test_cursor_finish_hints_the_queue_of_the_next_job(
    source: AsyncMQSource, make_worker: MakeWorker, clock: Clock, db: Any
) -> None:
    first = await source.call("mine", "m", cursor_key="c", now=clock.now)
    alone = await source.call("mine", "m", cursor_key="solo", now=clock.now)
    successor = await source.call(
        "other", "m", cursor_key="c", now=clock.now, when=clock.now - datetime.timedelta(seconds=3)
    )
    payloads: list[str] = []
    got = asyncio.Event()

    def on_notify(conn: Any, pid: int, channel: str, payload: str) -> None:
        payloads.append(payload)
        got.set()

    await db.add_listener("mq_other", on_notify)
    try:

        async def handler(job: JobContext) -> None:
            pass

        await make_worker({"mine": handler}, clock=clock).run_until_idle()
        await asyncio.wait_for(got.wait(), 2)
        await asyncio.sleep(0.2)  # anything else would arrive by now
    finally:
        await db.remove_listener("mq_other", on_notify)

    assert await job_state(db, first.id) == "completed"
    assert await job_state(db, alone.id) == "completed"
    assert await job_state(db, successor.id) == "pending"
    assert [json.loads(p) for p in payloads] == [{"j": successor.id, "t": epoch(successor.scheduled_time)}]


async def test_job_finished_notify(source: AsyncMQSource, make_worker: MakeWorker, db: Any) -> None:
    payloads: list[dict[str, Any]] = []
    got = asyncio.Event()

    def on_notify(conn: Any, pid: int, channel: str, payload: str) -> None:
        payloads.append(json.loads(payload))
        if len(payloads) >= 2:
            got.set()

    async def handler(job: JobContext) -> str:
        if job.method == "bad":
            raise ValueError("bad")
        return "ok"

    good = await source.call("q", "good")
    bad = await source.call("q", "bad")
    await db.add_listener(FINISHED_CHANNEL, on_notify)
    try:
        await make_worker({"q": handler}).run_until_idle()
        await asyncio.wait_for(got.wait(), 2)
    finally:
        await db.remove_listener(FINISHED_CHANNEL, on_notify)
    assert sorted(payloads, key=lambda p: p["j"]) == [
        {"j": good.id, "s": "completed"},
        {"j": bad.id, "s": "failed"},
    ]


async def test_run_until_idle_runs_successor_of_job_finishing_during_a_claim(
    source: AsyncMQSource, make_worker: MakeWorker, engine: AsyncEngine, db: Any
) -> None:
    """A cursor job whose finish commits while a claim is in flight must not end run_until_idle() early.

    Job x finishing wakes the loop into a claim. That claim's snapshot still shows y1 running, so y2
    (y1's successor on the cursor) is not claimable and the claim returns nothing; y1 finishes before the
    claim's answer is processed. Then no job is in flight, but y2 is due. The claim's answer is held back
    (after the server ran it) until y1 is done, so this order happens every time instead of by chance.
    """
    armed = asyncio.Event()
    held = asyncio.Event()
    worker: AsyncMQWorker | None = None

    async def hold_until_idle() -> None:
        held.set()
        for _ in range(400):
            assert worker is not None
            if not worker.get_status()["active_jobs"]:
                return
            await asyncio.sleep(0.005)

    async def after_statement(sql: str) -> None:
        if armed.is_set() and "SKIP LOCKED" in sql and "SET start_time=" in sql:  # the claim
            armed.clear()
            await hold_until_idle()

    async def handler(job: JobContext) -> None:
        if job.method == "x":
            armed.set()  # the claim that x's finish wakes up is held back
        elif job.method == "y1":
            await asyncio.wait_for(held.wait(), 5)

    x = await source.call("q", "x")
    y1 = await source.call("q", "y1", cursor_key="y")
    y2 = await source.call("q", "y2", cursor_key="y", collapse_on_cursor=False)
    worker = make_worker({"q": handler})
    hook_listener_statements(worker, after=after_statement)
    await worker.run_until_idle()
    assert held.is_set(), "the claim after x's finish was not seen: this test proves nothing"
    assert await job_state(db, x.id) == "completed"
    assert await job_state(db, y1.id) == "completed"
    assert await job_state(db, y2.id) == "completed", "run_until_idle() returned with y2 due"


async def test_successor_starts_at_once_when_predecessor_finishes_during_next_due_query(
    source: AsyncMQSource, make_worker: MakeWorker, engine: AsyncEngine
) -> None:
    """The live twin of the test above: a finish's hint must not be overwritten by an older answer.

    After claiming y1 the worker asks the database when the next job is due. That query's snapshot shows
    y1 running, so it answers "nothing" (y2 waits on y1's cursor). y1 finishes, and its finish hints
    "y2 is due now" (the worker's own hint and the NOTIFY to the queue), before that stale answer is
    processed. The answer must not erase the hint, or y2 waits for maintenance (timeout=30).
    """
    held = asyncio.Event()
    worker: AsyncMQWorker | None = None

    async def hold_until_idle() -> None:
        held.set()
        for _ in range(400):
            assert worker is not None
            if not worker.get_status()["active_jobs"]:
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.1)  # let y1's NOTIFY arrive first, too

    async def after_statement(sql: str) -> None:
        if held.is_set() or worker is None or "min(first_due.scheduled_time)" not in sql:
            return
        if worker.get_status()["active_jobs"]:
            await hold_until_idle()

    async def handler(job: JobContext) -> None:
        if job.method == "y1":
            await asyncio.wait_for(held.wait(), 5)

    worker = make_worker({"q": handler}, timeout=30)
    hook_listener_statements(worker, after=after_statement)
    async with worker:
        y1 = await source.call("q", "y1", cursor_key="y")
        y2 = await source.call("q", "y2", cursor_key="y", collapse_on_cursor=False)
        first = await source.wait_for_job(y1.id, timeout=5, poll_interval=0.1)
        second = await source.wait_for_job(y2.id, timeout=5, poll_interval=0.1)
    assert held.is_set(), "no next-due query ran while y1 was in flight: this test proves nothing"
    assert first.state == "completed"
    assert second.state == "completed"
    assert first.end_time is not None
    assert second.start_time is not None
    assert (second.start_time - first.end_time).total_seconds() < 1.5
