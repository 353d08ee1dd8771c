"""The seed's echo worker and source, in asyncio: enqueue a job, run it, await its result.

    python examples/echo.py [postgresql+asyncpg://user@host/db]

Without a URL (and without AIOMQ_DATABASE_URL) it runs on an embedded PostgreSQL
(pip install 'aiomq[embedded]').
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext, make_default_model

metadata = sa.MetaData()
model = make_default_model(metadata)


class EchoQueue:
    async def execute_job(self, job: JobContext) -> str:
        return f'hello, {job.args["name"]} from method="{job.method}"'


async def main(url: str) -> str:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        async with AsyncMQWorker(engine=engine, queues={"echo": EchoQueue()}, model=model):
            source = AsyncMQSource(engine=engine, model=model)
            job = await source.call("echo", "hello", {"name": "Andy"})
            print(f"queued job={job.id}")
            info = await source.wait_for_job(job.id, timeout=30)
            print(f"job={info.id} {info.state}: {info.result}")
            return str(info.result)
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def database_url(argv: list[str]) -> AsyncIterator[str]:
    url = argv[1] if len(argv) > 1 else os.environ.get("AIOMQ_DATABASE_URL")
    if url:
        yield url
        return
    from aiomq.embedded import embedded_database_url

    async with embedded_database_url() as embedded:
        yield embedded


async def cli() -> None:
    async with database_url(sys.argv) as url:
        await main(url)


if __name__ == "__main__":
    asyncio.run(cli())
