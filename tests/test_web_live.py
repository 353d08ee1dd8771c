"""The dashboard's live updates: one LISTEN connection, NOTIFYs turned into debounced refreshes, and a
lost connection reopened (with a refresh, since NOTIFYs may have been missed)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiomq import AsyncMQSource
from aiomq.channels import FINISHED_CHANNEL
from aiomq.web.live import LiveUpdates

WAIT = 20.0


async def until(check: Any) -> None:
    async with asyncio.timeout(WAIT):
        while not check():  # noqa: ASYNC110 - the hub counts; it has no event to wait for
            await asyncio.sleep(0.02)


async def listening(db: Any, count: int = 1) -> list[int]:
    """The pids of the sessions that LISTEN (the hub's), once there are ``count``."""
    pids: list[int] = []
    async with asyncio.timeout(WAIT):
        while len(pids) < count:
            pids = [
                r[0]
                for r in await db.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND query LIKE 'LISTEN %' AND pid <> pg_backend_pid()"
                )
            ]
            await asyncio.sleep(0.02)
    return pids


async def test_a_burst_of_notifies_is_one_refresh(database: str, db: Any) -> None:
    live = LiveUpdates(database, "mq_", _no_queues, interval=3600)
    async with live.subscribe() as changed:
        await listening(db)
        for n in range(20):
            await db.execute("SELECT pg_notify($1, $2)", FINISHED_CHANNEL, f'{{"j": {n}, "s": "completed"}}')
        await until(lambda: live.notifications == 20)
        await asyncio.wait_for(changed.wait(), WAIT)
        # The first refresh goes at once; the others wait for the interval, and are one.
        assert live.refreshes == 1
    assert live._task is None  # the last page left: the connection closed


async def test_queue_channels_and_reconnects(database: str, db: Any, source: AsyncMQSource) -> None:
    await source.call("watched", "m", {})

    async def queues() -> list[str]:
        return ["watched"]

    live = LiveUpdates(database, "mq_", queues, interval=0.01)
    async with live.subscribe() as changed:
        await _listens_to(db, "mq_watched")
        await source.call("watched", "m", {})
        await asyncio.wait_for(changed.wait(), WAIT)
        assert live.notifications >= 1
        changed.clear()
        refreshes = live.refreshes
        (pid,) = await listening(db)
        await db.execute("SELECT pg_terminate_backend($1)", pid)
        await asyncio.wait_for(changed.wait(), WAIT)  # reconnected, and told the pages to refresh
        assert live.refreshes == refreshes + 1
        (new_pid,) = await listening(db)
        assert new_pid != pid


async def _listens_to(db: Any, channel: str) -> None:
    query = "SELECT count(*) FROM pg_stat_activity WHERE query = $1"
    async with asyncio.timeout(WAIT):
        while not await db.fetchval(query, f'LISTEN "{channel}"'):  # noqa: ASYNC110 - polls the server
            await asyncio.sleep(0.02)


async def _no_queues() -> list[str]:
    return []
