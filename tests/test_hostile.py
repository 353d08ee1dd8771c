"""Hostile input: each gets a defined outcome, and none corrupts state or stops the worker.

Covered elsewhere: NUL and lone surrogates in args, trace, method and cursor_key (``test_source.py``) and in
results and cursors (``test_worker.py``); malformed NOTIFY payloads (``test_lifecycle.py``); handlers that
never return, async (cancelled by ``stop(timeout)``, job pending again) and sync (job marked ``lost``)
(``test_lifecycle.py``). The outcomes are listed in ``docs/reliability.md``.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
import time
from collections.abc import Callable
from typing import Any

import pytest

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext

MakeWorker = Callable[..., AsyncMQWorker]

SQL_LOOKING = [
    "x'); DELETE FROM mq_job; --",
    'q"; DROP TABLE mq_job_cursor; --',
    "$1::text || pg_sleep(10)",
    "\\'; SELECT pg_terminate_backend(pg_backend_pid()); --",
]


async def job_count(db: Any) -> int:
    count: int = await db.fetchval("SELECT count(*) FROM mq_job")
    return count


@pytest.mark.parametrize("queue", ["q'; DROP TABLE mq_job; --", "q" * 61, "mq_job; --", ""])
async def test_sql_looking_or_long_queue_names_are_refused(
    source: AsyncMQSource, db: Any, queue: str
) -> None:
    with pytest.raises(ValueError, match="invalid queue name"):
        await source.call(queue, "m")
    assert await job_count(db) == 0


async def test_sql_looking_method_and_cursor_key_are_stored_and_run_verbatim(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    seen: list[tuple[str, str | None, Any]] = []

    async def handler(job: JobContext) -> None:
        seen.append((job.method, job.cursor_key, job.args))
        assert job.cursor is not None
        job.cursor["last"] = job.method

    jobs = [
        await source.call("q", text, {"text": text}, cursor_key=text, collapse_on_cursor=False)
        for text in SQL_LOOKING
    ]
    await make_worker({"q": handler}).run_until_idle()
    assert sorted(seen) == sorted((t, t, {"text": t}) for t in SQL_LOOKING)
    for job in jobs:
        assert (await source.wait_for_job(job.id, timeout=1)).state == "completed"
    for text in SQL_LOOKING:
        assert await source.get_cursor(text) == {"last": text}
    assert await db.fetchval("SELECT count(*) FROM mq_job_cursor") == len(SQL_LOOKING)


@pytest.mark.parametrize("what", ["method", "cursor_key"])
async def test_a_key_too_long_to_index_is_refused_before_any_sql(
    source: AsyncMQSource, db: Any, what: str
) -> None:
    """PostgreSQL cannot index a btree entry over about 2,700 bytes. A longer cursor_key (or method, part of
    the collapse index) would fail when the job is claimed, and block its queue; it is refused at call()."""
    long = "".join(random.choices(string.ascii_letters, k=5000))  # random: no compression helps
    kwargs: dict[str, Any] = {"method": "m", "cursor_key": "k"}
    kwargs[what] = long
    with pytest.raises(ValueError, match=f"{what} is 5000 bytes long"):
        await source.call("q", kwargs["method"], cursor_key=kwargs["cursor_key"])
    with pytest.raises(ValueError, match=f"{what} is 5000 bytes long"):
        await source.call_many([{"queue": "q", **kwargs}])
    assert await job_count(db) == 0


async def test_the_longest_allowed_keys_are_stored_claimed_and_run(
    source: AsyncMQSource, make_worker: MakeWorker
) -> None:
    method = "".join(random.choices(string.ascii_letters, k=1024))
    cursor_key = "é" * 512  # 1,024 bytes in UTF-8
    ran: list[int] = []

    async def handler(job: JobContext) -> None:
        ran.append(job.id)

    job = await source.call("q", method, cursor_key=cursor_key)
    joined = await source.call("q", method, cursor_key=cursor_key)
    await make_worker({"q": handler}).run_until_idle()
    assert joined.id == job.id
    assert not joined.created
    assert ran == [job.id]
    assert await source.get_cursor(cursor_key) == {}


async def test_ten_megabyte_args_round_trip(source: AsyncMQSource, make_worker: MakeWorker) -> None:
    big = {"blob": "x" * (10 * 1024 * 1024), "items": list(range(1000))}
    got: list[Any] = []

    async def handler(job: JobContext) -> int:
        got.append(job.args)
        return len(job.args["blob"])

    job = await source.call("q", "m", big)
    await make_worker({"q": handler}).run_until_idle()
    info = await source.wait_for_job(job.id, timeout=5)
    assert info.state == "completed"
    assert info.result == 10 * 1024 * 1024
    assert got == [big]


async def test_deeply_nested_args(source: AsyncMQSource, make_worker: MakeWorker, db: Any) -> None:
    """Nesting Python's json can encode is stored and runs; deeper nesting is a TypeError before any SQL."""

    def nested(depth: int) -> Any:
        value: Any = "leaf"
        for _ in range(depth):
            value = [value]
        return value

    with pytest.raises(TypeError, match="nested too deeply"):
        await source.call("q", "m", nested(100_000))
    assert await job_count(db) == 0

    got: list[Any] = []

    async def handler(job: JobContext) -> None:
        got.append(job.args)

    job = await source.call("q", "m", {"deep": nested(500)})
    await make_worker({"q": handler}).run_until_idle()
    assert (await source.wait_for_job(job.id, timeout=5)).state == "completed"
    assert got == [{"deep": nested(500)}]


async def test_forged_notifications_do_not_hurt_the_worker(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    """Another client NOTIFYs well-formed lies (no such job, far past or future times, a schedule hint
    for a queue it does not own): the worker at most looks once more, and real jobs still run."""
    ran: list[int] = []

    async def handler(job: JobContext) -> None:
        ran.append(job.id)

    async with make_worker({"q": handler}, timeout=30):
        for payload in (
            {"j": 987654321, "t": 0},
            {"j": -1, "t": 32503680000},  # the year 3000
            {"j": "x", "t": -62135596800},  # the year 1
            {"s": 1, "t": 0},
            {"j": 1, "t": 10**30},
        ):
            await db.execute("SELECT pg_notify('mq_q', $1)", json.dumps(payload))
        job = await source.call("q", "m")
        info = await source.wait_for_job(job.id, timeout=5)
    assert info.state == "completed"
    assert ran == [job.id]
    assert await job_count(db) == 1


async def test_a_handler_that_blocks_the_event_loop_delays_but_breaks_nothing(
    source: AsyncMQSource, make_worker: MakeWorker
) -> None:
    """An async handler calling time.sleep() stalls the loop (nothing can preempt it): the other jobs wait,
    then every job completes. Blocking work belongs in a plain-function handler, which runs in a thread."""
    order: list[str] = []

    async def handler(job: JobContext) -> None:
        if job.method == "block":
            time.sleep(0.5)  # noqa: ASYNC251 - the point of the test
        order.append(job.method)

    blocker = await source.call("q", "block")
    others = [await source.call("q", "quick", {"i": i}) for i in range(5)]
    started = time.monotonic()
    await asyncio.wait_for(make_worker({"q": handler}).run_until_idle(), 10)
    assert time.monotonic() - started >= 0.5
    for job in (blocker, *others):
        assert (await source.wait_for_job(job.id, timeout=1)).state == "completed"
    assert sorted(order) == ["block"] + ["quick"] * 5
