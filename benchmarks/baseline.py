"""The raw asyncpg baselines: the same database work as aiomq, with the least code.

No SQLAlchemy, no retries, no cursors, no events, no liveness: the floor a hand-written queue on the same
schema would reach. Statements use the literal ``'pending'`` so they match the partial index
``ix_aiomq_job_pending_due`` as aiomq's do.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import asyncpg

from .light import QUEUE, plain_dsn, utcnow

__all__ = [
    "bulk_enqueue",
    "claim_sql",
    "drain_batched",
    "drain_one_by_one",
    "single_enqueue",
    "wakeup_latency",
]

_EPOCH = datetime.datetime(1970, 1, 1)
_LOCK_ID = 1  # satisfies ck_mq_job_lock_id; the baseline takes no advisory lock

INSERT_ONE = """
    INSERT INTO mq_job (state, created_time, scheduled_time, queue, method, args, trace)
    VALUES ('pending', $1, $2, $3, $4, $5::jsonb, $6::jsonb)
    RETURNING id
"""
INSERT_MANY = """
    INSERT INTO mq_job (state, created_time, scheduled_time, queue, method, args, trace)
    SELECT 'pending', $1, $2, $3, $4, a::jsonb, $6::jsonb FROM unnest($5::text[]) AS a
    RETURNING id
"""
NOTIFY = "SELECT pg_notify($1, $2)"

_CLAIMED = "SET state = 'running', lock_id = $2, worker = 'raw', start_time = now() AT TIME ZONE 'utc'"
_RETURNING = "RETURNING id, queue, method, args, cursor_key, trace"
_DUE = "state = 'pending' AND scheduled_time <= (now() AT TIME ZONE 'utc')"


def claim_sql(queues: Sequence[str], limit: str) -> tuple[str, Any]:
    """The claim of up to ``limit`` (SQL: a literal or ``$3``) due jobs of ``queues``, and its ``$1``.

    One queue: ``queue = $1``, an in-order walk of ``ix_aiomq_job_pending_due`` that stops after
    ``limit`` rows. Several: the same walk per queue (a LATERAL subquery each), merged. Not
    ``queue = ANY($1)``: PostgreSQL before 17 cannot walk a btree in order for an array, so it would read and
    sort the whole pending backlog at every claim. ``$2`` is the lock id.
    """
    if len(queues) == 1:
        due = f"SELECT id FROM mq_job WHERE {_DUE} AND queue = $1 ORDER BY scheduled_time, created_time"
        param: Any = queues[0]
    else:
        due = f"""
            SELECT j.id FROM unnest($1::text[]) AS q(name) CROSS JOIN LATERAL (
                SELECT id, scheduled_time, created_time FROM mq_job WHERE {_DUE} AND queue = q.name
                ORDER BY scheduled_time, created_time LIMIT {limit} FOR UPDATE SKIP LOCKED
            ) AS j
            ORDER BY j.scheduled_time, j.created_time
        """
        param = list(queues)
    if limit == "1":
        where = f"id = ({due} LIMIT 1 FOR UPDATE SKIP LOCKED)"
    else:
        where = f"id = ANY(ARRAY({due} LIMIT {limit} FOR UPDATE SKIP LOCKED))"
    return f"UPDATE mq_job {_CLAIMED} WHERE {where} {_RETURNING}", param


FINISH_ONE = """
    UPDATE mq_job SET state = 'completed', end_time = now() AT TIME ZONE 'utc', lock_id = NULL
    WHERE id = $1
"""
FINISH_MANY = """
    UPDATE mq_job SET state = 'completed', end_time = now() AT TIME ZONE 'utc', lock_id = NULL
    WHERE id = ANY($1::bigint[])
"""

Handler = Callable[[Any], Any]


def _payload(job_id: int, when: datetime.datetime) -> str:
    return json.dumps({"j": job_id, "t": int((when - _EPOCH).total_seconds())})


# ------------------------------------------------------------------------------------------------ enqueue


async def single_enqueue(url: str, queue: str, count: int, warmup: int = 20) -> float:
    """``count`` jobs, each ``INSERT ... RETURNING id`` + ``pg_notify`` in its own transaction. Seconds."""
    conn = await asyncpg.connect(plain_dsn(url))
    try:

        async def one(i: int) -> None:
            now = utcnow()
            async with conn.transaction():
                job_id = await conn.fetchval(
                    INSERT_ONE, now, now, queue, "noop", json.dumps({"i": i}), "null"
                )
                await conn.execute(NOTIFY, f"mq_{queue}", _payload(job_id, now))

        for i in range(warmup):
            await one(i)
        start = time.perf_counter()
        for i in range(count):
            await one(i)
        return time.perf_counter() - start
    finally:
        await conn.close()


async def bulk_enqueue(url: str, queue: str, count: int) -> float:
    """``count`` jobs in one multi-row ``INSERT ... SELECT FROM unnest`` and one ``pg_notify``. Seconds."""
    conn = await asyncpg.connect(plain_dsn(url))
    try:

        async def many(n: int) -> None:
            now = utcnow()
            args = [json.dumps({"i": i}) for i in range(n)]
            async with conn.transaction():
                ids = await conn.fetch(INSERT_MANY, now, now, queue, "noop", args, "null")
                await conn.execute(NOTIFY, f"mq_{queue}", _payload(ids[0]["id"], now))

        await many(10)  # warm up: connection, prepared statements
        start = time.perf_counter()
        await many(count)
        return time.perf_counter() - start
    finally:
        await conn.close()


# ------------------------------------------------------------------------------------------------ drains


async def _run(handler: Handler, is_async: bool, row: Any) -> None:
    if is_async:
        await handler(row)
    else:
        await asyncio.to_thread(handler, row)


async def drain_one_by_one(
    url: str, handlers: Mapping[str, tuple[Handler, bool]], concurrency: int = 10
) -> None:
    """``concurrency`` loops, each on its own connection: claim 1 job, run it, mark it completed."""
    claim, queues = claim_sql(list(handlers), "1")

    async def loop() -> None:
        conn = await asyncpg.connect(plain_dsn(url))
        try:
            while (row := await conn.fetchrow(claim, queues, _LOCK_ID)) is not None:
                await _run(*handlers[row["queue"]], row)
                await conn.execute(FINISH_ONE, row["id"])
        finally:
            await conn.close()

    await asyncio.gather(*(loop() for _ in range(concurrency)))


async def drain_batched(url: str, handlers: Mapping[str, tuple[Handler, bool]], batch: int = 100) -> None:
    """One connection: claim up to ``batch`` jobs, run them concurrently, mark them all completed at once."""
    claim, queues = claim_sql(list(handlers), "$3")
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        while rows := await conn.fetch(claim, queues, _LOCK_ID, batch):
            await asyncio.gather(*(_run(*handlers[row["queue"]], row) for row in rows))
            await conn.execute(FINISH_MANY, [row["id"] for row in rows])
    finally:
        await conn.close()


# ------------------------------------------------------------------------------------------------ latency


async def wakeup_latency(url: str, jobs: int, spacing: float) -> list[float]:
    """Commit -> handler start, in ms, for ``jobs`` jobs ``spacing`` s apart, with a LISTEN-driven loop.

    The worker: one LISTEN connection whose callback sets an event, and one loop that, when woken, claims
    one job at a time (``claim_sql``) until nothing is due, notes the time and starts the no-op, and marks
    the job completed. The enqueuer is ``single_enqueue``'s transaction on a third connection.
    """
    dsn = plain_dsn(url)
    listen = await asyncpg.connect(dsn)
    work = await asyncpg.connect(dsn)
    enqueue = await asyncpg.connect(dsn)
    claim, queue = claim_sql([QUEUE], "1")
    wakeup = asyncio.Event()
    started: dict[int, float] = {}
    stop = False

    async def noop(row: Any) -> None:
        return None

    async def worker() -> None:
        while not stop:
            await wakeup.wait()
            wakeup.clear()
            while (row := await work.fetchrow(claim, queue, _LOCK_ID)) is not None:
                started[row["id"]] = time.perf_counter()
                await noop(row)
                await work.execute(FINISH_ONE, row["id"])

    async def call(i: int) -> int:
        now = utcnow()
        async with enqueue.transaction():
            job_id: int = await enqueue.fetchval(
                INSERT_ONE, now, now, QUEUE, "noop", json.dumps({"i": i}), "null"
            )
            await enqueue.execute(NOTIFY, f"mq_{QUEUE}", _payload(job_id, now))
        return job_id

    await listen.add_listener(f"mq_{QUEUE}", lambda *_: wakeup.set())
    task = asyncio.create_task(worker())
    committed: dict[int, float] = {}
    try:
        for i in range(20):  # warm up, as benchmarks.wakeup_latency.measure does
            await _wait_for(started, await call(i))
        started.clear()
        for i in range(jobs):
            job_id = await call(i)
            committed[job_id] = time.perf_counter()
            await asyncio.sleep(spacing)
        await _wait_for(started, job_id)  # the last one
    finally:
        stop = True
        wakeup.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for conn in (listen, work, enqueue):
            await conn.close()
    return [(started[j] - committed[j]) * 1000 for j in committed if j in started]


async def _wait_for(started: dict[int, float], job_id: int, timeout: float = 30) -> None:
    deadline = time.perf_counter() + timeout
    while job_id not in started:
        if time.perf_counter() > deadline:
            raise TimeoutError("the baseline worker did not start the job")
        await asyncio.sleep(0.001)
