"""Fault injection at the worker's own connection, for tests that must order events exactly."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiomq import AsyncMQWorker

__all__ = ["hook_listener_statements"]


def hook_listener_statements(
    worker: AsyncMQWorker,
    *,
    before: Callable[[str], Awaitable[None]] | None = None,
    after: Callable[[str], Awaitable[None]] | None = None,
) -> None:
    """Fault injection: await ``before(sql)`` / ``after(sql)`` around each statement the worker runs on
    its listener connection (the claim, the next-due query); the statement itself runs for real."""
    real = worker._listener_fetch

    async def fetch(statement: Any, params: Any) -> list[Any]:
        if before is not None:
            await before(statement.sql)
        rows = await real(statement, params)
        if after is not None:
            await after(statement.sql)
        return rows

    worker._listener_fetch = fetch  # type: ignore[method-assign]
