"""Load (long form only): sustained enqueue and processing by several worker processes for minutes.

Reported, not asserted: throughput and each worker's RSS over time, and how big ``mq_job`` grows, as
finished jobs pile up (nothing prunes them here). What is asserted is what every chaos test asserts:
every job completed exactly once, cursors serialized and whole (:func:`verify`).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from aiomq import AsyncMQSource

from . import (
    MODEL,
    QUEUES,
    Fleet,
    Report,
    background,
    chaos_scale,
    unfinished,
    verify,
    wait_until,
    with_driver,
)

pytestmark = pytest.mark.chaos

SCALE = chaos_scale()
# 5 minutes in the long form (CHAOS_SCALE=10); CHAOS_LOAD_SECONDS runs it for that long at any scale.
DURATION = float(os.environ.get("CHAOS_LOAD_SECONDS") or 30.0 * SCALE)
LONG_FORM = SCALE >= 5 or bool(os.environ.get("CHAOS_LOAD_SECONDS"))
SAMPLES = 20
BATCH = 200
MAX_BACKLOG = 2000
CURSORS = 500


@pytest.mark.skipif(not LONG_FORM, reason="long form only: CHAOS_SCALE=10 runs it for 5 minutes")
@pytest.mark.timeout(int(300 + 2 * DURATION))
async def test_sustained_load_memory_throughput_and_table_growth(
    chaos_db: str, fleet: Fleet, report: Report
) -> None:
    engine = create_async_engine(with_driver(chaos_db, "postgresql+asyncpg"))
    conn = await asyncpg.connect(chaos_db)
    sampler = await asyncpg.connect(chaos_db)  # the producer uses conn meanwhile
    samples: list[dict[str, Any]] = []
    enqueued = 0
    try:
        await asyncio.gather(*(fleet.spawn("load") for _ in range(3)))
        workers = list(fleet.alive.values())
        source = AsyncMQSource(engine=engine, model=MODEL)
        stop = asyncio.Event()

        async def produce() -> None:
            """Batches of call_many, a quarter of the jobs on cursors, the backlog kept under MAX_BACKLOG."""
            nonlocal enqueued
            while not stop.is_set():
                if await conn.fetchval("SELECT count(*) FROM mq_job WHERE state = 'pending'") >= MAX_BACKLOG:
                    await asyncio.sleep(0.05)
                    continue
                calls: list[dict[str, Any]] = []
                for _ in range(BATCH):
                    enqueued += 1
                    call: dict[str, Any] = {
                        "queue": QUEUES[enqueued % 2],
                        "method": "work",
                        "args": {"ms": 0, "seq": enqueued},
                    }
                    if enqueued % 4 == 0:
                        call["cursor_key"] = f"c{enqueued % CURSORS:03d}"
                        call["collapse_on_cursor"] = False
                    calls.append(call)
                await source.call_many(calls)

        async def sample() -> None:
            started = last_t = time.monotonic()
            last_done = 0
            while not stop.is_set():
                await asyncio.sleep(DURATION / SAMPLES)
                done = await sampler.fetchval("SELECT count(*) FROM mq_job WHERE state = 'completed'")
                size = await sampler.fetchval("SELECT pg_total_relation_size('mq_job')")
                now = time.monotonic()
                samples.append(
                    {
                        "t_s": round(now - started, 1),
                        "completed": done,
                        "jobs_per_s": round((done - last_done) / (now - last_t)),
                        "mq_job_mib": round(size / 2**20, 1),
                        "rss_mib": [round((w.rss_kib() or 0) / 1024, 1) for w in workers],
                    }
                )
                last_done, last_t = done, now

        rss_start = [w.rss_kib() for w in workers]
        async with background(produce(), sample(), grace=30):
            await asyncio.sleep(DURATION)
            stop.set()
        drained = await wait_until(lambda: _drained(chaos_db), timeout=120)
        rss_end = [w.rss_kib() for w in workers]
        exit_codes = await fleet.stop_all()
        verdict = await verify(chaos_db)
        sizes = await conn.fetchrow(
            "SELECT pg_relation_size('mq_job') AS heap, pg_indexes_size('mq_job') AS indexes, "
            "pg_total_relation_size('mq_job') AS total"
        )
    finally:
        await sampler.close()
        await conn.close()
        await engine.dispose()

    rates = [s["jobs_per_s"] for s in samples]
    third = max(1, len(rates) // 3)
    figures = {
        **verdict.figures,
        "scale": SCALE,
        "seconds": DURATION,
        "workers": len(rss_start),
        "enqueued": enqueued,
        "jobs_per_s_first_third": round(statistics.median(rates[:third])) if rates else None,
        "jobs_per_s_last_third": round(statistics.median(rates[-third:])) if rates else None,
        "rss_mib_start": [round((r or 0) / 1024, 1) for r in rss_start],
        "rss_mib_end": [round((r or 0) / 1024, 1) for r in rss_end],
        "mq_job_mib_end": {k: round(v / 2**20, 1) for k, v in dict(sizes).items()},
        "samples": samples,
    }
    report(figures)
    assert drained, f"jobs still unfinished: {await unfinished(chaos_db)}\n{fleet.log_tails()}"
    assert verdict.problems == [], "\n".join(verdict.problems[:50])
    assert all(code == 0 for code in exit_codes.values()), exit_codes


async def _drained(url: str) -> bool:
    return not await unfinished(url)
