"""Fault-injection harness for aiomq (``nox -s chaos``; the tests are marked ``chaos``).

What the destructive tests share, kept free of pytest so that the worker processes
(:mod:`tests.chaos.driver`) can import it too:

- :class:`Cluster`: a PostgreSQL cluster the suite owns, started from the system binaries on a port of its
  own (as the ``postgres`` OS user when run as root), that a test may stop, kill and restart at will;
- :class:`Fleet`: worker processes (``python -m tests.chaos.driver``), started, SIGKILLed and stopped;
- :class:`Producer` and :func:`resolve_lost`: the job stream, and the operator who resolves lost jobs with
  ``retry_job`` + ``fail_lost_job``;
- :func:`verify`: the invariants, checked from the database and the ledger the handlers write over
  connections of their own.

``CHAOS_SCALE`` (default 1) multiplies durations, kills and restarts: 1 is the short form CI runs,
10 the long form (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import itertools
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Literal

import asyncpg
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from aiomq import AsyncMQSource, Retry, make_default_model

from ..pgserver import (
    _child_env,
    _free_port,
    _parent_death_signal,
    _RunAs,
    _system_bindir,
    _Unavailable,
    _unprivileged_user,
    _wait_ready,
    initdb,
)

__all__ = [
    "LEDGER_DDL",
    "MODEL",
    "QUEUES",
    "Cluster",
    "ClusterUnavailable",
    "Fleet",
    "Producer",
    "Report",
    "StopMode",
    "Verdict",
    "WorkerProc",
    "chaos_scale",
    "resolve_lost",
    "verify",
]

METADATA = sa.MetaData()
MODEL = make_default_model(METADATA)

#: The queues the driver serves; cursors are shared between them, so exclusivity is tested across queues.
QUEUES = ("chaos_a", "chaos_b")
#: application_name prefixes of the driver's connections, so a test can pick which ones to terminate.
POOL_APP = "chaos-pool"
LEDGER_APP = "chaos-ledger"
LISTENER_APP = "aiomq worker"  # set by aiomq's Listener: "aiomq worker <name>"
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

#: The ledger: one row per handler run, written by the handler over its own connection (not the job's
#: transaction). ``run_id`` is drawn by the handler, so a retried write never makes a second row and two
#: rows for one job mean the job ran twice. ``chaos_kills`` records when each SIGKILLed worker was dead.
LEDGER_DDL = """
CREATE TABLE chaos_ledger (
    run_id uuid PRIMARY KEY,
    job_id bigint NOT NULL,
    cursor_key text,
    worker text NOT NULL,
    seen integer,
    started timestamptz NOT NULL DEFAULT clock_timestamp(),
    ended timestamptz
);
CREATE INDEX ix_chaos_ledger_job ON chaos_ledger (job_id);
CREATE TABLE chaos_kills (
    worker text PRIMARY KEY,
    pid integer NOT NULL,
    killed_at timestamptz NOT NULL
);
-- Jobs marked lost whose worker was alive after all: they go from lost back to running (re-stamped).
CREATE TABLE chaos_lost_then_running (
    job_id bigint NOT NULL,
    worker text,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION chaos_note_lost_then_running() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO chaos_lost_then_running (job_id, worker) VALUES (NEW.id, NEW.worker);
    RETURN NEW;
END $$;
CREATE TRIGGER chaos_lost_then_running AFTER UPDATE OF state ON mq_job
    FOR EACH ROW WHEN (OLD.state = 'lost' AND NEW.state = 'running')
    EXECUTE FUNCTION chaos_note_lost_then_running();
"""

#: The retry policy of the jobs that carry one: workers retry their failures and resolve them when lost.
CHAOS_RETRY = Retry(max_attempts=3, backoff=0.1, factor=2)
#: The timeout of the jobs whose first run sleeps past it (``slow_first``: 1 s).
CHAOS_TIMEOUT = 0.3

#: Server settings of the test-owned cluster. ``fsync`` and ``full_page_writes`` only matter when the
#: *machine* crashes, so they stay off for speed; ``synchronous_commit`` stays on: an immediate shutdown is
#: a server crash, and with it off the last commits (a finish the worker saw succeed) would be rolled
#: back by recovery, which would test PostgreSQL's durability trade-off instead of aiomq.
CLUSTER_SETTINGS: tuple[tuple[str, str], ...] = (
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("synchronous_commit", "on"),
    ("max_connections", "400"),
    ("log_line_prefix", "%m [%p] %q%a "),
    ("log_min_messages", "warning"),
)

#: mq_job's start_time and end_time come from worker clocks read just before the claim and the finish
#: statements run, so a successor's start_time may precede its predecessor's end_time by the time the
#: claim takes to reach the server: usually a few milliseconds, tens on a freshly started worker under
#: load (its first claim prepares statements and introspects types). Overlaps explained by a clock error
#: up to this much count as skew, not as overlap; the ledger (the database's clock, written inside the
#: handler) is checked with no tolerance.
JOB_TIME_TOLERANCE = datetime.timedelta(milliseconds=150)

StopMode = Literal["smart", "fast", "immediate"]
#: The ``report`` fixture: records a test's figures.
Report = Callable[[dict[str, Any]], None]
_STOP_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}


def chaos_scale() -> float:
    """``CHAOS_SCALE`` (default 1): how long and how hard the destructive tests run."""
    raw = os.environ.get("CHAOS_SCALE", "").strip() or "1"
    try:
        value = float(raw)
    except ValueError as ex:
        raise ValueError(f"CHAOS_SCALE must be a number, got {raw!r}") from ex
    if value <= 0:
        raise ValueError(f"CHAOS_SCALE must be positive, got {raw!r}")
    return value


def utc_naive(value: datetime.datetime) -> datetime.datetime:
    """A timestamptz from the database as naive UTC, the format of aiomq's columns."""
    if value.tzinfo is None:
        return value
    return value.astimezone(datetime.UTC).replace(tzinfo=None)


def with_driver(url: str, driver: str) -> str:
    return sa.make_url(url).set(drivername=driver).render_as_string(hide_password=False)


# ------------------------------------------------------------------------------------------ the cluster


class ClusterUnavailable(Exception):
    """No system PostgreSQL binaries (or no unprivileged OS user to run them as): the chaos tests skip."""


class Cluster:
    """A PostgreSQL cluster owned by the test session: ``initdb`` once, then start, stop, restart at will.

    The postmaster is a direct child (on Linux it gets SIGINT if the test process dies), listens on
    127.0.0.1 at a port chosen once, so URLs stay valid across restarts, and runs as the ``postgres`` (or
    ``nobody``) OS user when the tests run as root.
    """

    def __init__(self, bindir: pathlib.Path, base: pathlib.Path, run_as: _RunAs | None) -> None:
        self.bindir = bindir
        self.base = base
        self.data = base / "data"
        self.log = base / "postgres.log"
        self.run_as = run_as
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.stops: collections.Counter[str] = collections.Counter()

    @classmethod
    def create(cls) -> Cluster:
        """``initdb`` a new cluster in a fresh temporary directory (not started)."""
        bindir = _system_bindir()
        if bindir is None:
            raise ClusterUnavailable(
                "no system PostgreSQL binaries (initdb and postgres in /usr/lib/postgresql/*/bin or "
                "pg_config --bindir); install the 'postgresql' package to run the chaos tests"
            )
        try:
            run_as = _unprivileged_user()
        except _Unavailable as ex:
            raise ClusterUnavailable(str(ex)) from ex
        base = pathlib.Path(tempfile.mkdtemp(prefix="aiomq-chaos-pg-", dir="/tmp" if run_as else None))
        cluster = cls(bindir, base, run_as)
        if run_as is not None:
            os.chown(base, run_as.uid, run_as.gid)
        init = initdb(bindir, cluster.data, cluster._popen_kwargs())
        if init.returncode != 0:
            shutil.rmtree(base, ignore_errors=True)
            output = "\n".join((init.stdout + init.stderr).splitlines()[-20:])
            raise ClusterUnavailable(f"{bindir}/initdb exited with {init.returncode}:\n{output}")
        return cluster

    def _popen_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"cwd": self.base, "env": _child_env()}
        if self.run_as is not None:
            kwargs.update(self.run_as.popen_kwargs())
        return kwargs

    @property
    def dsn(self) -> str:
        """libpq URL of the ``postgres`` database (admin work: create and drop databases)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self) -> None:
        """Start the postmaster (running crash recovery if needed) and wait until it accepts connections."""
        if self.running:
            return
        args = [str(self.bindir / "postgres"), "-D", str(self.data), "-h", "127.0.0.1"]
        args += ["-p", str(self.port), "-k", str(self.base) if len(str(self.base)) < 80 else ""]
        for name, value in CLUSTER_SETTINGS:
            args += ["-c", f"{name}={value}"]
        with self.log.open("ab") as log_file:
            # Started from this thread on purpose: the parent-death signal is tied to the thread that forks.
            self.proc = subprocess.Popen(  # noqa: ASYNC220 (returns at once; readiness is awaited below)
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_parent_death_signal(),
                **self._popen_kwargs(),
            )
        try:
            await _wait_ready(self.dsn, self.proc)
        except Exception as ex:
            raise RuntimeError(f"the chaos cluster did not start: {ex}\n{self.log_tail()}") from ex
        self.starts += 1

    async def stop(self, mode: StopMode = "fast", timeout: float = 60.0) -> None:
        """Shut down in PostgreSQL's ``mode`` (smart: SIGTERM, fast: SIGINT, immediate: SIGQUIT)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(_STOP_SIGNALS[mode])
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait(10)
                raise RuntimeError(f"postgres did not stop within {timeout}s in {mode} mode")
            await asyncio.sleep(0.02)
        self.stops[mode] += 1

    async def restart(self, mode: StopMode, *, down_for: float = 0.0) -> float:
        """Stop in ``mode``, stay down ``down_for`` seconds, start. Returns how long it was unreachable."""
        began = time.monotonic()
        await self.stop(mode)
        if down_for > 0:
            await asyncio.sleep(down_for)
        await self.start()
        return time.monotonic() - began

    def stop_now(self) -> None:
        """Synchronous fast shutdown, for teardown."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def destroy(self) -> None:
        try:
            self.stop_now()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError as ex:
            return f"(no server log: {ex})"
        return "\n".join(text.splitlines()[-lines:])

    # -------------------------------------------------------------------------------- databases

    async def create_database(self, name: str) -> str:
        """A database with aiomq's tables and the ledger; returns its libpq URL."""
        admin = await asyncpg.connect(self.dsn, timeout=30)
        try:
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        finally:
            await admin.close()
        url = self.url(name)
        engine = create_async_engine(with_driver(url, "postgresql+asyncpg"))
        try:
            async with engine.begin() as conn:
                await conn.run_sync(METADATA.create_all)
        finally:
            await engine.dispose()
        conn = await asyncpg.connect(url, timeout=30)
        try:
            await conn.execute(LEDGER_DDL)
        finally:
            await conn.close()
        return url

    async def drop_database(self, name: str) -> None:
        admin = await asyncpg.connect(self.dsn, timeout=30)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


# ------------------------------------------------------------------------------------------ workers


@dataclasses.dataclass
class WorkerProc:
    """One ``python -m tests.chaos.driver`` process."""

    name: str
    proc: asyncio.subprocess.Process
    log_path: pathlib.Path
    lock_id: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int | None:
        """Resident set size from /proc, in KiB (None where /proc is not available)."""
        try:
            status = pathlib.Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return None


class Fleet:
    """Worker processes on one database: spawn, SIGKILL (recording when each was dead), stop."""

    def __init__(
        self,
        url: str,
        log_dir: pathlib.Path,
        *,
        timeout: float = 2.0,
        concurrency: int = 8,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.url = url
        self.log_dir = log_dir
        self.timeout = timeout
        self.concurrency = concurrency
        self.extra_args = list(extra_args)
        self.alive: dict[str, WorkerProc] = {}
        self.killed: dict[str, datetime.datetime] = {}  # name -> naive UTC time (database clock) it was dead
        self.exit_codes: dict[str, int] = {}
        self._serial = 0

    async def spawn(self, label: str = "w") -> WorkerProc:
        """Start a worker and wait until it listens (its driver prints ``READY <pid> <lock_id>``)."""
        self._serial += 1
        name = f"chaos-{label}{self._serial}"
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.chaos.driver",
                self.url,
                "--name",
                name,
                "--timeout",
                str(self.timeout),
                "--concurrency",
                str(self.concurrency),
                *self.extra_args,
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log_file,
            )
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"worker {name} did not become ready:\n{_tail(log_path)}") from None
        words = line.decode().split()
        if len(words) != 3 or words[0] != "READY":
            await proc.wait()
            raise RuntimeError(f"worker {name} failed to start ({line!r}):\n{_tail(log_path)}")
        worker = WorkerProc(name=name, proc=proc, log_path=log_path, lock_id=int(words[2]))
        self.alive[name] = worker
        return worker

    async def kill(self, worker: WorkerProc, conn: Any) -> datetime.datetime:
        """SIGKILL ``worker``, reap it, and record (in ``chaos_kills``) the database time it was dead by."""
        worker.proc.kill()
        await worker.proc.wait()
        del self.alive[worker.name]
        dead_at = utc_naive(await conn.fetchval("SELECT clock_timestamp()"))
        await conn.execute(
            "INSERT INTO chaos_kills (worker, pid, killed_at) VALUES ($1, $2, $3 AT TIME ZONE 'UTC')",
            worker.name,
            worker.pid,
            dead_at,
        )
        self.killed[worker.name] = dead_at
        return dead_at

    async def stop_all(self, timeout: float = 60.0) -> dict[str, int]:
        """SIGTERM every live worker (graceful: jobs in flight finish) and wait; SIGKILL after ``timeout``."""
        workers = list(self.alive.values())
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                code = await asyncio.wait_for(worker.proc.wait(), timeout)
            except TimeoutError:
                worker.proc.kill()
                code = await worker.proc.wait()
                code = code if code else -9
            self.exit_codes[worker.name] = code
            self.alive.pop(worker.name, None)
        return {w.name: self.exit_codes[w.name] for w in workers}

    def abort(self) -> None:
        """Teardown after a failure: SIGKILL whatever is still alive (only our own children)."""
        for worker in list(self.alive.values()):
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()
        self.alive.clear()

    def log_tails(self, lines: int = 15) -> str:
        return "\n".join(
            f"--- {path.name}\n{_tail(path, lines)}" for path in sorted(self.log_dir.glob("*.log"))
        )

    def count_in_logs(self, needle: str) -> int:
        total = 0
        for path in self.log_dir.glob("*.log"):
            with contextlib.suppress(OSError):
                total += path.read_text(errors="replace").count(needle)
        return total


def _tail(path: pathlib.Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as ex:
        return f"(no log: {ex})"


# ------------------------------------------------------------------------------------------ the job stream


@dataclasses.dataclass
class StreamStats:
    calls: int = 0
    created: int = 0
    joined: int = 0
    errors: int = 0
    last_error: str | None = None
    ids: set[int] = dataclasses.field(default_factory=set)


class Producer:
    """Enqueues a stream of jobs, a batch per transaction, keeping the pending backlog bounded.

    ``cursor_share`` of the jobs go to one of ``cursors`` cursors (a random one of the two queues),
    ``collapse_share`` of those with ``collapse_on_cursor=True``; ``long_share`` of the jobs run for
    150-400 ms, the rest for ``0..max_ms`` ms. ``retry_share`` of the jobs carry :data:`CHAOS_RETRY`; of
    those, ``fail_share`` fail their first run (the handler raises) and ``timeout_share`` run past
    :data:`CHAOS_TIMEOUT` on their first run: their retries run normally. Errors (the database being down) are
    counted and retried on the next tick; a batch whose commit failed may or may not exist, which
    :func:`verify` does not mind: it checks every job the database has.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        seed: int,
        cursors: int = 200,
        cursor_share: float = 0.8,
        collapse_share: float = 0.3,
        long_share: float = 0.05,
        max_ms: int = 30,
        batch: int = 10,
        interval: float = 0.05,
        max_backlog: int = 300,
        retry_share: float = 0.3,
        fail_share: float = 0.2,
        timeout_share: float = 0.1,
    ) -> None:
        self.engine = engine
        self.rng = random.Random(seed)
        self.cursors = cursors
        self.cursor_share = cursor_share
        self.collapse_share = collapse_share
        self.long_share = long_share
        self.max_ms = max_ms
        self.batch = batch
        self.interval = interval
        self.max_backlog = max_backlog
        self.retry_share = retry_share
        self.fail_share = fail_share
        self.timeout_share = timeout_share
        self.stats = StreamStats()
        self._seq = 0

    def _job(self) -> dict[str, Any]:
        self._seq += 1
        rng = self.rng
        ms = rng.randint(150, 400) if rng.random() < self.long_share else rng.randint(0, self.max_ms)
        spec: dict[str, Any] = {"queue": rng.choice(QUEUES), "args": {"ms": ms, "seq": self._seq}}
        if rng.random() < self.cursor_share:
            spec["cursor_key"] = f"c{rng.randrange(self.cursors):04d}"
            spec["collapse_on_cursor"] = rng.random() < self.collapse_share
        if rng.random() < self.retry_share:
            spec["retry"] = CHAOS_RETRY
            draw = rng.random()
            if draw < self.fail_share:
                spec["args"]["fail_first"] = True
            elif draw < self.fail_share + self.timeout_share:
                # The timeout is copied to the retries, which must finish well within it.
                spec["args"].update(slow_first=True, ms=rng.randint(0, 10))
                spec["timeout"] = CHAOS_TIMEOUT
        return spec

    async def enqueue(self, specs: Sequence[Mapping[str, Any]]) -> list[int]:
        """One transaction; cursor keys sorted (collapsible inserts in opposite orders deadlock)."""
        ordered = sorted(specs, key=lambda s: (s.get("cursor_key") or "", s["args"]["seq"]))
        ids = []
        async with AsyncSession(self.engine) as session, session.begin():
            source = AsyncMQSource(dbsession=session, model=MODEL)
            for spec in ordered:
                queued = await source.call(
                    spec["queue"],
                    "work",
                    spec["args"],
                    cursor_key=spec.get("cursor_key"),
                    collapse_on_cursor=spec.get("collapse_on_cursor", False),
                    retry=spec.get("retry"),
                    timeout=spec.get("timeout"),
                )
                ids.append(queued.id)
                if queued.created:
                    self.stats.created += 1
                else:
                    self.stats.joined += 1
        self.stats.calls += len(ordered)
        self.stats.ids.update(ids)
        return ids

    async def backlog(self) -> int:
        async with self.engine.connect() as conn:
            value = await conn.scalar(sa.text("SELECT count(*) FROM mq_job WHERE state = 'pending'"))
        return int(value or 0)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                if await self.backlog() < self.max_backlog:
                    await self.enqueue([self._job() for _ in range(self.batch)])
            except Exception as ex:
                self.stats.errors += 1
                self.stats.last_error = repr(ex)
                await _sleep_or(stop, 0.2)
                continue
            await _sleep_or(stop, self.interval)


async def _sleep_or(stop: asyncio.Event, delay: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), delay)


@contextlib.asynccontextmanager
async def background(*coros: Awaitable[None], grace: float = 0.0) -> AsyncIterator[None]:
    """Run ``coros`` as tasks for the block. After it, give them ``grace`` seconds to end by themselves
    (loops that watch a stop event), cancel the rest, and re-raise what any of them raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        yield
    finally:
        if grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            if not task.done():
                task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, Exception):
            raise result


# ------------------------------------------------------------------------------------------ the operator


async def resolve_lost(engine: AsyncEngine) -> list[tuple[int, int]]:
    """What an operator does with lost jobs that have no retry policy (workers resolve the others):
    ``retry_job`` (a new pending job) and ``fail_lost_job`` with a marker result, in one transaction per
    job. Returns ``(lost_id, retry_id)`` pairs."""
    async with engine.connect() as conn:
        query = (
            "SELECT id FROM mq_job WHERE state = 'lost' "
            "AND NOT (jsonb_typeof(trace) = 'object' AND trace ? 'aiomq_retry') ORDER BY id LIMIT 500"
        )
        ids = list(await conn.scalars(sa.text(query)))
    resolved = []
    for job_id in ids:
        async with AsyncSession(engine) as session, session.begin():
            source = AsyncMQSource(dbsession=session, model=MODEL)
            job = await source.get_job(job_id, for_update=True)
            if job.state != "lost":
                continue
            retry = await source.retry_job(job_id)
            await source.fail_lost_job(job_id, result={"chaos": "lost", "retried_as": retry.id})
        resolved.append((job_id, retry.id))
    return resolved


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if await predicate():
                return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(interval)


async def unfinished(url: str) -> dict[str, int]:
    """Jobs not yet in a final state, by state."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT state::text, count(*) FROM mq_job "
            "WHERE state IN ('pending', 'running', 'lost') GROUP BY state"
        )
    finally:
        await conn.close()
    return {r[0]: r[1] for r in rows}


# ------------------------------------------------------------------------------------------ the checks


@dataclasses.dataclass
class Verdict:
    """What :func:`verify` found: ``problems`` must be empty; ``figures`` are for the report."""

    problems: list[str]
    figures: dict[str, Any]

    def summary(self) -> str:
        return json.dumps(self.figures, default=str, sort_keys=True)


async def verify(
    url: str, *, killed: Mapping[str, datetime.datetime] | None = None, lost_may_come_back: bool = False
) -> Verdict:
    """Check the invariants on the final state of a chaos run.

    1. No job is pending, running or lost: every one is ``completed``, or ``failed`` by the operator's
       ``fail_lost_job`` (the marker result), and each of those has a retry chain that ends completed once.
    2. Lost jobs are exactly those claimed by a worker that was killed before it finished them: a lost job's
       worker was killed, after the job's start; every job of a worker that was not killed completed.
    3. No job ran twice (one ledger row per job) and every completed job ran (one ended ledger row).
    4. No two jobs of one cursor overlapped: the ledger intervals ``[started, ended]`` (a killed run ends
       when its worker was dead) and the jobs' own ``[start_time, end_time]``, per cursor, are disjoint.
    5. No cursor state was torn or lost: a cursor's counter equals its number of completed jobs, the values
       its completed jobs saw are exactly 0..n-1 in completion order, and ``last_job`` is the job that saw
       n-1.
    6. No job was marked lost while its worker lived (it would go from lost back to running, re-stamped),
       unless ``lost_may_come_back``: a worker whose own listener connection was cut looks dead to the
       others for a moment, as DESIGN §7.2 allows; only a database restart must not cause false alarms.

    Failed jobs are allowed when they are planned first-run failures (or timeouts) retried by the worker,
    lost jobs the operator failed, or lost jobs a worker resolved (``LostJobError``); every chain of
    retries ends completed exactly once.
    """
    killed = dict(killed or {})
    problems: list[str] = []
    conn = await asyncpg.connect(url, timeout=30)
    try:
        jobs = await conn.fetch(
            "SELECT id, state::text AS state, queue, cursor_key, worker, start_time, end_time, "
            "result, trace FROM mq_job ORDER BY id"
        )
        ledger = await conn.fetch(
            "SELECT run_id, job_id, cursor_key, worker, seen, started, ended FROM chaos_ledger"
        )
        cursors = {
            r["key"]: json.loads(r["properties"])
            for r in await conn.fetch("SELECT key, properties FROM mq_job_cursor")
        }
        kills_in_db = {
            r["worker"]: utc_naive(r["killed_at"])
            for r in await conn.fetch("SELECT worker, killed_at FROM chaos_kills")
        }
        back_to_running = await conn.fetch("SELECT job_id, worker, at FROM chaos_lost_then_running")
    finally:
        await conn.close()
    killed.update(kills_in_db)

    by_id = {r["id"]: r for r in jobs}
    results: dict[int, Any] = {
        r["id"]: json.loads(r["result"]) if r["result"] is not None else None for r in jobs
    }
    traces = {r["id"]: json.loads(r["trace"]) if r["trace"] is not None else None for r in jobs}
    states = collections.Counter(r["state"] for r in jobs)

    # 1. final states
    def retried(job_id: int) -> int | None:
        trace = traces[job_id]
        return trace.get("aiomq_retried_by") if isinstance(trace, dict) else None

    for job in jobs:
        state, result = job["state"], results[job["id"]]
        if state in ("pending", "running", "lost", "canceled"):
            problems.append(f"job {job['id']} ended {state} (worker {job['worker']})")
        elif (
            state == "failed"
            and not _is_lost_marker(result)
            and not _is_lost_job_error(result)
            and (retried(job["id"]) is None or not _is_planned_failure(result))
        ):
            problems.append(f"job {job['id']} failed unexpectedly: {result}")
    lost_ids = [
        r["id"]
        for r in jobs
        if r["state"] == "failed"
        and (_is_lost_marker(results[r["id"]]) or _is_lost_job_error(results[r["id"]]))
    ]
    by_workers = [i for i in lost_ids if _is_lost_job_error(results[i])]
    planned = [r["id"] for r in jobs if r["state"] == "failed" and _is_planned_failure(results[r["id"]])]
    if not lost_may_come_back:
        for item in back_to_running:
            problems.append(f"job {item['job_id']} of worker {item['worker']} was marked lost but was alive")
    retry_of = {
        job_id: trace["mq_source_job_id"]
        for job_id, trace in traces.items()
        if isinstance(trace, dict) and "mq_source_job_id" in trace
    }

    def root(job_id: int) -> int:
        while job_id in retry_of:
            job_id = retry_of[job_id]
        return job_id

    completed_per_root = collections.Counter(root(r["id"]) for r in jobs if r["state"] == "completed")

    def out_of_runs(job_id: int) -> bool:
        """A failure on the policy's last attempt, with no retry: the chain ends failed (DESIGN §7.1)."""
        found = traces[job_id]
        trace: dict[str, Any] = found if isinstance(found, dict) else {}
        return (
            by_id[job_id]["state"] == "failed"
            and trace.get("aiomq_attempt", 1) >= CHAOS_RETRY.max_attempts
            and "aiomq_retried_by" not in trace
        )

    exhausted = {root(r["id"]) for r in jobs if out_of_runs(r["id"])}
    for job in jobs:
        if job["id"] in retry_of:
            continue
        count = completed_per_root.get(job["id"], 0)
        if count != 1 and not (count == 0 and job["id"] in exhausted):
            problems.append(f"job {job['id']} and its retries completed {count} times, not once")
    for lost_id in lost_ids:
        result = results[lost_id]
        expected = retried(lost_id) if _is_lost_job_error(result) else result["retried_as"]
        attempt = (traces[lost_id] or {}).get("aiomq_attempt", 1)
        if expected is None and _is_lost_job_error(result) and attempt >= CHAOS_RETRY.max_attempts:
            continue  # lost on its last attempt: failed for good
        if retry_of.get(expected) != lost_id:
            problems.append(f"lost job {lost_id}: its retry {expected} is missing or not linked to it")

    # 2. lost <=> claimed by a worker killed before finishing
    for lost_id in lost_ids:
        job = by_id[lost_id]
        dead_at = killed.get(job["worker"])
        if dead_at is None:
            problems.append(f"job {lost_id} was lost but its worker {job['worker']} was never killed")
        elif job["start_time"] is not None and job["start_time"] > dead_at:
            problems.append(f"job {lost_id} was lost but started after its worker {job['worker']} died")
    for job in jobs:
        planned_failure = job["state"] == "failed" and _is_planned_failure(results[job["id"]])
        survivor = job["worker"] is not None and job["worker"] not in killed
        if survivor and job["state"] != "completed" and not planned_failure:
            problems.append(f"job {job['id']} of surviving worker {job['worker']} ended {job['state']}")
        if (
            job["state"] == "completed"
            and job["worker"] in killed
            and job["end_time"] > killed[job["worker"]]
        ):
            problems.append(f"job {job['id']} completed after its worker {job['worker']} was killed")

    # 3. exactly one run per job
    runs: dict[int, list[asyncpg.Record]] = collections.defaultdict(list)
    for run in ledger:
        runs[run["job_id"]].append(run)
    duplicates = sorted(job_id for job_id, rows in runs.items() if len(rows) > 1)
    for job_id in duplicates:
        problems.append(f"job {job_id} ran {len(runs[job_id])} times")
    for job in jobs:
        if job["state"] == "completed" and not any(r["ended"] is not None for r in runs.get(job["id"], ())):
            problems.append(f"job {job['id']} completed without a finished run in the ledger")
    unended = [r for r in ledger if r["ended"] is None and r["worker"] not in killed]
    for run in unended:
        problems.append(f"run of job {run['job_id']} by surviving worker {run['worker']} never ended")

    # 4. no overlap per cursor (ledger, database clock; jobs' own times, worker clocks on this host)
    overlaps = 0
    intervals: dict[str, list[tuple[datetime.datetime, datetime.datetime, int]]] = collections.defaultdict(
        list
    )
    for run in ledger:
        if run["cursor_key"] is None:
            continue
        started = utc_naive(run["started"])
        if run["ended"] is not None:
            ended = utc_naive(run["ended"])
        elif run["worker"] in killed:
            ended = max(started, killed[run["worker"]])
        else:
            continue  # reported above
        intervals[run["cursor_key"]].append((started, ended, run["job_id"]))
    job_intervals: dict[str, list[tuple[datetime.datetime, datetime.datetime, int]]] = (
        collections.defaultdict(list)
    )
    for job in jobs:
        if job["cursor_key"] is not None and job["start_time"] is not None and job["end_time"] is not None:
            job_intervals[job["cursor_key"]].append((job["start_time"], job["end_time"], job["id"]))
    skew = datetime.timedelta(0)
    for label, table, tolerance in (
        ("ledger", intervals, datetime.timedelta(0)),
        ("job times", job_intervals, JOB_TIME_TOLERANCE),
    ):
        for key, spans in table.items():
            spans.sort()
            for (s1, e1, j1), (s2, e2, j2) in itertools.pairwise(spans):
                if s2 >= e1:
                    continue
                # The clock error that would explain the overlap: the smaller of the overlaps in either
                # order (a successor stamped early can even sort before its predecessor).
                error = min(e1 - s2, e2 - s1)
                if error <= tolerance:
                    skew = max(skew, error)
                    continue
                overlaps += 1
                problems.append(f"cursor {key}: jobs {j1} and {j2} overlapped ({label}: {s2} < {e1})")

    # 5. cursor state
    completed_by_cursor: dict[str, list[asyncpg.Record]] = collections.defaultdict(list)
    for job in jobs:
        if job["state"] == "completed" and job["cursor_key"] is not None:
            completed_by_cursor[job["cursor_key"]].append(job)
    for key in sorted(set(completed_by_cursor) | set(cursors)):
        done = sorted(completed_by_cursor.get(key, ()), key=lambda r: (r["end_time"], r["id"]))
        props = cursors.get(key, {})
        n = props.get("n", 0)
        if n != len(done):
            problems.append(f"cursor {key}: counter {n} but {len(done)} completed jobs")
        seen = [(results[r["id"]] or {}).get("seen") for r in done]
        if seen != list(range(len(done))):
            problems.append(f"cursor {key}: completed jobs saw {seen[:20]}..., not 0..{len(done) - 1}")
        if done and props.get("last_job") != done[-1]["id"]:
            problems.append(f"cursor {key}: last_job {props.get('last_job')} is not {done[-1]['id']}")

    lost_delay = [
        (by_id[i]["end_time"] - killed[by_id[i]["worker"]]).total_seconds()
        for i in lost_ids
        if by_id[i]["worker"] in killed and by_id[i]["end_time"] is not None
    ]
    figures: dict[str, Any] = {
        "jobs": len(jobs),
        "states": dict(states),
        "completed": states.get("completed", 0),
        "cursor_jobs_completed": sum(len(v) for v in completed_by_cursor.values()),
        "cursors": len(cursors),
        "lost": len(lost_ids),
        "lost_resolved_by_workers": len(by_workers),
        "chains_failed_after_last_attempt": len(exhausted),
        "lost_then_running": len(back_to_running),
        "planned_failures_retried": len(planned),
        "timeouts": sum(1 for i in planned if (results[i] or {}).get("exc") == "TimeoutError"),
        "retried": len(retry_of),
        "workers_killed": len(killed),
        "ledger_runs": len(ledger),
        "duplicates": len(duplicates),
        "overlaps": overlaps,
        "job_time_skew_ms_max": round(skew.total_seconds() * 1000, 1),
        "lost_marked_after_kill_s_max": round(max(lost_delay), 3) if lost_delay else None,
    }
    return Verdict(problems=problems, figures=figures)


def _is_lost_marker(result: Any) -> bool:
    """The result :func:`resolve_lost` gives the lost jobs it fails."""
    return isinstance(result, dict) and result.get("chaos") == "lost"


def _is_lost_job_error(result: Any) -> bool:
    """The result of a lost job a worker resolved (it had a retry policy)."""
    return isinstance(result, dict) and result.get("exc") == "LostJobError"


def _is_planned_failure(result: Any) -> bool:
    """The first run of a job the producer made fail (``fail_first``) or run past its timeout."""
    if not isinstance(result, dict):
        return False
    return result.get("exc") == "TimeoutError" or "planned failure" in str(result.get("message"))
