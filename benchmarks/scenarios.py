"""The scenarios: each measures aiomq and its raw asyncpg baseline on fresh scratch databases.

Every scenario is an ``async def (ctx) -> Scenario`` registered in ``SCENARIOS``; ``ctx.results`` holds the
scenarios already run, for the rows that compare with another scenario's figure. The harness they share
(sizes, context, drains in a subprocess) is in :mod:`benchmarks.harness`; scenarios 10-12 (operating
queues) in :mod:`benchmarks.operating`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from aiomq import AsyncMQSource

from . import baseline, operating
from .await_path import await_latency
from .common import QUEUE, SYNC_QUEUE, Row, fresh_database, make_model, median
from .harness import Context, Scenario, Sizes
from .harness import drains as _drains
from .harness import median_rate as _rate
from .harness import repeat as _repeat
from .wakeup_latency import measure as aiomq_wakeup_latency
from .wakeup_latency import summary
from .web_path import web_path

__all__ = ["BULK_VARIANTS", "SCENARIOS", "Context", "Scenario", "Sizes"]


# ------------------------------------------------------------------------------------------- 1. enqueue


async def aiomq_single_enqueue(url: str, count: int, warmup: int = 20) -> float:
    """``count`` ``AsyncMQSource(engine=...).call``: each its own transaction. Seconds."""
    _, model = make_model()
    engine = create_async_engine(url)
    try:
        source = AsyncMQSource(engine=engine, model=model)
        for i in range(warmup):
            await source.call(QUEUE, "noop", {"i": i})
        start = time.perf_counter()
        for i in range(count):
            await source.call(QUEUE, "noop", {"i": i})
        return time.perf_counter() - start
    finally:
        await engine.dispose()


async def single_enqueue(ctx: Context) -> Scenario:
    n = ctx.sizes.enqueue

    async def side(fn: Callable[[str, int], Awaitable[float]]) -> float:
        async with fresh_database(ctx.server) as url:
            return n / await fn(url, n)

    rates = await _repeat(
        ctx,
        ctx.sizes.runs,
        {
            "aiomq": lambda: side(aiomq_single_enqueue),
            "raw": lambda: side(lambda url, n: baseline.single_enqueue(url, QUEUE, n)),
        },
        lambda v: f"{v:,.0f} jobs/s",
    )
    return Scenario(
        "single_enqueue",
        f"single enqueue, {n:,} calls",
        {"jobs": n, "runs": ctx.sizes.runs},
        {"jobs_per_s": rates},
        [
            Row(
                "1 single enqueue",
                f"{n:,} calls, 1 txn each",
                "jobs/s",
                median(rates["aiomq"]),
                "asyncpg INSERT+NOTIFY txn",
                median(rates["raw"]),
            )
        ],
    )


# ------------------------------------------------------------------------------------------- 2. bulk

#: How aiomq enqueues ``count`` jobs in one transaction: ``(source on an AsyncSession, count)``. The
#: harness opens the session and its transaction, and times up to the commit.
BulkEnqueue = Callable[[AsyncMQSource, int], Awaitable[None]]


async def bulk_calls(source: AsyncMQSource, count: int) -> None:
    for i in range(count):
        await source.call(QUEUE, "noop", {"i": i})


async def bulk_call_many(source: AsyncMQSource, count: int) -> None:
    await source.call_many([{"queue": QUEUE, "method": "noop", "args": {"i": i}} for i in range(count)])


# Each variant gets a row of its own; a new way to enqueue in bulk is one function and one entry here.
BULK_VARIANTS: dict[str, BulkEnqueue] = {
    "call x N": bulk_calls,
    "call_many": bulk_call_many,
}


async def aiomq_bulk_enqueue(url: str, count: int, variant: BulkEnqueue) -> float:
    _, model = make_model()
    engine = create_async_engine(url)
    try:
        for n in (10, count):  # the first, untimed, warms the pool and the prepared statements
            start = time.perf_counter()
            async with AsyncSession(engine) as session, session.begin():
                await variant(AsyncMQSource(dbsession=session, model=model), n)
            seconds = time.perf_counter() - start
        return seconds
    finally:
        await engine.dispose()


async def bulk_enqueue(ctx: Context) -> Scenario:
    n = ctx.sizes.bulk

    async def aiomq_side(variant: BulkEnqueue) -> float:
        async with fresh_database(ctx.server) as url:
            return n / await aiomq_bulk_enqueue(url, n, variant)

    async def raw_side() -> float:
        async with fresh_database(ctx.server) as url:
            return n / await baseline.bulk_enqueue(url, QUEUE, n)

    sides: dict[str, Callable[[], Awaitable[float]]] = {
        f"aiomq {name}": (lambda v=variant: aiomq_side(v))  # type: ignore[misc]
        for name, variant in BULK_VARIANTS.items()
    }
    sides["raw"] = raw_side
    rates = await _repeat(ctx, ctx.sizes.runs, sides, lambda v: f"{v:,.0f} jobs/s")
    return Scenario(
        "bulk_enqueue",
        f"bulk enqueue, {n:,} jobs in one transaction",
        {"jobs": n, "runs": ctx.sizes.runs, "variants": list(BULK_VARIANTS)},
        {"jobs_per_s": rates},
        [
            Row(
                "2 bulk enqueue",
                f"{n:,} jobs, 1 txn: {name}",
                "jobs/s",
                median(rates[f"aiomq {name}"]),
                "asyncpg unnest INSERT + 1 NOTIFY",
                median(rates["raw"]),
            )
            for name in BULK_VARIANTS
        ],
    )


# ------------------------------------------------------------------------------------------- drains


_RAW1 = "asyncpg 1/claim x10 conns"
_RAW100 = "asyncpg 100/claim, 1 finish"


async def plain_drain(ctx: Context) -> Scenario:
    n = ctx.sizes.drain
    runs = await _drains(ctx, ["aiomq", "raw1", "raw100", "aiomq@50"], n)
    rate = _rate(runs["aiomq"])
    return Scenario(
        "drain",
        f"drain {n:,} pre-loaded no-op jobs (aiomq at its default concurrency=10, and at 50)",
        {"jobs": n, "runs": ctx.sizes.drain_runs},
        runs,
        [
            Row("3 drain", f"{n:,} no-op jobs", "jobs/s", rate, _RAW1, _rate(runs["raw1"])),
            Row("3 drain", f"{n:,} no-op jobs", "jobs/s", rate, _RAW100, _rate(runs["raw100"])),
            Row(
                "3 drain",
                f"{n:,} no-op jobs, concurrency=50",
                "jobs/s",
                _rate(runs["aiomq@50"]),
                _RAW100,
                _rate(runs["raw100"]),
            ),
        ],
    )


def _vs_plain(ctx: Context, scenario: str, metric: str, rate: float) -> list[Row]:
    plain = ctx.results.get("drain")
    if plain is None:
        return []
    return [Row(scenario, metric, "jobs/s", rate, "aiomq plain drain (3)", plain.rows[0].aiomq)]


async def cursor_drain(ctx: Context) -> Scenario:
    n, keys = ctx.sizes.drain, ctx.sizes.cursor_keys
    runs = await _drains(ctx, ["aiomq", "raw100"], n, cursor_keys=keys)
    rate = _rate(runs["aiomq"])
    metric = f"{keys:,} cursors x {n // keys}"
    return Scenario(
        "cursor_drain",
        f"drain {n:,} jobs on {keys:,} cursor keys ({n // keys} each, collapse off, keys interleaved)",
        {"jobs": n, "cursor_keys": keys, "runs": ctx.sizes.drain_runs},
        runs,
        [
            Row(
                "4 cursor drain",
                metric,
                "jobs/s",
                rate,
                _RAW100 + " (no cursor logic)",
                _rate(runs["raw100"]),
            ),
            *_vs_plain(ctx, "4 cursor drain", metric, rate),
        ],
    )


async def mixed_drain(ctx: Context) -> Scenario:
    n = ctx.sizes.drain
    queues = {QUEUE: "async", SYNC_QUEUE: "sync"}
    runs = await _drains(ctx, ["aiomq", "raw100"], n, queues=queues)
    rate = _rate(runs["aiomq"])
    metric = f"{n:,} jobs, 50% sync"
    return Scenario(
        "mixed_drain",
        f"drain {n:,} jobs, half on a queue with a sync (threaded) handler",
        {"jobs": n, "queues": queues, "runs": ctx.sizes.drain_runs},
        runs,
        [
            Row("5 sync/async drain", metric, "jobs/s", rate, _RAW100 + ", to_thread", _rate(runs["raw100"])),
            *_vs_plain(ctx, "5 sync/async drain", metric, rate),
        ],
    )


async def retry_drain(ctx: Context) -> Scenario:
    """Jobs that fail once and complete on their retry (a worker policy, no backoff): each costs a failure
    recorded with its retry in one transaction, and a second run."""
    n = ctx.sizes.drain
    runs = await _drains(ctx, ["aiomq"], n, queues={QUEUE: "fail_once"}, retry=2)
    rate = _rate(runs["aiomq"])  # jobs that completed (on their second run) per second
    metric = f"{n:,} jobs failing once, then retried"
    return Scenario(
        "retry_drain",
        f"drain {n:,} jobs whose first run fails, with AsyncMQWorker(retry=Retry(max_attempts=2, backoff=0))",
        {"jobs": n, "runs": ctx.sizes.drain_runs},
        runs,
        [
            *_vs_plain(ctx, "9 retry drain", metric, rate),
            Row(
                "9 retry drain",
                f"{metric}: handler runs",
                "runs/s",
                2 * rate,
                "aiomq plain drain (3)",
                _plain(ctx),
            ),
        ],
    )


def _plain(ctx: Context) -> float | None:
    plain = ctx.results.get("drain")
    return None if plain is None else plain.rows[0].aiomq


async def backlog(ctx: Context) -> Scenario:
    """The first ``small`` jobs of a backlog of ``small`` vs of ``big``: the same work from a bigger table;
    and the whole ``big`` drain (stopped at ``backlog_time_limit``)."""
    small, big = ctx.sizes.backlog
    limit = ctx.sizes.backlog_time_limit
    runs_small = await _drains(ctx, ["aiomq", "raw100"], small)
    runs_big = await _drains(
        ctx, ["aiomq", "raw100"], big, rss_at=ctx.sizes.rss_at, mark_at=[small], time_limit=limit
    )

    def first(runs: Sequence[dict[str, Any]]) -> float | None:
        times = [r["marks_s"].get(str(small)) for r in runs]
        return None if None in times else median([small / t for t in times if t is not None])

    a_small, r_small = _rate(runs_small["aiomq"]), _rate(runs_small["raw100"])
    a_first, r_first = first(runs_big["aiomq"]), first(runs_big["raw100"])
    capped = [f"{r['impl']}: {r['handled']:,} done" for rs in runs_big.values() for r in rs if r["capped"]]
    all_big = f"all {big:,}" + (f" (stopped at {limit:g} s: {', '.join(capped)})" if capped else "")
    return Scenario(
        "backlog",
        f"backlog independence: the first {small:,} jobs of a backlog of {small:,} vs {big:,}",
        {"small": small, "big": big, "runs": ctx.sizes.drain_runs, "time_limit_s": limit},
        {"small": runs_small, "big": runs_big},
        [
            Row("6 backlog", f"first {small:,} of {small:,}", "jobs/s", a_small, _RAW100, r_small),
            Row("6 backlog", f"first {small:,} of {big:,}", "jobs/s", a_first, _RAW100, r_first),
            Row(
                "6 backlog",
                f"rate ratio: backlog {big:,} / {small:,}",
                "x",
                None if a_first is None else a_first / a_small,
                _RAW100,
                None if r_first is None else r_first / r_small,
            ),
            Row("6 backlog", all_big, "jobs/s", _rate(runs_big["aiomq"]), _RAW100, _rate(runs_big["raw100"])),
        ],
    )


def _done(runs: Sequence[dict[str, Any]]) -> str:
    capped = [r["handled"] for r in runs if r["capped"]]
    return f" (aiomq stopped after {min(capped):,})" if capped else ""


async def memory(ctx: Context) -> Scenario:
    """Derived from the drains of scenarios 3 and 6, each of which ran in a process of its own."""
    plain, back = ctx.results["drain"], ctx.results["backlog"]
    first, last = ctx.sizes.rss_at

    def peak(runs: Sequence[dict[str, Any]]) -> float:
        return median([r["peak_rss_kib"] for r in runs]) / 1024

    def sample(runs: Sequence[dict[str, Any]], at: int) -> float | None:
        values = [r["rss_samples_kib"].get(str(at)) for r in runs]
        return None if None in values else median([v for v in values if v is not None]) / 1024

    def end(runs: Sequence[dict[str, Any]]) -> float:
        return median([r["rss_end_kib"] for r in runs]) / 1024

    def start(runs: Sequence[dict[str, Any]]) -> float:
        return median([r["rss_start_kib"] for r in runs]) / 1024

    m, big = plain.measurements, back.measurements["big"]
    n = plain.params["jobs"]
    rows = [
        Row("8 worker RSS", "ready, before the drain", "MiB", start(m["aiomq"]), _RAW100, start(m["raw100"])),
        Row("8 worker RSS", f"peak, {n:,}-job drain", "MiB", peak(m["aiomq"]), _RAW100, peak(m["raw100"])),
    ]
    for at in (first, last):
        a, r = sample(big["aiomq"], at), sample(big["raw100"], at)
        note = "" if a is not None and r is not None else "not reached before the time limit"
        rows.append(Row("8 worker RSS", f"after {at:,} jobs", "MiB", a, _RAW100, r, note))
    rows.append(
        Row(
            "8 worker RSS",
            f"at the end of the {back.params['big']:,}-job drain{_done(big['aiomq'])}",
            "MiB",
            end(big["aiomq"]),
            _RAW100,
            end(big["raw100"]),
        )
    )
    rows.append(
        Row(
            "8 worker RSS",
            f"peak, {back.params['big']:,}-job drain{_done(big['aiomq'])}",
            "MiB",
            peak(big["aiomq"]),
            _RAW100,
            peak(big["raw100"]),
        )
    )
    return Scenario(
        "memory",
        "worker RSS (each drain ran in a process of its own; peak is VmHWM, samples /proc/self/statm)",
        {"rss_at": list(ctx.sizes.rss_at)},
        {"rows_from": ["drain", "backlog"]},
        rows,
    )


# ------------------------------------------------------------------------------------------- 7. latency


async def wakeup(ctx: Context) -> Scenario:
    jobs, spacing = ctx.sizes.latency_jobs, ctx.sizes.latency_spacing_ms / 1000

    async def aiomq_side() -> dict[str, float]:
        async with fresh_database(ctx.server) as url:
            return dict(await aiomq_wakeup_latency(url, jobs, spacing))

    async def raw_side() -> dict[str, float]:
        async with fresh_database(ctx.server) as url:
            return summary(await baseline.wakeup_latency(url, jobs, spacing))

    runs: dict[str, list[dict[str, float]]] = {"aiomq": [], "raw": []}
    for run in range(ctx.sizes.latency_runs):
        for name, fn in (("aiomq", aiomq_side), ("raw", raw_side)):
            result = await fn()
            runs[name].append(result)
            ctx.log(
                f"{name} run {run + 1}: p50 {result['p50_ms']:.2f} ms, p95 {result['p95_ms']:.2f} ms, "
                f"p99 {result['p99_ms']:.2f} ms"
            )
    rows = [
        Row(
            "7 wake-up latency",
            f"{p} commit->start",
            "ms",
            median([r[f"{p}_ms"] for r in runs["aiomq"]]),
            "asyncpg LISTEN + 1 UPDATE claim",
            median([r[f"{p}_ms"] for r in runs["raw"]]),
        )
        for p in ("p50", "p95", "p99")
    ]
    return Scenario(
        "wakeup_latency",
        f"idle wake-up latency, {jobs} jobs {ctx.sizes.latency_spacing_ms:g} ms apart",
        {"jobs": jobs, "spacing_ms": ctx.sizes.latency_spacing_ms, "runs": ctx.sizes.latency_runs},
        runs,
        rows,
    )


#: key -> (number, scenario, the scenarios it needs before it).
SCENARIOS: dict[str, tuple[int, Callable[[Context], Awaitable[Scenario]], tuple[str, ...]]] = {
    "single_enqueue": (1, single_enqueue, ()),
    "bulk_enqueue": (2, bulk_enqueue, ()),
    "drain": (3, plain_drain, ()),
    "cursor_drain": (4, cursor_drain, ()),
    "mixed_drain": (5, mixed_drain, ()),
    "backlog": (6, backlog, ()),
    "wakeup_latency": (7, wakeup, ()),
    "memory": (8, memory, ("drain", "backlog")),
    "retry_drain": (9, retry_drain, ("drain",)),
    "queue_stats": (10, operating.queue_stats, ()),
    "prune_latency": (11, operating.prune_latency, ()),
    "priority_backlog": (12, operating.priority_backlog, ()),
    "await_latency": (13, await_latency, ()),
    "web_path": (14, web_path, ()),
}
