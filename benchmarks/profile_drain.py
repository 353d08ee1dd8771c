"""Where an aiomq drain spends its time: pyinstrument over ``run_until_idle()`` on pre-loaded jobs.

    pip install pyinstrument
    python -m benchmarks.profile_drain [URL] [--jobs N] [--cursor-keys K] [--sync] [--explain] [--html PATH]

Same set-up as the suite's drain scenarios (a scratch database, jobs pre-loaded with one INSERT, an async
no-op handler, default concurrency). Prints the process's wall and CPU time, then pyinstrument's call tree
of the event loop's thread (``async_mode="disabled"``: time waiting for PostgreSQL shows up as
``epoll.poll`` under the loop, not charged to the awaiting coroutine), the transactions committed and
the statements sent per job. ``--explain`` first shows PostgreSQL's plan of aiomq's claim statement on the
full backlog (it reads ``aiomq.sql``, an internal module).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import importlib
import os
import re
import time
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from aiomq import AsyncMQWorker, JobContext

from .common import QUEUE, SYNC_QUEUE, fresh_database, make_model, plain_dsn, preload
from .suite import server_url


async def explain_claim(url: str, queues: list[str], limit: int = 10) -> None:
    """EXPLAIN ANALYZE of aiomq's claim statement (``aiomq.sql``, an internal) on the current backlog."""
    from aiomq import sql
    from aiomq.records import utcnow

    _, model = make_model()
    engine = create_async_engine(url)
    compiled = sql.statements(model).claims.claim.compile(dialect=engine.dialect)
    await engine.dispose()
    values = {"queues": queues, "now": utcnow(), "limit": limit, "lock_id": 1, "name": "explain"}
    args = [values.get(name, compiled.params.get(name)) for name in compiled.positiontup or ()]
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        async with conn.transaction():
            await conn.fetch(str(compiled), *args)  # warm the cache; rolled back below
            plan = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {compiled}", *args)
            raise _Rollback
    except _Rollback:
        pass
    finally:
        await conn.close()
    print(f"aiomq's claim (limit {limit}) on this backlog:")
    print("\n".join(f"  {row[0]}" for row in plan))


class _Rollback(Exception):
    pass


async def profile(url: str, jobs: int, cursor_keys: int, sync: bool, html: str | None, explain: bool) -> None:
    pyinstrument: Any = importlib.import_module("pyinstrument")
    queues = [QUEUE, SYNC_QUEUE] if sync else [QUEUE]
    async with fresh_database(url) as db:
        await preload(db, jobs, queues=queues, cursor_keys=cursor_keys)
        if explain:
            await explain_claim(db, queues)
        _, model = make_model()
        engine = create_async_engine(db)
        statements: collections.Counter[str] = collections.Counter()

        @sa.event.listens_for(engine.sync_engine, "before_cursor_execute")
        def count(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
            statements[_kind(statement)] += 1

        commits_before = await _commits(db)

        async def noop(job: JobContext) -> None:
            return None

        def sync_noop(job: JobContext) -> None:
            return None

        handlers: dict[str, Any] = {QUEUE: noop, SYNC_QUEUE: sync_noop} if sync else {QUEUE: noop}
        worker = AsyncMQWorker(engine=engine, queues=handlers, model=model, timeout=60)
        profiler = pyinstrument.Profiler(interval=0.0005, async_mode="disabled")
        cpu, wall = time.process_time(), time.perf_counter()
        profiler.start()
        await worker.run_until_idle()
        profiler.stop()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        await engine.dispose()
        await asyncio.sleep(1.5)  # backends report their statistics at exit, at most once a second
        commits = await _commits(db) - commits_before
    print(
        f"{jobs:,} jobs in {wall:.2f} s = {jobs / wall:,.0f} jobs/s under the profiler; "
        f"this process used {cpu:.2f} s of CPU ({cpu / wall:.0%} of one core)"
    )
    print(f"server-side transactions committed in the database: {commits:,} = {commits / jobs:.2f} per job")
    print("statements through the engine (the listener connection's are not counted):")
    for kind, n in statements.most_common():
        print(f"  {n:8,}  {n / jobs:5.2f}/job  {kind}")
    print(profiler.output_text(unicode=False, color=False, show_all=False))
    if html:
        await asyncio.to_thread(_write, html, profiler.output_html())
        print(f"HTML: {html}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _kind(statement: str) -> str:
    """A statement's gist: its verb and table, or the function a SELECT calls."""
    text = " ".join(statement.split())
    if text.startswith("WITH"):
        text = text[
            text.rfind(")", 0, text.find(" UPDATE ") if " UPDATE " in text else len(text)) + 1 :
        ].strip()
    words = re.findall(r"[A-Za-z_][A-Za-z_0-9.]*(?:\()?", text)
    return " ".join(words[:6])


async def _commits(url: str) -> int:
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        value: int = await conn.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
    finally:
        await conn.close()
    return value


async def amain() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", nargs="?", default=os.environ.get("AIOMQ_DATABASE_URL"))
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--cursor-keys", type=int, default=0)
    parser.add_argument("--sync", action="store_true", help="half the jobs on a queue with a sync handler")
    parser.add_argument("--html", metavar="PATH")
    parser.add_argument(
        "--explain", action="store_true", help="first EXPLAIN ANALYZE aiomq's claim statement"
    )
    args = parser.parse_args()
    async with server_url(args.url) as url:
        await profile(url, args.jobs, args.cursor_keys, args.sync, args.html, args.explain)


if __name__ == "__main__":
    asyncio.run(amain())
