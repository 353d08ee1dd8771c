"""The worker's link to the database: one live :class:`~aiomq.listener.Listener` at a time, reopened with
capped backoff when it dies (a new advisory lock id each time), and the statements run on it.

Statements run on the link go through its ``hooks``: fault injection for tests that must order events
exactly (:func:`aiomq.testing.hook_listener_statements`), with the statement itself still run for real.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from .compiled import Compiled
from .dberrors import Backoff, retrying
from .errors import SchemaMissingError
from .listener import Listener

__all__ = ["Link", "StatementHook"]

log = logging.getLogger(__name__)

#: ``hook(sql, run)``: called for each statement run on the link; must ``await run()`` and return its rows.
StatementHook = Callable[[str, Callable[[], Awaitable[list[Any]]]], Awaitable[list[Any]]]


class Link:
    """Opens, replaces and closes the worker's dedicated connection; runs statements on it."""

    def __init__(
        self,
        *,
        name: str,
        make_listener: Callable[[], Listener],
        backoff: Backoff,
        sleep: Callable[[float], Awaitable[None]],
        stopping: Callable[[], bool],
    ) -> None:
        self._name = name
        self._make_listener = make_listener
        self._backoff = backoff
        self._sleep = sleep
        self._stopping = stopping
        self._listener: Listener | None = None
        self.lock_id: int | None = None
        self.hooks: list[StatementHook] = []
        #: The loop time of the last replacement of a dead connection (None until one happens).
        self.reconnected_at: float | None = None

    @property
    def alive(self) -> bool:
        return self._listener is not None and self._listener.alive

    @property
    def connected(self) -> bool:
        """Whether a connection was opened (it may have died since)."""
        return self._listener is not None

    async def connect(
        self,
        *,
        first: bool,
        prove: Callable[[Listener], Awaitable[None]],
        recover: Callable[[int, int], Awaitable[None]],
    ) -> None:
        """Open (or replace) the connection, retrying until it opens or the worker stops.

        ``prove(listener)`` runs on a first connection (a ``ValueError`` from it is final);
        ``recover(old_lock_id, lock_id)`` after a replacement (re-stamping running jobs). The first
        connection also gives up after ``len(backoff)`` attempts: at start, an error is more likely a
        mistake than an outage.
        """
        old_lock_id = self.lock_id
        self.abort()

        async def attempt() -> tuple[Listener, int] | None:
            if self._stopping():
                return None
            listener = self._make_listener()
            try:
                lock_id = await listener.open()
                if first:
                    await prove(listener)
                await listener.settle()
                if old_lock_id is not None:
                    await recover(old_lock_id, lock_id)
            except BaseException:
                listener.abort()
                raise
            return listener, lock_id

        def give_up(failures: int, ex: BaseException) -> bool:
            final = isinstance(ex, ValueError | SchemaMissingError) or failures + 1 >= len(self._backoff)
            return first and final

        def on_retry(ex: BaseException, failures: int, delay: float) -> None:
            log.warning(
                "worker %s cannot open its listener connection (%s); retrying in %.1fs", self._name, ex, delay
            )

        opened = await retrying(
            attempt, backoff=self._backoff, give_up=give_up, on_retry=on_retry, sleep=self._sleep
        )
        if opened is None:  # stopped while connecting
            return
        self._listener, self.lock_id = opened
        if old_lock_id is not None:
            self.reconnected_at = asyncio.get_running_loop().time()
            log.info("worker %s reconnected (lock_id %s -> %s)", self._name, old_lock_id, self.lock_id)

    async def fetch(self, statement: Compiled, params: Mapping[str, Any]) -> list[Any]:
        """Run ``statement`` on the connection (autocommit); ``ConnectionError`` if it is gone."""
        listener = self._listener
        if listener is None:
            raise ConnectionError("the worker's listener connection is closed")
        args = statement.args(params)

        async def fetch() -> list[Any]:
            return await listener.fetch(statement.sql, args)

        run: Callable[[], Awaitable[list[Any]]] = fetch
        for hook in self.hooks:
            run = _wrapped(hook, statement.sql, run)
        return await run()

    def since_reconnect(self) -> float | None:
        """Seconds since the connection was last replaced, or None if it never was."""
        if self.reconnected_at is None:
            return None
        return asyncio.get_running_loop().time() - self.reconnected_at

    async def keepalive(self, timeout: float) -> bool:
        """One round trip; False (and the connection dropped) if it fails."""
        return self._listener is not None and await self._listener.keepalive(timeout)

    def abort(self) -> None:
        """Drop the connection at once (its advisory lock goes with it)."""
        if self._listener is not None:
            self._listener.abort()
            self._listener = None

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()
        self.lock_id = None


def _wrapped(
    hook: StatementHook, sql: str, run: Callable[[], Awaitable[list[Any]]]
) -> Callable[[], Awaitable[list[Any]]]:
    async def wrapped() -> list[Any]:
        return await hook(sql, run)

    return wrapped
