"""One drain in a process of its own, so its memory figures are the worker's alone.

    python -m benchmarks.drain_worker '{"impl": "aiomq", "url": "...", "queues": {"bench": "async"}}'

``impl`` is ``aiomq`` (one ``AsyncMQWorker`` with default concurrency, ``timeout=60``, timed over
``run_until_idle()``), ``raw1`` (``baseline.drain_one_by_one``) or ``raw100`` (``baseline.drain_batched``).
``queues`` maps each queue to ``async`` or ``sync`` (a plain function: a thread in aiomq,
``asyncio.to_thread`` in the baselines), or, for aiomq with ``retry`` (a number of runs), ``fail_once``
(raises on a job's first run, so each job runs twice). ``rss_at`` lists handled-job counts at which to
sample the RSS, ``mark_at`` counts at which to note the time; after ``time_limit`` seconds the drain
stops (aiomq gracefully) and ``capped`` is true. The clock starts before the first connection. Prints one
JSON line: seconds, jobs handled, times, RSS figures.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import resource
import sys
import time
from typing import Any

from . import baseline
from .light import peak_rss_kib, rss_kib

__all__ = ["run"]


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    impl: str = spec["impl"]
    url: str = spec["url"]
    rss_at = {int(n) for n in spec.get("rss_at", ())}
    mark_at = {int(n) for n in spec.get("mark_at", ())}
    time_limit: float | None = spec.get("time_limit")
    samples: dict[str, int] = {}
    marks: dict[str, float] = {}
    counter = itertools.count(1)  # next() is atomic under the GIL: safe from handler threads
    start = time.perf_counter()

    def note() -> None:
        n = next(counter)
        if n in mark_at:
            marks[str(n)] = time.perf_counter() - start
        if n in rss_at:
            samples[str(n)] = rss_kib()

    async def async_noop(job: Any) -> None:
        note()

    def sync_noop(job: Any) -> None:
        note()

    async def fail_once(job: Any) -> None:
        note()
        if job.attempt == 1:
            raise RuntimeError("the first run fails")

    def pick(kind: str) -> tuple[Any, bool]:
        if kind == "async":
            return async_noop, True
        if kind == "sync":
            return sync_noop, False
        if kind == "fail_once":  # aiomq only: the worker's retry policy runs it again
            return fail_once, True
        raise ValueError(f"unknown handler kind {kind!r}")

    handlers = {queue: pick(kind) for queue, kind in spec["queues"].items()}
    if impl == "aiomq":
        # Imported here, so the baselines' processes hold neither SQLAlchemy nor aiomq.
        from sqlalchemy.ext.asyncio import create_async_engine

        from aiomq import AsyncMQWorker, Retry

        from .common import make_model

        _, model = make_model()
        engine = create_async_engine(url)
        queues = {queue: fn for queue, (fn, _) in handlers.items()}  # aiomq tells async from sync
        concurrency = int(spec.get("concurrency", 10))  # aiomq's default unless the spec says
        retry = Retry(max_attempts=int(spec["retry"]), backoff=0) if spec.get("retry") else None
        worker = AsyncMQWorker(
            engine=engine, queues=queues, model=model, timeout=60, concurrency=concurrency, retry=retry
        )
        rss_start = rss_kib()
        start = time.perf_counter()
        task = asyncio.create_task(worker.run_until_idle())
        done, _ = await asyncio.wait({task}, timeout=time_limit)
        capped = not done
        if capped:
            worker.shutdown_gracefully()  # jobs in flight finish and are recorded
        await task
        seconds = time.perf_counter() - start
        await engine.dispose()
    elif impl in ("raw1", "raw100"):
        rss_start = rss_kib()
        start = time.perf_counter()
        if impl == "raw1":
            drain = baseline.drain_one_by_one(url, handlers, concurrency=int(spec.get("concurrency", 10)))
        else:
            drain = baseline.drain_batched(url, handlers, batch=int(spec.get("batch", 100)))
        try:
            await asyncio.wait_for(drain, time_limit)
            capped = False
        except TimeoutError:
            capped = True  # jobs in flight stay running: the database is thrown away
        seconds = time.perf_counter() - start
    else:
        raise ValueError(f"unknown impl {impl!r}")
    return {
        "impl": impl,
        "seconds": seconds,
        "handled": next(counter) - 1,
        "capped": capped,
        "marks_s": marks,
        "rss_start_kib": rss_start,
        "rss_samples_kib": samples,
        "rss_end_kib": rss_kib(),
        "peak_rss_kib": peak_rss_kib(),
        "ru_maxrss_kib": resource.getrusage(
            resource.RUSAGE_SELF
        ).ru_maxrss,  # includes the parent's: see light
    }


def main() -> None:
    result = asyncio.run(run(json.loads(sys.argv[1])))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
