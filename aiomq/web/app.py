"""``create_app``: the dashboard as an ASGI (Starlette) app, to serve with ``aiomq web`` or to mount in a
FastAPI or Starlette service.

Server-rendered pages (Jinja2) refreshed by htmx, vendored as ``static/htmx.min.js`` (no build step):
version :data:`HTMX_VERSION` from the npm registry's ``htmx.org`` package, its ``dist/htmx.min.js``
unchanged (sha256 :data:`HTMX_SHA256`; ``tests/test_web.py`` checks it). A page's live region re-fetches
itself when the server-sent event stream at ``/events`` says something changed (:mod:`.live`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
from collections.abc import AsyncIterator, Awaitable, Callable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from ..dsn import libpq_dsn, reason
from ..model import Model
from ..source import AsyncMQSource
from .actions import action_routes
from .live import LiveUpdates
from .pages import BadRequest, page_routes
from .queries import DEFAULT_TIMEOUT, Reader
from .render import Dashboard
from .security import BasicAuth, SecurityHeaders

__all__ = ["DEFAULT_LOCK_KEY", "HTMX_SHA256", "HTMX_VERSION", "create_app"]

log = logging.getLogger(__name__)

HTMX_VERSION = "2.0.11"
HTMX_SHA256 = "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717"
STATIC = pathlib.Path(__file__).parent / "static"
#: AsyncMQWorker's default ``lock_key``: the advisory lock class whose holders are live workers.
DEFAULT_LOCK_KEY = 1250360252
#: Seconds between comments on an idle event stream, so proxies keep it open.
KEEPALIVE = 15.0


def create_app(
    engine: AsyncEngine,
    model: Model,
    *,
    read_only: bool = False,
    auth: tuple[str, str] | None = None,
    lock_key: int = DEFAULT_LOCK_KEY,
    statement_timeout: float = DEFAULT_TIMEOUT,
    page_size: int = 50,
    live_interval: float | None = 1.0,
    title: str = "aiomq",
) -> Starlette:
    """The dashboard on ``engine`` (an asyncpg engine) and ``model``.

    ``read_only`` hides every action and refuses action POSTs; ``auth`` is a ``(user, password)`` for
    HTTP basic auth; ``lock_key`` is the workers' (``AsyncMQWorker(lock_key=...)``); each query runs for at
    most ``statement_timeout`` seconds; lists show ``page_size`` rows; pages refresh on the database's
    NOTIFYs at most once per ``live_interval`` seconds (None: no live updates). Mount it anywhere::

        app.mount("/mq", aiomq.web.create_app(engine, model))
    """
    if not 1 <= page_size <= 1000:
        raise ValueError(f"page_size must be from 1 to 1000, got {page_size!r}")
    reader = Reader(engine, model, lock_key=lock_key, timeout=statement_timeout)

    live = None
    if live_interval is not None:
        dsn = libpq_dsn(engine.url)
        live = LiveUpdates(dsn, model.channel_prefix, reader.queue_names, interval=live_interval)
    dashboard = Dashboard(
        reader=reader,
        source=AsyncMQSource(engine=engine, model=model),
        live=live,
        read_only=read_only,
        page_size=page_size,
        title=title,
    )
    routes: list[BaseRoute] = [
        *page_routes(dashboard),
        *action_routes(dashboard),
        Route("/events", _events(live), name="events"),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    metrics = metrics_route(engine, model)
    if metrics is not None:
        routes.append(metrics)

    async def bad_request(request: Request, exc: Exception) -> Response:
        return dashboard.error(request, 400, str(exc))

    async def database_error(request: Request, exc: Exception) -> Response:
        # A query past its statement_timeout, a lost connection: say so on a page rather than a bare 500.
        log.warning("dashboard: %s %s failed: %s", request.method, request.url.path, reason(exc))
        return dashboard.error(request, 503, f"the database did not answer: {reason(exc)}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if live is not None:
            await live.close()

    handlers = {BadRequest: bad_request, sa.exc.DBAPIError: database_error, OSError: database_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.add_middleware(SecurityHeaders, auth=None if auth is None else BasicAuth(*auth))
    app.state.dashboard = dashboard
    return app


def _events(live: LiveUpdates | None) -> Callable[[Request], Awaitable[Response]]:
    """``/events``: a server-sent event stream; ``refresh`` whenever the database says something changed
    (debounced by :class:`~.live.LiveUpdates`). 204 (no live updates) tells EventSource not to retry."""

    async def events(request: Request) -> Response:
        if live is None:
            return Response(status_code=204)

        async def stream() -> AsyncIterator[str]:
            async with live.subscribe() as changed:
                yield "retry: 2000\n\n"
                while True:
                    try:
                        await asyncio.wait_for(changed.wait(), KEEPALIVE)
                    except TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    changed.clear()
                    yield "event: refresh\ndata: {}\n\n"

        headers = {"cache-control": "no-store", "x-accel-buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    return events


def metrics_route(engine: AsyncEngine, model: Model) -> Route | None:
    """``/metrics`` in Prometheus' text format, when ``aiomq[metrics]`` is installed (None otherwise): the
    database gauges of :func:`aiomq.metrics.exposition` (queue statistics, lost jobs, paused queues), read
    at each scrape, then prometheus_client's default registry (the process's own metrics and whatever
    the service registered there)."""
    try:
        from .. import metrics as aiomq_metrics
    except ImportError:
        return None
    import prometheus_client

    async def metrics(request: Request) -> Response:
        registry = prometheus_client.REGISTRY
        body, content_type = await aiomq_metrics.exposition(engine, model, registry=registry)
        return Response(body, media_type=content_type)

    return Route("/metrics", metrics, name="metrics")
