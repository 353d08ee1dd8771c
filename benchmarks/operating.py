"""Scenarios 10-12, operating queues (DESIGN §7.6): ``queue_stats()`` on a million finished jobs, claim
latency while ``prune_jobs()`` deletes a million, and the backlog scenario with mixed priorities.

Scenario 10 measures read-only queries, so all its sides share one scratch database (loaded once, then
``VACUUM ANALYZE``) and take turns call by call. Scenario 11 gets a scratch database per side, each with its
own load. Scenario 12 is scenario 6's drain (``benchmarks.harness.drain``, in a subprocess) on backlogs
with and without priorities, plus ``EXPLAIN (ANALYZE, BUFFERS)`` of the worker's claim statement, read from
``aiomq.sql`` (an internal module) and run both as a generic plan (as the worker runs it) and as a custom one.
"""

from __future__ import annotations

import asyncio
import datetime
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import create_async_engine

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext
from aiomq.compiled import Compiled
from aiomq.sql import statements

from .common import QUEUE, Row, count_states, fresh_database, make_model, median, plain_dsn, preload
from .harness import Context, Scenario, drain
from .light import utcnow
from .wakeup_latency import summary

__all__ = ["explain_claim", "load_jobs", "priority_backlog", "prune_latency", "queue_stats"]

#: Finished states cycled through by job number: 1 in 20 failed, 1 in 20 canceled, the rest completed.
MIXED_FINISHED = ("failed", "canceled", *["completed"] * 18)
#: What ``prune_jobs`` deletes by default: every row of scenario 11 goes.
PRUNABLE = ("canceled", *["completed"] * 19)
STATS_QUEUES = tuple(f"q{i}" for i in range(10))
RUNNING, LOST = 20, 10  # scenario 10's few active jobs
PRIORITIES = range(-5, 6)
#: Scenario 11's cutoff: its jobs ended two days ago.
PRUNE_AGE = datetime.timedelta(days=1)

_NAIVE = "asyncpg GROUP BY queue, state"
_FLOOR = "asyncpg primary-key lookup"
_ONE_DELETE = "during one DELETE statement"
#: The lines of a claim's plan logged as it runs (the JSON keeps the whole plan).
_KEY = re.compile(r"Scan|Sort |Join|JIT|Timing|Rows Removed|Execution Time")
_GENERIC, _CUSTOM = "force_generic_plan", "force_custom_plan"

_LOAD = """
    INSERT INTO mq_job (state, created_time, scheduled_time, start_time, end_time, queue, method, args,
                        result, lock_id, worker)
    SELECT s::mq_job_state, t0,
           CASE WHEN s = 'pending' AND n % 2 = 1 THEN $1::timestamp + interval '1 hour' ELSE t0 END,
           CASE WHEN s <> 'pending' THEN t0 END,
           CASE WHEN s IN ('completed', 'failed', 'canceled') THEN t0 + interval '1 s' END,
           ($5::text[])[1 + n % cardinality($5::text[])], 'noop', jsonb_build_object('i', n),
           CASE s WHEN 'completed' THEN '{"ok": true}'::jsonb
                  WHEN 'failed' THEN '{"exc": "RuntimeError", "message": "bench"}'::jsonb END,
           CASE WHEN s IN ('running', 'lost') THEN 1 END,
           CASE WHEN s IN ('running', 'lost') THEN 'bench' END
    FROM (
        SELECT n, CASE WHEN n <= $2 THEN ($6::text[])[1 + n % cardinality($6::text[])]
                       WHEN n <= $2 + $3 THEN 'pending'
                       WHEN n <= $2 + $3 + $4 - $7 THEN 'running'
                       ELSE 'lost' END AS s,
               CASE WHEN n <= $2 THEN $1::timestamp - interval '2 days' + n * interval '1 ms'
                    ELSE $1::timestamp - ($2 + $3 + $4 - n + 1) * interval '1 ms' END AS t0
        FROM generate_series(1, $2::int + $3::int + $4::int) AS n
    ) AS t
"""


async def load_jobs(
    url: str,
    *,
    finished: int,
    finished_states: Sequence[str],
    queues: Sequence[str],
    pending: int = 0,
    running: int = 0,
    lost: int = 0,
) -> None:
    """One ``INSERT ... SELECT FROM generate_series`` (not timed), then ``VACUUM ANALYZE``.

    Ids run in this order: ``finished`` jobs (states cycled from ``finished_states``) created and ended two
    days ago, then ``pending`` jobs (even numbers due, odd ones an hour from now), ``running`` and ``lost``
    ones created in the last seconds; job ``n`` goes to ``queues[n % len(queues)]``. ``created_time`` grows
    with the id, as the prune's walk expects.
    """
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        await conn.execute(
            _LOAD, utcnow(), finished, pending, running + lost, list(queues), list(finished_states), lost
        )
        await conn.execute("VACUUM ANALYZE mq_job")
    finally:
        await conn.close()


def _summary(values: Sequence[float]) -> dict[str, float]:
    return summary(values, count_key="n")


# ------------------------------------------------------------------------------------------- 10. stats


async def _timed_calls(
    sides: Mapping[str, Callable[[], Awaitable[object]]], calls: int, warmup: int = 5
) -> dict[str, list[float]]:
    """Each side once per round, in turn, for ``warmup`` untimed rounds and ``calls`` timed ones (ms)."""
    out: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(warmup + calls):
        for name, fn in sides.items():
            start = time.perf_counter()
            await fn()
            if i >= warmup:
                out[name].append((time.perf_counter() - start) * 1000)
    return out


def _check_stats(stats: Sequence[Any], pending: int) -> None:
    got = (
        len(stats),
        sum(s.pending_due + s.pending_later for s in stats),
        sum(s.running for s in stats),
        sum(s.lost for s in stats),
    )
    if got != (len(STATS_QUEUES), pending, RUNNING, LOST):
        raise RuntimeError(f"queue_stats() saw (queues, pending, running, lost) = {got}")


async def _stats_calls(url: str, calls: int, total: int, pending: int) -> dict[str, list[float]]:
    _, model = make_model()
    engine = create_async_engine(url, pool_size=2)
    source = AsyncMQSource(engine=engine, model=model)
    stats_sql = Compiled(statements(model).queues.stats, engine.dialect)
    conn = await asyncpg.connect(plain_dsn(url))
    rng = random.Random(10)
    try:
        _check_stats(await source.queue_stats(), pending)
        return await _timed_calls(
            {
                "aiomq queue_stats()": source.queue_stats,
                "aiomq stats SQL": lambda: conn.fetch(stats_sql.sql, *stats_sql.args({"now": utcnow()})),
                "naive GROUP BY": lambda: conn.fetch(
                    "SELECT queue, state, count(*) FROM mq_job GROUP BY queue, state"
                ),
                "primary-key lookup": lambda: conn.fetchrow(
                    "SELECT * FROM mq_job WHERE id = $1", rng.randint(1, total)
                ),
                "aiomq get_job()": lambda: source.get_job(rng.randint(1, total)),
            },
            calls,
        )
    finally:
        await conn.close()
        await engine.dispose()


async def queue_stats(ctx: Context) -> Scenario:
    finished, pending = ctx.sizes.stats_jobs
    calls = ctx.sizes.stats_calls
    async with fresh_database(ctx.server) as url:
        start = time.perf_counter()
        await load_jobs(
            url,
            finished=finished,
            finished_states=MIXED_FINISHED,
            queues=STATS_QUEUES,
            pending=pending,
            running=RUNNING,
            lost=LOST,
        )
        ctx.log(f"loaded {finished + pending + RUNNING + LOST:,} jobs in {time.perf_counter() - start:.1f} s")
        times = await _stats_calls(url, calls, finished + pending + RUNNING + LOST, pending)
    summary = {name: _summary(values) for name, values in times.items()}
    for name, s in summary.items():
        ctx.log(f"{name}: median {s['p50_ms']:.2f} ms, p95 {s['p95_ms']:.2f} ms")
    aiomq, sql = summary["aiomq queue_stats()"], summary["aiomq stats SQL"]
    naive, floor = summary["naive GROUP BY"], summary["primary-key lookup"]
    what = f"{finished:,} finished + {pending:,} pending"
    name = "10 queue stats"
    return Scenario(
        "queue_stats",
        f"queue_stats() on {what} jobs in {len(STATS_QUEUES)} queues, {calls} calls a side, taking turns",
        {"finished": finished, "pending": pending, "running": RUNNING, "lost": LOST, "calls": calls},
        {"ms": times, "summary": summary},
        [
            Row(name, f"queue_stats(), median, {what}", "ms", aiomq["p50_ms"], _NAIVE, naive["p50_ms"]),
            Row(name, "queue_stats(), p95", "ms", aiomq["p95_ms"], _NAIVE, naive["p95_ms"]),
            Row(name, "its SQL alone on asyncpg, median", "ms", sql["p50_ms"], _NAIVE, naive["p50_ms"]),
            Row(name, "queue_stats(), median", "ms", aiomq["p50_ms"], _FLOOR, floor["p50_ms"]),
            Row(name, "its SQL alone on asyncpg, median", "ms", sql["p50_ms"], _FLOOR, floor["p50_ms"]),
            Row(
                name,
                "queue_stats(), median",
                "ms",
                aiomq["p50_ms"],
                "aiomq get_job(): a PK lookup",
                summary["aiomq get_job()"]["p50_ms"],
            ),
        ],
    )


# ------------------------------------------------------------------------------------------- 11. prune


async def _latencies(
    source: AsyncMQSource,
    started: Mapping[int, float],
    spacing: float,
    *,
    count: int,
    until: Callable[[], bool] = lambda: False,
) -> list[float]:
    """Enqueue a job every ``spacing`` s, ``count`` of them or until ``until()``; commit->start in ms."""
    committed: dict[int, float] = {}
    while len(committed) < count and not until():
        queued = await source.call(QUEUE, "noop")  # returns after its commit
        committed[queued.id] = time.perf_counter()
        await asyncio.sleep(spacing)
    if committed:
        await source.wait_for_job(max(committed), timeout=60, poll_interval=0.05)
    return [(started[j] - committed[j]) * 1000 for j in committed if j in started]


async def _prune_jobs(source: AsyncMQSource) -> tuple[int, float]:
    start = time.perf_counter()
    deleted = await source.prune_jobs(older_than=PRUNE_AGE)
    return deleted, time.perf_counter() - start


async def _one_delete(url: str) -> tuple[int, float]:
    """What a person would write: one DELETE of every old completed or canceled job."""
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        start = time.perf_counter()
        status = await conn.execute(
            "DELETE FROM mq_job WHERE state IN ('completed', 'canceled') AND end_time < $1",
            utcnow() - PRUNE_AGE,
        )
        return int(status.split()[-1]), time.perf_counter() - start
    finally:
        await conn.close()


async def _prune_side(ctx: Context, how: str) -> dict[str, Any]:
    """An idle worker on ``prune_rows`` old finished jobs: latencies with no prune, then during one."""
    rows, spacing = ctx.sizes.prune_rows, ctx.sizes.latency_spacing_ms / 1000
    async with fresh_database(ctx.server) as url:
        await load_jobs(url, finished=rows, finished_states=PRUNABLE, queues=(QUEUE,))
        _, model = make_model()
        engine = create_async_engine(url, pool_size=5)
        started: dict[int, float] = {}

        async def noop(job: JobContext) -> None:
            started[job.id] = time.perf_counter()

        source = AsyncMQSource(engine=engine, model=model)
        try:
            async with AsyncMQWorker(engine=engine, queues={QUEUE: noop}, model=model, timeout=60):
                for _ in range(20):  # warm up pools and prepared statements
                    queued = await source.call(QUEUE, "warmup")
                    await source.wait_for_job(queued.id, timeout=10, poll_interval=0.05)
                idle = await _latencies(source, started, spacing, count=ctx.sizes.latency_jobs)
                prune = _prune_jobs(source) if how == "prune_jobs" else _one_delete(url)
                task = asyncio.create_task(prune)
                during = await _latencies(source, started, spacing, count=10**6, until=task.done)
                deleted, seconds = await task
        finally:
            await engine.dispose()
        states = await count_states(url)
    # What is left is the jobs of the latency measurement: one completed job per handler run.
    if deleted != rows or states != {"completed": len(started)}:
        raise RuntimeError(f"{how} deleted {deleted:,} of {rows:,} rows; left {states}")
    phases = {"idle": _summary(idle), "during": _summary(during)}
    ctx.log(
        f"{how}: {deleted:,} rows in {seconds:.1f} s ({deleted / seconds:,.0f} rows/s); "
        + "; ".join(
            f"{phase} p50/p95/p99 {s['p50_ms']:.2f}/{s['p95_ms']:.2f}/{s['p99_ms']:.2f} ms over {s['n']:,.0f}"
            for phase, s in phases.items()
        )
    )
    return {**phases, "deleted": deleted, "seconds": seconds}


async def prune_latency(ctx: Context) -> Scenario:
    rows = ctx.sizes.prune_rows
    aiomq = await _prune_side(ctx, "prune_jobs")
    naive = await _prune_side(ctx, "one DELETE")
    idle, during, during_naive = aiomq["idle"], aiomq["during"], naive["during"]
    name = "11 prune latency"
    base = "same worker, no prune"
    rows_out = [
        Row(name, f"{p} commit->start during prune_jobs", "ms", during[f"{p}_ms"], base, idle[f"{p}_ms"])
        for p in ("p50", "p95", "p99")
    ]
    rows_out += [
        Row(name, "p99 during prune_jobs", "ms", during["p99_ms"], _ONE_DELETE, during_naive["p99_ms"]),
        Row(
            name,
            f"prune of {rows:,} rows (batches of 5,000)",
            "rows/s",
            aiomq["deleted"] / aiomq["seconds"],
            "one DELETE statement",
            naive["deleted"] / naive["seconds"],
        ),
    ]
    return Scenario(
        "prune_latency",
        f"idle wake-up latency of a worker while {rows:,} finished rows are pruned",
        {"rows": rows, "latency_jobs": ctx.sizes.latency_jobs, "spacing_ms": ctx.sizes.latency_spacing_ms},
        {"prune_jobs": aiomq, "one_delete": naive},
        rows_out,
    )


# ------------------------------------------------------------------------------------------- 12. priorities


def _literal(value: Any) -> str:
    """``value`` as SQL text: ``EXECUTE`` takes its arguments as expressions, not as bind parameters."""
    if isinstance(value, list):
        return "ARRAY[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, datetime.datetime):
        value = value.isoformat(sep=" ")
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(int(value))


async def _explain_once(conn: Any, execute: str, mode: str) -> tuple[list[str], list[int]]:
    """One rolled-back ``EXPLAIN ANALYZE`` of the prepared claim: the plan, and the claimed priorities."""
    transaction = conn.transaction()
    await transaction.start()
    try:
        await conn.execute(f"SET LOCAL plan_cache_mode = {mode}")
        await conn.execute("SET LOCAL jit = off")  # as on the worker's connection (aiomq/listener.py)
        plan = [r[0] for r in await conn.fetch(execute)]
        rows = await conn.fetch("SELECT priority FROM mq_job WHERE state = 'running' ORDER BY id")
        return plan, [r[0] for r in rows]
    finally:
        await transaction.rollback()


async def explain_claim(url: str, limit: int = 10, repeat: int = 5) -> dict[str, Any]:
    """``EXPLAIN (ANALYZE, BUFFERS)`` of the worker's claim of ``limit`` jobs of ``QUEUE``, ``repeat`` times
    each as a generic plan (``plan_cache_mode=force_generic_plan``, the setting of the worker's connection)
    and as a custom plan, each run rolled back. The statement is ``PREPARE``d and run by ``EXPLAIN EXECUTE``:
    an ``EXPLAIN`` given bind parameters would plan with their values, a custom plan whatever the setting.
    Per mode: the last plan, the median execution time, and the priorities of the jobs it claimed."""
    _, model = make_model()
    engine = create_async_engine(url)
    claim = Compiled(statements(model).claims.claim, engine.dialect)
    await engine.dispose()
    args = claim.args({"queues": [QUEUE], "now": utcnow(), "limit": limit, "lock_id": 1, "name": "explain"})
    execute = f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE aiomq_claim({', '.join(_literal(a) for a in args)})"
    out: dict[str, Any] = {}
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        await conn.execute(f"PREPARE aiomq_claim AS {claim.sql}")
        for mode in (_GENERIC, _CUSTOM):
            times: list[float] = []
            for _ in range(repeat):
                plan, claimed = await _explain_once(conn, execute, mode)
                found = re.search(r"Execution Time: ([0-9.]+) ms", plan[-1])
                times.append(float(found.group(1)) if found else float("nan"))
            out[mode] = {"plan": plan, "execution_ms": times, "median_ms": median(times), "claimed": claimed}
    finally:
        await conn.close()
    return out


def _priorities(count: int) -> list[int]:
    rng = random.Random(12)
    return [rng.choice(PRIORITIES) for _ in range(count)]


async def _explains(ctx: Context, count: int) -> dict[str, dict[str, Any]]:
    """The claim's plans on ``count`` pending jobs without priorities and with them (a database each)."""
    out: dict[str, dict[str, Any]] = {}
    for kind, priorities in (("plain", None), ("priority", _priorities(count))):
        async with fresh_database(ctx.server) as url:
            await preload(url, count, priorities=priorities)
            out[kind] = explained = await explain_claim(url)
        for mode, result in explained.items():
            ctx.log(f"claim of 10 on {count:,} pending ({kind}, {mode}): {result['median_ms']:.3f} ms")
            for line in result["plan"]:
                if _KEY.search(line):
                    ctx.log(f"  {line}")
    top = max(PRIORITIES)
    for mode, result in out["priority"].items():
        if any(p != top for p in result["claimed"]):
            raise RuntimeError(f"the claim ({mode}) took priorities {result['claimed']}, not all {top}")
    return out


async def priority_backlog(ctx: Context) -> Scenario:
    """Scenario 6's measure (the first ``small`` jobs of a backlog of ``small`` vs of ``big``), on jobs of
    priorities drawn uniformly from -5..5, beside the same drains without priorities."""
    small, big = ctx.sizes.backlog
    limit = min(ctx.sizes.backlog_time_limit, 45)  # only the first ``small`` jobs are needed
    runs: dict[str, list[dict[str, Any]]] = {}
    for _ in range(ctx.sizes.drain_runs):
        for kind in ("plain", "priority"):
            for n in (small, big):
                priorities = _priorities(n) if kind == "priority" else None
                result = await drain(
                    ctx, "aiomq", n, priorities=priorities, mark_at=[small], time_limit=limit
                )
                runs.setdefault(f"{kind} {n}", []).append(result)
    explains = await _explains(ctx, big)

    def first(kind: str) -> float | None:  # the first ``small`` jobs of the big backlog
        times = [r["marks_s"].get(str(small)) for r in runs[f"{kind} {big}"]]
        return None if None in times else median([small / t for t in times if t is not None])

    def whole(kind: str) -> float:  # the small backlog, start-up and shutdown included
        return median([r["jobs_per_s"] for r in runs[f"{kind} {small}"]])

    def ratio(kind: str) -> float | None:
        rate = first(kind)
        return None if rate is None else rate / whole(kind)

    def plan(kind: str, mode: str) -> float:  # the claim's median execution time, ms
        return float(explains[kind][mode]["median_ms"])

    name, base = "12 priority backlog", "aiomq, no priorities"
    claim = f"claim of 10 on {big:,} pending (EXPLAIN ANALYZE)"
    return Scenario(
        "priority_backlog",
        f"backlog independence with priorities -5..5: the first {small:,} jobs of {small:,} vs {big:,}",
        {"small": small, "big": big, "priorities": [min(PRIORITIES), max(PRIORITIES)], "time_limit_s": limit},
        {"drains": runs, "explain": explains},
        [
            Row(name, f"first {small:,} of {small:,}", "jobs/s", whole("priority"), base, whole("plain")),
            Row(name, f"first {small:,} of {big:,}", "jobs/s", first("priority"), base, first("plain")),
            Row(
                name, f"rate ratio: backlog {big:,} / {small:,}", "x", ratio("priority"), base, ratio("plain")
            ),
            Row(
                name,
                f"{claim}, generic plan",
                "ms",
                plan("priority", _GENERIC),
                base,
                plan("plain", _GENERIC),
            ),
            Row(name, f"{claim}, custom plan", "ms", plan("priority", _CUSTOM), base, plan("plain", _CUSTOM)),
        ],
    )
