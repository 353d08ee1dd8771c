"""Scenario 13: awaiting a job. How long after its finish NOTIFY reaches the process does ``wait_for_job``
return, for callers waiting one at a time and fifty at once?

    python -m benchmarks.await_path [--jobs 300] [--batch 50] [URL]

One process holds a worker (an async no-op handler), a source and a raw asyncpg connection that LISTENs
on ``mq.job_finished`` and notes when each job's NOTIFY arrives: that arrival is the baseline, the
earliest moment any code in the process can know the job finished. aiomq's figure is the time from the
same ``call`` to ``wait_for_job`` returning; the difference is what ``wait_for_job`` adds after the NOTIFY
(reading the finished job included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext, make_default_model
from aiomq.channels import FINISHED_CHANNEL, parse_finished

from .common import Row, fresh_database
from .harness import Context, Scenario
from .light import QUEUE, plain_dsn
from .wakeup_latency import scratch_database, summary

__all__ = ["await_latency", "measure"]

#: Waiters at once in the concurrent half.
BATCH = 50


class _Clock:
    """Per job: when ``call`` returned, when its finish NOTIFY arrived, when ``wait_for_job`` returned."""

    def __init__(self) -> None:
        self.called: dict[int, float] = {}
        self.notified: dict[int, float] = {}
        self.returned: dict[int, float] = {}

    def on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self.notified.setdefault(parse_finished(payload).job_id, time.perf_counter())

    def reset(self) -> None:
        self.called.clear()
        self.notified.clear()
        self.returned.clear()

    def figures(self) -> dict[str, list[float]]:
        jobs = [j for j in self.returned if j in self.notified]
        return {
            "after_notify_ms": [(self.returned[j] - self.notified[j]) * 1000 for j in jobs],
            "call_to_return_ms": [(self.returned[j] - self.called[j]) * 1000 for j in jobs],
            "call_to_notify_ms": [(self.notified[j] - self.called[j]) * 1000 for j in jobs],
        }


async def _call_and_wait(source: AsyncMQSource, clock: _Clock) -> None:
    queued = await source.call(QUEUE, "noop")
    clock.called[queued.id] = time.perf_counter()
    info = await source.wait_for_job(queued.id, timeout=30)
    clock.returned[queued.id] = time.perf_counter()
    if info.state != "completed":
        raise RuntimeError(f"job {queued.id} ended {info.state}")


async def measure(url: str, jobs: int, batch: int) -> dict[str, dict[str, list[float]]]:
    """``jobs`` awaited one at a time, then ``jobs`` more in batches of ``batch`` awaited at once."""
    metadata = sa.MetaData()
    model = make_default_model(metadata)
    engine = create_async_engine(url, pool_size=max(10, batch), max_overflow=10)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)  # a no-op on a database that has the schema

    async def noop(job: JobContext) -> None:
        return None

    clock = _Clock()
    listen = await asyncpg.connect(plain_dsn(url))
    await listen.add_listener(FINISHED_CHANNEL, clock.on_notify)
    source = AsyncMQSource(engine=engine, model=model)
    out: dict[str, dict[str, list[float]]] = {}
    try:
        async with AsyncMQWorker(
            engine=engine, queues={QUEUE: noop}, model=model, timeout=60, concurrency=max(10, batch)
        ):
            for _ in range(20):  # warm up pools, prepared statements and the waiters' connection
                await _call_and_wait(source, clock)
            clock.reset()
            for _ in range(jobs):
                await _call_and_wait(source, clock)
            out["one at a time"] = clock.figures()
            clock.reset()
            for _ in range(max(1, jobs // batch)):
                await asyncio.gather(*(_call_and_wait(source, clock) for _ in range(batch)))
            out[f"{batch} at once"] = clock.figures()
    finally:
        await listen.close()
        await engine.dispose()
    return out


def report(figures: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, dict[str, float]]]:
    return {
        mode: {name: summary(values) for name, values in series.items()} for mode, series in figures.items()
    }


async def await_latency(ctx: Context) -> Scenario:
    jobs = ctx.sizes.latency_jobs
    async with fresh_database(ctx.server) as url:
        result = report(await measure(url, jobs, BATCH))
    rows = []
    for mode, series in result.items():
        aiomq, notify = series["call_to_return_ms"], series["call_to_notify_ms"]
        after = series["after_notify_ms"]
        ctx.log(f"{mode}: wait_for_job returns {after['p50_ms']:.2f} ms (p50) after the NOTIFY arrives")
        for p in ("p50", "p99"):
            rows.append(
                Row(
                    "13 await a job",
                    f"{mode}: call -> wait_for_job returns, {p}",
                    "ms",
                    aiomq[f"{p}_ms"],
                    "call -> its finish NOTIFY arrives (asyncpg LISTEN)",
                    notify[f"{p}_ms"],
                    f"{after[f'{p}_ms']:.2f} ms after the NOTIFY",
                )
            )
    return Scenario(
        "await_latency",
        f"awaiting jobs: {jobs} one at a time, then {jobs} in batches of {BATCH} at once",
        {"jobs": jobs, "batch": BATCH},
        result,
        rows,
    )


def _print(result: dict[str, dict[str, dict[str, float]]], keys: Sequence[str]) -> None:
    for mode, series in result.items():
        for key in keys:
            s = series[key]
            print(
                f"{mode:>14} {key:>18}: p50 {s['p50_ms']:.2f} ms, p95 {s['p95_ms']:.2f} ms, "
                f"p99 {s['p99_ms']:.2f} ms ({s['jobs']:.0f} jobs)"
            )


async def amain() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", nargs="?", default=os.environ.get("AIOMQ_DATABASE_URL"))
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()
    async with scratch_database(args.url) as url:
        result = report(await measure(url, args.jobs, args.batch))
    _print(result, ("after_notify_ms", "call_to_notify_ms", "call_to_return_ms"))
    print(json.dumps({"benchmark": "await_path", **result}))


if __name__ == "__main__":
    asyncio.run(amain())
