"""Every example runs, top to bottom, on a real database."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from aiomq import AsyncMQSource, AsyncMQWorker
from aiomq.testing import RecordingHandler, drain
from examples import cursor_throttle, echo, recurring

from .conftest import asyncpg_url


async def test_echo_example(database: str) -> None:
    assert await echo.main(asyncpg_url(database)) == 'hello, Andy from method="hello"'


async def test_cursor_throttle_example(database: str) -> None:
    cursor = await cursor_throttle.main(asyncpg_url(database))
    # two windows of five calls each: two jobs, ten changes seen, state kept between them
    assert cursor == {"runs": 2, "seen": 10}


def test_echo_example_as_a_script(database: str) -> None:
    proc = subprocess.run(
        [sys.executable, "examples/echo.py", asyncpg_url(database)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert 'completed: hello, Andy from method="hello"' in proc.stdout


async def test_recurring_example(database: str) -> None:
    outcome = await recurring.main(asyncpg_url(database), seconds=2.5)
    runs = outcome["cursor"]["runs"]
    assert runs >= 2  # a firing per second, serialised on the cursor
    assert len(outcome["notified"]) == runs  # one listener job per completed run


async def test_sync_enqueue_example_feeds_an_aiomq_worker(database: str, source: AsyncMQSource) -> None:
    from examples import sync_enqueue

    job_id = await asyncio.to_thread(sync_enqueue.main, database)
    again = await asyncio.to_thread(sync_enqueue.main, database)  # joins the pending job on the cursor
    assert again == job_id
    handler = RecordingHandler(result="sent")
    await drain(AsyncMQWorker(engine=source.engine, queues={"mail": handler}, model=source.model))  # type: ignore[arg-type]
    assert handler.calls == [("welcome", {"user": 42})]
    assert (await source.wait_for_job(job_id, timeout=5)).result == "sent"
