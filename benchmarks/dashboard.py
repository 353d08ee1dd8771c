"""The dashboard's page timings on a big job table: the overview, the first and a deep keyset page of the
jobs list, filtered lists, a job's page, the workers and lost pages.

    python -m benchmarks.dashboard [SERVER_URL] [--jobs 1000000] [--database web_1m] [--repeat 20] [--keep]

It creates the database (dropped at the end unless ``--keep``), fills ``mq_job`` with one INSERT ... SELECT
generate_series (8 queues, 5 methods; 90 % completed, 5 % failed, 3 % canceled, 2 % pending (a tenth of
them due later), a few lost; finished over the last two days; every 50th job on one of 1,000 cursors),
runs ANALYZE, then requests each page ``--repeat`` times through httpx's ASGI transport (the whole app:
routing, queries, templates) and prints the median and the slowest time per page.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

import asyncpg
import httpx
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from aiomq import make_default_model
from aiomq.dsn import libpq_dsn, with_database
from aiomq.web import create_app

FILL = """
INSERT INTO mq_job (state, created_time, scheduled_time, start_time, end_time, queue, method, args, result,
                    cursor_key, collapsible, trace)
SELECT s.state::mq_job_state, s.t - interval '5 s', s.t - interval '5 s', s.started, s.ended,
       'queue_' || (n % 8), (ARRAY['send', 'build', 'resize', 'sync', 'notify'])[1 + n % 5],
       jsonb_build_object('n', n, 'to', 'user' || n || '@example.com'),
       CASE s.state WHEN 'completed' THEN jsonb_build_object('ok', true)
                    WHEN 'failed' THEN jsonb_build_object('exc', 'ValueError', 'message', 'no', 'tb',
                                                          jsonb_build_array('Traceback ...'))
       END,
       CASE WHEN n % 50 = 0 THEN 'cursor_' || (n % 1000) END,
       CASE WHEN n % 50 = 0 THEN false END, NULL
FROM (
    SELECT n, p.state, p.t,
           CASE WHEN p.state IN ('pending') THEN NULL ELSE p.t END AS started,
           CASE WHEN p.state IN ('pending') THEN NULL ELSE p.t + interval '200 ms' END AS ended
    FROM (
        SELECT n,
               CASE WHEN n % 100 < 90 THEN 'completed' WHEN n % 100 < 95 THEN 'failed'
                    WHEN n % 100 < 98 THEN 'canceled'
                    WHEN n % 100000 = 99 THEN 'lost' ELSE 'pending' END AS state,
               now() at time zone 'utc' - ($1 - n) * (interval '172800 s' / $1)
                 + CASE WHEN n % 1000 = 98 THEN interval '1 hour' ELSE interval '0' END AS t
        FROM generate_series(1, $1) AS n
    ) p
) s
"""


async def prepare(server: str, name: str, jobs: int) -> str:
    admin = await asyncpg.connect(libpq_dsn(server))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = with_database(server, driver="postgresql+asyncpg", database=name)
    metadata = sa.MetaData()
    make_default_model(metadata)
    engine = create_async_engine(url, poolclass=sa.NullPool)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    await engine.dispose()
    conn = await asyncpg.connect(libpq_dsn(url))
    try:
        started = time.perf_counter()
        await conn.execute(FILL, jobs)
        # The lost jobs' cursors must be unique among running and lost jobs: they have none.
        await conn.execute("UPDATE mq_job SET cursor_key = NULL WHERE state = 'lost'")
        await conn.execute("VACUUM ANALYZE mq_job")
        print(f"filled {jobs:,} jobs in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    finally:
        await conn.close()
    return url


async def drop(server: str, name: str) -> None:
    admin = await asyncpg.connect(libpq_dsn(server))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def measure(url: str, jobs: int, repeat: int) -> list[tuple[str, float, float]]:
    engine = create_async_engine(url, pool_size=2)
    model = make_default_model(sa.MetaData())
    app = create_app(engine, model, live_interval=None)
    conn = await asyncpg.connect(libpq_dsn(url))
    try:
        failed_id = await conn.fetchval("SELECT max(id) FROM mq_job WHERE state = 'failed'")
    finally:
        await conn.close()
    pages = {
        "overview (/)": "/",
        "jobs, first page": "/jobs",
        "jobs, deep keyset page (before the middle id)": f"/jobs?before={jobs // 2}",
        "jobs, last page (before id 60)": "/jobs?before=60",
        "jobs, state=failed": "/jobs?state=failed",
        "jobs, queue + state=failed, deep": f"/jobs?queue=queue_3&state=failed&before={jobs // 2}",
        "jobs, method + cursor": "/jobs?method=send&cursor=cursor_500",
        "job page (failed job)": f"/jobs/{failed_id}",
        "lost jobs": "/lost",
        "workers": "/workers",
        "cursors": "/cursors",
    }
    results = []
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for label, path in pages.items():
                assert (await client.get(path)).status_code == 200, path  # warm: plans, caches
                times = []
                for _ in range(repeat):
                    started = time.perf_counter()
                    response = await client.get(path)
                    times.append(time.perf_counter() - started)
                    assert response.status_code == 200, (path, response.text[:500])
                results.append((label, statistics.median(times) * 1000, max(times) * 1000))
    finally:
        await engine.dispose()
    return results


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dashboard", description="page timings")
    parser.add_argument("server", nargs="?", default="postgresql://root@127.0.0.1:5432/postgres")
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--database", default="web_1m")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="leave the database in place")
    args = parser.parse_args(argv)
    url = await prepare(args.server, args.database, args.jobs)
    try:
        results = await measure(url, args.jobs, args.repeat)
    finally:
        if not args.keep:
            await drop(args.server, args.database)
    print(f"\n{args.jobs:,} jobs; {args.repeat} requests per page through the ASGI app\n")
    print(f"{'page':<50} {'median ms':>10} {'max ms':>10}")
    for label, med, worst in results:
        print(f"{label:<50} {med:>10.1f} {worst:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
