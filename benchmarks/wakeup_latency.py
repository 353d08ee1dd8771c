"""Idle wake-up latency: commit of ``call`` -> the handler starting, for jobs spaced apart.

    python -m benchmarks.wakeup_latency [--jobs 200] [--spacing-ms 10] [URL]

One process holds the worker and the source, so both timestamps come from one monotonic clock. The
worker is idle between jobs (each job is a no-op that finishes long before the next commit). Without a
URL (or AIOMQ_DATABASE_URL) it runs on the embedded PostgreSQL. Prints p50/p95/p99 in milliseconds and
a JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Sequence

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext, make_default_model


@contextlib.asynccontextmanager
async def scratch_database(url: str | None) -> AsyncIterator[str]:
    """A throwaway database on the given server (or the embedded one), dropped afterwards."""
    if url is None:
        from aiomq.embedded import embedded_database_url

        async with embedded_database_url() as embedded, scratch_database(embedded) as scratch:
            yield scratch
        return
    base = sa.make_url(url)
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"aiomq_bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin)
    await conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.set(drivername="postgresql+asyncpg", database=name).render_as_string(hide_password=False)
    finally:
        await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await conn.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def summary(values: Sequence[float], count_key: str = "jobs") -> dict[str, float]:
    """How many (under ``count_key``), p50, p95, p99 and max of latencies in milliseconds."""
    ordered = list(values)
    return {
        count_key: len(ordered),
        "p50_ms": percentile(ordered, 50),
        "p95_ms": percentile(ordered, 95),
        "p99_ms": percentile(ordered, 99),
        "max_ms": max(ordered),
    }


async def measure(url: str, jobs: int, spacing: float) -> dict[str, float]:
    metadata = sa.MetaData()
    model = make_default_model(metadata)
    engine = create_async_engine(url, pool_size=5)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    started: dict[int, float] = {}

    async def noop(job: JobContext) -> None:
        started[job.id] = time.perf_counter()

    committed: dict[int, float] = {}
    source = AsyncMQSource(engine=engine, model=model)
    async with AsyncMQWorker(engine=engine, queues={"bench": noop}, model=model, timeout=60):
        for _ in range(20):  # warm up pools and prepared statements
            queued = await source.call("bench", "warmup")
            await source.wait_for_job(queued.id, timeout=10, poll_interval=0.05)
        started.clear()
        for _ in range(jobs):
            queued = await source.call("bench", "noop")  # returns after its commit
            committed[queued.id] = time.perf_counter()
            await asyncio.sleep(spacing)
        await source.wait_for_job(queued.id, timeout=30, poll_interval=0.05)  # the last one
    await engine.dispose()
    latencies = [(started[j] - committed[j]) * 1000 for j in committed if j in started]
    return {
        "jobs": len(latencies),
        "p50_ms": round(percentile(latencies, 50), 3),
        "p95_ms": round(percentile(latencies, 95), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
        "mean_ms": round(statistics.fmean(latencies), 3),
        "max_ms": round(max(latencies), 3),
    }


async def amain() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", nargs="?", default=os.environ.get("AIOMQ_DATABASE_URL"))
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--spacing-ms", type=float, default=10.0)
    args = parser.parse_args()
    async with scratch_database(args.url) as url:
        result = await measure(url, args.jobs, args.spacing_ms / 1000)
    print(
        f"wake-up latency over {result['jobs']} jobs, {args.spacing_ms:g} ms apart: "
        f"p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, p99 {result['p99_ms']} ms"
    )
    print(json.dumps({"benchmark": "wakeup_latency", **result}))


if __name__ == "__main__":
    asyncio.run(amain())
