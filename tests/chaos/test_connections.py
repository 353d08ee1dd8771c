"""Dead connections: ``pg_terminate_backend`` on the workers' listener and pool connections while jobs run.

No worker process dies here, so no job may end lost: a worker whose listener connection dies reconnects
with a new lock id and re-stamps the jobs it is still running (also those another worker marked lost
meanwhile); a worker whose pool connection dies in a claim, a finish or maintenance retries. Probe jobs
enqueued right after each listener kill show that new jobs keep being picked up.
"""

from __future__ import annotations

import asyncio
import datetime
import random
import time
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext
from aiomq.testing import hook_listener_statements

from . import (
    LISTENER_APP,
    MODEL,
    POOL_APP,
    Fleet,
    Producer,
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
DURATION = 12.0 * SCALE
SEED = 4242
TIMEOUT = 2.0  # the workers' maintenance period
BACKOFF_CAP = 2.0  # the last of the driver's retry_intervals


async def terminate(conn: Any, app_prefix: str, rng: random.Random, most: int) -> int:
    """Terminate up to ``most`` random backends of this database whose application_name starts so."""
    pids = await conn.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE $1 "
        "ORDER BY pid",
        f"{app_prefix} chaos-%",
    )
    chosen = rng.sample([r["pid"] for r in pids], min(most, len(pids)))
    for pid in chosen:
        await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    return len(chosen)


@pytest.mark.timeout(int(180 + 2 * DURATION))
async def test_terminated_listener_and_pool_connections_lose_nothing(
    chaos_db: str, fleet: Fleet, report: Report
) -> None:
    rng = random.Random(SEED)
    engine = create_async_engine(with_driver(chaos_db, "postgresql+asyncpg"), pool_pre_ping=True)
    conn = await asyncpg.connect(chaos_db)
    killed = {"listener": 0, "pool": 0}
    probes: list[int] = []
    try:
        await asyncio.gather(*(fleet.spawn("steady") for _ in range(3)))
        rss_start = {w.name: w.rss_kib() for w in fleet.alive.values()}
        producer = Producer(engine, seed=SEED, cursors=60, long_share=0.3, max_ms=80, max_backlog=150)
        source = AsyncMQSource(engine=engine, model=MODEL)
        stop = asyncio.Event()

        async def terminator() -> None:
            while not stop.is_set():
                await asyncio.sleep(rng.uniform(0.2, 0.7))
                kind = rng.choice(("listener", "pool", "pool", "both"))
                if kind in ("pool", "both"):
                    killed["pool"] += await terminate(conn, POOL_APP, rng, most=rng.randint(1, 4))
                if kind in ("listener", "both"):
                    killed["listener"] += await terminate(conn, LISTENER_APP, rng, most=1)
                    probe = await source.call(rng.choice(("chaos_a", "chaos_b")), "probe", {"ms": 0})
                    probes.append(probe.id)

        started = time.monotonic()
        async with background(producer.run(stop), producer.run(stop), terminator(), grace=30):
            await asyncio.sleep(DURATION)
            stop.set()
        drained = await wait_until(lambda: _drained(chaos_db), timeout=60)
        elapsed = time.monotonic() - started
        rss_end = {w.name: w.rss_kib() for w in fleet.alive.values()}
        probe_latency = await conn.fetchval(
            "SELECT max(extract(epoch FROM start_time - created_time)) FROM mq_job WHERE id = ANY($1)", probes
        )
        exit_codes = await fleet.stop_all()
        verdict = await verify(chaos_db, lost_may_come_back=True)
    finally:
        await conn.close()
        await engine.dispose()

    figures = {
        **verdict.figures,
        "scale": SCALE,
        "seconds": round(elapsed, 1),
        "terminated_listener_connections": killed["listener"],
        "terminated_pool_connections": killed["pool"],
        "listener_reconnects": fleet.count_in_logs("reconnected (lock_id"),
        "jobs_restamped_after_reconnect": fleet.count_in_logs("re-stamped running jobs"),
        "marked_lost_meanwhile": fleet.count_in_logs("is lost: its worker is gone"),
        "probe_jobs": len(probes),
        "probe_max_latency_s": round(float(probe_latency or 0), 3),
        "worker_rss_kib": {name: (rss_start[name], rss_end.get(name)) for name in rss_start},
    }
    report(figures)
    assert drained, f"jobs still unfinished: {await unfinished(chaos_db)}\n{fleet.log_tails()}"
    assert all(code == 0 for code in exit_codes.values()), exit_codes
    assert verdict.problems == [], "\n".join(verdict.problems[:50])
    planned = verdict.figures["planned_failures_retried"] + verdict.figures["lost"]
    assert verdict.figures["states"].get("completed") == verdict.figures["jobs"] - planned
    assert killed["listener"] >= int(5 * SCALE), killed
    assert killed["pool"] >= int(10 * SCALE), killed
    assert figures["listener_reconnects"] >= killed["listener"]
    # A probe is claimed on the NOTIFY, or on the reconnect's own re-check, or at the latest by the next
    # maintenance: within timeout plus one reconnect backoff.
    assert figures["probe_max_latency_s"] <= TIMEOUT + BACKOFF_CAP + 1.0, figures["probe_max_latency_s"]


async def _drained(url: str) -> bool:
    return not await unfinished(url)


# ------------------------------------------------------------------------------------------ a lost reply


class _ReplyLost:
    """Fault injection on a worker: its first claim statement commits (autocommit), then its connection is
    terminated and the worker sees the error instead of the reply. PostgreSQL does this when a backend is
    terminated (``pg_terminate_backend``, an immediate shutdown, a network cut) between the commit of an
    autocommit statement and the delivery of its result."""

    def __init__(self, worker: AsyncMQWorker, admin: asyncpg.Connection) -> None:
        self.fired = 0
        self.admin = admin
        hook_listener_statements(worker, after=self.after_statement)

    async def after_statement(self, sql: str) -> None:
        if self.fired == 0 and sql.lstrip().startswith("WITH locked AS"):
            self.fired += 1
            await self.admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE $1",
                f"{LISTENER_APP} %",
            )
            raise ConnectionResetError("injected: the connection died before the claim's reply arrived")


@pytest.mark.timeout(60)
async def test_claim_whose_reply_is_lost_does_not_strand_its_jobs(chaos_db: str) -> None:
    """A claim that committed although the worker saw a connection error: its jobs must still run.

    They are ``running`` under the worker's own, live lock id, so no maintenance will ever mark them lost;
    if the worker forgets them they are stranded until it exits.
    """
    engine = create_async_engine(with_driver(chaos_db, "postgresql+asyncpg"))
    admin = await asyncpg.connect(chaos_db)
    ran: list[int] = []

    async def handler(job: JobContext) -> None:
        ran.append(job.id)

    try:
        source = AsyncMQSource(engine=engine, model=MODEL)
        jobs = [(await source.call("chaos_a", "work", {"n": i})).id for i in range(3)]
        worker = AsyncMQWorker(
            engine=engine,
            queues={"chaos_a": handler},
            model=MODEL,
            timeout=1,
            retry_intervals=(0.05, 0.1, 0.2),
        )
        injector = _ReplyLost(worker, admin)
        async with worker:
            done = await wait_until(lambda: _all_completed(source, jobs), timeout=2 * 1 + 3)
            states = {j: (await source.get_job(j)).state for j in jobs}
        assert injector.fired == 1
        assert done, f"jobs stranded after a claim whose reply was lost: {states}, handler ran {ran}"
        assert sorted(ran) == sorted(jobs)
    finally:
        await admin.close()
        await engine.dispose()


async def _all_completed(source: AsyncMQSource, ids: list[int]) -> bool:
    for job_id in ids:
        if (await source.get_job(job_id)).state != "completed":
            return False
    return True


class _FirstClaimFails:
    """Fault injection: the first claim statement fails before it reaches the server, so the worker
    retries the claim after its first retry interval."""

    def __init__(self, worker: AsyncMQWorker) -> None:
        self.failed_at: float | None = None
        hook_listener_statements(worker, before=self.before_statement)

    async def before_statement(self, sql: str) -> None:
        if self.failed_at is None and sql.lstrip().startswith("WITH locked AS"):
            self.failed_at = time.time()
            raise ConnectionResetError("injected: the claim never reached the server")


@pytest.mark.timeout(60)
async def test_retried_claim_stamps_the_time_it_claimed(chaos_db: str) -> None:
    """``start_time`` is when the job was claimed, not when the first, failed, claim attempt began.

    Otherwise, after a dead pool connection, a job's start_time precedes the moment its cursor became free
    (its predecessor's end_time) by up to a retry interval, and the jobs look as if they overlapped.
    """
    engine = create_async_engine(with_driver(chaos_db, "postgresql+asyncpg"))
    backoff = 0.5
    try:
        source = AsyncMQSource(engine=engine, model=MODEL)
        job = await source.call("chaos_a", "work", {})

        async def handler(job: JobContext) -> None:
            return None

        worker = AsyncMQWorker(
            engine=engine, queues={"chaos_a": handler}, model=MODEL, retry_intervals=(backoff, 1.0)
        )
        injector = _FirstClaimFails(worker)
        async with worker:
            info = await source.wait_for_job(job.id, timeout=10)
        assert injector.failed_at is not None
        assert info.state == "completed"
        assert info.start_time is not None
        started = info.start_time.replace(tzinfo=datetime.UTC).timestamp()
        assert started >= injector.failed_at + backoff * 0.9, (
            f"start_time is {injector.failed_at + backoff - started:.3f}s before the claim that succeeded"
        )
    finally:
        await engine.dispose()


@pytest.mark.timeout(60)
async def test_no_claim_while_the_listener_is_down(chaos_db: str) -> None:
    """A worker whose listener connection died claims nothing until it has reconnected.

    Its advisory lock died with the connection, so whatever it claims under the old lock id looks lost to
    every other worker: they mark it lost (the lost event fires, ``wait_for_job`` returns ``lost``) and an
    operator who then runs ``retry_job`` gets the job run twice. Here the listener dies while maintenance
    is retrying a failed statement (as it does through a database outage); when maintenance succeeds, the
    worker must reconnect before it claims.
    """
    engine = create_async_engine(with_driver(chaos_db, "postgresql+asyncpg"))
    admin = await asyncpg.connect(chaos_db)
    claims: list[bool] = []  # for each claim statement: was the listener connected?
    kills: list[asyncio.Task[None]] = []
    name = f"chaos-solo-{random.randrange(10**6)}"

    async def kill_listener() -> None:
        await admin.fetchval(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = $1",
            f"{LISTENER_APP} {name}",
        )

    def before_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("DELETE FROM mq_lock") and not kills:
            kills.append(asyncio.get_running_loop().create_task(kill_listener()))
            raise ConnectionResetError("injected: the database went away during maintenance")

    async def before_statement(sql: str) -> None:
        if sql.startswith("WITH locked AS"):
            claims.append(bool(worker.get_status()["listener_connected"]))

    async def handler(job: JobContext) -> None:
        return None

    try:
        source = AsyncMQSource(engine=engine, model=MODEL)
        job = await source.call("chaos_a", "work", {})
        worker = AsyncMQWorker(
            engine=engine,
            queues={"chaos_a": handler},
            model=MODEL,
            name=name,
            timeout=30,
            retry_intervals=(0.3, 0.3, 0.3),
        )
        sa.event.listen(engine.sync_engine, "before_cursor_execute", before_execute)
        hook_listener_statements(worker, before=before_statement)
        async with worker:
            info = await source.wait_for_job(job.id, timeout=10, poll_interval=0.1)
        await asyncio.gather(*kills)
        assert kills, "the fault was not injected"
        assert claims, "the worker never claimed"
        assert all(claims), f"claimed while the listener connection was down: {claims}"
        assert info.state == "completed"
    finally:
        await admin.close()
        await engine.dispose()
