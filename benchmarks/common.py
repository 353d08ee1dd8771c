"""What every scenario shares: scratch databases with the schema, fast pre-loading, results, medians."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import statistics
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from aiomq import Model, make_default_model

from .light import QUEUE, SYNC_QUEUE, plain_dsn, rss_kib, utcnow
from .wakeup_latency import scratch_database

__all__ = [
    "QUEUE",
    "SYNC_QUEUE",
    "Row",
    "fresh_database",
    "make_model",
    "median",
    "plain_dsn",
    "preload",
    "rss_kib",
]


def make_model() -> tuple[sa.MetaData, Model]:
    metadata = sa.MetaData()
    return metadata, make_default_model(metadata)


@contextlib.asynccontextmanager
async def fresh_database(server_url: str) -> AsyncIterator[str]:
    """A scratch database on ``server_url`` holding aiomq's schema; yields its ``postgresql+asyncpg`` URL."""
    async with scratch_database(server_url) as url:
        metadata, _ = make_model()
        engine = create_async_engine(url, poolclass=sa.NullPool)
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        await engine.dispose()
        yield url


async def preload(
    url: str,
    count: int,
    *,
    queues: Sequence[str] = (QUEUE,),
    cursor_keys: int = 0,
    priorities: Sequence[int] | None = None,
) -> None:
    """Insert ``count`` due no-op jobs in one statement (not timed), then ANALYZE.

    Job ``i`` goes to ``queues[i % len(queues)]``; with ``cursor_keys`` it gets cursor ``c<i % cursor_keys>``
    (not collapsible), so the keys are interleaved and any window of due jobs spans many cursors. All are
    due a second ago; ``created_time`` grows with ``i`` so the claim order is the insertion order (within a
    priority). ``priorities``, one per job, fill the ``priority`` column; without them it keeps its default.
    """
    base = utcnow() - datetime.timedelta(seconds=10)
    queue_list = [queues[i % len(queues)] for i in range(count)]
    keys: list[str | None] = [f"c{i % cursor_keys}" for i in range(count)] if cursor_keys else [None] * count
    args: list[Any] = [base, queue_list, keys]
    column, value, source = "", "", "unnest($2::text[], $3::text[]) WITH ORDINALITY AS t(q, k, n)"
    if priorities is not None:
        if len(priorities) != count:
            raise ValueError(f"{len(priorities)} priorities for {count} jobs")
        args.append(list(priorities))
        column, value = ", priority", ", p"
        source = "unnest($2::text[], $3::text[], $4::smallint[]) WITH ORDINALITY AS t(q, k, p, n)"
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        await conn.execute(
            f"""
            INSERT INTO mq_job (state, created_time, scheduled_time, queue, method, args, cursor_key,
                                collapsible, trace{column})
            SELECT 'pending', $1::timestamp + n * interval '1 microsecond', $1::timestamp + interval '9 s',
                   q, 'noop', jsonb_build_object('i', n), k, CASE WHEN k IS NULL THEN NULL ELSE false END,
                   NULL{value}
            FROM {source}
            """,
            *args,
        )
        await conn.execute("ANALYZE mq_job")
    finally:
        await conn.close()


async def count_states(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        rows = await conn.fetch("SELECT state::text, count(*) FROM mq_job GROUP BY state")
    finally:
        await conn.close()
    return {r[0]: r[1] for r in rows}


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


@dataclasses.dataclass
class Row:
    """One line of the results table: aiomq's figure beside a baseline's, and their ratio."""

    scenario: str
    metric: str
    unit: str
    aiomq: float | None
    baseline: str
    baseline_value: float | None
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.aiomq is None or not self.baseline_value:
            return None
        return self.aiomq / self.baseline_value

    def as_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ratio": None if self.ratio is None else round(self.ratio, 4)}
