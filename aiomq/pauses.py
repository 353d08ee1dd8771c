"""What a worker knows of paused queues: which of its queues it may claim from.

A NOTIFY on ``mq.queue_pause`` updates it at once; the rows of ``aiomq_queue_pause`` are read again after
each (re)connect and at each maintenance, so a missed notification costs at most one maintenance interval.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncConnection

from . import channels
from .sql import Statements

__all__ = ["Pauses"]

log = logging.getLogger(__name__)


class Pauses:
    def __init__(self, st: Statements, queues: Sequence[str], name: str) -> None:
        self._statement = st.queues.paused_among
        self._queues = list(queues)
        self._name = name
        self._paused: set[str] = set()
        self._claimable = list(self._queues)
        #: False when the model or the database has no ``aiomq_queue_pause``: nothing is ever paused.
        self.enabled = self._statement is not None

    @property
    def paused(self) -> frozenset[str]:
        return frozenset(self._paused)

    def claimable(self) -> list[str]:
        """The worker's queues that are not paused, in the worker's order."""
        return self._claimable

    def _set(self, paused: set[str]) -> set[str]:
        """Replace the paused set; returns the queues that were resumed."""
        resumed = self._paused - paused
        for queue in sorted(paused - self._paused):
            log.warning("worker %s: queue %s is paused; its jobs wait", self._name, queue)
        for queue in sorted(resumed):
            log.warning("worker %s: queue %s is resumed", self._name, queue)
        self._paused = paused
        self._claimable = [q for q in self._queues if q not in paused]
        return resumed

    def note(self, payload: str) -> bool:
        """A ``mq.queue_pause`` notification; True when one of this worker's queues was resumed (claim)."""
        try:
            note = channels.parse_pause(payload)
        except ValueError as ex:  # maintenance reads the rows anyway
            log.warning(
                "ignoring a malformed notification on %r: %r (%s)", channels.PAUSE_CHANNEL, payload, ex
            )
            return False
        if note.queue not in self._queues:
            return False
        paused = self._paused | {note.queue} if note.paused else self._paused - {note.queue}
        return bool(self._set(paused))

    async def reload(self, conn: AsyncConnection) -> bool:
        """Read the paused rows of this worker's queues; True when one was resumed meanwhile."""
        if not self.enabled or self._statement is None:
            return False
        rows = await conn.scalars(self._statement, {"queues": self._queues})
        return bool(self._set(set(rows)))
