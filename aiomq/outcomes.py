"""Recording outcomes: every finished handler's outcome is stored once, in batches, each job task awaiting
its own future. The home of retries and of metrics counters.

Outcomes whose event nobody listens to (the common case) go in one autocommit statement that also saves
cursors and sends the NOTIFYs; the rest in one transaction per batch; a batch that fails for a reason
retrying cannot fix is recorded job by job, so one bad outcome cannot lose the others. Jobs whose handler
was cancelled by ``stop(timeout)`` are put back (async) or marked lost (sync) here too.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from . import channels
from .compiled import Compiled
from .dberrors import Backoff, Transactions, retrying
from .events import Announcement, Announcer, announcement, finished_event
from .execution import Outcome
from .model import JobStates
from .records import JobContext
from .retry import Retry
from .serialize import dump_json, error_result
from .sql import Statements

__all__ = ["Record", "Recorder", "prepare", "schedule_retries"]

log = logging.getLogger(__name__)

_BATCH = 500


class Record:
    """An outcome ready to store: JSON already encoded and checked."""

    __slots__ = ("cursor_json", "job", "result_json", "retry_wait", "state")

    def __init__(
        self,
        job: JobContext,
        state: str,
        result_json: str | None,
        cursor_json: str | None,
        retry_wait: float | None = None,
    ) -> None:
        self.job = job
        self.state = state
        self.result_json = result_json
        self.cursor_json = cursor_json
        #: Seconds until the next run, for a failure its retry policy gives another run.
        self.retry_wait = retry_wait

    @property
    def result(self) -> Any:
        return None if self.result_json is None else json.loads(self.result_json)


def prepare(
    states: type[JobStates], job: JobContext, outcome: Outcome, policy: Retry | None = None
) -> Record:
    """Encode the outcome; what JSON or jsonb cannot store fails the job with an error saying why. A
    retryable failure with runs left under ``policy`` gets the wait before its next run."""
    if outcome.retryable and policy is not None and policy.runs_left(job.attempt):
        record = _encode(states, job, outcome)
        record.retry_wait = policy.wait(job.attempt)
        return record
    return _encode(states, job, outcome)


def _encode(states: type[JobStates], job: JobContext, outcome: Outcome) -> Record:
    try:
        result_json = None if outcome.result is None else dump_json(outcome.result, "the job result")
        cursor_json = None
        if outcome.save_cursor and job.cursor_key is not None:
            cursor_json = dump_json(job.cursor, "the job's cursor")
    except (TypeError, ValueError) as ex:
        log.error("job %s failed: %s", job.id, ex)
        return Record(job, states.FAILED, dump_json(error_result(ex), "error result"), None)
    if job.cursor_key is None and job.cursor is not None:
        log.warning("job %s has no cursor_key: ignoring the cursor it set", job.id)
    return Record(job, outcome.state, result_json, cursor_json)


def rejected(job: JobContext, states: type[JobStates], ex: BaseException) -> Record:
    """The record of a job whose outcome the database refused for good: failed, saying why."""
    result = {**error_result(ex), "message": f"the database rejected the job's outcome: {ex}"}
    return Record(job, states.FAILED, dump_json(result, "error result"), None)


async def schedule_retries(
    conn: AsyncConnection,
    st: Statements,
    items: list[tuple[int, datetime.datetime, int]],
    now: datetime.datetime,
) -> dict[int, int]:
    """The next runs of failed jobs ``(job id, scheduled time, attempt)``, in ``conn``'s transaction, with
    their NOTIFYs and the failed jobs' ``aiomq_retried_by``: ``{failed id: retry id}``."""
    params = {
        "ids": [i for i, _, _ in items],
        "scheduled": [when for _, when, _ in items],
        "attempts": [attempt for _, _, attempt in items],
        "now": now,
    }
    return {row.source_id: row.id for row in await conn.execute(st.outcomes.retry_many, params)}


class Recorder:
    """Records outcomes for one worker. ``on_recorded(record)`` runs after each recorded finish."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        st: Statements,
        clock: Callable[[], Any],
        backoff: Backoff,
        transactions: Transactions,
        is_retryable: Callable[[BaseException], bool],
        stopping: Callable[[], bool],
        announcer: Announcer,
        on_recorded: Callable[[Record], None],
        policy: Callable[[JobContext], Retry | None] = lambda job: None,
    ) -> None:
        self._engine = engine
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._st = st
        self._states = st.parts.model.JobStates
        self._quiet_sql = Compiled(st.outcomes.finish_quiet, engine.dialect)
        self._clock = clock
        self._backoff = backoff
        self._tx = transactions
        self._is_retryable = is_retryable
        self._stopping = stopping
        self._announcer = announcer
        self._on_recorded = on_recorded
        self._policy = policy
        self._queue: list[tuple[Record, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self, name: str) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=name)

    def stop(self) -> None:
        """Stop recording (every job task awaited its outcome by then)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def record(self, job: JobContext, outcome: Outcome) -> None:
        """Hand the outcome to the recorder, which records outcomes in batches, and wait until it did."""
        done = asyncio.get_running_loop().create_future()
        policy = self._policy(job) if outcome.retryable else None
        self._queue.append((prepare(self._states, job, outcome, policy), done))
        self._wakeup.set()
        await done

    async def _run(self) -> None:
        """Record finished jobs, as many per transaction as have finished meanwhile."""
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch, self._queue = self._queue[:_BATCH], self._queue[_BATCH:]
                try:
                    await self._record_batch([record for record, _ in batch])
                except Exception as ex:  # one bad outcome must not lose the others: record one by one
                    log.warning(
                        "recording %d jobs at once failed (%s); recording them one by one", len(batch), ex
                    )
                    for record, _ in batch:
                        try:
                            await self._record_one(record)
                        except Exception:  # never let the recorder die: jobs wait on it
                            log.exception("could not record job %s", record.job.id)
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

    async def _until_recorded(self, count: int, op: Callable[[], Awaitable[Any]]) -> Any:
        """``op()`` until it succeeds: retryable errors back off (giving up only once stopping, after as
        many attempts as ``retry_intervals`` has), others raise."""

        def give_up(failures: int, ex: BaseException) -> bool:
            return (self._stopping() and failures >= len(self._backoff)) or not self._is_retryable(ex)

        def on_retry(ex: BaseException, failures: int, delay: float) -> None:
            log.warning("recording %d jobs failed (%s); retrying in %.1fs", count, ex, delay)

        return await retrying(op, backoff=self._backoff, give_up=give_up, on_retry=on_retry)

    async def _record_batch(self, records: list[Record]) -> None:
        """Those whose event nobody listens to (with their cursors) in one autocommit statement, the rest
        (events, retries, and those the statement left out) in one transaction. Retried while retryable."""
        quiet = [r for r in records if r.retry_wait is None]
        done: set[int] = set()
        if quiet:
            rows = await self._until_recorded(len(quiet), lambda: self._record_quiet(quiet))
            done = {row["id"] for row in rows}
            for record in quiet:
                if record.job.id in done:
                    self._recorded(record, True)
        records = [r for r in records if r.job.id not in done]
        if records:
            await self._record_in_transaction(records)

    async def _record_quiet(self, records: list[Record]) -> list[Any]:
        params = {
            "ids": [r.job.id for r in records],
            "states": [r.state for r in records],
            "results": [r.result_json for r in records],
            "cursors": [r.cursor_json for r in records],
            "now": self._clock(),
        }
        # One statement on a pooled connection's driver: SQLAlchemy's execution path was a quarter of
        # a no-op drain's CPU. A connection that failed other than by an SQL error is discarded.
        async with self._autocommit.connect() as conn:
            driver = (await conn.get_raw_connection()).driver_connection
            assert driver is not None
            try:
                rows: list[Any] = await driver.fetch(self._quiet_sql.sql, *self._quiet_sql.args(params))
            except Exception as ex:
                if not isinstance(ex, asyncpg.PostgresError):
                    await conn.invalidate(ex)
                raise
            return rows

    async def _record_in_transaction(self, records: list[Record]) -> None:
        by_id = {r.job.id: r for r in records}
        outcomes = self._st.outcomes

        async def op() -> list[Any]:
            async with self._engine.begin() as conn:
                params = {
                    "ids": [r.job.id for r in records],
                    "states": [r.state for r in records],
                    "results": [r.result_json for r in records],
                    "now": self._clock(),
                }
                rows = list(await conn.execute(outcomes.finish_many, params))
                saves = [by_id[row.id] for row in rows if by_id[row.id].cursor_json is not None]
                if saves:
                    cursors = {
                        "keys": [r.job.cursor_key for r in saves],
                        "properties": [r.cursor_json for r in saves],
                        "job_ids": [r.job.id for r in saves],
                    }
                    await conn.execute(outcomes.save_cursors, cursors)
                retries = await self._schedule_retries(conn, [by_id[row.id] for row in rows])
                freed: set[str] = set()  # the finish_many statement sent each job's mq.job_finished
                for row in rows:
                    record = by_id[row.id]
                    plan = self._plan(record, row.has_listeners)
                    if plan.event:
                        name, data = finished_event(record.state, row, result=record.result)
                        if row.id in retries:
                            data["retry_job_id"] = retries[row.id]
                        await self._announcer.emit(conn, name, data)
                    if plan.successor_hint and row.cursor_key is not None:
                        freed.add(row.cursor_key)
                if freed:
                    await conn.execute(outcomes.notify_successors, {"keys": sorted(freed)})
                return rows

        rows = await self._until_recorded(len(records), op)
        recorded = {row.id for row in rows}
        for record in records:
            self._recorded(record, record.job.id in recorded)

    async def _schedule_retries(self, conn: AsyncConnection, recorded: list[Record]) -> dict[int, int]:
        """The next runs of the recorded failures that get one, in ``conn``'s transaction: {failed: new}."""
        wanted = [r for r in recorded if r.retry_wait is not None]
        if not wanted:
            return {}
        now = self._clock()
        scheduled = [now + datetime.timedelta(seconds=r.retry_wait or 0) for r in wanted]
        items = [(r.job.id, when, r.job.attempt + 1) for r, when in zip(wanted, scheduled, strict=True)]
        retries = await schedule_retries(conn, self._st, items, now)
        for record, when in zip(wanted, scheduled, strict=True):
            log.warning(
                "job %s failed on attempt %d; its retry is job %s at %s",
                record.job.id,
                record.job.attempt,
                retries.get(record.job.id),
                when,
            )
        return retries

    def _plan(self, record: Record, has_listeners: bool) -> Announcement:
        return announcement(
            self._states, record.state, cursor_key=record.job.cursor_key, has_listeners=has_listeners
        )

    def _recorded(self, record: Record, recorded: bool) -> None:
        if not recorded:
            log.warning(
                "job %s finished (%s) but is no longer running or lost: outcome discarded",
                record.job.id,
                record.state,
            )
            return
        log.info("finished job %s: %s", record.job.id, record.state)
        self._on_recorded(record)

    async def _record_one(self, record: Record) -> None:
        """Record one outcome; retried until it commits or the worker is stopped. If the database refuses
        it for good, the job is failed with an error result saying why."""
        try:
            recorded = await self._record_one_attempts(record)
        except Exception as ex:
            if self._is_retryable(ex):  # gave up at stop
                log.error("giving up recording job %s: %s", record.job.id, ex)
                return
            # Retrying cannot fix this (the database rejects the result or the cursor): say so.
            log.error("job %s: the database rejected its outcome: %s", record.job.id, ex)
            record = rejected(record.job, self._states, ex)
            try:
                recorded = await self._record_one_attempts(record)
            except Exception:
                log.exception("could not record job %s", record.job.id)
                return
        self._recorded(record, recorded)

    async def _record_one_attempts(self, record: Record) -> bool:
        job = record.job

        async def op() -> bool:
            async with self._engine.begin() as conn:
                params = {
                    "job_id": job.id,
                    "state": record.state,
                    "result_json": record.result_json,
                    "now": self._clock(),
                }
                row = (await conn.execute(self._st.outcomes.finish, params)).first()
                if row is None:
                    return False
                if record.cursor_json is not None:
                    cursor = {"key": job.cursor_key, "properties_json": record.cursor_json, "job_id": job.id}
                    await conn.execute(self._st.outcomes.save_cursor, cursor)
                retries = await self._schedule_retries(conn, [record])
                await self._announcer.announce(
                    conn,
                    row,
                    record.state,
                    job.cursor_key,
                    result=record.result,
                    retry_job_id=retries.get(job.id),
                )
                return True

        def give_up(failures: int, ex: BaseException) -> bool:
            return not self._is_retryable(ex) or (self._stopping() and failures >= len(self._backoff))

        def on_retry(ex: BaseException, failures: int, delay: float) -> None:
            log.warning("recording job %s failed (%s); retrying in %.1fs", job.id, ex, delay)

        return await retrying(op, backoff=self._backoff, give_up=give_up, on_retry=on_retry)

    async def abandon(self, job: JobContext, *, sync: bool) -> None:
        """A handler was cancelled by stop(timeout): an async job goes back to pending, a sync one is lost."""
        outcomes = self._st.outcomes
        prefix = self._st.parts.model.channel_prefix

        async def op(conn: AsyncConnection) -> Any:
            if sync:
                params = {"job_id": job.id, "now": self._clock()}
                row = (await conn.execute(outcomes.mark_one_lost, params)).first()
                if row is not None:
                    await self._announcer.announce(conn, row, self._states.LOST, job.cursor_key)
                return row
            row = (await conn.execute(outcomes.requeue, {"job_id": job.id})).first()
            if row is not None:
                note = {
                    "channel": channels.queue_channel(prefix, job.queue),
                    "payload": channels.job_payload(job.id, self._clock()),
                }
                await conn.execute(self._st.notify, note)
            return row

        try:
            await self._tx.run("abandon job", op, while_stopping=True)
        except Exception:
            log.exception("could not release job %s after cancelling its handler", job.id)
            return
        if sync:
            log.error("job %s: its sync handler could not be interrupted; marked lost", job.id)
        else:
            log.warning("job %s: handler cancelled at stop; the job is pending again", job.id)
