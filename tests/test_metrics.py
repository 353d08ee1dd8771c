"""Prometheus metrics (DESIGN §8): the worker's counters against the database's counts, the database
gauges read from the scrape thread, ``exposition()``, and ``aiomq worker --metrics-port`` scraped."""

from __future__ import annotations

import asyncio
import datetime
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from aiomq import AsyncMQSource, AsyncMQWorker, FailedJobError, JobContext, Model, Retry
from aiomq.metrics import QueueCollector, WorkerMetrics, exposition

from .dbhelpers import wait_for
from .test_cli import cli, cli_env

MakeWorker = Callable[..., AsyncMQWorker]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """Every sample of an exposition: (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def by(found: Samples, name: str, *keys: str) -> dict[tuple[str, ...], float]:
    """The samples of ``name`` with a nonzero value, keyed by the values of the labels ``keys``."""
    out = {}
    for (sample, labels), value in found.items():
        if sample == name and value:
            label = dict(labels)
            out[tuple(label[k] for k in keys)] = value
    return out


async def database_counts(db: Any) -> dict[tuple[str, ...], float]:
    rows = await db.fetch("SELECT queue, method, state, count(*) AS n FROM mq_job GROUP BY 1, 2, 3")
    return {(r["queue"], r["method"], r["state"]): float(r["n"]) for r in rows}


async def test_worker_counters_equal_the_database(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    async def flaky(job: JobContext) -> str:
        if job.args.get("fail_until", 0) >= job.attempt:
            raise RuntimeError("not yet")
        return "ok"

    async def slow(job: JobContext) -> None:
        await asyncio.sleep(10)

    def refuse(job: JobContext) -> None:  # a sync handler
        raise FailedJobError("no")

    for i in range(3):
        await source.call("work", "plain", {"i": i})
    await source.call("work", "flaky", {"fail_until": 2}, retry=Retry(max_attempts=3, backoff=0))
    await source.call("work", "flaky", {"fail_until": 9}, retry=Retry(max_attempts=2, backoff=0))
    await source.call("slow", "sleep", timeout=0.05)
    await source.call("sync", "refuse")
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    await make_worker({"work": flaky, "slow": slow, "sync": refuse}, hooks=[metrics]).run_until_idle()

    found = samples(generate_latest(registry).decode())
    counts = await database_counts(db)
    assert by(found, "aiomq_jobs_finished_total", "queue", "method", "state") == counts
    assert counts[("work", "flaky", "failed")] == 4  # three retried, one out of runs
    assert by(found, "aiomq_job_retries_total", "queue", "method") == {("work", "flaky"): 3}
    assert by(found, "aiomq_job_timeouts_total", "queue", "method") == {("slow", "sleep"): 1}
    runs = by(found, "aiomq_job_run_seconds_count", "queue", "method")
    assert runs == {("work", "plain"): 3, ("work", "flaky"): 5, ("slow", "sleep"): 1, ("sync", "refuse"): 1}
    assert by(found, "aiomq_job_wait_seconds_count", "queue", "method") == runs
    assert by(found, "aiomq_job_run_seconds_sum", "queue", "method")[("slow", "sleep")] >= 0.05
    assert by(found, "aiomq_jobs_active", "queue") == {}  # all done: every gauge back at zero
    assert ("aiomq_jobs_active", frozenset({("queue", "work")})) in found


async def test_active_jobs_while_they_run(source: AsyncMQSource, make_worker: MakeWorker) -> None:
    registry = CollectorRegistry()
    release = asyncio.Event()
    started = 0

    async def held(job: JobContext) -> None:
        nonlocal started
        started += 1
        await release.wait()

    for _ in range(3):
        await source.call("held", "m")
    async with make_worker({"held": held}, hooks=[WorkerMetrics(registry)]):
        await wait_for(lambda: _true(started == 3), "three jobs to start")
        assert registry.get_sample_value("aiomq_jobs_active", {"queue": "held"}) == 3
        release.set()
        labels = {"queue": "held"}
        await wait_for(lambda: _true(registry.get_sample_value("aiomq_jobs_active", labels) == 0), "the end")


async def _true(value: bool) -> bool:
    return value


async def test_hooks_must_be_job_hooks_and_one_that_raises_is_skipped(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(TypeError, match=r"hooks\[0\] must be an aiomq.hooks.JobHooks"):
        make_worker({"q": lambda job: None}, hooks=[object()])

    class Broken(WorkerMetrics):
        def started(self, job: JobContext, scheduled_time: Any, start_time: Any) -> None:
            raise ZeroDivisionError("a broken hook")

    registry = CollectorRegistry()
    job = await source.call("q", "m")
    await make_worker({"q": lambda job: "fine"}, hooks=[Broken(registry)]).run_until_idle()
    row = await db.fetchrow("SELECT state FROM mq_job WHERE id = $1", job.id)
    assert row["state"] == "completed"
    assert "job hook" in caplog.text
    assert "ZeroDivisionError" in caplog.text
    labels = {"queue": "q", "method": "m", "state": "completed"}
    assert registry.get_sample_value("aiomq_jobs_finished_total", labels) == 1


# ---------------------------------------------------------------------------------- the database gauges


async def test_queue_gauges_read_from_the_scrape_thread(
    source: AsyncMQSource, engine: AsyncEngine, model: Model
) -> None:
    await source.call("alpha", "m")
    await source.call("alpha", "m")
    await source.call("alpha", "m", when=datetime.timedelta(seconds=-5))
    await source.call("beta", "m", when=datetime.timedelta(hours=1))
    await source.pause_queue("gamma")
    registry = CollectorRegistry()
    collector = QueueCollector(engine, model, min_interval=60)
    registry.register(collector)

    found = samples((await asyncio.to_thread(generate_latest, registry)).decode())
    jobs = by(found, "aiomq_queue_jobs", "queue", "state")
    assert jobs == {("alpha", "pending_due"): 3, ("beta", "pending_later"): 1}
    assert by(found, "aiomq_queue_paused", "queue") == {("gamma",): 1}
    assert ("aiomq_queue_paused", frozenset({("queue", "alpha")})) in found
    assert set(by(found, "aiomq_queue_oldest_due_age_seconds", "queue")) <= {("alpha",)}
    assert found[("aiomq_queue_stats_errors_total", frozenset())] == 0
    stats = {s.queue: s for s in await source.queue_stats()}
    assert set(stats) == {"alpha", "beta", "gamma"}

    # Within min_interval a scrape serves the values read: no second query.
    await source.call("alpha", "m")
    again = samples((await asyncio.to_thread(generate_latest, registry)).decode())
    assert by(again, "aiomq_queue_jobs", "queue", "state")[("alpha", "pending_due")] == 3
    # From the loop's own thread a scrape cannot wait on the loop: it serves the last values at once.
    on_loop = samples(generate_latest(registry).decode())
    assert by(on_loop, "aiomq_queue_jobs", "queue", "state")[("alpha", "pending_due")] == 3


async def test_a_collector_needs_an_event_loop(engine: AsyncEngine, model: Model) -> None:
    with pytest.raises(RuntimeError, match="QueueCollector reads the database on an event loop"):
        await asyncio.to_thread(QueueCollector, engine, model)  # a thread with no loop, and no loop=


async def test_a_blocked_read_is_bounded_and_serves_the_last_values(
    source: AsyncMQSource, engine: AsyncEngine, model: Model, database: str, caplog: pytest.LogCaptureFixture
) -> None:
    await source.call("alpha", "m")
    registry = CollectorRegistry()
    registry.register(QueueCollector(engine, model, min_interval=0, wait=30, statement_timeout=0.2))
    first = samples((await asyncio.to_thread(generate_latest, registry)).decode())
    assert by(first, "aiomq_queue_jobs", "queue", "state") == {("alpha", "pending_due"): 1}

    blocker = await asyncpg.connect(database)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE mq_job IN ACCESS EXCLUSIVE MODE")
            blocked = samples((await asyncio.to_thread(generate_latest, registry)).decode())
    finally:
        await blocker.close()
    # The read gave up at its statement_timeout (not at the scrape's wait); the last values are served.
    assert "reading the queue statistics failed" in caplog.text
    assert "statement timeout" in caplog.text
    assert blocked[("aiomq_queue_stats_errors_total", frozenset())] == 1
    assert by(blocked, "aiomq_queue_jobs", "queue", "state") == {("alpha", "pending_due"): 1}
    after = samples((await asyncio.to_thread(generate_latest, registry)).decode())
    age: tuple[str, frozenset[tuple[str, str]]] = ("aiomq_queue_stats_age_seconds", frozenset())
    assert after[("aiomq_queue_stats_errors_total", frozenset())] == 1
    assert after[age] < blocked[age]  # read afresh once the lock is gone


async def test_exposition_for_a_web_route(source: AsyncMQSource, engine: AsyncEngine, model: Model) -> None:
    await source.call("alpha", "m")
    body, content_type = await exposition(engine, model)
    assert content_type.startswith("text/plain")
    found = samples(body.decode())
    assert by(found, "aiomq_queue_jobs", "queue", "state") == {("alpha", "pending_due"): 1}
    assert ("aiomq_queue_stats_errors_total", frozenset()) not in found

    registry = CollectorRegistry()
    WorkerMetrics(registry)
    body, _ = await exposition(engine, model, registry=registry)
    assert "# TYPE aiomq_jobs_finished_total counter" in body.decode()
    assert "aiomq_queue_jobs{" in body.decode()


# ------------------------------------------------------------------------------ aiomq worker --metrics-port

HANDLERS = """
    import asyncio
    from aiomq import FailedJobError

    async def work(job):
        if job.args.get("fail_until", 0) >= job.attempt:
            raise RuntimeError("not yet")
        if job.args.get("refuse"):
            raise FailedJobError("refused")
        return "ok"

    QUEUES = {"m_work": work}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(get)


async def test_a_scrape_of_a_worker_shows_the_database_counts(
    database: str, source: AsyncMQSource, db: Any, tmp_path: pathlib.Path
) -> None:
    (tmp_path / "metricjobs.py").write_text(textwrap.dedent(HANDLERS))
    env = cli_env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    port = free_port()
    calls: list[dict[str, Any]] = [
        {"queue": "m_work", "method": "ok"},
        {"queue": "m_work", "method": "ok"},
        {"queue": "m_work", "method": "refuse", "args": {"refuse": True}},
        {"queue": "m_work", "method": "flaky", "args": {"fail_until": 1}, "retry": Retry(2, backoff=0)},
        {"queue": "m_work", "method": "doomed", "args": {"fail_until": 5}, "retry": Retry(2, backoff=0)},
        {"queue": "m_idle", "method": "waits"},  # no worker for it: a pending job in the gauges
    ]
    jobs = await source.call_many(calls)
    await source.pause_queue("m_paused")
    log = tmp_path / "worker.log"
    with log.open("w") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "aiomq", "worker", "metricjobs:QUEUES", "--database-url", database],
            *["--metrics-port", str(port), "--metrics-host", "127.0.0.1", "--timeout", "5"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            for job in jobs[:-1]:
                await source.wait_for_job(job.id, timeout=30, follow_retries=True)
            counts = await database_counts(db)
            deadline = time.monotonic() + 30
            while True:  # a job's counter moves just after its commit, which wait_for_job saw
                text = await scrape(port)
                found = samples(text)
                finished = by(found, "aiomq_jobs_finished_total", "queue", "method", "state")
                if finished == {k: v for k, v in counts.items() if k[2] != "pending"}:
                    break
                assert time.monotonic() < deadline, (finished, counts)
                await asyncio.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert finished == {
        ("m_work", "ok", "completed"): 2,
        ("m_work", "refuse", "failed"): 1,
        ("m_work", "flaky", "failed"): 1,
        ("m_work", "flaky", "completed"): 1,
        ("m_work", "doomed", "failed"): 2,
    }
    assert by(found, "aiomq_job_retries_total", "queue", "method") == {
        ("m_work", "flaky"): 1,
        ("m_work", "doomed"): 1,
    }
    assert by(found, "aiomq_queue_jobs", "queue", "state") == {("m_idle", "pending_due"): 1}
    assert by(found, "aiomq_queue_paused", "queue") == {("m_paused",): 1}
    assert ("process_resident_memory_bytes", frozenset()) in found or sys.platform != "linux"
    assert f"serving Prometheus metrics on http://127.0.0.1:{port}/metrics" in log.read_text()


async def test_metrics_options(database: str, tmp_path: pathlib.Path) -> None:
    proc = await cli("worker", "x:Y", "--metrics-port", "http", "--database-url", database)
    assert proc.returncode == 2
    assert "expected a TCP port from 0 to 65535, got 'http'" in proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "metricjobs.py").write_text(textwrap.dedent(HANDLERS))
        env = cli_env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
        proc = await cli(
            "worker", "metricjobs:QUEUES", "--metrics-port", str(port), "--metrics-host", "127.0.0.1",
            "--database-url", database, env=env,
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in proc.stderr
