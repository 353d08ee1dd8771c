"""Live updates: one asyncpg LISTEN connection per dashboard app tells every open page to refresh.

It listens on ``mq.job_finished`` (every finish, cancel and abort), ``mq.queue_pause``, and each queue's
``mq_<queue>`` channel (new jobs, schedules changed), and is debounced: however many NOTIFYs arrive, each
page hears at most one refresh per ``interval`` seconds. The connection opens with the first page that
subscribes and closes when the last leaves; while it is down it is reopened with a capped backoff (and a
refresh is sent when it is back, since NOTIFYs may have been missed meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg

from .. import channels

__all__ = ["LiveUpdates"]

log = logging.getLogger(__name__)

#: Seconds between reconnect attempts, growing to the last value.
BACKOFF = (0.5, 1.0, 2.0, 5.0, 10.0)
#: Seconds between looks for queues that appeared since (their channels are listened to then).
QUEUE_RESCAN = 30.0


class LiveUpdates:
    """Shared LISTEN connection and the pages subscribed to it.

    ``queue_names`` returns the queues whose channels to listen on; ``dsn`` is a libpq URL.
    """

    def __init__(
        self,
        dsn: str,
        channel_prefix: str,
        queue_names: Callable[[], Awaitable[list[str]]],
        *,
        interval: float = 1.0,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval!r}")
        self._dsn = dsn
        self._prefix = channel_prefix
        self._queue_names = queue_names
        self.interval = interval
        self._subscribers: set[asyncio.Event] = set()
        self._task: asyncio.Task[None] | None = None
        self._flush: asyncio.TimerHandle | None = None
        self._last_flush = float("-inf")  # the first refresh goes at once
        self.notifications = 0  # NOTIFYs heard, and refreshes sent: for tests and the curious
        self.refreshes = 0
        self._was_connected = False

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Event]:
        """An event set whenever the page should refresh (the holder clears it)."""
        event = asyncio.Event()
        self._subscribers.add(event)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="aiomq web LISTEN")
        try:
            yield event
        finally:
            self._subscribers.discard(event)
            if not self._subscribers:
                await self.close()

    async def close(self) -> None:
        task, self._task = self._task, None
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self.notifications += 1
        self.changed()

    def changed(self) -> None:
        """Something changed: refresh every page, at most once per ``interval``."""
        if self._flush is not None:
            return  # one is scheduled: it covers this change too
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._last_flush + self.interval - loop.time())
        self._flush = loop.call_later(delay, self._broadcast)

    def _broadcast(self) -> None:
        self._flush = None
        self._last_flush = asyncio.get_running_loop().time()
        self.refreshes += 1
        for event in self._subscribers:
            event.set()

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._listen_until_lost()
                attempt = 0
            except Exception as ex:  # the pages still work; they only stop refreshing by themselves
                log.warning("dashboard LISTEN connection failed (%s: %s); retrying", type(ex).__name__, ex)
            await asyncio.sleep(BACKOFF[min(attempt, len(BACKOFF) - 1)])
            attempt += 1

    async def _listen_until_lost(self) -> None:
        conn = await asyncpg.connect(self._dsn, timeout=10)
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _: lost.set())
        try:
            listened: set[str] = set()
            for channel in (channels.FINISHED_CHANNEL, channels.PAUSE_CHANNEL):
                await conn.add_listener(channel, self._notified)
                listened.add(channel)
            if self._was_connected:
                self.changed()  # what changed while the connection was down is not missed
            self._was_connected = True
            while not lost.is_set():
                for queue in await self._queue_names():
                    channel = channels.queue_channel(self._prefix, queue)
                    if channel not in listened:
                        await conn.add_listener(channel, self._notified)
                        listened.add(channel)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), QUEUE_RESCAN)
        finally:
            if not conn.is_closed():
                try:
                    await asyncio.shield(conn.close(timeout=2))
                except Exception:
                    conn.terminate()
