"""OpenTelemetry tracing (DESIGN §8): producer spans at enqueue, consumer spans per run, one trace across
retries, on a real database, with the SDK's in-memory exporter; and aiomq without the optional packages."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

from aiomq import AsyncMQSource, AsyncMQWorker, FailedJobError, JobContext, Retry

from .conftest import asyncpg_url
from .dbhelpers import fetch_job

MakeWorker = Callable[..., AsyncMQWorker]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """A tracer provider exporting to memory, installed as the global one for this test only."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    saved = trace._TRACER_PROVIDER_SET_ONCE, trace._TRACER_PROVIDER
    # The API sets its global provider once per process; tests put it back as it was.
    trace._TRACER_PROVIDER_SET_ONCE, trace._TRACER_PROVIDER = Once(), None
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        trace._TRACER_PROVIDER_SET_ONCE, trace._TRACER_PROVIDER = saved


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_one_trace_from_call_through_the_runs_and_retries(
    spans: InMemorySpanExporter, source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    tracer = trace.get_tracer("test")
    attempts: list[int] = []

    async def flaky(job: JobContext) -> str:
        attempts.append(job.attempt)
        with tracer.start_as_current_span("inside the handler"):
            if job.attempt < 3:
                raise ConnectionError(f"attempt {job.attempt} failed")
        return "done"

    with tracer.start_as_current_span("request") as request:
        queued = await source.call("traced", "sync_account", {"n": 1}, retry=Retry(max_attempts=3, backoff=0))
    await make_worker({"traced": flaky}).run_until_idle()
    assert attempts == [1, 2, 3]

    (producer,) = named(spans, "call traced")
    runs = named(spans, "process traced")
    inner = named(spans, "inside the handler")
    trace_id = request.get_span_context().trace_id
    every = [producer, *runs, *inner]
    assert {s.context.trace_id for s in every if s.context is not None} == {trace_id}
    assert producer.kind is SpanKind.PRODUCER
    assert parent_id(producer) == request.get_span_context().span_id
    assert producer.attributes is not None
    assert dict(producer.attributes) == {
        "messaging.system": "aiomq",
        "messaging.operation.type": "create",
        "messaging.operation.name": "call",
        "messaging.destination.name": "traced",
        "aiomq.method": "sync_account",
    }
    # The job's trace carries the producer span's context, in W3C form; each retry copied it.
    rows = [await fetch_job(db, r["id"]) for r in await db.fetch("SELECT id FROM mq_job ORDER BY id")]
    assert rows[0]["id"] == queued.id
    assert producer.context is not None
    traceparent = f"00-{producer.context.trace_id:032x}-{producer.context.span_id:016x}-"  # then flags
    assert {r["trace"]["aiomq_otel"]["traceparent"][:-2] for r in rows} == {traceparent}

    runs.sort(key=lambda s: s.start_time or 0)
    assert len(runs) == 3
    for attempt, (run, row) in enumerate(zip(runs, rows, strict=True), start=1):
        assert run.kind is SpanKind.CONSUMER
        assert parent_id(run) == producer.context.span_id  # every attempt: a child of the call
        assert run.attributes is not None
        assert dict(run.attributes) == {
            "messaging.system": "aiomq",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": "traced",
            "messaging.message.id": str(row["id"]),
            "aiomq.method": "sync_account",
            "aiomq.attempt": attempt,
            "aiomq.job.state": row["state"],
        }
    assert [r.status.status_code for r in runs] == [StatusCode.ERROR, StatusCode.ERROR, StatusCode.UNSET]
    assert [[e.name for e in r.events] for r in runs] == [["exception"], ["exception"], []]
    assert runs[0].events[0].attributes is not None
    assert runs[0].events[0].attributes["exception.message"] == "attempt 1 failed"
    assert [r["state"] for r in rows] == ["failed", "failed", "completed"]
    # The handler's own spans are children of its run's span.
    assert sorted(parent_id(s) or 0 for s in inner) == sorted(r.context.span_id for r in runs if r.context)


async def test_sync_handlers_timeouts_and_deliberate_failures(
    spans: InMemorySpanExporter, source: AsyncMQSource, make_worker: MakeWorker
) -> None:
    tracer = trace.get_tracer("test")

    def in_thread(job: JobContext) -> None:
        with tracer.start_as_current_span("in the thread"):
            pass

    async def slow(job: JobContext) -> None:
        await asyncio.sleep(10)

    async def refuse(job: JobContext) -> None:
        raise FailedJobError({"why": "refused"})

    await source.call("sync_q", "m")
    await source.call("slow_q", "m", timeout=0.05)
    await source.call("refuse_q", "m")
    await make_worker({"sync_q": in_thread, "slow_q": slow, "refuse_q": refuse}).run_until_idle()

    (sync_run,) = named(spans, "process sync_q")
    (child,) = named(spans, "in the thread")
    assert sync_run.context is not None
    assert parent_id(child) == sync_run.context.span_id
    assert sync_run.status.status_code is StatusCode.UNSET

    (slow_run,) = named(spans, "process slow_q")
    assert slow_run.status.status_code is StatusCode.ERROR
    assert "exceeded its timeout of 0.05 s" in (slow_run.status.description or "")
    (event,) = slow_run.events
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "TimeoutError"

    (refused,) = named(spans, "process refuse_q")
    assert refused.status.status_code is StatusCode.ERROR
    assert refused.attributes is not None
    assert refused.attributes["aiomq.job.state"] == "failed"


async def test_call_many_items_and_retry_job(
    spans: InMemorySpanExporter, source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    first, second = await source.call_many(
        [{"queue": "batch", "method": "a"}, {"queue": "batch", "method": "b", "trace": {"mine": 1}}]
    )
    producers = named(spans, "call batch")
    assert len(producers) == 2
    assert len({s.context.trace_id for s in producers if s.context}) == 2  # no current span: two roots
    row = await fetch_job(db, second.id)
    assert row["trace"]["mine"] == 1
    assert set(row["trace"]["aiomq_otel"]) == {"traceparent"}

    await make_worker({"batch": lambda job: None}).run_until_idle()
    again = await source.retry_job(first.id)
    (retry_producer,) = named(spans, "retry_job batch")
    original = next(s for s in producers if s.attributes and s.attributes["aiomq.method"] == "a")
    assert original.context is not None
    # retry_job: the caller's span (none here: a new trace), linked to the original call.
    assert [link.context.span_id for link in retry_producer.links] == [original.context.span_id]
    await make_worker({"batch": lambda job: None}).run_until_idle()
    run = next(
        s
        for s in named(spans, "process batch")
        if s.attributes and s.attributes["messaging.message.id"] == str(again.id)
    )
    assert retry_producer.context is not None
    assert parent_id(run) == retry_producer.context.span_id


async def test_an_aborted_run_is_no_error(
    spans: InMemorySpanExporter, source: AsyncMQSource, make_worker: MakeWorker
) -> None:
    started = asyncio.Event()

    async def wait(job: JobContext) -> None:
        started.set()
        await asyncio.sleep(30)

    job = await source.call("abort_q", "m")
    async with make_worker({"abort_q": wait}):
        await started.wait()
        await source.abort_job(job.id)
        assert (await source.wait_for_job(job.id, timeout=10)).state == "canceled"
    (run,) = named(spans, "process abort_q")
    assert run.status.status_code is StatusCode.UNSET
    assert [e.name for e in run.events] == ["aborted"]
    assert run.attributes is not None
    assert run.attributes["aiomq.job.state"] == "canceled"


async def test_a_job_without_a_context_starts_a_new_trace(
    spans: InMemorySpanExporter, source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    queued = await source.call("plain", "m", trace={"from": "psycopg2_mq"})
    # As psycopg2_mq enqueues it: no aiomq_otel in the trace.
    await db.execute("UPDATE mq_job SET trace = $1 WHERE id = $2", '{"from": "psycopg2_mq"}', queued.id)
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("around the worker") as around:  # not the run's parent
        await make_worker({"plain": lambda job: None}).run_until_idle()
    (run,) = named(spans, "process plain")
    assert run.parent is None
    assert run.context is not None
    assert run.context.trace_id != around.get_span_context().trace_id


async def test_without_a_tracer_provider_rows_are_as_before(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    plain = await source.call("q", "m")
    policy = await source.call("q", "m", retry=2)
    await make_worker({"q": lambda job: None}).run_until_idle()
    assert (await fetch_job(db, plain.id))["trace"] is None
    assert set((await fetch_job(db, policy.id))["trace"]) == {"aiomq_retry"}


BLOCKED = """
    import asyncio, datetime, importlib.abc, sys

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("opentelemetry", "prometheus_client"):
                raise ImportError(f"{name} is blocked")
            return None

    sys.meta_path.insert(0, Blocker())

    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import create_async_engine
    import aiomq, aiomq.cli

    async def main():
        engine = create_async_engine(sys.argv[1])
        model = aiomq.make_default_model(sa.MetaData())
        source = aiomq.AsyncMQSource(engine=engine, model=model)
        job = await source.call("q", "m", retry=2)
        ran = []
        worker = aiomq.AsyncMQWorker(engine=engine, queues={"q": ran.append}, model=model)
        await worker.run_until_idle()
        info = await source.get_job(job.id)
        await engine.dispose()
        print(info.state, sorted(info.trace), len(ran))

    asyncio.run(main())
    try:
        import aiomq.metrics
    except ImportError as ex:
        print("aiomq.metrics:", ex)
    code = aiomq.cli.main(["worker", "x:Y", "--metrics-port", "0", "--database-url", sys.argv[1]])
    print("exit", code)
    optional = ("opentelemetry", "prometheus_client")
    print("imported:", sorted(m for m in sys.modules if m.split(".")[0] in optional))
"""


async def test_without_opentelemetry_and_prometheus_client(database: str, tmp_path: Any) -> None:
    script = tmp_path / "blocked.py"
    script.write_text(textwrap.dedent(BLOCKED))
    (tmp_path / "x.py").write_text("Y = {'q': print}\n")
    url = asyncpg_url(database)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(script), url],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "completed ['aiomq_retry'] 1"
    assert lines[1] == "aiomq.metrics: prometheus_client is blocked"
    assert lines[2:] == ["exit 2", "imported: []"]
    assert "--metrics-port needs prometheus-client: pip install 'aiomq[metrics]'" in proc.stderr
