"""The FastAPI and aiohttp examples, served in-process against the real test database.

Every test runs once per app: FastAPI through httpx's ASGI transport (with the app's lifespan entered by
hand, since the transport does not run it), aiohttp through its TestServer and TestClient.
"""

from __future__ import annotations

import contextlib
import datetime
import json
from collections.abc import AsyncIterator
from typing import Any, Protocol

import httpx
import pytest
from aiohttp import test_utils

from aiomq import AsyncMQSource
from examples import aiohttp_app, fastapi_app

from .conftest import asyncpg_url


class Api(Protocol):
    async def request(
        self, method: str, url: str, *, json: Any = None, params: dict[str, str] | None = None
    ) -> tuple[int, Any]: ...


class HttpxApi:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def request(
        self, method: str, url: str, *, json: Any = None, params: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        response = await self.client.request(method, url, json=json, params=params)
        return response.status_code, response.json()


class AiohttpApi:
    def __init__(self, client: test_utils.TestClient[Any, Any]) -> None:
        self.client = client

    async def request(
        self, method: str, url: str, *, json: Any = None, params: dict[str, str] | None = None
    ) -> tuple[int, Any]:
        async with self.client.request(method, url, json=json, params=params) as response:
            return response.status, await response.json()


@contextlib.asynccontextmanager
async def serve_fastapi(url: str) -> AsyncIterator[Api]:
    app = fastapi_app.create_app(url)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        yield HttpxApi(client)


@contextlib.asynccontextmanager
async def serve_aiohttp(url: str) -> AsyncIterator[Api]:
    app = aiohttp_app.create_app(url)
    async with test_utils.TestClient(test_utils.TestServer(app)) as client:
        yield AiohttpApi(client)


@pytest.fixture(params=["fastapi", "aiohttp"])
async def api(request: pytest.FixtureRequest, database: str) -> AsyncIterator[Api]:
    serve = serve_fastapi if request.param == "fastapi" else serve_aiohttp
    async with serve(asyncpg_url(database)) as client:
        yield client


async def test_order_and_its_job_commit_with_the_request(api: Api, db: Any, source: AsyncMQSource) -> None:
    status, body = await api.request("POST", "/orders", json={"item": "book", "quantity": 2})
    assert status == 201, body
    order_id, job_id = body["order_id"], body["job_id"]
    # Committed before the response was sent: both rows are there.
    job = await db.fetchrow("SELECT queue, method, args FROM mq_job WHERE id = $1", job_id)
    assert (job["queue"], job["method"]) == ("orders", "confirm")
    assert await db.fetchval("SELECT count(*) FROM orders WHERE id = $1", order_id) == 1

    info = await source.wait_for_job(job_id, timeout=10)
    assert info.state == "completed"
    assert info.result == {"order_id": order_id, "confirmed": True}
    order = await db.fetchrow(
        "SELECT item, quantity, status, confirmed_by_job FROM orders WHERE id = $1", order_id
    )
    assert dict(order) == {"item": "book", "quantity": 2, "status": "confirmed", "confirmed_by_job": job_id}

    status, body = await api.request("GET", f"/jobs/{job_id}")
    assert status == 200
    assert body["state"] == "completed"
    assert body["result"] == {"order_id": order_id, "confirmed": True}
    assert body["args"] == {"order_id": order_id}


async def test_a_failing_request_leaves_no_job_and_no_order(api: Api, db: Any) -> None:
    status, body = await api.request("POST", "/orders", json={"item": "book", "fail": True})
    assert status == 400, body
    assert await db.fetchval("SELECT count(*) FROM mq_job") == 0
    assert await db.fetchval("SELECT count(*) FROM orders") == 0
    # The next request gets a clean transaction.
    status, body = await api.request("POST", "/orders", json={"item": "pen"})
    assert status == 201, body
    assert await db.fetchval("SELECT count(*) FROM mq_job") == 1
    assert await db.fetchval("SELECT item FROM orders") == "pen"


async def test_echo_awaits_the_result(api: Api) -> None:
    status, body = await api.request("POST", "/echo", json={"message": "hi"}, params={"timeout": "10"})
    assert status == 200, body
    assert body["state"] == "completed"
    assert body["result"] == {"echo": "hi", "method": "hello"}


async def test_echo_reports_a_failed_job(api: Api) -> None:
    status, body = await api.request("POST", "/echo", json={"message": "hi", "error": True})
    assert status == 502, body
    assert body["detail"]["state"] == "failed"
    assert body["detail"]["result"]["exc"] == "ValueError"


async def test_echo_times_out_with_504_and_the_job_finishes_later(api: Api, source: AsyncMQSource) -> None:
    status, body = await api.request(
        "POST", "/echo", json={"message": "slow", "delay": 0.5}, params={"timeout": "0.05"}
    )
    assert status == 504, body
    job_id = body["detail"]["job_id"]
    status, body = await api.request("GET", f"/jobs/{job_id}")
    assert status == 200
    assert body["state"] in ("pending", "running")
    assert body["result"] is None

    await source.wait_for_job(job_id, timeout=10)
    status, body = await api.request("GET", f"/jobs/{job_id}")
    assert (status, body["state"]) == (200, "completed")
    assert body["result"] == {"echo": "slow", "method": "hello"}


async def test_job_state_endpoint(api: Api, source: AsyncMQSource) -> None:
    later = await source.call("echo", "hello", {"message": "later"}, when=datetime.timedelta(hours=1))
    status, body = await api.request("GET", f"/jobs/{later.id}")
    assert status == 200
    assert body["id"] == later.id
    assert {k: body[k] for k in ("queue", "method", "state", "result", "start_time")} == {
        "queue": "echo",
        "method": "hello",
        "state": "pending",
        "result": None,
        "start_time": None,
    }

    status, _ = await api.request("GET", f"/jobs/{later.id + 1000}")
    assert status == 404


async def test_fastapi_commits_before_the_response_is_sent(database: str, db: Any) -> None:
    """The request's transaction ends before ``http.response.start``: a client never sees a 201 too early."""
    app = fastapi_app.create_app(asyncpg_url(database))
    body = json.dumps({"item": "book"}).encode()
    received = False
    seen: list[tuple[int, int, int]] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received:
            return {"type": "http.disconnect"}
        received = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start":
            jobs = await db.fetchval("SELECT count(*) FROM mq_job")
            rows = await db.fetchval("SELECT count(*) FROM orders")
            seen.append((message["status"], jobs, rows))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/orders",
        "raw_path": b"/orders",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 12345),
        "server": ("test", 80),
    }
    async with app.router.lifespan_context(app):
        await app(scope, receive, send)
    assert seen == [(201, 1, 1)]


async def test_fastapi_app_mounts_the_dashboard(database: str, source: AsyncMQSource) -> None:
    app = fastapi_app.create_app(asyncpg_url(database))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client,
    ):
        created = await client.post("/orders", json={"item": "book"})
        job_id = created.json()["job_id"]
        await source.wait_for_job(job_id, timeout=20)
        overview = await client.get("/dashboard/")
        assert overview.status_code == 200
        assert 'href="/dashboard/jobs?queue=orders"' in overview.text
        job = await client.get(f"/dashboard/jobs/{job_id}")
        assert job.status_code == 200
        assert "completed" in job.text
