"""Crashing workers: worker processes are SIGKILLed at random, again and again, while jobs stream in.

One worker (the anchor) lives through the whole run, so its memory can be compared from start to end; the
others are killed at random and replaced. An operator loop resolves every lost job as a person would:
``retry_job`` then ``fail_lost_job``. At the end :func:`tests.chaos.verify` checks that nothing was lost,
run twice, run beside another job of its cursor, or torn.
"""

from __future__ import annotations

import asyncio
import random
import time

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from . import (
    Fleet,
    Producer,
    Report,
    WorkerProc,
    background,
    chaos_scale,
    resolve_lost,
    unfinished,
    verify,
    wait_until,
    with_driver,
)

pytestmark = pytest.mark.chaos

SCALE = chaos_scale()
DURATION = 22.0 * SCALE
WORKERS = 4  # one anchor, three that get killed
SEED = 20261127


@pytest.mark.timeout(int(180 + 2 * DURATION))
async def test_sigkilled_workers_lose_no_job_and_never_overlap_a_cursor(
    chaos_db: str, fleet: Fleet, report: Report
) -> None:
    rng = random.Random(SEED)
    engine = create_async_engine(with_driver(chaos_db, "postgresql+asyncpg"), pool_pre_ping=True)
    conn = await asyncpg.connect(chaos_db)
    try:
        anchor, *_ = await asyncio.gather(
            fleet.spawn("anchor"), *(fleet.spawn("mortal") for _ in range(WORKERS - 1))
        )
        rss_ready = anchor.rss_kib()
        producer = Producer(engine, seed=SEED)
        stop = asyncio.Event()
        resolved: list[tuple[int, int]] = []
        spawns: list[asyncio.Task[WorkerProc]] = []
        kills = 0

        async def killer() -> None:
            nonlocal kills
            while not stop.is_set():
                await asyncio.sleep(rng.uniform(0.3, 1.1))
                mortals = sorted((w for w in fleet.alive.values() if w is not anchor), key=lambda w: w.name)
                if stop.is_set() or not mortals:
                    continue
                await fleet.kill(rng.choice(mortals), conn)
                kills += 1
                spawns.append(asyncio.create_task(fleet.spawn("mortal")))

        async def operator() -> None:
            while True:
                resolved.extend(await resolve_lost(engine))
                await asyncio.sleep(0.3)

        started = time.monotonic()
        async with background(operator()):
            async with background(producer.run(stop), producer.run(stop), killer(), grace=30):
                await asyncio.sleep(min(3.0, DURATION / 4))
                rss_warm = anchor.rss_kib()
                await asyncio.sleep(max(0.0, DURATION - (time.monotonic() - started)))
                stop.set()
            await asyncio.gather(*spawns)
            drained = await wait_until(lambda: _drained(chaos_db), timeout=120)
        elapsed = time.monotonic() - started
        rss_end = anchor.rss_kib()
        exit_codes = await fleet.stop_all()
        verdict = await verify(chaos_db, killed=fleet.killed)
    finally:
        await conn.close()
        await engine.dispose()

    figures = {
        **verdict.figures,
        "scale": SCALE,
        "seconds": round(elapsed, 1),
        "kills": kills,
        "workers_started": len(fleet.killed) + len(exit_codes),
        "resolved_by_operator": len(resolved),
        "enqueue_calls": producer.stats.calls,
        "joined_by_collapse": producer.stats.joined,
        "enqueue_errors": producer.stats.errors,
        "last_enqueue_error": producer.stats.last_error,
        "anchor_rss_kib": {"ready": rss_ready, "warm": rss_warm, "end": rss_end},
        "jobs_per_second": round(verdict.figures["completed"] / elapsed, 1),
    }
    report(figures)
    assert drained, f"jobs still unfinished: {await unfinished(chaos_db)}\n{fleet.log_tails()}"
    assert all(code == 0 for code in exit_codes.values()), exit_codes
    assert verdict.problems == [], "\n".join(verdict.problems[:50])
    assert kills >= int(10 * SCALE)
    assert verdict.figures["lost"] > 0, "no kill caught a job in flight: the run proved nothing"
    assert len(resolved) + verdict.figures["lost_resolved_by_workers"] == verdict.figures["lost"]
    assert verdict.figures["lost_then_running"] == 0


async def _drained(url: str) -> bool:
    return not await unfinished(url)
