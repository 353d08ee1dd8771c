"""The web-path benchmark's server: ``examples/fastapi_app.py`` under uvicorn, plus the same database work
written by hand, for scenario 14 (``benchmarks.web_path``).

    python -m benchmarks.web_server URL PORT

Routes added beside the example's ``POST /orders`` (order + job in the request's transaction) and
``POST /echo`` (enqueue, commit, await the result):

- ``POST /bench/plain``: no database at all (the floor of the HTTP stack).
- ``POST /bench/orders``: what ``/orders`` does with the job's INSERT and NOTIFY written by hand in SQL on
  the request's session: the same rows, the same transaction.
- ``POST /bench/enqueue``: ``/echo``'s enqueue by hand (INSERT and NOTIFY in a transaction of their own),
  without the await: ``/echo`` should cost this plus the worker's wake-up and finish.
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import Any

import sqlalchemy as sa
import uvicorn
from fastapi import APIRouter, FastAPI

from examples.fastapi_app import DbSession, EchoIn, OrderIn, ServicesDep, create_app, orders

__all__ = ["bench_app"]

_EPOCH = datetime.datetime(1970, 1, 1)

# What AsyncMQSource.call writes for a job with no cursor, retry or priority: the row and its NOTIFY.
_INSERT_JOB = sa.text(
    "INSERT INTO mq_job (state, created_time, scheduled_time, queue, method, args, trace)"
    " VALUES ('pending', :now, :now, :queue, :method, CAST(:args AS jsonb), NULL) RETURNING id"
)
_NOTIFY = sa.text("SELECT pg_notify(:channel, :payload)")


async def _enqueue_by_hand(session: Any, queue: str, method: str, args: Any) -> int:
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    job_id: int = (
        await session.execute(
            _INSERT_JOB, {"now": now, "queue": queue, "method": method, "args": json.dumps(args)}
        )
    ).scalar_one()
    payload = json.dumps({"j": job_id, "t": int((now - _EPOCH).total_seconds())})
    await session.execute(_NOTIFY, {"channel": f"mq_{queue}", "payload": payload})
    return job_id


router = APIRouter(prefix="/bench")


@router.post("/plain")
async def plain(order: OrderIn) -> dict[str, Any]:
    return {"item": order.item}


@router.post("/orders", status_code=201)
async def orders_by_hand(order: OrderIn, session: DbSession) -> dict[str, Any]:
    order_id = await session.scalar(
        sa.insert(orders).values(item=order.item, quantity=order.quantity).returning(orders.c.id)
    )
    job_id = await _enqueue_by_hand(session, "orders", "confirm", {"order_id": order_id})
    return {"order_id": order_id, "job_id": job_id}


@router.post("/enqueue")
async def enqueue_by_hand(body: EchoIn, services: ServicesDep) -> dict[str, Any]:
    async with services.sessions() as session, session.begin():
        job_id = await _enqueue_by_hand(session, "echo", "hello", body.model_dump())
    return {"job_id": job_id}


def bench_app(url: str) -> FastAPI:
    app = create_app(url)
    app.include_router(router)
    return app


if __name__ == "__main__":
    url, port = sys.argv[1], int(sys.argv[2])
    uvicorn.run(bench_app(url), host="127.0.0.1", port=port, log_level="warning", access_log=False)
