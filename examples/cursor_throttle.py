"""A cursor as a throttle: many calls inside a 1-second window become one job with persistent state.

    python examples/cursor_throttle.py [postgresql+asyncpg://user@host/db]

Every call for account 42 names the cursor ``account:42``. While a job on it is pending, further calls
join that job (``created`` is False) instead of adding one, and a conflict resolver merges their arguments.
The job's ``job.cursor`` dict is saved when it succeeds, so the next job on the cursor sees it.
"""

from __future__ import annotations

import asyncio
import datetime
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


async def sync_account(job: JobContext) -> dict[str, Any]:
    assert job.cursor is not None
    job.cursor["runs"] = job.cursor.get("runs", 0) + 1
    job.cursor["seen"] = job.cursor.get("seen", 0) + len(job.args["changes"])
    return {"synced": job.args["changes"]}


def merge_changes(new: list[str]) -> Any:
    def resolve(job: Any) -> None:
        job.args = {"changes": [*job.args["changes"], *new]}

    return resolve


async def main(url: str) -> dict[str, Any] | None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        source = AsyncMQSource(engine=engine, model=model)
        async with AsyncMQWorker(engine=engine, queues={"accounts": sync_account}, model=model):
            for batch in range(2):
                jobs = []
                for i in range(5):
                    change = [f"change-{batch}-{i}"]
                    jobs.append(
                        await source.call(
                            "accounts",
                            "sync",
                            {"changes": change},
                            cursor_key="account:42",
                            when=datetime.timedelta(seconds=1),
                            conflict_resolver=merge_changes(change),
                        )
                    )
                print(f"batch {batch}: 5 calls -> job ids {sorted({j.id for j in jobs})}")
                info = await source.wait_for_job(jobs[0].id, timeout=30)
                print(f"job {info.id} {info.state}: {info.result}")
            cursor = await source.get_cursor("account:42")
            print(f"cursor account:42 = {cursor}")
            return cursor
    finally:
        await engine.dispose()


async def cli() -> None:
    async with database_url(sys.argv) as url:
        await main(url)


if __name__ == "__main__":
    asyncio.run(cli())
