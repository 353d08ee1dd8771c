"""An aiohttp service with an aiomq worker inside: enqueue in the request's transaction, or enqueue and await.

    python examples/aiohttp_app.py postgresql+asyncpg://user@host/db [port]

(or the URL in ``AIOMQ_DATABASE_URL``), or build the app with :func:`create_app` and run it with
``aiohttp.web.run_app``. Calling ``create_app`` touches no database: the engine, the tables (created if
missing) and the worker live in a cleanup context, started with the app and stopped with it.

- ``POST /orders`` ``{"item": "book", "quantity": 2}`` inserts an order and enqueues ``orders.confirm`` in
  the same transaction (one per request, opened by a middleware: committed before the response is sent,
  rolled back on any exception). ``"fail": true`` makes the handler raise after enqueueing: 400, and
  neither the order nor the job exists.
- ``POST /echo?timeout=5`` ``{"message": "hi"}`` enqueues (committed) and awaits the job's result; 504 (with
  the job's id) when it takes longer than ``timeout`` seconds, 502 when the job did not complete.
- ``GET /jobs/{id}`` reports a job's state and result; 404 for an unknown id.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa
from aiohttp import web
from aiohttp.typedefs import Handler
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext, make_default_model

__all__ = ["create_app", "metadata", "model", "orders"]

metadata = sa.MetaData()
model = make_default_model(metadata)

# The application's own table, on the same metadata as the queue's tables.
orders = sa.Table(
    "orders",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
    sa.Column("item", sa.Text, nullable=False),
    sa.Column("quantity", sa.Integer, nullable=False),
    sa.Column("status", sa.Text, nullable=False, server_default="new"),
    sa.Column("confirmed_by_job", sa.BigInteger),
)

MAX_ECHO_DELAY = 30.0

DATABASE_URL = web.AppKey("database_url", str)
ENGINE = web.AppKey("engine", AsyncEngine)
SESSIONS = web.AppKey("sessions", async_sessionmaker[AsyncSession])
CONCURRENCY = web.AppKey("concurrency", int)
SESSION = web.RequestKey("session", AsyncSession)


# ---------------------------------------------------------------- job handlers


class OrdersQueue:
    """Handler of the ``orders`` queue: ``confirm`` marks an order confirmed, in a transaction of its own."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def execute_job(self, job: JobContext) -> dict[str, Any]:
        if job.method != "confirm":
            raise ValueError(f"unknown method {job.method!r}")
        order_id = int(job.args["order_id"])
        async with self.engine.begin() as conn:
            confirmed = await conn.scalar(
                sa.update(orders)
                .where(orders.c.id == order_id, orders.c.status == "new")
                .values(status="confirmed", confirmed_by_job=job.id)
                .returning(orders.c.id)
            )
        return {"order_id": order_id, "confirmed": confirmed is not None}


async def echo(job: JobContext) -> dict[str, Any]:
    """Handler of the ``echo`` queue: answers after ``delay`` seconds, or fails when asked to."""
    delay = float(job.args.get("delay", 0))
    if delay > 0:
        await asyncio.sleep(min(delay, MAX_ECHO_DELAY))
    if job.args.get("error"):
        raise ValueError("the echo job was asked to fail")
    return {"echo": job.args["message"], "method": job.method}


# ---------------------------------------------------------------- app plumbing


async def mq_worker(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: engine, tables and worker for the app's lifetime."""
    engine = create_async_engine(app[DATABASE_URL])
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)  # the queue's tables and ours, if missing
        app[ENGINE] = engine
        app[SESSIONS] = async_sessionmaker(engine, expire_on_commit=False)
        queues = {"orders": OrdersQueue(engine), "echo": echo}
        # Returns once the worker listens; leaving waits for the jobs in flight.
        async with AsyncMQWorker(engine=engine, queues=queues, model=model, concurrency=app[CONCURRENCY]):
            yield
    finally:
        await engine.dispose()


@web.middleware
async def transaction(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One transaction per request: committed if the handler returns, rolled back if it raises.

    The session connects on first use, so handlers that do not touch it hold no connection. Note that
    aiohttp's HTTP exceptions are exceptions here: raising ``web.HTTPFound`` rolls back too.
    """
    async with request.app[SESSIONS]() as session, session.begin():
        request[SESSION] = session
        return await handler(request)


def error(status: type[web.HTTPError], detail: Any) -> web.HTTPError:
    return status(text=json.dumps({"detail": detail}), content_type="application/json")


async def json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise error(web.HTTPBadRequest, "the body must be JSON") from None
    if not isinstance(body, dict):
        raise error(web.HTTPBadRequest, "the body must be a JSON object")
    return body


def job_view(job: Any) -> dict[str, Any]:
    """A ``model.Job`` row (or ``JobInfo``) as JSON."""

    def iso(value: Any) -> str | None:
        return None if value is None else str(value.isoformat())

    return {
        "id": job.id,
        "queue": job.queue,
        "method": job.method,
        "args": job.args,
        "state": job.state,
        "result": job.result,
        "created_time": iso(job.created_time),
        "scheduled_time": iso(job.scheduled_time),
        "start_time": iso(job.start_time),
        "end_time": iso(job.end_time),
    }


routes = web.RouteTableDef()


@routes.post("/orders")
async def create_order(request: web.Request) -> web.Response:
    body = await json_object(request)
    item, quantity, fail = body.get("item"), body.get("quantity", 1), body.get("fail", False)
    if not isinstance(item, str) or not 1 <= len(item) <= 200:
        raise error(web.HTTPBadRequest, "item must be a string of 1 to 200 characters")
    if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
        raise error(web.HTTPBadRequest, "quantity must be a positive integer")
    session = request[SESSION]
    order_id = await session.scalar(
        sa.insert(orders).values(item=item, quantity=quantity).returning(orders.c.id)
    )
    assert order_id is not None
    # Enqueued in the request's transaction: the job exists if and only if the order does.
    source = AsyncMQSource(dbsession=session, model=model)
    job = await source.call("orders", "confirm", {"order_id": order_id})
    if fail:
        # Anything raised from here on rolls back the order and the job together.
        raise error(web.HTTPBadRequest, "order rejected")
    return web.json_response({"order_id": order_id, "job_id": job.id}, status=201)


@routes.post("/echo")
async def echo_and_wait(request: web.Request) -> web.Response:
    try:
        timeout = float(request.query.get("timeout", "10"))
    except ValueError:
        timeout = math.nan
    if not 0 < timeout <= 60:
        raise error(web.HTTPBadRequest, "timeout must be a number of seconds in (0, 60]")
    body = await json_object(request)
    message, delay, fail = body.get("message"), body.get("delay", 0), body.get("error", False)
    if not isinstance(message, str):
        raise error(web.HTTPBadRequest, "message must be a string")
    if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= MAX_ECHO_DELAY:
        raise error(web.HTTPBadRequest, f"delay must be a number of seconds in [0, {MAX_ECHO_DELAY}]")
    # An engine source commits before returning: a job must be committed before anyone can await it.
    source = AsyncMQSource(engine=request.app[ENGINE], model=model)
    job = await source.call("echo", "hello", {"message": message, "delay": delay, "error": bool(fail)})
    try:
        info = await source.wait_for_job(job.id, timeout=timeout)
    except TimeoutError:
        raise error(
            web.HTTPGatewayTimeout, {"job_id": job.id, "message": f"no result within {timeout} seconds"}
        ) from None
    if info.state != model.JobStates.COMPLETED:
        raise error(web.HTTPBadGateway, job_view(info))
    return web.json_response({"job_id": job.id, "state": info.state, "result": info.result})


@routes.get(r"/jobs/{job_id:\d+}")
async def get_job(request: web.Request) -> web.Response:
    job_id = int(request.match_info["job_id"])
    job = await AsyncMQSource(dbsession=request[SESSION], model=model).get_job(job_id, raises=False)
    if job is None:
        raise error(web.HTTPNotFound, f"no job {job_id}")
    return web.json_response(job_view(job))


def create_app(database_url: str, *, concurrency: int = 10) -> web.Application:
    """The app, on a ``postgresql+asyncpg://`` URL; nothing connects before the app starts."""
    app = web.Application(middlewares=[transaction])
    app[DATABASE_URL] = database_url
    app[CONCURRENCY] = concurrency
    app.cleanup_ctx.append(mq_worker)
    app.add_routes(routes)
    return app


if __name__ == "__main__":
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("AIOMQ_DATABASE_URL")
    if not url:
        sys.exit(f"usage: {sys.argv[0]} postgresql+asyncpg://user@host/db [port]  (or AIOMQ_DATABASE_URL)")
    web.run_app(create_app(url), port=int(sys.argv[2]) if len(sys.argv) > 2 else 8080)
