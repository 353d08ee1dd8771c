"""Building a worker's parts: each gets what it needs at construction (settings, bound methods), so none
of them imports or holds the worker. :class:`~aiomq.worker.AsyncMQWorker` calls :func:`assemble` once."""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from .claims import Claimer, ClaimSQL
from .compiled import Compiled
from .dberrors import Backoff, Transactions
from .events import Announcer
from .execution import Executor, Middleware
from .link import Link
from .listener import Listener
from .maintenance import Maintenance
from .model import Model
from .outcomes import Record, Recorder
from .pauses import Pauses
from .pruning import Pruner
from .records import JobContext
from .retry import Policies
from .scheduler import Scheduler
from .sql import Statements, statements

__all__ = ["Callbacks", "Parts", "Settings", "assemble"]


#: The ``prune_after`` duty starts a prune at most once every this many maintenance intervals.
PRUNE_EVERY = 5


class Settings(Protocol):
    """What the parts read of the worker's settings (its public attributes and overridable methods)."""

    engine: AsyncEngine
    model: Model
    name: str
    queues: list[str]
    concurrency: int
    timeout: float
    jitter: float
    lock_key: int
    retry_intervals: list[float]
    listener_dsn: str
    clock: Callable[[], datetime.datetime]
    mq_source_factory: Callable[..., Any]
    lost_grace: float
    prune_after: datetime.timedelta | None

    def is_retryable_error(self, ex: BaseException) -> bool: ...

    def result_from_error(self, ex: BaseException) -> Any: ...


@dataclasses.dataclass(frozen=True)
class Callbacks:
    """The worker's own state the parts act on, as functions."""

    start: Callable[[JobContext, datetime.datetime, datetime.datetime], None]
    running: Callable[[], Iterable[int]]
    on_notify: Callable[[str, str], None]
    on_recorded: Callable[[Record], None]
    on_abort: Callable[[list[int]], None]
    wake: Callable[[], None]
    sleep: Callable[[float], Any]
    stopping: Callable[[], bool]


@dataclasses.dataclass(frozen=True)
class Parts:
    st: Statements
    backoff: Backoff
    link: Link
    transactions: Transactions
    claimer: Claimer
    executor: Executor
    recorder: Recorder
    scheduler: Scheduler
    maintenance: Maintenance
    pauses: Pauses
    pruner: Pruner


def assemble(
    w: Settings,
    cb: Callbacks,
    *,
    channels: Sequence[str],
    policies: Policies,
    middleware: Sequence[Middleware],
) -> Parts:
    st = statements(w.model)
    backoff = Backoff(w.retry_intervals, w.jitter)
    link = _link(w, cb, st, backoff, channels)
    tx = Transactions(w.engine, backoff=backoff, is_retryable=w.is_retryable_error, stopping=cb.stopping)

    def source_for(session: AsyncSession) -> Any:
        return w.mq_source_factory(dbsession=session, model=w.model)

    announcer = Announcer(st, source_for, w.clock)
    pauses = Pauses(st, w.queues, w.name)
    claimer = Claimer(
        link=link,
        sql=ClaimSQL(st.claims, w.engine.dialect),
        queues=w.queues,
        claimable=pauses.claimable,
        name=w.name,
        clock=w.clock,
        backoff=backoff,
        is_retryable=w.is_retryable_error,
        stopping=cb.stopping,
        start=cb.start,
        running=cb.running,
        timeout=w.timeout,
    )
    executor = Executor(
        states=w.model.JobStates,
        worker_name=w.name,
        concurrency=w.concurrency,
        result_from_error=w.result_from_error,
        middleware=middleware,
    )
    recorder = Recorder(
        engine=w.engine,
        st=st,
        clock=w.clock,
        backoff=backoff,
        transactions=tx,
        is_retryable=w.is_retryable_error,
        stopping=cb.stopping,
        announcer=announcer,
        on_recorded=cb.on_recorded,
        policy=lambda job: policies.retry_for(job.queue, job.trace),
    )
    scheduler = Scheduler(
        st=st,
        transactions=tx,
        queues=w.queues,
        name=w.name,
        clock=w.clock,
        timeout=w.timeout,
        retry_after=backoff.cap,
        source_for=source_for,
        is_retryable=w.is_retryable_error,
    )
    pruner = Pruner(
        engine=w.engine,
        st=st,
        prune_after=w.prune_after,
        clock=w.clock,
        stopping=cb.stopping,
        interval=PRUNE_EVERY * w.timeout,
    )
    maintenance = _maintenance(w, cb, st, tx, link, scheduler, announcer, policies, backoff, pauses, pruner)
    return Parts(st, backoff, link, tx, claimer, executor, recorder, scheduler, maintenance, pauses, pruner)


def _link(w: Settings, cb: Callbacks, st: Statements, backoff: Backoff, channels: Sequence[str]) -> Link:
    dialect = w.engine.dialect
    try_lock = Compiled(st.claims.try_lock, dialect)
    keepalive = Compiled(st.maintenance.keepalive, dialect)

    def make_listener() -> Listener:  # reads listener_dsn at each connect: it may be changed
        return Listener(
            dsn=w.listener_dsn,
            channels=channels,
            lock_key=w.lock_key,
            application_name=f"aiomq worker {w.name}"[:63],
            on_notify=cb.on_notify,
            on_lost=cb.wake,
            try_lock=try_lock,
            keepalive=keepalive,
            json_deserializer=getattr(dialect, "_json_deserializer", None) or json.loads,
        )

    return Link(
        name=w.name, make_listener=make_listener, backoff=backoff, sleep=cb.sleep, stopping=cb.stopping
    )


def _maintenance(
    w: Settings,
    cb: Callbacks,
    st: Statements,
    tx: Transactions,
    link: Link,
    scheduler: Scheduler,
    announcer: Announcer,
    policies: Policies,
    backoff: Backoff,
    pauses: Pauses,
    pruner: Pruner,
) -> Maintenance:
    return Maintenance(
        st=st,
        transactions=tx,
        keepalive=link.keepalive,
        lock_id=lambda: link.lock_id,
        since_reconnect=link.since_reconnect,
        scheduler=scheduler,
        announcer=announcer,
        policies=policies,
        pauses=pauses,
        pruner=pruner,
        running=cb.running,
        on_abort=cb.on_abort,
        lost_grace=w.lost_grace,
        # No false alarms after a restart: at least the reconnect backoff cap (DESIGN §7.2).
        window=backoff.cap,
        queues=w.queues,
        lock_key=w.lock_key,
        name=w.name,
        clock=w.clock,
        timeout=w.timeout,
    )
