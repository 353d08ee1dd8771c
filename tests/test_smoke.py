from __future__ import annotations

from typing import Any

from aiomq import AsyncMQSource, JobContext


async def test_echo_job_completes(source: AsyncMQSource, make_worker: Any) -> None:
    async def echo(job: JobContext) -> str:
        return f"hello, {job.args['name']} from method={job.method!r}"

    async with make_worker({"echo": echo}):
        queued = await source.call("echo", "hello", {"name": "Andy"})
        info = await source.wait_for_job(queued.id, timeout=10)
    assert info.state == "completed"
    assert info.result == "hello, Andy from method='hello'"
