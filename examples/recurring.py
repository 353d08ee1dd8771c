"""A recurring job with a cursor, throttled, and a listener that reacts to its completion.

    python examples/recurring.py [postgresql+asyncpg://user@host/db]

The schedule fires every second (an RFC 5545 RRULE). Its jobs share the cursor ``report:daily``, so they
never overlap, and since a schedule collapses on its cursor by default, a slow run never lets firings pile
up: while one is pending, the next firing joins it. Each run keeps a counter in the cursor. A listener on
``mq.job_finished.completed.reports.refresh`` turns every completed run into a ``notify`` job, in the same
transaction that records the run.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext, make_default_model

try:
    from examples.echo import database_url
except ImportError:  # run as a script from the examples folder
    from echo import database_url  # type: ignore[import-not-found,no-redef]

metadata = sa.MetaData()
model = make_default_model(metadata)


class Reports:
    def __init__(self) -> None:
        self.notified: list[int] = []

    async def execute_job(self, job: JobContext) -> Any:
        if job.method == "refresh":
            assert job.cursor is not None
            job.cursor["runs"] = job.cursor.get("runs", 0) + 1
            return {"run": job.cursor["runs"], "schedule_ids": job.schedule_ids}
        # "notify": the listener's job; the event is in its args
        self.notified.append(job.args["event"]["data"]["id"])
        return None


async def main(url: str, seconds: float = 3.5) -> dict[str, Any]:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        source = AsyncMQSource(engine=engine, model=model)
        reports = Reports()
        async with AsyncMQWorker(engine=engine, queues={"reports": reports}, model=model):
            await source.add_listener("mq.job_finished.completed.reports.refresh", "reports", "notify")
            schedule = await source.add_schedule(
                "reports", "refresh", rrule="FREQ=SECONDLY;INTERVAL=1", cursor_key="report:daily"
            )
            print(f"schedule {schedule.id} next at {schedule.next_execution_time}")
            await asyncio.sleep(seconds)
            await source.disable_schedule(schedule.id)
            await asyncio.sleep(0.5)  # let the last notify job run
        cursor = await source.get_cursor("report:daily") or {}
        print(f"cursor report:daily = {cursor}; completed runs notified: {reports.notified}")
        return {"cursor": cursor, "notified": reports.notified}
    finally:
        await engine.dispose()


async def cli() -> None:
    async with database_url(sys.argv) as url:
        await main(url)


if __name__ == "__main__":
    asyncio.run(cli())
