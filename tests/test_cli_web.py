"""``aiomq web``: the dashboard served by the command, as a subprocess, against the test database."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator

import httpx
import pytest

from aiomq import AsyncMQSource
from aiomq.cli import build_parser
from aiomq.cli_web import basic_auth_from_env
from aiomq.errors import UsageError

from .test_cli import cli, cli_env, one_line_error


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def running(*args: str, **env: str) -> AsyncIterator[str]:
    """``aiomq web ARGS`` on a free port until the block ends (SIGTERM); yields its URL."""
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiomq", "web", "--port", str(port), *args, env=cli_env(**env)
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                assert proc.returncode is None, "aiomq web exited"
                with contextlib.suppress(httpx.TransportError):
                    await client.get(url + "/static/style.css")
                    break
                await asyncio.sleep(0.05)
        yield url
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught (so the exit says why).
        assert await asyncio.wait_for(proc.wait(), 20) in (0, -signal.SIGTERM)


def test_defaults_bind_localhost() -> None:
    args = build_parser().parse_args(["web"])
    assert (args.host, args.port, args.read_only) == ("127.0.0.1", 8080, False)
    with pytest.raises(UsageError, match="expected a TCP port"):
        build_parser().parse_args(["web", "--port", "70000"])


def test_basic_auth_needs_both_variables() -> None:
    assert basic_auth_from_env({}) is None
    assert basic_auth_from_env({"AIOMQ_WEB_USER": "u", "AIOMQ_WEB_PASSWORD": "p"}) == ("u", "p")
    with pytest.raises(UsageError, match="set both"):
        basic_auth_from_env({"AIOMQ_WEB_USER": "u"})


async def test_serves_the_database_queues(database: str, source: AsyncMQSource) -> None:
    await source.call("served_queue", "m", {})
    async with running("--database-url", database) as url, httpx.AsyncClient() as client:
        page = await client.get(url + "/")
        assert page.status_code == 200
        assert "served_queue" in page.text
        assert ">Pause</button>" in page.text


async def test_read_only_and_auth_from_the_environment(database: str, source: AsyncMQSource) -> None:
    job = await source.call("q", "m", {})
    async with (
        running(
            "--database-url", database, "--read-only", AIOMQ_WEB_USER="ops", AIOMQ_WEB_PASSWORD="pw"
        ) as url,
        httpx.AsyncClient() as client,
    ):
        assert (await client.get(url + "/")).status_code == 401
        page = await client.get(f"{url}/jobs/{job.id}", auth=("ops", "pw"))
        assert page.status_code == 200
        assert "read-only" in page.text
        assert '<form method="post"' not in page.text


async def test_half_configured_auth_is_an_error(database: str) -> None:
    proc = await cli("web", "--database-url", database, env=cli_env(AIOMQ_WEB_PASSWORD="pw"))
    one_line_error(proc, 2, "AIOMQ_WEB_USER")


async def test_shows_the_demos_queues_and_jobs(database: str) -> None:
    demo = await cli("demo", "--database-url", database, "--jobs", "20", "--no-progress", timeout=120)
    assert demo.returncode == 0, demo.stderr
    queues = sorted(set(re.findall(r"aiomq_demo_[0-9a-f]+_\w+", demo.stdout)))
    assert queues
    async with running("--database-url", database) as url, httpx.AsyncClient() as client:
        overview = (await client.get(url + "/")).text
        for queue in queues:
            assert f'data-queue="{queue}"' in overview
        jobs = await client.get(url + "/jobs", params={"queue": queues[0], "state": "completed"})
        assert "data-job=" in jobs.text
