"""A chaos worker process: ``python -m tests.chaos.driver URL [--name N] [--timeout S] [--concurrency N]``.

Runs an :class:`~aiomq.AsyncMQWorker` on the queues ``chaos_a`` and ``chaos_b`` until SIGTERM (or SIGINT),
then stops gracefully: jobs in flight finish and are recorded. Prints ``READY <pid> <lock_id>`` on stdout
once the worker listens; logs go to stderr.

Every job (args ``{"ms": <int>, ...}``) writes a ledger row when it starts and stamps it when it ends, over
a connection of its own (not the job's transaction, so a killed run leaves its trace), sleeps ``ms``
milliseconds in between, and, on a cursor, increments the cursor's counter ``n`` and sets ``last_job``.
Its result says which worker ran it and which counter value it saw. On its first run, a job with
``fail_first`` raises instead, and one with ``slow_first`` sleeps past its timeout. Lost jobs with a retry
policy are resolved by the workers after ``--lost-grace`` seconds.

Connections carry an ``application_name`` a test can select: ``chaos-pool <name>`` for the engine's pool,
``chaos-ledger <name>`` for the ledger, and aiomq's own ``aiomq worker <name>`` for the listener.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import create_async_engine

from aiomq import AsyncMQWorker, JobContext

from . import LEDGER_APP, MODEL, POOL_APP, QUEUES, with_driver

log = logging.getLogger("chaos.driver")

# Errors that mean "the database or the connection is gone for now": the ledger write is tried again.
_TRANSIENT = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


class Ledger:
    """Ledger writes over a few connections of our own, retried until the database answers.

    A plain list of connections rather than an asyncpg pool: a connection that failed in any way is
    dropped and replaced, whatever state the failure left it in.
    """

    def __init__(self, dsn: str, name: str, size: int, patience: float = 300.0) -> None:
        self.dsn = dsn
        self.name = name
        self.patience = patience
        self.idle: list[Any] = []
        self.slots = asyncio.Semaphore(size)
        self.retries = 0

    async def _connect(self) -> Any:
        return await asyncpg.connect(
            self.dsn, timeout=10, server_settings={"application_name": f"{LEDGER_APP} {self.name}"}
        )

    async def close(self) -> None:
        idle, self.idle = self.idle, []
        for conn in idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)

    async def execute(self, query: str, *args: Any) -> None:
        deadline = time.monotonic() + self.patience
        async with self.slots:
            while True:
                conn = self.idle.pop() if self.idle else None
                try:
                    if conn is None or conn.is_closed():
                        conn = await self._connect()
                    await conn.execute(query, *args, timeout=10)
                except _TRANSIENT:
                    if conn is not None:
                        conn.terminate()
                    if time.monotonic() > deadline:
                        raise
                    self.retries += 1
                    await asyncio.sleep(0.1)
                    continue
                except BaseException:
                    if conn is not None:
                        conn.terminate()
                    raise
                self.idle.append(conn)
                return


class ChaosHandler:
    """The handler of both queues (async: it runs on the worker's loop)."""

    def __init__(self, ledger: Ledger, name: str) -> None:
        self.ledger = ledger
        self.name = name

    async def execute_job(self, job: JobContext) -> dict[str, Any]:
        run_id = uuid.uuid4()
        seen = None if job.cursor is None else int(job.cursor.get("n", 0))
        # Shielded: a timeout must not cut the row's INSERT short after the server ran it, which would
        # leave a run without its end.
        started = asyncio.ensure_future(
            self.ledger.execute(
                "INSERT INTO chaos_ledger (run_id, job_id, cursor_key, worker, seen) "
                "VALUES ($1, $2, $3, $4, $5) ON CONFLICT (run_id) DO NOTHING",
                run_id,
                job.id,
                job.cursor_key,
                self.name,
                seen,
            )
        )
        try:
            await asyncio.shield(started)
            first = job.attempt == 1
            # A first run past its timeout: cancelled by the worker, failed, retried.
            ms = 1000 if first and job.args.get("slow_first") else int(job.args.get("ms", 0))
            await asyncio.sleep(ms / 1000)
            if first and job.args.get("fail_first"):
                raise RuntimeError(f"planned failure of job {job.id}")
            if job.cursor is not None:
                assert seen is not None
                job.cursor["n"] = seen + 1
                job.cursor["last_job"] = job.id
        finally:  # also when the run failed or its timeout cancelled it: the run is over
            await started
            # Shielded too: a timeout that falls while the end is written (a database restart makes the
            # write wait) must not leave the run without its end; the cancellation goes on after it.
            ended = asyncio.ensure_future(
                self.ledger.execute(
                    "UPDATE chaos_ledger SET ended = clock_timestamp() WHERE run_id = $1", run_id
                )
            )
            try:
                await asyncio.shield(ended)
            except asyncio.CancelledError:
                await ended
                raise
        return {"worker": self.name, "seen": seen}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos.driver", description="A chaos worker process."
    )
    parser.add_argument("url", help="libpq URL of the database (postgresql://...)")
    parser.add_argument("--name", default=f"chaos-{os.getpid()}")
    parser.add_argument("--timeout", type=float, default=2.0, help="aiomq maintenance period (seconds)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pool-size", type=int, default=5)
    parser.add_argument(
        "--lost-grace", type=float, default=10.0, help="seconds before lost jobs with a retry policy resolve"
    )
    parser.add_argument(
        "--retry-intervals",
        default="0.1,0.25,0.5,1,2",
        help="aiomq retry_intervals, comma separated (the last one caps reconnect backoff)",
    )
    return parser.parse_args(argv)


async def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    engine = create_async_engine(
        with_driver(args.url, "postgresql+asyncpg"),
        pool_size=args.pool_size,
        max_overflow=args.concurrency,
        connect_args={"server_settings": {"application_name": f"{POOL_APP} {args.name}"}},
    )
    ledger = Ledger(with_driver(args.url, "postgresql"), args.name, size=args.concurrency)
    handler = ChaosHandler(ledger, args.name)
    worker = AsyncMQWorker(
        engine=engine,
        queues=dict.fromkeys(QUEUES, handler),
        model=MODEL,
        concurrency=args.concurrency,
        timeout=args.timeout,
        retry_intervals=tuple(float(x) for x in args.retry_intervals.split(",")),
        name=args.name,
        lost_grace=args.lost_grace,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()
    code = 0
    try:
        async with worker:
            print(f"READY {os.getpid()} {worker.get_status()['lock_id']}", flush=True)
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
                if os.getppid() != parent:
                    log.error("the controller is gone: stopping")
                    break
                if not worker.get_status()["running"] and not stop.is_set():
                    log.error("the worker stopped on its own")
                    code = 3
                    break
            log.info("stopping (ledger retries: %d)", ledger.retries)
    finally:
        await ledger.close()
        await engine.dispose()
    return code


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
