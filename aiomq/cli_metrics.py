"""``aiomq worker --metrics-port N [--metrics-host ADDR]``: serve the worker's Prometheus metrics.

The endpoint (any path, as prometheus-client serves it) shows :class:`~aiomq.metrics.WorkerMetrics`, the
database gauges of :class:`~aiomq.metrics.QueueCollector` and the process's own (CPU, memory, file
descriptors, garbage collection), in a registry of the command's own. It needs ``aiomq[metrics]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncEngine

from .cli_args import tcp_port
from .errors import UsageError
from .hooks import JobHooks
from .model import Model

__all__ = ["add_options", "serving"]

log = logging.getLogger(__name__)


def add_options(parser: argparse.ArgumentParser) -> None:
    """The worker's metrics options."""
    parser.add_argument(
        "--metrics-port",
        type=tcp_port,
        default=os.environ.get("AIOMQ_METRICS_PORT") or None,
        metavar="PORT",
        help="serve Prometheus metrics on this port (needs aiomq[metrics]; env AIOMQ_METRICS_PORT)",
    )
    parser.add_argument(
        "--metrics-host",
        default=os.environ.get("AIOMQ_METRICS_HOST", "0.0.0.0"),
        metavar="ADDR",
        help="the address the metrics endpoint binds (default 0.0.0.0; env AIOMQ_METRICS_HOST)",
    )


@contextlib.asynccontextmanager
async def serving(
    args: argparse.Namespace, engine: AsyncEngine, model: Model
) -> AsyncIterator[list[JobHooks]]:
    """With ``--metrics-port``, the endpoint is served while in the block, and the worker's hooks are
    yielded; without it, nothing is served or imported and no hook is yielded."""
    if args.metrics_port is None:
        yield []
        return
    try:
        import prometheus_client

        from . import metrics
    except ImportError as ex:
        raise UsageError(
            f"--metrics-port needs prometheus-client: pip install 'aiomq[metrics]' ({ex})"
        ) from None
    registry = prometheus_client.CollectorRegistry()
    for collector in (prometheus_client.ProcessCollector, prometheus_client.PlatformCollector):
        collector(registry=registry)
    prometheus_client.GCCollector(registry=registry)
    worker_metrics = metrics.WorkerMetrics(registry)
    registry.register(metrics.QueueCollector(engine, model))
    try:
        server, _thread = prometheus_client.start_http_server(
            args.metrics_port, addr=args.metrics_host, registry=registry
        )
    except OSError as ex:
        raise UsageError(f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: {ex}") from None
    log.info("serving Prometheus metrics on http://%s:%d/metrics", args.metrics_host, server.server_port)
    try:
        yield [worker_metrics]
    finally:
        await asyncio.to_thread(server.shutdown)  # off the loop: a scrape in progress may wait on it
        server.server_close()
