"""A user's test of their own handler with aiomq's pytest fixtures: nothing to set up.

    pip install 'aiomq[testing]'
    cp examples/testing_handlers.py test_handlers.py && pytest test_handlers.py

With no ``AIOMQ_TEST_SERVER_URL``, the fixtures start an embedded PostgreSQL once per test session and give
each test a fresh database with the queue's tables.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from aiomq import AsyncMQSource, AsyncMQWorker
from aiomq.testing import RecordingHandler, drain, wait_for_completed


@pytest.mark.asyncio
async def test_welcome_mail_is_sent(
    aiomq_source: AsyncMQSource, aiomq_worker: Callable[..., AsyncMQWorker]
) -> None:
    handler = RecordingHandler(result=lambda job: f"sent to user {job.args['user']}")
    queued = await aiomq_source.call("mail", "welcome", {"user": 42})
    await drain(aiomq_worker({"mail": handler}))
    info = await wait_for_completed(aiomq_source, queued.id)
    assert info.result == "sent to user 42"
    assert handler.calls == [("welcome", {"user": 42})]
