"""Claiming: due jobs of the worker's queues, taken on the connection that holds its advisory lock, and
the bookkeeping of when the next job becomes due (NOTIFY hints, the database's answer, backoff).

A claim is one statement on the worker's own connection (:class:`~aiomq.link.Link`): one round trip, one
transaction, and it can only commit while the advisory lock it stamps on the jobs is held. A claim whose
reply was lost may still have committed; its jobs are found and started by :meth:`Claimer.adopt`.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from sqlalchemy.engine import Dialect

from .compiled import Compiled
from .dberrors import Backoff, is_unique_violation, retrying
from .records import JobContext
from .sql.claims import ClaimStatements

__all__ = ["ClaimSQL", "Claimer", "Connection", "due_after_empty_claim", "merge_next_due"]

log = logging.getLogger(__name__)

#: How soon to look again when due jobs exist but all are locked by someone else's transaction.
LOCKED_RETRY = datetime.timedelta(seconds=0.05)
#: Immediate retries of a claim that lost a race for a cursor (a unique violation), before backing off.
MAX_RACES = 20


class Connection(Protocol):
    """What the claimer needs of the worker's link: its advisory lock id, whether it is up, statements."""

    @property
    def lock_id(self) -> int | None: ...

    @property
    def alive(self) -> bool: ...

    async def fetch(self, statement: Compiled, params: Mapping[str, Any]) -> list[Any]: ...


class ClaimSQL:
    """The claim statements compiled for the link's driver."""

    def __init__(self, statements: ClaimStatements, dialect: Dialect) -> None:
        self.claim = Compiled(statements.claim, dialect)
        self.adopt = Compiled(statements.adopt, dialect)
        self.next_due = Compiled(statements.next_due, dialect)


def due_after_empty_claim(
    now: datetime.datetime, db_due: datetime.datetime | None
) -> datetime.datetime | None:
    """When to claim again after a claim found nothing although a job seemed due.

    If the database says a job is due (``db_due <= now``), it is locked (another worker's claim, a caller's
    FOR UPDATE): look again shortly instead of spinning. Otherwise the hint was early (NOTIFY times are
    whole seconds) and the database knows better.
    """
    if db_due is not None and db_due <= now:
        return now + LOCKED_RETRY
    return db_due


def merge_next_due(
    db_due: datetime.datetime | None, hinted: datetime.datetime | None
) -> datetime.datetime | None:
    """The database's answer, or a hint that arrived while the query ran, whichever is earlier."""
    return min((t for t in (db_due, hinted) if t is not None), default=None)


def _due_order(row: Any) -> tuple[Any, ...]:
    return row["scheduled_time"], row["created_time"], row["id"]


class Claimer:
    """Claims jobs and starts them through ``start(job, scheduled_time, now)``."""

    def __init__(
        self,
        *,
        link: Connection,
        sql: ClaimSQL,
        queues: Sequence[str],
        claimable: Callable[[], list[str]],
        name: str,
        clock: Callable[[], datetime.datetime],
        backoff: Backoff,
        is_retryable: Callable[[BaseException], bool],
        stopping: Callable[[], bool],
        start: Callable[[JobContext, datetime.datetime, datetime.datetime], None],
        running: Callable[[], Iterable[int]],
        timeout: float,
    ) -> None:
        self._link = link
        self._sql = sql
        self._queues = list(queues)
        self._claimable = claimable  # the queues not paused
        self._name = name
        self._clock = clock
        self._backoff = backoff
        self._is_retryable = is_retryable
        self._stopping = stopping
        self._start = start
        self._running = running
        self._timeout = timeout
        #: When the next job becomes claimable, as far as this worker knows (None: wait for a hint).
        self.next_due: datetime.datetime | None = None
        self._hints = 0  # tells whether a hint arrived while a next-due query was in flight
        self._db_next_due: datetime.datetime | None = None
        self._hinted_during_refresh = False
        # Claims that failed in a way that may have committed (the reply was lost): their start_time
        # stamps, with the loop time of the failure. Looked up (``adopt``) after the next successful
        # claim and at each maintenance, and forgotten once a lookup ran ``timeout`` after the failure.
        self._unsure: dict[datetime.datetime, float] = {}

    @property
    def unsure(self) -> bool:
        """Whether a failed claim may have committed jobs nobody runs yet."""
        return bool(self._unsure)

    def hint(self, when: datetime.datetime) -> None:
        """A job may be due at ``when`` (a NOTIFY, a finished cursor job)."""
        self._hints += 1
        if self.next_due is None or when < self.next_due:
            self.next_due = when

    def is_due(self) -> bool:
        return self.next_due is not None and self.next_due <= self._clock()

    def _params(self, limit: int) -> dict[str, Any]:
        return {
            "queues": self._claimable(),
            "now": self._clock(),
            "limit": limit,
            "lock_id": self._link.lock_id,
            "name": self._name,
        }

    async def claim(self, limit: int) -> int:
        """Claim up to ``limit`` due jobs and start them. Returns how many were started."""
        assert self._link.lock_id is not None
        params = self._params(limit)
        if not params["queues"]:  # all paused: a resume's NOTIFY (or maintenance) wakes the worker
            self.next_due = None
            return 0
        rows = await self._claim_rows(params)
        if rows is None:
            return 0
        now = params["now"]
        rows.sort(key=_due_order)
        for row in rows:
            self._start(JobContext.from_claim(row), row["scheduled_time"], now)
        if self._unsure:
            await self.adopt()
        if len(rows) >= limit:
            self.next_due = now  # there may be more: claim again when a slot frees
        else:
            await asyncio.sleep(0)  # let the handlers just started begin before the next query
            await self.refresh_next_due()
        return len(rows)

    async def _claim_rows(self, params: dict[str, Any]) -> list[Any] | None:
        """The claimed rows; None if the claim gave up (logged) or the worker stopped meanwhile."""
        races = 0
        retried = False

        async def attempt() -> list[Any] | None:
            nonlocal races
            while True:
                if not self._link.alive:
                    return None  # without our advisory lock, what we claim would look lost to everyone else
                if retried and self._stopping():
                    return None
                # now is read per attempt: a start_time taken before a retry's backoff could precede the
                # moment the job's cursor became free.
                now = params["now"] = self._clock()
                try:
                    return await self._link.fetch(self._sql.claim, params)
                except Exception as ex:
                    if is_unique_violation(ex) and races < MAX_RACES:
                        races += 1  # another worker took a job of the same cursor: claim again at once
                        continue
                    if not is_unique_violation(ex):  # it may have committed with its reply lost
                        self._unsure[now] = asyncio.get_running_loop().time()
                    raise

        def give_up(failures: int, ex: BaseException) -> bool:
            return not self._is_retryable(ex) or failures + 1 >= len(self._backoff)

        def on_retry(ex: BaseException, failures: int, delay: float) -> None:
            nonlocal retried
            retried = True
            log.info("claim failed (%s); retry %d in %.1fs", ex, failures + 1, delay)

        try:
            return await retrying(attempt, backoff=self._backoff, give_up=give_up, on_retry=on_retry)
        except Exception as ex:
            log.exception("claim failed, the worker goes on: %s", ex)
            self.next_due = self._clock() + datetime.timedelta(seconds=self._backoff.cap)
            return None

    async def adopt(self) -> None:
        """Start the jobs of claims that committed although their reply was lost.

        They are ``running`` under this worker's live lock, so no maintenance would ever mark them lost:
        without this they would wait until the worker exits. Their handlers never ran, so they run now.
        """
        assert self._link.lock_id is not None
        looked_at = asyncio.get_running_loop().time()
        params = {
            "name": self._name,
            "stamps": list(self._unsure),
            "queues": self._queues,
            "known": list(self._running()),
            "lock_id": self._link.lock_id,
        }
        try:
            rows = await self._link.fetch(self._sql.adopt, params)
        except Exception as ex:
            log.warning("looking for the jobs of a failed claim failed (%s); looking again later", ex)
            return
        # A claim cut off on our side may still be committing on the server: keep looking for a while.
        self._unsure = {s: t for s, t in self._unsure.items() if looked_at - t < self._timeout}
        rows.sort(key=_due_order)
        for row in rows:
            log.warning("job %s was claimed by a claim whose reply was lost: running it now", row["id"])
            self._start(JobContext.from_claim(row), row["scheduled_time"], self._clock())

    async def refresh_next_due(self) -> None:
        """Ask the database when the next job becomes claimable (None: wait for a hint)."""
        hints = self._hints
        value: datetime.datetime | None = None
        self._db_next_due = None
        try:
            queues = self._claimable()
            if queues:
                rows = await self._link.fetch(self._sql.next_due, {"queues": queues})
                value = rows[0][0]
        except Exception as ex:  # (the connection died, say): look again soon rather than never
            log.warning("reading the next due time failed (%s); looking again shortly", ex)
            value = self._clock() + datetime.timedelta(seconds=self._backoff.intervals[0])
        # A hint that arrived while the query ran is newer than its answer: keep the earlier of the two.
        self._hinted_during_refresh = self._hints != hints
        hinted = self.next_due if self._hinted_during_refresh else None
        self._db_next_due = value
        self.next_due = merge_next_due(value, hinted)

    def after_empty_claim(self) -> None:
        """A claim took nothing: decide when to look again (unless a hint came meanwhile)."""
        if self.is_due() and not self._hinted_during_refresh:
            self.next_due = due_after_empty_claim(self._clock(), self._db_next_due)
