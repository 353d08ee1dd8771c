"""A FastAPI service with an aiomq worker inside: enqueue in the request's transaction, or enqueue and await.

Build the app with :func:`create_app` and serve it with any ASGI server::

    from examples.fastapi_app import create_app

    app = create_app("postgresql+asyncpg://user@host/db")   # e.g. uvicorn.run(app)

Importing this module and calling ``create_app`` touch no database: the engine is made but connects only
when used; the tables (created if missing) and the worker live in the app's lifespan.

- ``POST /orders`` ``{"item": "book", "quantity": 2}`` inserts an order and enqueues ``orders.confirm`` in
  the same transaction (one per request: committed before the response is sent, rolled back on any error).
  ``"fail": true`` makes the handler raise after enqueueing: 400, and neither the order nor the job exists.
- ``POST /echo?timeout=5`` ``{"message": "hi"}`` enqueues (committed) and awaits the job's result; 504 (with
  the job's id) when it takes longer than ``timeout`` seconds, 502 when the job did not complete.
- ``GET /jobs/{id}`` reports a job's state and result; 404 for an unknown id.
- ``/dashboard/`` is aiomq's dashboard (``aiomq.web``, ``pip install aiomq[web]``) mounted in the app: the
  queues, jobs and actions of this service's database. Protect it as the rest of your admin pages (it
  also takes ``read_only=True`` and ``auth=(user, password)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext, make_default_model
from aiomq.web import create_app as create_dashboard

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


# ---------------------------------------------------------------- request plumbing


@dataclasses.dataclass(frozen=True)
class Services:
    """What the lifespan sets up, on ``app.state.services``."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def request_session(
    services: Annotated[Services, Depends(get_services)],
) -> AsyncIterator[AsyncSession]:
    """One transaction per request: committed if the handler returns, rolled back if it raises."""
    async with services.sessions() as session, session.begin():
        yield session


# scope="function": the transaction ends (commits) before the response is sent, so a client that got
# its 201 can see the order and the job, and a failed commit is a 500 rather than a lost write.
DbSession = Annotated[AsyncSession, Depends(request_session, scope="function")]
ServicesDep = Annotated[Services, Depends(get_services)]


class OrderIn(BaseModel):
    item: str = Field(min_length=1, max_length=200)
    quantity: int = Field(default=1, ge=1)
    fail: bool = False


class EchoIn(BaseModel):
    message: str
    delay: float = Field(default=0, ge=0, le=MAX_ECHO_DELAY)
    error: bool = False


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


router = APIRouter()


@router.post("/orders", status_code=201)
async def create_order(order: OrderIn, session: DbSession) -> dict[str, Any]:
    order_id = await session.scalar(
        sa.insert(orders).values(item=order.item, quantity=order.quantity).returning(orders.c.id)
    )
    assert order_id is not None
    # Enqueued in the request's transaction: the job exists if and only if the order does.
    source = AsyncMQSource(dbsession=session, model=model)
    job = await source.call("orders", "confirm", {"order_id": order_id})
    if order.fail:
        # Anything raised from here on rolls back the order and the job together.
        raise HTTPException(status_code=400, detail="order rejected")
    return {"order_id": order_id, "job_id": job.id}


@router.post("/echo")
async def echo_and_wait(
    body: EchoIn,
    services: ServicesDep,
    timeout: Annotated[float, Query(gt=0, le=60)] = 10.0,
) -> dict[str, Any]:
    # An engine source commits before returning: a job must be committed before anyone can await it.
    source = AsyncMQSource(engine=services.engine, model=model)
    job = await source.call("echo", "hello", body.model_dump())
    try:
        info = await source.wait_for_job(job.id, timeout=timeout)
    except TimeoutError:
        raise HTTPException(
            status_code=504, detail={"job_id": job.id, "message": f"no result within {timeout} seconds"}
        ) from None
    if info.state != model.JobStates.COMPLETED:
        raise HTTPException(status_code=502, detail=job_view(info))
    return {"job_id": job.id, "state": info.state, "result": info.result}


@router.get("/jobs/{job_id}")
async def get_job(job_id: int, session: DbSession) -> dict[str, Any]:
    job = await AsyncMQSource(dbsession=session, model=model).get_job(job_id, raises=False)
    if job is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id}")
    return job_view(job)


def create_app(database_url: str, *, concurrency: int = 10) -> FastAPI:
    """The app, on a ``postgresql+asyncpg://`` URL; nothing connects before the lifespan starts."""
    engine = create_async_engine(database_url)  # connects on first use only

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with engine.begin() as conn:
                await conn.run_sync(metadata.create_all)  # the queue's tables and ours, if missing
            app.state.services = Services(engine, async_sessionmaker(engine, expire_on_commit=False))
            queues = {"orders": OrdersQueue(engine), "echo": echo}
            # Returns once the worker listens; leaving waits for the jobs in flight.
            async with AsyncMQWorker(engine=engine, queues=queues, model=model, concurrency=concurrency):
                yield
        finally:
            await engine.dispose()

    app = FastAPI(title="aiomq FastAPI example", lifespan=lifespan)
    app.include_router(router)
    app.mount("/dashboard", create_dashboard(engine, model))
    return app
