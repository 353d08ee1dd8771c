"""The harness every scenario shares: sizes, the context and results of a run, interleaved repeats, and
drains of pre-loaded jobs in a subprocess each (``benchmarks.drain_worker``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .common import QUEUE, Row, count_states, fresh_database, median, preload

__all__ = ["Context", "Scenario", "Sizes", "drain", "drains", "median_rate", "repeat", "run_drain_process"]

_ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Sizes:
    runs: int  # repeats of the cheap measurements (the median is reported)
    drain_runs: int  # repeats of each drain
    enqueue: int
    bulk: int
    drain: int
    cursor_keys: int
    backlog: tuple[int, int]
    backlog_time_limit: float  # seconds; the big backlog's drain stops there if not done
    rss_at: tuple[int, int]
    latency_jobs: int
    latency_runs: int
    stats_jobs: tuple[int, int]  # queue_stats: finished rows, pending rows
    stats_calls: int  # queue_stats: timed calls of each side
    prune_rows: int  # prune_latency: finished rows the prune deletes
    latency_spacing_ms: float = 10.0

    @classmethod
    def full(cls) -> Sizes:
        return cls(
            runs=3,
            drain_runs=1,
            enqueue=2_000,
            bulk=5_000,
            drain=20_000,
            cursor_keys=1_000,
            backlog=(5_000, 100_000),
            backlog_time_limit=240,
            rss_at=(10_000, 100_000),
            latency_jobs=500,
            latency_runs=3,
            stats_jobs=(1_000_000, 10_000),
            stats_calls=50,
            prune_rows=1_000_000,
        )

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            runs=3,
            drain_runs=1,
            enqueue=300,
            bulk=1_000,
            drain=3_000,
            cursor_keys=1_000,
            backlog=(2_000, 10_000),
            backlog_time_limit=60,
            rss_at=(2_000, 10_000),
            latency_jobs=100,
            latency_runs=1,
            stats_jobs=(100_000, 2_000),
            stats_calls=20,
            prune_rows=100_000,
        )


@dataclasses.dataclass
class Scenario:
    key: str
    title: str
    params: dict[str, Any]
    measurements: dict[str, Any]
    rows: list[Row]

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "params": self.params,
            "measurements": self.measurements,
            "rows": [r.as_json() for r in self.rows],
        }


@dataclasses.dataclass
class Context:
    server: str  # a server URL; each measurement gets a scratch database on it
    sizes: Sizes
    results: dict[str, Scenario] = dataclasses.field(default_factory=dict)

    def log(self, message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)


async def repeat(
    ctx: Context,
    runs: int,
    sides: Mapping[str, Callable[[], Awaitable[float]]],
    label: Callable[[float], str],
) -> dict[str, list[float]]:
    """Run each side ``runs`` times, interleaved (a, b, a, b, ...), so drift hits both alike."""
    out: dict[str, list[float]] = {name: [] for name in sides}
    for run in range(runs):
        for name, fn in sides.items():
            value = await fn()
            out[name].append(value)
            ctx.log(f"{name} run {run + 1}: {label(value)}")
    return out


# ------------------------------------------------------------------------------------------- drains


async def run_drain_process(spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """``benchmarks.drain_worker`` in a subprocess; its JSON line."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.drain_worker",
        json.dumps(spec),
        cwd=_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"drain worker {spec['impl']} exited {proc.returncode}:\n{err.decode()[-3000:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


async def drain(
    ctx: Context,
    impl: str,
    count: int,
    *,
    queues: Mapping[str, str] | None = None,
    cursor_keys: int = 0,
    rss_at: Sequence[int] = (),
    mark_at: Sequence[int] = (),
    time_limit: float | None = None,
    retry: int | None = None,
    priorities: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Pre-load ``count`` jobs on a fresh database, drain them with ``impl`` in a subprocess, check.

    ``jobs_per_s`` is the jobs handled over the seconds taken: all ``count`` of them unless the drain was
    ``capped`` by ``time_limit``. ``priorities`` (one per job) go to the pre-load; without them every job
    has the column's default.
    """
    queues = dict(queues or {QUEUE: "async"})
    name = impl
    impl, _, concurrency = impl.partition("@")  # "aiomq@50": aiomq with concurrency=50
    spec = {
        "impl": impl,
        **({"concurrency": int(concurrency)} if concurrency else {}),
        "queues": queues,
        "rss_at": list(rss_at),
        "mark_at": list(mark_at),
        "time_limit": time_limit,
        **({"retry": retry} if retry else {}),
    }
    async with fresh_database(ctx.server) as url:
        await preload(url, count, queues=list(queues), cursor_keys=cursor_keys, priorities=priorities)
        result = await run_drain_process({**spec, "url": url})
        states = await count_states(url)
    handled = result["handled"]
    runs_each = 2 if retry else 1  # fail_once: every job fails once, then its retry completes
    expected = {"completed": count, **({"failed": count} if retry else {})}
    if not result["capped"] and (states != expected or handled != runs_each * count):
        raise RuntimeError(f"{name} drain of {count} jobs ended with {states}, {handled} handled")
    result["jobs"] = count
    result["states"] = states
    result["jobs_per_s"] = handled / result["seconds"]
    ctx.log(
        f"{name}: {handled:,} of {count:,} jobs in {result['seconds']:.2f} s = {result['jobs_per_s']:,.0f} "
        f"jobs/s{' (stopped at the time limit)' if result['capped'] else ''}, "
        f"peak RSS {result['peak_rss_kib'] / 1024:.1f} MiB"
    )
    return result


async def drains(
    ctx: Context, impls: Sequence[str], count: int, **kw: Any
) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {impl: [] for impl in impls}
    for _ in range(ctx.sizes.drain_runs):
        for impl in impls:
            out[impl].append(await drain(ctx, impl, count, **kw))
    return out


def median_rate(runs: Sequence[dict[str, Any]]) -> float:
    return median([r["jobs_per_s"] for r in runs])
