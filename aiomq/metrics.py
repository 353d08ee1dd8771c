"""Prometheus metrics (DESIGN §8; ``pip install aiomq[metrics]``, which is prometheus-client).

Two kinds, from two places:

- :class:`WorkerMetrics`, a :class:`~aiomq.hooks.JobHooks`: what one worker process runs, counted as it
  happens on the worker's loop (``AsyncMQWorker(hooks=[WorkerMetrics()])``; ``aiomq worker --metrics-port``
  does it for you). Nothing is read from logs, and nothing is asked of the database.

  ==================================  =========  =====================  ===================================
  ``aiomq_jobs_finished_total``       counter    queue, method, state   outcomes this worker committed
  ``aiomq_job_retries_total``         counter    queue, method          failures that scheduled a retry
  ``aiomq_job_timeouts_total``        counter    queue, method          runs past their timeout (§7.3)
  ``aiomq_job_run_seconds``           histogram  queue, method          claim to outcome (handler time)
  ``aiomq_job_wait_seconds``          histogram  queue, method          start time minus scheduled time
  ``aiomq_jobs_active``               gauge      queue                  jobs in this worker's handlers
  ==================================  =========  =====================  ===================================

  A job that ends without this worker's outcome (marked lost, or resolved by lost-job maintenance) is not
  in ``aiomq_jobs_finished_total``; the database gauges show lost jobs.

- :class:`QueueCollector`: gauges read from the database, the same for every process that reads them
  (aggregate them with ``max``, not ``sum``), from :meth:`~aiomq.AsyncMQSource.queue_stats` (DESIGN §7.6):
  ``aiomq_queue_jobs{queue, state}`` (state ``pending_due``, ``pending_later``, ``running``, ``lost``),
  ``aiomq_queue_paused{queue}`` (1 or 0), ``aiomq_queue_oldest_due_age_seconds{queue}`` (queues with a due
  job), ``aiomq_queue_stats_age_seconds`` (how old the values are) and ``aiomq_queue_stats_errors_total``.
  The statistics read the pending jobs' partial index and the few running and lost rows, never the finished
  ones: a few milliseconds on a table of millions of jobs, cheap to scrape every 15 s. Every read runs in a
  transaction with a ``statement_timeout`` (``statement_timeout`` seconds, default 2).

**Sync scrapes, async database.** prometheus-client calls ``collect()`` on its HTTP server's thread, while
aiomq reaches the database through the application's async engine, bound to one event loop. The collector
hands the read to that loop (``asyncio.run_coroutine_threadsafe``) and waits at most ``wait`` seconds; the
loop is never blocked, and a scrape thread never opens connections of its own. Reads are shared: values
younger than ``min_interval`` seconds are served as they are, so several scrapers cost one query. When a
read fails or is late, the last values are served (their age says so) and the error counter goes up; the
read goes on and refreshes them for the next scrape. Compared with refreshing on a timer, this queries the
database only when someone scrapes, and serves values as fresh as the scrape. From the loop's own thread
(where waiting would deadlock), ``collect()`` serves the last values: in async code use :func:`exposition`.

:func:`exposition` renders the database gauges (read on the caller's loop) in Prometheus' text format, for a
``/metrics`` route of a web application or the dashboard.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from .execution import Outcome
from .hooks import JobHooks
from .model import Model
from .queues import QueueStats
from .records import JobContext
from .source import AsyncMQSource

__all__ = ["QueueCollector", "WorkerMetrics", "exposition", "read_queue_stats"]

log = logging.getLogger(__name__)

#: Seconds: from fast handlers to hour-long ones.
RUN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
#: Seconds a due job waited to be claimed: from a NOTIFY's milliseconds to a backlog's hours.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_STATES = ("pending_due", "pending_later", "running", "lost")


class WorkerMetrics(JobHooks):
    """A worker's metrics (see the module's table) in ``registry`` (prometheus-client's default one unless
    given). One per registry: share it between the workers of a process."""

    def __init__(
        self,
        registry: CollectorRegistry | None = REGISTRY,
        *,
        run_buckets: Sequence[float] = RUN_BUCKETS,
        wait_buckets: Sequence[float] = WAIT_BUCKETS,
    ) -> None:
        by_job = ("queue", "method")
        self.finished_total = Counter(
            "aiomq_jobs_finished",
            "Jobs whose outcome this worker recorded",
            [*by_job, "state"],
            registry=registry,
        )
        self.retries_total = Counter(
            "aiomq_job_retries", "Failed runs that scheduled a retry", by_job, registry=registry
        )
        self.timeouts_total = Counter(
            "aiomq_job_timeouts", "Runs that exceeded their job timeout", by_job, registry=registry
        )
        self.run_seconds = Histogram(
            "aiomq_job_run_seconds",
            "Seconds from claim to outcome",
            by_job,
            registry=registry,
            buckets=run_buckets,
        )
        self.wait_seconds = Histogram(
            "aiomq_job_wait_seconds",
            "Seconds from a job's scheduled time to its start",
            by_job,
            registry=registry,
            buckets=wait_buckets,
        )
        self.active = Gauge(
            "aiomq_jobs_active", "Jobs in this worker's handlers", ["queue"], registry=registry
        )
        self._started: dict[int, tuple[float, _Children]] = {}
        # labels() validates and locks on every call: a job's children are looked up once per queue and
        # method (and state), which made the hooks several times cheaper.
        self._children: dict[tuple[str, str], _Children] = {}
        self._finished: dict[tuple[str, str, str], Any] = {}

    def _of(self, job: JobContext) -> _Children:
        key = (job.queue, job.method)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = _Children(self, job.queue, job.method)
        return children

    def started(self, job: JobContext, scheduled_time: Any, start_time: Any) -> None:
        children = self._of(job)
        self._started[job.id] = (time.perf_counter(), children)
        children.wait.observe(max((start_time - scheduled_time).total_seconds(), 0.0))
        children.active.inc()

    def finished(self, job: JobContext, outcome: Outcome | None) -> None:
        entry = self._started.pop(job.id, None)
        if entry is None:
            return
        began, children = entry
        children.active.dec()
        if outcome is None:  # cancelled at stop: put back, not finished
            return
        children.run.observe(time.perf_counter() - began)
        if outcome.timed_out:
            children.timeouts.inc()

    def recorded(self, job: JobContext, state: str, retried: bool) -> None:
        key = (job.queue, job.method, state)
        counter = self._finished.get(key)
        if counter is None:
            counter = self._finished[key] = self.finished_total.labels(*key)
        counter.inc()
        if retried:
            self._of(job).retries.inc()


class _Children:
    """One queue and method's labelled metrics."""

    __slots__ = ("active", "retries", "run", "timeouts", "wait")

    def __init__(self, metrics: WorkerMetrics, queue: str, method: str) -> None:
        self.wait = metrics.wait_seconds.labels(queue, method)
        self.run = metrics.run_seconds.labels(queue, method)
        self.timeouts = metrics.timeouts_total.labels(queue, method)
        self.retries = metrics.retries_total.labels(queue, method)
        self.active = metrics.active.labels(queue)


async def read_queue_stats(
    engine: AsyncEngine, model: Model, *, statement_timeout: float = 2.0
) -> list[QueueStats]:
    """:meth:`~aiomq.AsyncMQSource.queue_stats` in a transaction of its own whose statements may run at
    most ``statement_timeout`` seconds (a lock wait included)."""
    async with AsyncSession(engine) as session, session.begin():
        milliseconds = str(max(1, round(statement_timeout * 1000)))
        await session.execute(sa.select(sa.func.set_config("statement_timeout", milliseconds, True)))
        return await AsyncMQSource(dbsession=session, model=model).queue_stats()


@dataclasses.dataclass(frozen=True)
class _Reading:
    stats: list[QueueStats]
    at: float  # time.monotonic() of the read


def _families(reading: _Reading | None, errors: int) -> Iterator[Metric]:
    jobs = GaugeMetricFamily(
        "aiomq_queue_jobs", "Jobs of a queue in the database, by state", labels=["queue", "state"]
    )
    paused = GaugeMetricFamily("aiomq_queue_paused", "1 if the queue is paused", labels=["queue"])
    oldest = GaugeMetricFamily(
        "aiomq_queue_oldest_due_age_seconds",
        "How long the queue's oldest due job has waited",
        labels=["queue"],
    )
    for s in reading.stats if reading is not None else ():
        for state, value in zip(_STATES, (s.pending_due, s.pending_later, s.running, s.lost), strict=True):
            jobs.add_metric([s.queue, state], value)
        paused.add_metric([s.queue], 1 if s.paused else 0)
        if s.oldest_due_age is not None:
            oldest.add_metric([s.queue], s.oldest_due_age.total_seconds())
    yield from (jobs, paused, oldest)
    age = GaugeMetricFamily("aiomq_queue_stats_age_seconds", "Seconds since the queue statistics were read")
    if reading is not None:
        age.add_metric([], time.monotonic() - reading.at)
    yield age
    yield CounterMetricFamily(
        "aiomq_queue_stats_errors", "Reads of the queue statistics that failed or came late", value=errors
    )


class QueueCollector(Collector):
    """The database gauges (see the module's docstring), read on ``loop`` (the running one by default)
    when scraped, at most once per ``min_interval`` seconds, waiting at most ``wait`` seconds."""

    def __init__(
        self,
        engine: AsyncEngine,
        model: Model,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        wait: float = 5.0,
        min_interval: float = 5.0,
        statement_timeout: float = 2.0,
    ) -> None:
        self._engine = engine
        self._model = model
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    "QueueCollector reads the database on an event loop: create it in a coroutine on the "
                    "loop your engine is used on, or pass loop="
                ) from None
        self._loop = loop
        self._wait = wait
        self._min_interval = min_interval
        self._statement_timeout = statement_timeout
        self._lock = threading.Lock()  # scrapes may come from several threads
        self._reading: _Reading | None = None
        self._pending: concurrent.futures.Future[list[QueueStats]] | None = None
        self._errors = 0

    def describe(self) -> Iterable[Metric]:
        # Without it, registering in an auto-describing registry (the default one) would collect at once.
        return list(_families(None, 0))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            reading = self._refresh()
            return list(_families(reading, self._errors))

    def _refresh(self) -> _Reading | None:
        reading = self._reading
        if reading is not None and time.monotonic() - reading.at < self._min_interval:
            return reading
        if self._on_loop() or self._loop.is_closed():
            return reading
        if self._pending is not None and self._pending.done():
            self._pending = None  # a late read that ended after its scrape gave up: read afresh
        if self._pending is None:  # else the read a late scrape left running is still on its way
            coro = read_queue_stats(self._engine, self._model, statement_timeout=self._statement_timeout)
            self._pending = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            stats = self._pending.result(self._wait)
        except concurrent.futures.TimeoutError:
            self._errors += 1
            log.warning("reading the queue statistics took over %g s: serving the last values", self._wait)
            return reading
        except Exception as ex:
            self._pending = None
            self._errors += 1
            log.warning("reading the queue statistics failed (%s): serving the last values", ex)
            return reading
        self._pending = None
        self._reading = _Reading(stats, time.monotonic())
        return self._reading

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False


async def exposition(
    engine: AsyncEngine,
    model: Model,
    *,
    registry: CollectorRegistry | None = None,
    statement_timeout: float = 2.0,
) -> tuple[bytes, str]:
    """``(body, content_type)`` of a Prometheus scrape: the database gauges, read now on the running loop
    (a failed read raises), followed by ``registry``'s metrics if given. For a ``/metrics`` route, e.g.
    ``Response(body, media_type=content_type)``."""
    stats = await read_queue_stats(engine, model, statement_timeout=statement_timeout)
    fixed = CollectorRegistry(auto_describe=False)
    fixed.register(_Fixed(_Reading(stats, time.monotonic())))
    body = _generate_latest(fixed)
    if registry is not None:
        body += _generate_latest(registry)
    return body, CONTENT_TYPE_LATEST


class _Fixed(Collector):
    def __init__(self, reading: _Reading) -> None:
        self._reading = reading

    def collect(self) -> Iterable[Metric]:
        return [m for m in _families(self._reading, 0) if m.name != "aiomq_queue_stats_errors"]
