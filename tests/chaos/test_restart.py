"""Database restarts mid-run, in PostgreSQL's fast and immediate shutdown modes.

Every connection dies at once (fast: the backends are told to terminate; immediate: they are killed and
the server runs crash recovery at the next start). The worker processes live on: they must reconnect
with backoff, re-stamp the jobs they are still running, record every outcome, and end with every job
completed. A job enqueued right after a restart, before any worker's listener is back, has nobody to hear
its NOTIFY: it must still run, at the latest one maintenance period (plus one reconnect backoff) later.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from aiomq import AsyncMQSource

from . import (
    LISTENER_APP,
    MODEL,
    Cluster,
    Fleet,
    Producer,
    Report,
    StopMode,
    background,
    chaos_scale,
    unfinished,
    verify,
    wait_until,
    with_driver,
)

pytestmark = pytest.mark.chaos

SCALE = chaos_scale()
RESTARTS = max(1, round(1.5 * SCALE))
RUN_BETWEEN = 3.0  # seconds of normal work before each restart
TIMEOUT = 2.0  # the workers' maintenance period
BACKOFF_CAP = 2.0  # the last of the driver's retry_intervals


async def listeners_connected(url: str) -> int:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        value = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name LIKE $1",
            f"{LISTENER_APP} chaos-%",
        )
        return int(value)
    finally:
        await conn.close()


@pytest.mark.timeout(int(180 + RESTARTS * (RUN_BETWEEN + 15)))
@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_workers_survive_database_restarts(
    mode: StopMode, chaos_cluster: Cluster, chaos_db: str, fleet: Fleet, report: Report
) -> None:
    rng = random.Random(f"restart-{mode}")
    engine = create_async_engine(with_driver(chaos_db, "postgresql+asyncpg"), pool_pre_ping=True)
    downtimes: list[float] = []
    reconnect_times: list[float] = []
    probe: dict[str, Any] = {}
    try:
        await asyncio.gather(*(fleet.spawn("steady") for _ in range(3)))
        producer = Producer(engine, seed=len(mode), cursors=100, long_share=0.15, max_ms=60)
        stop = asyncio.Event()
        started = time.monotonic()
        async with background(producer.run(stop), grace=30):
            for _ in range(RESTARTS):
                await asyncio.sleep(RUN_BETWEEN)
                downtimes.append(await chaos_cluster.restart(mode, down_for=rng.uniform(0.5, 3.0)))
                back = time.monotonic()
                assert await wait_until(
                    lambda: _all_listening(chaos_db, len(fleet.alive)), timeout=TIMEOUT + BACKOFF_CAP + 10
                ), f"workers did not reconnect after a {mode} restart\n{fleet.log_tails()}"
                reconnect_times.append(time.monotonic() - back)
            await asyncio.sleep(RUN_BETWEEN)
            stop.set()

        # The missed NOTIFY: restart, and enqueue before the workers' listeners are back.
        await chaos_cluster.stop(mode)
        await asyncio.sleep(1.0)  # long enough for every worker to be in a reconnect backoff
        await chaos_cluster.start()
        probe_engine = create_async_engine(with_driver(chaos_db, "postgresql+asyncpg"))
        try:
            probe["listeners_at_commit"] = await listeners_connected(chaos_db)
            queued = await AsyncMQSource(engine=probe_engine, model=MODEL).call("chaos_a", "probe", {"ms": 0})
            info = await AsyncMQSource(engine=probe_engine, model=MODEL).wait_for_job(
                queued.id, timeout=TIMEOUT + BACKOFF_CAP + 10, poll_interval=0.2
            )
        finally:
            await probe_engine.dispose()
        assert info.start_time is not None
        probe["latency_s"] = round((info.start_time - info.created_time).total_seconds(), 3)

        drained = await wait_until(lambda: _drained(chaos_db), timeout=60)
        elapsed = time.monotonic() - started
        exit_codes = await fleet.stop_all()
        verdict = await verify(chaos_db)
    finally:
        await engine.dispose()

    figures = {
        **verdict.figures,
        "scale": SCALE,
        "mode": mode,
        "seconds": round(elapsed, 1),
        "restarts": len(downtimes) + 1,
        "downtime_s_max": round(max(downtimes), 2),
        "all_reconnected_after_s_max": round(max(reconnect_times), 2),
        "listener_reconnects": fleet.count_in_logs("reconnected (lock_id"),
        "jobs_restamped_after_reconnect": fleet.count_in_logs("re-stamped running jobs"),
        "marked_lost_meanwhile": fleet.count_in_logs("is lost: its worker is gone"),
        "enqueue_errors_while_down": producer.stats.errors,
        "missed_notify_probe": probe,
    }
    report(figures)
    assert drained, f"jobs still unfinished: {await unfinished(chaos_db)}\n{fleet.log_tails()}"
    assert all(code == 0 for code in exit_codes.values()), exit_codes
    assert verdict.problems == [], "\n".join(verdict.problems[:50])
    assert verdict.figures["states"].get("completed") == (
        verdict.figures["jobs"] - verdict.figures["planned_failures_retried"]
    )
    assert verdict.figures["lost"] == 0
    assert verdict.figures["lost_then_running"] == 0  # no false alarms after a restart (DESIGN §7.2)
    # (after the last restart a worker may still be in its backoff when the run ends)
    assert figures["listener_reconnects"] >= 3 * RESTARTS
    assert info.state == "completed"
    assert probe["latency_s"] <= TIMEOUT + BACKOFF_CAP + 1.0, probe


async def _all_listening(url: str, workers: int) -> bool:
    return await listeners_connected(url) >= workers


async def _drained(url: str) -> bool:
    return not await unfinished(url)
