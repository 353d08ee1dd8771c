"""OpenTelemetry tracing (DESIGN §8; ``pip install aiomq[otel]``, which is opentelemetry-api alone).

On whenever ``opentelemetry`` (the API) is importable, and a no-op until the application installs a tracer
provider, as OpenTelemetry asks of libraries: aiomq never configures a provider or an exporter, and needs
no call to switch it on. Without the API nothing of it is imported, and every hook here is one test of a
cached ``None``.

- **Producer.** ``call`` (each ``call_many`` item, ``call_schedule`` and listeners too) and ``retry_job``
  start and end a PRODUCER span, ``call <queue>`` (``retry_job <queue>``), a child of the caller's
  current span, and store its context in the job's trace under ``aiomq_otel``: a W3C Trace Context
  carrier, ``{"traceparent": ..., "tracestate": ...}``. The span covers building the job, not its INSERT
  (the job id comes from the database later, so it carries no ``messaging.message.id``). The carrier is
  always W3C, whatever global propagator the application chose, because producer and consumer may be
  different processes with different settings, and the row outlives both. When there is nothing to
  propagate (no provider and no current span), no span is made and the trace is left as it was: rows
  look as in 0.1. A trace
  that is not a dict (psycopg2_mq allows any JSON) is left alone. ``retry_job`` copies the original's
  trace: the new span is the caller's child, with a span link to the original job's producer span.
- **Consumer.** The worker runs each job inside a CONSUMER span, ``process <queue>``, whose parent is the
  context in the job's ``aiomq_otel`` (a job without one, such as one enqueued by psycopg2_mq, starts a new
  trace; with no provider either, no span is made). It is the current span while the handler and the
  worker's middleware run (in the handler's thread too, for a sync handler), so the handler's own spans are
  its children. Attributes: OpenTelemetry's messaging conventions (``messaging.system`` = ``"aiomq"``,
  ``messaging.operation.type`` = ``"process"``, ``messaging.destination.name`` = the queue,
  ``messaging.message.id`` = the job id) and aiomq's own (``aiomq.method``, ``aiomq.attempt``, and at the
  end ``aiomq.job.state``). An exception the handler raised is recorded on the span with an error status; so
  is a timeout; an aborted job ends with an ``aborted`` event and no error.
- **Retries.** An automatic retry (DESIGN §7.1) copies its job's trace, ``aiomq_otel`` included, so every
  attempt's CONSUMER span is a child of the same producer span: one trace from ``call`` to the last run.

``messaging.system`` is ``"aiomq"``, not ``"postgresql"``: the attribute names the messaging protocol whose
semantics the spans describe (queues, jobs, attempts), as ``"rabbitmq"`` or ``"kafka"`` do; PostgreSQL is
only where the rows live, and calling it the system would merge aiomq's spans with those of every other
queue built on PostgreSQL. The database calls themselves are the database instrumentation's to trace.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from .execution import Outcome
from .hooks import JobHooks
from .model import JobStates
from .records import JobContext

__all__ = ["OTEL_KEY", "SYSTEM", "producer_trace", "worker_hooks"]

log = logging.getLogger(__name__)

#: The trace key of the producer span's context (a W3C Trace Context carrier).
OTEL_KEY = "aiomq_otel"
#: ``messaging.system`` of aiomq's spans.
SYSTEM = "aiomq"
_SCOPE = "aiomq"


class _Api:
    """The OpenTelemetry API, imported once, and the tracer of the current provider."""

    def __init__(self) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.context = context
        self.trace = trace
        self.propagator = TraceContextTextMapPropagator()
        self._provider: Any = None
        self._tracer: Any = None

    def idle(self) -> bool:
        """No tracer provider is installed and no span is current: every span would be a no-op with
        nothing to propagate, so none is made (the cost of having the API installed and unused)."""
        return (
            isinstance(self.trace.get_tracer_provider(), self.trace.ProxyTracerProvider)
            and not self.trace.get_current_span().get_span_context().is_valid
        )

    @property
    def tracer(self) -> Any:
        # The provider may be installed (or, in tests, replaced) after aiomq first traced: follow it.
        provider = self.trace.get_tracer_provider()
        if provider is not self._provider:
            self._provider, self._tracer = provider, provider.get_tracer(_SCOPE)
        return self._tracer

    def link_to(self, carrier: Any) -> list[Any]:
        """A span link to the context in ``carrier`` (an earlier ``aiomq_otel``), if it holds a valid one."""
        if not isinstance(carrier, dict):
            return []
        span_context = self.trace.get_current_span(self.propagator.extract(carrier)).get_span_context()
        return [self.trace.Link(span_context)] if span_context.is_valid else []


@functools.cache
def _api() -> _Api | None:
    try:
        return _Api()
    except ImportError:
        return None


def producer_trace(trace: Any, queue: str, method: str, operation: str = "call") -> Any:
    """``trace`` with the context of a PRODUCER span for the new job under ``aiomq_otel`` (a copy), or
    ``trace`` itself when OpenTelemetry is absent, there is nothing to propagate, or it is not a dict."""
    api = _api()
    if api is None or (trace is not None and not isinstance(trace, dict)) or api.idle():
        return trace
    previous = trace.get(OTEL_KEY) if trace else None
    span = api.tracer.start_span(
        f"{operation} {queue}",
        kind=api.trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": SYSTEM,
            "messaging.operation.type": "create",
            "messaging.operation.name": operation,
            "messaging.destination.name": queue,
            "aiomq.method": method,
        },
        links=api.link_to(previous) if previous is not None else None,
    )
    carrier: dict[str, str] = {}
    api.propagator.inject(carrier, context=api.trace.set_span_in_context(span))
    span.end()
    if not carrier:
        return trace
    return {**(trace or {}), OTEL_KEY: carrier}


def worker_hooks(states: type[JobStates]) -> list[JobHooks]:
    """The worker's tracing hooks: none without the OpenTelemetry API."""
    api = _api()
    return [] if api is None else [_Consumer(api, states)]


class _Consumer(JobHooks):
    """A CONSUMER span per run: opened by the middleware (so it is current in the handler), ended when
    the outcome is known."""

    def __init__(self, api: _Api, states: type[JobStates]) -> None:
        self._api = api
        self._states = states
        self._spans: dict[int, tuple[Any, bool]] = {}  # job id -> (span, error recorded)
        self.middleware = self._run

    async def _run(self, job: JobContext, call_next: Callable[[], Awaitable[Any]]) -> Any:
        api = self._api
        carrier = job.trace.get(OTEL_KEY) if isinstance(job.trace, dict) else None
        if carrier is None and api.idle():
            return await call_next()
        parent = api.propagator.extract(carrier) if isinstance(carrier, dict) else None
        span = api.tracer.start_span(
            f"process {job.queue}",
            context=parent if parent is not None else api.context.Context(),  # never the worker's own
            kind=api.trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "process",
                "messaging.destination.name": job.queue,
                "messaging.message.id": str(job.id),
                "aiomq.method": job.method,
                "aiomq.attempt": job.attempt,
            },
        )
        self._spans[job.id] = (span, False)
        token = api.context.attach(api.trace.set_span_in_context(span))
        try:
            return await call_next()
        except Exception as ex:
            span.record_exception(ex)
            span.set_status(api.trace.Status(api.trace.StatusCode.ERROR, f"{type(ex).__name__}: {ex}"))
            self._spans[job.id] = (span, True)
            raise
        finally:
            api.context.detach(token)

    def finished(self, job: JobContext, outcome: Outcome | None) -> None:
        span, errored = self._spans.pop(job.id, (None, False))
        if span is None:
            return
        trace = self._api.trace
        if outcome is None:
            span.add_event("cancelled at the worker's stop")
            span.set_status(trace.Status(trace.StatusCode.ERROR, "cancelled at the worker's stop"))
        else:
            span.set_attribute("aiomq.job.state", outcome.state)
            if outcome.timed_out:
                message = _message(outcome.result) or "the job exceeded its timeout"
                span.record_exception(TimeoutError(message))
                span.set_status(trace.Status(trace.StatusCode.ERROR, message))
            elif outcome.state == self._states.CANCELED:
                span.add_event("aborted")
            elif outcome.state == self._states.FAILED and not errored:
                span.set_status(trace.Status(trace.StatusCode.ERROR, _message(outcome.result) or "failed"))
        span.end()


def _message(result: Any) -> str | None:
    message = result.get("message") if isinstance(result, dict) else None
    return message if isinstance(message, str) else None
