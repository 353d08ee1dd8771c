"""AsyncMQSource against a real PostgreSQL: enqueue, collapse, bad input, lookups, state changes, waiting.

Rows are checked through the raw asyncpg connection ``db`` (a connection of its own, so it sees only what
was committed), and NOTIFYs through ``db`` LISTENing. To prove that a NOTIFY was *not* sent, a sentinel
NOTIFY is sent after the action: notifications reach a listener in commit order, so once the sentinel
has arrived everything committed before it has arrived too.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import json
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

import aiomq
import aiomq.waiters
from aiomq import AsyncMQSource, AsyncMQWorker, JobContext, JobInfo, QueuedJob
from aiomq.model import Model

EPOCH = datetime.datetime(1970, 1, 1)
#: A fixed naive-UTC "now", with microseconds so that the NOTIFY's whole seconds are truncated.
T0 = datetime.datetime(2030, 5, 17, 12, 30, 15, 750_000)
STATES = ["pending", "running", "completed", "failed", "canceled", "lost"]
JSON_COLUMNS = ("args", "result", "trace", "cursor_snapshot")
SENTINEL_CHANNEL = "aiomq_test_sentinel"


def epoch(when: datetime.datetime) -> int:
    return int((when - EPOCH).total_seconds())


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


# ---------------------------------------------------------------------------------------------- helpers


async def job_row(db: Any, job_id: int) -> dict[str, Any]:
    """The committed ``mq_job`` row, JSON columns decoded."""
    rec = await db.fetchrow("SELECT * FROM mq_job WHERE id = $1", job_id)
    assert rec is not None, f"job {job_id} is not in mq_job"
    row = dict(rec)
    for column in JSON_COLUMNS:
        if row[column] is not None:
            row[column] = json.loads(row[column])
    return row


async def job_ids(db: Any) -> list[int]:
    return [r["id"] for r in await db.fetch("SELECT id FROM mq_job ORDER BY id")]


async def update_job(db: Any, job_id: int, **columns: Any) -> None:
    """Change a job by hand (no NOTIFY), e.g. to put it in a state only a worker would."""
    sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(columns, start=2))
    await db.execute(f"UPDATE mq_job SET {sets} WHERE id = $1", job_id, *columns.values())


async def put_in_state(
    db: Any, job_id: int, state: str, *, end_time: datetime.datetime | None = None
) -> None:
    """As a worker would leave it: running jobs hold a lock_id (ck_mq_job_lock_id), ended ones an end_time."""
    await update_job(
        db,
        job_id,
        state=state,
        lock_id=7 if state == "running" else None,
        worker=None if state == "pending" else "w",
        start_time=None if state == "pending" else T0,
        end_time=end_time if end_time is not None or state in ("pending", "running") else T0,
    )


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


async def insert_schedule(db: Any) -> int:
    id_: int = await db.fetchval(
        "INSERT INTO mq_job_schedule (created_time, is_enabled, rrule, queue, method, args)"
        " VALUES ($1, false, 'FREQ=DAILY', 'q', 'm', '{}') RETURNING id",
        T0,
    )
    return id_


async def insert_listener(db: Any, event: str = "some.event") -> int:
    id_: int = await db.fetchval(
        "INSERT INTO mq_job_listener (created_time, is_enabled, event, queue, method, args, context_arg_key)"
        " VALUES ($1, true, $2, 'q', 'm', '{}', 'event') RETURNING id",
        T0,
        event,
    )
    return id_


class Notifications:
    """What ``db`` received on the channels it LISTENs to."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.received: list[tuple[str, str]] = []

    async def listen(self, *channels: str) -> None:
        for channel in (*channels, SENTINEL_CHANNEL):
            await self.db.add_listener(channel, self._on_notify)

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self.received.append((channel, payload))

    async def settle(self) -> None:
        """Return once every NOTIFY committed before this call has been received."""
        token = uuid.uuid4().hex
        await self.db.execute("SELECT pg_notify($1, $2)", SENTINEL_CHANNEL, token)

        async def arrived() -> bool:
            return (SENTINEL_CHANNEL, token) in self.received

        await wait_until(arrived)

    def payloads(self, channel: str) -> list[Any]:
        return [json.loads(p) for c, p in self.received if c == channel]


@pytest.fixture
async def notes(db: Any) -> Notifications:
    n = Notifications(db)
    await n.listen("mq_q")
    return n


@pytest.fixture
async def session(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    async with async_sessionmaker(engine)() as s:
        yield s


@pytest.fixture
def session_source(session: AsyncSession, model: Model) -> AsyncMQSource:
    return AsyncMQSource(dbsession=session, model=model)


async def check_rejections(
    session: AsyncSession,
    session_source: AsyncMQSource,
    db: Any,
    exc: type[Exception],
    match: str | None,
    cases: dict[str, Callable[[], Awaitable[Any]]],
) -> None:
    """Each case raises ``exc`` (its message matching ``match``, or naming the case's label when None),
    writes nothing, and leaves the caller's transaction usable: another call in it commits. Every case is
    tried; all problems are reported together."""
    problems: list[str] = []
    committed: list[int] = []
    for label, call in cases.items():
        try:
            await call()
        except exc as ex:
            pattern = re.escape(label) if match is None else match
            if not re.search(pattern, str(ex)):
                problems.append(f"{label}: {ex!r} does not mention {pattern!r}")
        except Exception as ex:
            problems.append(f"{label}: raised {ex!r}, expected {exc.__name__}")
        else:
            problems.append(f"{label}: did not raise")
            await session.rollback()
        try:
            ok = await session_source.call("ok", "ok", {"after": label})
            await session.commit()
            committed.append(ok.id)
        except Exception as ex:
            problems.append(f"{label}: the caller's transaction is unusable afterwards: {ex!r}")
            await session.rollback()
    assert not problems, "\n".join(problems)
    assert await job_ids(db) == committed
    assert [r["method"] for r in await db.fetch("SELECT method FROM mq_job")] == ["ok"] * len(cases)
    assert await db.fetchval("SELECT count(*) FROM mq_job_schedule_link") == 0
    assert await db.fetchval("SELECT count(*) FROM mq_job_listener_link") == 0


# ---------------------------------------------------------------------------------------------- construction


async def test_source_needs_exactly_one_of_dbsession_and_engine(
    engine: AsyncEngine, session: AsyncSession, model: Model
) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        AsyncMQSource(model=model)
    with pytest.raises(ValueError, match="exactly one"):
        AsyncMQSource(model=model, dbsession=session, engine=engine)


# ---------------------------------------------------------------------------------------------- call basics


async def test_call_writes_a_pending_row(source: AsyncMQSource, db: Any) -> None:
    when = T0 + datetime.timedelta(minutes=5)
    queued = await source.call(
        "q", "m", {"a": [1, "x", None]}, when=when, now=T0, cursor_key="c1", trace={"t": 1}
    )

    assert isinstance(queued, QueuedJob)
    assert queued == QueuedJob(
        id=queued.id, queue="q", method="m", cursor_key="c1", scheduled_time=when, created=True
    )
    with pytest.raises(AttributeError):
        queued.id = 5  # type: ignore[misc]
    row = await job_row(db, queued.id)
    assert row == {
        "id": queued.id,
        "state": "pending",
        "queue": "q",
        "method": "m",
        "args": {"a": [1, "x", None]},
        "created_time": T0,
        "scheduled_time": when,
        "cursor_key": "c1",
        "collapsible": True,
        "trace": {"t": 1},
        "start_time": None,
        "end_time": None,
        "result": None,
        "cursor_snapshot": None,
        "lock_id": None,
        "worker": None,
        "priority": 0,
    }


async def test_call_defaults(source: AsyncMQSource, db: Any) -> None:
    before = utcnow()
    queued = await source.call("q", "m")
    after = utcnow()

    row = await job_row(db, queued.id)
    assert row["args"] == {}
    assert row["cursor_key"] is None
    assert row["collapsible"] is False
    assert before <= row["created_time"] <= after
    assert row["scheduled_time"] == row["created_time"] == queued.scheduled_time
    assert queued.cursor_key is None
    assert queued.created is True
    # No trace given: JSON null, not SQL NULL (reference §3).
    trace_is_sql_null, trace_is_json_null = await db.fetchrow(
        "SELECT trace IS NULL, trace = 'null'::jsonb FROM mq_job WHERE id = $1", queued.id
    )
    assert (trace_is_sql_null, trace_is_json_null) == (False, True)


async def test_call_notifies_queue_channel(source: AsyncMQSource, db: Any, notes: Notifications) -> None:
    queued = await source.call("q", "m", when=T0, now=T0)
    await notes.settle()

    assert notes.payloads("mq_q") == [{"j": queued.id, "t": epoch(T0)}]
    payload = notes.payloads("mq_q")[0]
    assert type(payload["j"]) is int
    assert type(payload["t"]) is int
    assert payload["t"] == int(datetime.datetime(2030, 5, 17, 12, 30, 15, tzinfo=datetime.UTC).timestamp())


async def test_call_with_cursor_and_no_collapse_is_not_collapsible(source: AsyncMQSource, db: Any) -> None:
    plain = await source.call("q", "m", cursor_key="c", collapse_on_cursor=False)
    default = await source.call("q", "m", cursor_key="c")
    explicit = await source.call("q", "m2", cursor_key="c", collapse_on_cursor=True)

    assert (await job_row(db, plain.id))["collapsible"] is False
    assert (await job_row(db, default.id))["collapsible"] is True
    assert (await job_row(db, explicit.id))["collapsible"] is True


# ---------------------------------------------------------------------------------------------- modes


async def test_notify_payload_text_is_psycopg2_mqs_byte_for_byte(
    source: AsyncMQSource,
    session: AsyncSession,
    session_source: AsyncMQSource,
    notes: Notifications,
) -> None:
    """The INSERT sends its own NOTIFY, in engine and session mode; the text is what json.dumps writes."""
    in_engine_mode = await source.call("q", "m", when=T0, now=T0)
    in_session_mode = await session_source.call("q", "m", when=T0, now=T0)
    await session.commit()
    await notes.settle()
    texts = [payload for channel, payload in notes.received if channel == "mq_q"]
    assert texts == [json.dumps({"j": job.id, "t": epoch(T0)}) for job in (in_engine_mode, in_session_mode)]


async def test_dbsession_rollback_leaves_no_row_and_no_notify(
    session: AsyncSession, session_source: AsyncMQSource, db: Any, notes: Notifications
) -> None:
    queued = await session_source.call("q", "m", {"a": 1})
    # Visible inside the caller's transaction, nowhere else.
    assert (await session.execute(sa.text("SELECT count(*) FROM mq_job"))).scalar_one() == 1
    assert await job_ids(db) == []
    await session.rollback()

    await notes.settle()
    assert await job_ids(db) == []
    assert notes.payloads("mq_q") == []
    assert await session_source.get_job(queued.id, raises=False) is None


async def test_dbsession_commit_makes_row_and_notify_visible(
    session: AsyncSession, session_source: AsyncMQSource, db: Any, notes: Notifications
) -> None:
    queued = await session_source.call("q", "m", {"a": 1}, when=T0)
    await notes.settle()
    assert await job_ids(db) == []
    assert notes.payloads("mq_q") == []

    await session.commit()
    await notes.settle()
    assert await job_ids(db) == [queued.id]
    assert notes.payloads("mq_q") == [{"j": queued.id, "t": epoch(T0)}]


async def test_dbsession_source_never_commits_state_changes(
    session: AsyncSession, session_source: AsyncMQSource, source: AsyncMQSource, db: Any
) -> None:
    pending = await source.call("q", "m")
    lost = await source.call("q", "m")
    await put_in_state(db, lost.id, "lost")

    await session_source.cancel_job(pending.id)
    await session_source.fail_lost_job(lost.id, result={"why": "gone"})
    retried = await session_source.retry_job(pending.id)
    assert (await session_source.get_job(pending.id)).state == "canceled"
    await session.rollback()

    assert (await job_row(db, pending.id))["state"] == "pending"
    assert (await job_row(db, lost.id))["state"] == "lost"
    assert await job_ids(db) == [pending.id, lost.id]
    assert retried.id not in await job_ids(db)


async def test_engine_source_commits_each_method(
    source: AsyncMQSource, db: Any, notes: Notifications
) -> None:
    queued = await source.call("q", "m")
    await notes.settle()
    assert await job_ids(db) == [queued.id]
    assert [p["j"] for p in notes.payloads("mq_q")] == [queued.id]

    retried = await source.retry_job(queued.id)
    assert await job_ids(db) == [queued.id, retried.id]

    await source.cancel_job(queued.id)
    assert (await job_row(db, queued.id))["state"] == "canceled"

    await put_in_state(db, retried.id, "lost")
    await source.fail_lost_job(retried.id)
    assert (await job_row(db, retried.id))["state"] == "failed"


# ---------------------------------------------------------------------------------------------- when


async def test_when_naive_utc_datetime(source: AsyncMQSource, db: Any, notes: Notifications) -> None:
    when = T0 + datetime.timedelta(hours=1)
    queued = await source.call("q", "m", when=when, now=T0)
    await notes.settle()
    assert queued.scheduled_time == when
    assert (await job_row(db, queued.id))["scheduled_time"] == when
    assert notes.payloads("mq_q") == [{"j": queued.id, "t": epoch(when)}]


async def test_when_aware_datetime_is_converted_to_utc(
    source: AsyncMQSource, db: Any, notes: Notifications
) -> None:
    plus2 = datetime.timezone(datetime.timedelta(hours=2))
    when = datetime.datetime(2030, 5, 17, 16, 0, 30, 500_000, tzinfo=plus2)
    now = datetime.datetime(2030, 5, 17, 5, 0, tzinfo=datetime.timezone(datetime.timedelta(hours=-5)))
    queued = await source.call("q", "m", when=when, now=now)
    await notes.settle()

    utc_when = datetime.datetime(2030, 5, 17, 14, 0, 30, 500_000)
    assert queued.scheduled_time == utc_when
    assert queued.scheduled_time.tzinfo is None
    row = await job_row(db, queued.id)
    assert row["scheduled_time"] == utc_when
    assert row["created_time"] == datetime.datetime(2030, 5, 17, 10, 0)
    assert notes.payloads("mq_q") == [{"j": queued.id, "t": int(when.timestamp())}]


async def test_when_timedelta_is_relative_to_now(
    source: AsyncMQSource, db: Any, notes: Notifications
) -> None:
    later = await source.call("q", "m", when=datetime.timedelta(minutes=10), now=T0)
    earlier = await source.call("q", "m", when=datetime.timedelta(seconds=-30), now=T0)
    before = utcnow()
    default_now = await source.call("q", "m", when=datetime.timedelta(hours=1))
    after = utcnow()
    await notes.settle()

    assert later.scheduled_time == T0 + datetime.timedelta(minutes=10)
    assert (await job_row(db, later.id))["scheduled_time"] == T0 + datetime.timedelta(minutes=10)
    assert (await job_row(db, later.id))["created_time"] == T0
    assert (await job_row(db, earlier.id))["scheduled_time"] == T0 - datetime.timedelta(seconds=30)
    row = await job_row(db, default_now.id)
    assert row["scheduled_time"] == row["created_time"] + datetime.timedelta(hours=1)
    assert before <= row["created_time"] <= after
    assert notes.payloads("mq_q")[0] == {"j": later.id, "t": epoch(T0 + datetime.timedelta(minutes=10))}


async def test_when_of_a_bad_type_is_a_type_error(
    session: AsyncSession, session_source: AsyncMQSource, db: Any, notes: Notifications
) -> None:
    bad: dict[str, Any] = {
        "str": "2030-05-17T12:00:00",
        "int": 1_900_000_000,
        "float": 1.5,
        "date": datetime.date(2030, 5, 17),
        "time": datetime.time(12, 0),
        "list": [T0],
    }
    cases = {label: _call_with(session_source, "q", "m", when=when) for label, when in bad.items()}
    await check_rejections(session, session_source, db, TypeError, "when", cases)
    await notes.settle()
    assert notes.payloads("mq_q") == []


# ---------------------------------------------------------------------------------------------- collapse


async def test_collapse_joins_the_pending_job(source: AsyncMQSource, db: Any, notes: Notifications) -> None:
    first = await source.call("q", "m", {"n": 1}, cursor_key="c", when=T0, now=T0)
    second = await source.call(
        "q", "m", {"n": 2}, cursor_key="c", when=T0, now=T0 + datetime.timedelta(seconds=1)
    )
    await notes.settle()

    assert first.created is True
    assert second == QueuedJob(first.id, "q", "m", "c", T0, created=False)
    assert await job_ids(db) == [first.id]
    row = await job_row(db, first.id)
    assert row["args"] == {"n": 1}
    assert row["created_time"] == T0
    assert row["scheduled_time"] == T0
    # A join at the same time sends nothing.
    assert notes.payloads("mq_q") == [{"j": first.id, "t": epoch(T0)}]


async def test_collapse_with_an_earlier_when_moves_the_job_and_notifies(
    source: AsyncMQSource, db: Any, notes: Notifications
) -> None:
    at_60 = T0 + datetime.timedelta(seconds=60)
    at_30 = T0 + datetime.timedelta(seconds=30)
    first = await source.call("q", "m", cursor_key="c", when=at_60, now=T0)
    moved = await source.call("q", "m", cursor_key="c", when=at_30, now=T0)
    await notes.settle()

    assert moved == QueuedJob(first.id, "q", "m", "c", at_30, created=False)
    assert (await job_row(db, first.id))["scheduled_time"] == at_30
    assert notes.payloads("mq_q") == [{"j": first.id, "t": epoch(at_60)}, {"j": first.id, "t": epoch(at_30)}]


async def test_collapse_with_a_later_or_equal_when_changes_nothing(
    source: AsyncMQSource, db: Any, notes: Notifications
) -> None:
    first = await source.call("q", "m", cursor_key="c", when=T0, now=T0)
    await notes.settle()
    before = await job_row(db, first.id)
    for delta in (0, 1, 3600):
        joined = await source.call(
            "q", "m", cursor_key="c", when=T0 + datetime.timedelta(seconds=delta), now=T0
        )
        assert joined == QueuedJob(first.id, "q", "m", "c", T0, created=False), delta
    await notes.settle()

    assert await job_row(db, first.id) == before
    assert notes.payloads("mq_q") == [{"j": first.id, "t": epoch(T0)}]


async def test_collapse_slot_is_cursor_queue_and_method(source: AsyncMQSource, db: Any) -> None:
    base = await source.call("q", "m", cursor_key="c")
    other_queue = await source.call("q2", "m", cursor_key="c")
    other_method = await source.call("q", "m2", cursor_key="c")
    other_cursor = await source.call("q", "m", cursor_key="c2")

    jobs = [base, other_queue, other_method, other_cursor]
    assert all(j.created for j in jobs)
    assert len({j.id for j in jobs}) == 4
    assert len(await job_ids(db)) == 4
    # ... and each slot now collapses on its own.
    again = [await source.call(j.queue, j.method, cursor_key=j.cursor_key) for j in jobs]
    assert [(j.id, j.created) for j in again] == [(j.id, False) for j in jobs]
    assert len(await job_ids(db)) == 4


async def test_collapse_on_cursor_false_adds_a_job_each_time(source: AsyncMQSource, db: Any) -> None:
    jobs = [await source.call("q", "m", cursor_key="c", collapse_on_cursor=False) for _ in range(3)]

    assert all(j.created for j in jobs)
    assert len({j.id for j in jobs}) == 3
    assert [(await job_row(db, j.id))["collapsible"] for j in jobs] == [False, False, False]


async def test_non_collapsible_pending_job_does_not_absorb_a_collapsible_call(
    source: AsyncMQSource, db: Any
) -> None:
    plain = await source.call("q", "m", cursor_key="c", collapse_on_cursor=False)
    collapsible = await source.call("q", "m", cursor_key="c")
    joined = await source.call("q", "m", cursor_key="c")

    assert collapsible.created is True
    assert collapsible.id != plain.id
    assert (joined.id, joined.created) == (collapsible.id, False)
    assert await job_ids(db) == [plain.id, collapsible.id]


async def test_collapsible_call_does_not_join_a_collapsible_call_without_the_flag(
    source: AsyncMQSource, db: Any
) -> None:
    collapsible = await source.call("q", "m", cursor_key="c")
    plain = await source.call("q", "m", cursor_key="c", collapse_on_cursor=False)

    assert plain.created is True
    assert plain.id != collapsible.id


async def test_collapse_only_joins_a_pending_job(source: AsyncMQSource, db: Any) -> None:
    for state in ["running", "lost", "completed", "failed", "canceled"]:
        cursor = f"c-{state}"
        first = await source.call("q", "m", {"n": 1}, cursor_key=cursor)
        await put_in_state(db, first.id, state)
        second = await source.call("q", "m", {"n": 2}, cursor_key=cursor)
        third = await source.call("q", "m", {"n": 3}, cursor_key=cursor)

        assert second.created is True, state
        assert second.id != first.id, state
        assert (third.id, third.created) == (second.id, False), state
        assert (await job_row(db, second.id))["args"] == {"n": 2}, state
        assert (await job_row(db, first.id))["state"] == state


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_conflict_resolver_runs_once_on_join_with_the_live_job(
    source: AsyncMQSource, db: Any, model: Model, kind: str
) -> None:
    seen: list[dict[str, Any]] = []

    def look(job: Any) -> None:
        assert isinstance(job, model.Job)
        assert sa.inspect(job).persistent
        seen.append(
            {
                "id": job.id,
                "state": job.state,
                "args": job.args,
                "trace": job.trace,
                "cursor_key": job.cursor_key,
                "created_time": job.created_time,
                "scheduled_time": job.scheduled_time,
                "collapsible": job.collapsible,
            }
        )
        job.args = {**job.args, "merged": [*job.args.get("merged", []), len(seen)]}
        job.trace = {"resolved": True}

    def sync_resolver(job: Any) -> None:
        look(job)

    async def async_resolver(job: Any) -> None:
        await asyncio.sleep(0)
        look(job)

    resolver: Callable[[Any], Any] = sync_resolver if kind == "sync" else async_resolver
    first = await source.call("q", "m", {"n": 1}, cursor_key="c", when=T0, now=T0, conflict_resolver=resolver)
    assert seen == []  # never called on insert
    assert (await job_row(db, first.id))["args"] == {"n": 1}

    joined = await source.call("q", "m", {"n": 2}, cursor_key="c", when=T0, conflict_resolver=resolver)
    assert joined.id == first.id
    assert seen == [
        {
            "id": first.id,
            "state": "pending",
            "args": {"n": 1},
            "trace": None,
            "cursor_key": "c",
            "created_time": T0,
            "scheduled_time": T0,
            "collapsible": True,
        }
    ]
    row = await job_row(db, first.id)
    assert row["args"] == {"n": 1, "merged": [1]}
    assert row["trace"] == {"resolved": True}

    await source.call("q", "m", {"n": 3}, cursor_key="c", conflict_resolver=resolver)
    assert len(seen) == 2
    assert seen[1]["args"] == {"n": 1, "merged": [1]}
    assert (await job_row(db, first.id))["args"] == {"n": 1, "merged": [1, 2]}


async def test_conflict_resolver_in_a_dbsession_is_committed_with_the_caller(
    session: AsyncSession, session_source: AsyncMQSource, db: Any
) -> None:
    def resolver(job: Any) -> None:
        job.args = {"resolved": True}

    first = await session_source.call("q", "m", {"n": 1}, cursor_key="c")
    joined = await session_source.call("q", "m", {"n": 2}, cursor_key="c", conflict_resolver=resolver)
    assert joined.id == first.id
    assert await job_ids(db) == []
    await session.commit()
    assert await job_ids(db) == [first.id]
    assert (await job_row(db, first.id))["args"] == {"resolved": True}


async def test_schedule_and_listener_ids_merge_into_trace_and_links(source: AsyncMQSource, db: Any) -> None:
    s1, s2, s3 = [await insert_schedule(db) for _ in range(3)]
    l1, l2 = [await insert_listener(db) for _ in range(2)]

    first = await source.call(
        "q", "m", cursor_key="c", trace={"origin": "web"}, schedule_ids=[s1, s2], listener_ids=[l1]
    )
    row = await job_row(db, first.id)
    assert row["trace"]["origin"] == "web"
    assert set(row["trace"]["mq_schedule_ids"]) == {s1, s2}
    assert set(row["trace"]["mq_listener_ids"]) == {l1}

    joined = await source.call(
        "q",
        "m",
        cursor_key="c",
        trace={"origin": "cron", "extra": 1},
        schedule_ids=[s2, s3],
        listener_ids=[l2, l1],
    )
    assert (joined.id, joined.created) == (first.id, False)
    trace = (await job_row(db, first.id))["trace"]
    assert set(trace) == {"origin", "mq_schedule_ids", "mq_listener_ids"}
    assert trace["origin"] == "web"  # the joining call's own trace is discarded
    assert sorted(trace["mq_schedule_ids"]) == sorted({s1, s2, s3})
    assert sorted(trace["mq_listener_ids"]) == sorted({l1, l2})

    schedule_links = await db.fetch("SELECT job_id, schedule_id FROM mq_job_schedule_link")
    listener_links = await db.fetch("SELECT job_id, listener_id FROM mq_job_listener_link")
    assert sorted(tuple(r) for r in schedule_links) == [(first.id, s) for s in sorted([s1, s2, s3])]
    assert sorted(tuple(r) for r in listener_links) == [(first.id, lid) for lid in sorted([l1, l2])]


async def test_ids_join_a_job_whose_trace_is_null(source: AsyncMQSource, db: Any) -> None:
    s1 = await insert_schedule(db)
    first = await source.call("q", "m", cursor_key="c")
    await source.call("q", "m", cursor_key="c", schedule_ids=[s1])

    assert (await job_row(db, first.id))["trace"] == {"mq_schedule_ids": [s1]}
    assert await db.fetchval("SELECT count(*) FROM mq_job_schedule_link WHERE job_id = $1", first.id) == 1


async def test_schedule_and_listener_ids_given_as_generators(source: AsyncMQSource, db: Any) -> None:
    """``schedule_ids``/``listener_ids`` are typed ``Iterable[int]``: a one-shot iterator must work too."""
    s1 = await insert_schedule(db)
    l1 = await insert_listener(db)
    queued = await source.call("q", "m", schedule_ids=(s for s in [s1]), listener_ids=(lid for lid in [l1]))

    assert (await job_row(db, queued.id))["trace"] == {"mq_schedule_ids": [s1], "mq_listener_ids": [l1]}
    assert await db.fetchval("SELECT count(*) FROM mq_job_schedule_link WHERE job_id = $1", queued.id) == 1
    assert await db.fetchval("SELECT count(*) FROM mq_job_listener_link WHERE job_id = $1", queued.id) == 1


# ---------------------------------------------------------------------------------------------- concurrency


async def _waiting_on_a_lock(db: Any) -> bool:
    n: int = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return n > 0


async def test_concurrent_transactions_on_one_slot_end_with_one_job(
    engine: AsyncEngine, model: Model, db: Any
) -> None:
    make = async_sessionmaker(engine)
    async with make() as first_session, make() as second_session:
        first_source = AsyncMQSource(dbsession=first_session, model=model)
        second_source = AsyncMQSource(dbsession=second_session, model=model)

        first = await first_source.call("q", "m", {"who": 1}, cursor_key="c")
        second_task = asyncio.create_task(second_source.call("q", "m", {"who": 2}, cursor_key="c"))
        await wait_until(lambda: _waiting_on_a_lock(db))  # on the first's uncommitted index entry
        assert not second_task.done()

        await first_session.commit()
        second = await asyncio.wait_for(second_task, 5)
        await second_session.commit()

    assert first.created is True
    assert (second.id, second.created) == (first.id, False)
    assert await job_ids(db) == [first.id]
    assert (await job_row(db, first.id))["args"] == {"who": 1}


async def test_concurrent_slot_taken_over_when_the_first_rolls_back(
    engine: AsyncEngine, model: Model, db: Any
) -> None:
    make = async_sessionmaker(engine)
    async with make() as first_session, make() as second_session:
        first_source = AsyncMQSource(dbsession=first_session, model=model)
        second_source = AsyncMQSource(dbsession=second_session, model=model)

        first = await first_source.call("q", "m", {"who": 1}, cursor_key="c")
        second_task = asyncio.create_task(second_source.call("q", "m", {"who": 2}, cursor_key="c"))
        await wait_until(lambda: _waiting_on_a_lock(db))

        await first_session.rollback()
        second = await asyncio.wait_for(second_task, 5)
        await second_session.commit()

    assert second.created is True
    assert second.id != first.id
    assert await job_ids(db) == [second.id]
    assert (await job_row(db, second.id))["args"] == {"who": 2}


async def test_concurrent_calls_in_a_stable_key_order_do_not_deadlock(
    engine: AsyncEngine, model: Model, db: Any
) -> None:
    """Reference §8.8: opposite orders deadlock; callers avoid it by enqueuing keys in a stable order."""
    make = async_sessionmaker(engine)
    async with make() as first_session, make() as second_session:
        first_source = AsyncMQSource(dbsession=first_session, model=model)
        second_source = AsyncMQSource(dbsession=second_session, model=model)

        async def enqueue_both(src: AsyncMQSource) -> list[QueuedJob]:
            return [await src.call("q", "m", cursor_key=key) for key in ("foo-1", "foo-2")]

        first_one = await first_source.call("q", "m", cursor_key="foo-1")
        second_task = asyncio.create_task(enqueue_both(second_source))
        await wait_until(lambda: _waiting_on_a_lock(db))
        first_two = await first_source.call("q", "m", cursor_key="foo-2")
        await first_session.commit()
        second = await asyncio.wait_for(second_task, 5)
        await second_session.commit()

    assert [(j.id, j.created) for j in second] == [(first_one.id, False), (first_two.id, False)]
    assert await job_ids(db) == [first_one.id, first_two.id]


# ---------------------------------------------------------------------------------------------- bad input


class _Opaque:
    pass


NOT_JSON: dict[str, Any] = {
    "set": {1, 2},
    "bytes": b"bytes",
    "datetime": datetime.datetime(2030, 1, 1),
    "decimal": decimal.Decimal("1.5"),
    "nan": math.nan,
    "inf": math.inf,
    "-inf": -math.inf,
    "object": _Opaque(),
    "nested-set": {"nested": [{"deep": {1}}]},
    "tuple-key": {(1, 2): "tuple key"},
}
NOT_JSONB_STRINGS: dict[str, Any] = {
    "nul": "a\x00b",
    "nul-value": {"k": "a\x00b"},
    "nul-key": {"a\x00": 1},
    "nul-nested": ["x", ["\x00"]],
    "surrogate": "\ud800",
    "surrogate-value": {"k": "x\udfff"},
    "surrogate-key": {"\udc80": 1},
    "surrogate-nested": [{"k": ["\ud83d"]}],
}


def _call_with(src: AsyncMQSource, *args: Any, **kwargs: Any) -> Callable[[], Awaitable[Any]]:
    return lambda: src.call(*args, **kwargs)


async def test_args_not_json_is_a_type_error(
    session: AsyncSession, session_source: AsyncMQSource, db: Any
) -> None:
    cases = {label: _call_with(session_source, "q", "m", value) for label, value in NOT_JSON.items()}
    await check_rejections(session, session_source, db, TypeError, "args", cases)


async def test_trace_not_json_is_a_type_error(
    session: AsyncSession, session_source: AsyncMQSource, db: Any
) -> None:
    cases = {label: _call_with(session_source, "q", "m", trace=value) for label, value in NOT_JSON.items()}
    await check_rejections(session, session_source, db, TypeError, "trace", cases)


async def test_args_with_strings_jsonb_cannot_hold_is_a_value_error(
    session: AsyncSession, session_source: AsyncMQSource, db: Any
) -> None:
    cases = {label: _call_with(session_source, "q", "m", v) for label, v in NOT_JSONB_STRINGS.items()}
    await check_rejections(session, session_source, db, ValueError, "args", cases)


async def test_trace_with_strings_jsonb_cannot_hold_is_a_value_error(
    session: AsyncSession, session_source: AsyncMQSource, db: Any
) -> None:
    cases = {label: _call_with(session_source, "q", "m", trace=v) for label, v in NOT_JSONB_STRINGS.items()}
    await check_rejections(session, session_source, db, ValueError, "trace", cases)


async def test_json_accepts_non_bmp_text_and_surrogate_lookalikes(source: AsyncMQSource, db: Any) -> None:
    """No false alarms: non-BMP characters (escaped as surrogate pairs by json.dumps) and text that merely
    *looks* like an escaped surrogate."""
    args = {"emoji": "\U0001f600", "text": "\\ud800", "ü": "ß"}
    queued = await source.call("q", "m", args, trace={"k": "\\ud83d", "e": "\U0001f600"})
    row = await job_row(db, queued.id)
    assert row["args"] == args
    assert row["trace"] == {"k": "\\ud83d", "e": "\U0001f600"}


async def test_json_accepts_text_that_looks_like_an_escaped_nul(source: AsyncMQSource, db: Any) -> None:
    """A backslash followed by ``u0000`` (a JSON document or a Windows path stored as a string) holds no
    NUL character and is storable."""
    args = {"raw": '{"x": "\\u0000"}', "path": "C:\\u0000"}
    queued = await source.call("q", "m", args, trace={"k": "\\u0000"})
    row = await job_row(db, queued.id)
    assert row["args"] == args
    assert row["trace"] == {"k": "\\u0000"}


async def test_text_columns_with_strings_postgres_cannot_hold_are_a_value_error(
    session: AsyncSession, session_source: AsyncMQSource, db: Any
) -> None:
    """PostgreSQL ``text`` cannot hold NUL nor a lone surrogate either: reject before any SQL (DESIGN §1.5),
    so a dbsession caller's transaction is not aborted by a server error."""
    cases = {
        "method-nul": _call_with(session_source, "q", "a\x00b"),
        "method-surrogate": _call_with(session_source, "q", "\ud800"),
        "cursor-nul": _call_with(session_source, "q", "m", cursor_key="c\x00"),
        "cursor-surrogate": _call_with(session_source, "q", "m", cursor_key="\udc00"),
    }
    await check_rejections(session, session_source, db, ValueError, "method|cursor_key", cases)


INVALID_QUEUES: dict[str, Any] = {
    "empty": "",
    "digit": "1abc",
    "dash": "a-b",
    "space": "a b",
    "61-chars": "x" * 61,
    "injection": "x'; drop table mq_job;--",
    "newline": "abc\n",
    "non-ascii": "é",
    "dot": "a.b",
    "none": None,
    "int": 5,
}


async def test_invalid_queue_name_is_a_value_error(
    session: AsyncSession, session_source: AsyncMQSource, db: Any
) -> None:
    cases = {label: _call_with(session_source, queue, "m") for label, queue in INVALID_QUEUES.items()}
    await check_rejections(session, session_source, db, ValueError, "queue", cases)
    assert await db.fetchval("SELECT to_regclass('mq_job') IS NOT NULL")


async def test_valid_queue_names_are_accepted_and_notified(source: AsyncMQSource, db: Any) -> None:
    queues = ["x" * 60, "_", "Q_1", "MixedCase", "a1_"]
    notes = Notifications(db)
    await notes.listen(*(f"mq_{q}" for q in queues))
    jobs = [await source.call(q, "m", when=T0) for q in queues]
    await notes.settle()
    for queue, queued in zip(queues, jobs, strict=True):
        assert (await job_row(db, queued.id))["queue"] == queue
        assert notes.payloads(f"mq_{queue}") == [{"j": queued.id, "t": epoch(T0)}]


async def test_collapse_on_cursor_without_a_cursor_is_a_value_error(
    session: AsyncSession, session_source: AsyncMQSource, db: Any
) -> None:
    cases = {"no-cursor": _call_with(session_source, "q", "m", collapse_on_cursor=True)}
    await check_rejections(session, session_source, db, ValueError, "cursor", cases)


async def test_job_kwargs_naming_an_unknown_or_call_set_column_is_a_value_error(
    session: AsyncSession, session_source: AsyncMQSource, db: Any
) -> None:
    columns = ["no_such_column", "id", "state", "args", "trace", "created_time", "scheduled_time"]
    columns += ["queue", "method", "cursor_key", "collapsible"]
    cases = {column: _call_with(session_source, "q", "m", job_kwargs={column: "x"}) for column in columns}
    await check_rejections(session, session_source, db, ValueError, None, cases)


async def test_job_kwargs_set_a_free_column(source: AsyncMQSource, db: Any) -> None:
    queued = await source.call("q", "m", job_kwargs={"worker": "w1"})
    row = await job_row(db, queued.id)
    assert row["worker"] == "w1"
    assert row["state"] == "pending"


# ---------------------------------------------------------------------------------------------- no schema


async def test_missing_schema_is_reported_clearly(empty_database: str, model: Model) -> None:
    url = sa.make_url(empty_database).set(drivername="postgresql+asyncpg")
    engine = create_async_engine(url)
    try:
        src = AsyncMQSource(engine=engine, model=model)
        for call in (
            lambda: src.call("q", "m"),
            lambda: src.get_job(1),
            lambda: src.find_jobs(),
        ):
            with pytest.raises(aiomq.SchemaMissingError) as info:
                await call()
            assert isinstance(info.value, RuntimeError)
            message = str(info.value)
            assert "mq_job" in message
            assert "create_all" in message
            assert "aiomq schema" in message
    finally:
        await engine.dispose()


# ---------------------------------------------------------------------------------------------- get_job


async def test_get_job_returns_the_orm_row(source: AsyncMQSource, model: Model) -> None:
    queued = await source.call("q", "m", {"a": 1}, cursor_key="c", now=T0, when=T0, trace={"t": 1})
    job = await source.get_job(queued.id)

    assert isinstance(job, model.Job)
    assert (job.id, job.queue, job.method, job.args, job.state) == (queued.id, "q", "m", {"a": 1}, "pending")
    assert (job.cursor_key, job.created_time, job.scheduled_time, job.trace) == ("c", T0, T0, {"t": 1})
    assert job.collapsible is True


async def test_get_job_from_an_engine_source_is_detached_and_readable(source: AsyncMQSource, db: Any) -> None:
    queued = await source.call("q", "m", {"a": 1}, now=T0, job_kwargs={"worker": "w"})
    await update_job(db, queued.id, result='{"r": 2}', end_time=T0)
    job = await source.get_job(queued.id)

    state = sa.inspect(job)
    assert state.detached
    assert not state.expired_attributes
    row = await job_row(db, queued.id)
    for column in row:
        assert getattr(job, column) == row[column], column


async def test_get_job_missing(source: AsyncMQSource, session_source: AsyncMQSource) -> None:
    for src in (source, session_source):
        with pytest.raises(LookupError):
            await src.get_job(424242)
        assert await src.get_job(424242, raises=False) is None


async def test_get_job_for_update_needs_a_dbsession(source: AsyncMQSource) -> None:
    queued = await source.call("q", "m")
    with pytest.raises(ValueError, match="dbsession"):
        await source.get_job(queued.id, for_update=True)


async def test_get_job_for_update_locks_the_row_in_the_callers_transaction(
    source: AsyncMQSource, session: AsyncSession, session_source: AsyncMQSource, db: Any
) -> None:
    queued = await source.call("q", "m")
    lock_sql = "SELECT id FROM mq_job WHERE id = $1 FOR UPDATE NOWAIT"

    unlocked = await session_source.get_job(queued.id)
    assert unlocked.id == queued.id
    async with db.transaction():
        assert await db.fetchval(lock_sql, queued.id) == queued.id

    job = await session_source.get_job(queued.id, for_update=True)
    assert job.id == queued.id
    with pytest.raises(asyncpg.LockNotAvailableError):
        async with db.transaction():
            await db.fetchval(lock_sql, queued.id)

    await session.rollback()
    async with db.transaction():
        assert await db.fetchval(lock_sql, queued.id) == queued.id


async def test_get_job_for_update_sees_fresh_values(
    source: AsyncMQSource, session: AsyncSession, session_source: AsyncMQSource, db: Any
) -> None:
    queued = await source.call("q", "m")
    assert (await session_source.get_job(queued.id)).state == "pending"
    await session.commit()
    await put_in_state(db, queued.id, "running")
    assert (await session_source.get_job(queued.id, for_update=True)).state == "running"


# ---------------------------------------------------------------------------------------------- find_jobs


async def test_find_jobs_filters_and_orders_newest_first(source: AsyncMQSource, db: Any) -> None:
    specs = [
        ("q", "m", None),
        ("q", "m2", "c"),
        ("q2", "m", "c"),
        ("q", "m", "c"),
        ("q2", "m2", None),
    ]
    ids = []
    for i, (queue, method, cursor) in enumerate(specs):
        now = T0 + datetime.timedelta(seconds=i)
        queued = await source.call(
            queue, method, {"i": i}, cursor_key=cursor, now=now, collapse_on_cursor=False
        )
        ids.append(queued.id)
    await put_in_state(db, ids[0], "completed")
    await put_in_state(db, ids[4], "failed")

    def got(infos: list[JobInfo]) -> list[int]:
        assert all(isinstance(i, JobInfo) for i in infos)
        return [i.id for i in infos]

    assert got(await source.find_jobs()) == ids[::-1]
    assert got(await source.find_jobs(queue="q")) == [ids[3], ids[1], ids[0]]
    assert got(await source.find_jobs(method="m")) == [ids[3], ids[2], ids[0]]
    assert got(await source.find_jobs(state="pending")) == [ids[3], ids[2], ids[1]]
    assert got(await source.find_jobs(state="failed")) == [ids[4]]
    assert got(await source.find_jobs(cursor_key="c")) == [ids[3], ids[2], ids[1]]
    assert got(await source.find_jobs(queue="q", method="m", state="pending", cursor_key="c")) == [ids[3]]
    assert got(await source.find_jobs(queue="nope")) == []
    assert got(await source.find_jobs(limit=2)) == [ids[4], ids[3]]
    assert got(await source.find_jobs(queue="q", limit=1)) == [ids[3]]

    info = (await source.find_jobs(queue="q2", method="m2"))[0]
    row = await job_row(db, ids[4])
    assert info == JobInfo(**{f: row[f] for f in JobInfo.__dataclass_fields__})
    assert info.args == {"i": 4}
    assert info.state == "failed"


async def test_find_jobs_bad_state_is_a_value_error(source: AsyncMQSource) -> None:
    with pytest.raises(ValueError, match="bogus"):
        await source.find_jobs(state="bogus")


# ---------------------------------------------------------------------------------------------- get_cursor


async def test_get_cursor(source: AsyncMQSource, session_source: AsyncMQSource, db: Any) -> None:
    assert await source.get_cursor("c") is None
    await db.execute(
        "INSERT INTO mq_job_cursor (key, properties) VALUES ('c', $1)", json.dumps({"n": 3, "l": [1]})
    )
    assert await source.get_cursor("c") == {"n": 3, "l": [1]}
    assert await session_source.get_cursor("c") == {"n": 3, "l": [1]}
    assert await source.get_cursor("other") is None


# ---------------------------------------------------------------------------------------------- retry_job


async def test_retry_job_copies_the_job_into_a_new_pending_one(source: AsyncMQSource, db: Any) -> None:
    s1 = await insert_schedule(db)
    l1 = await insert_listener(db)
    for state in STATES:  # any state: there is no state check
        original = await source.call(
            "q",
            "m",
            {"a": [1, {"b": 2}], "state": state},
            cursor_key=f"c-{state}",
            when=T0,
            now=T0 - datetime.timedelta(hours=1),
            trace={"origin": "web", "nested": {"x": [1]}},
            schedule_ids=[s1],
            listener_ids=[l1],
        )
        await put_in_state(db, original.id, state)
        before = await job_row(db, original.id)

        retried_at = T0 + datetime.timedelta(days=1)
        retried = await source.retry_job(original.id, now=retried_at)

        assert retried == QueuedJob(retried.id, "q", "m", f"c-{state}", T0, created=True), state
        assert retried.id != original.id
        row = await job_row(db, retried.id)
        assert row["state"] == "pending"
        assert (row["queue"], row["method"], row["args"], row["cursor_key"]) == (
            "q",
            "m",
            {"a": [1, {"b": 2}], "state": state},
            f"c-{state}",
        )
        assert row["scheduled_time"] == T0  # the original's time, not now
        assert row["created_time"] == retried_at
        assert row["collapsible"] is False
        assert row["trace"] == {**before["trace"], "mq_source_job_id": original.id}
        assert (row["start_time"], row["end_time"], row["result"], row["lock_id"], row["worker"]) == (
            None,
        ) * 5
        assert await job_row(db, original.id) == before, state
        # Provenance only through the copied trace: no link rows for the retry.
        for table in ("mq_job_schedule_link", "mq_job_listener_link"):
            assert await db.fetchval(f"SELECT count(*) FROM {table} WHERE job_id = $1", retried.id) == 0
            assert await db.fetchval(f"SELECT count(*) FROM {table} WHERE job_id = $1", original.id) == 1


async def test_retry_job_of_a_job_without_trace(source: AsyncMQSource, db: Any, notes: Notifications) -> None:
    original = await source.call("q", "m", when=T0)
    before = utcnow()
    retried = await source.retry_job(original.id)
    after = utcnow()
    await notes.settle()

    row = await job_row(db, retried.id)
    assert row["trace"] == {"mq_source_job_id": original.id}
    assert row["args"] == {}
    assert before <= row["created_time"] <= after
    assert [p["j"] for p in notes.payloads("mq_q")] == [original.id, retried.id]


async def test_retry_job_of_a_pending_collapsible_job_does_not_join_it(
    source: AsyncMQSource, db: Any
) -> None:
    original = await source.call("q", "m", cursor_key="c")
    retried = await source.retry_job(original.id)
    assert retried.created is True
    assert retried.id != original.id
    assert (await job_row(db, retried.id))["collapsible"] is False
    assert (await job_row(db, original.id))["collapsible"] is True


async def test_retry_job_missing_is_a_lookup_error(source: AsyncMQSource, db: Any) -> None:
    with pytest.raises(LookupError):
        await source.retry_job(424242)
    assert await job_ids(db) == []


# ---------------------------------------------------------------------------------------------- cancel_job


async def test_cancel_pending_job(source: AsyncMQSource, db: Any) -> None:
    queued = await source.call("q", "m")
    await source.cancel_job(queued.id, now=T0)
    row = await job_row(db, queued.id)
    assert row["state"] == "canceled"
    assert row["end_time"] == T0


async def test_cancel_pending_job_default_now(source: AsyncMQSource, db: Any) -> None:
    queued = await source.call("q", "m")
    before = utcnow()
    await source.cancel_job(queued.id)
    after = utcnow()
    assert before <= (await job_row(db, queued.id))["end_time"] <= after


async def test_cancel_failed_job_keeps_its_end_time(source: AsyncMQSource, db: Any) -> None:
    queued = await source.call("q", "m")
    ended = T0 - datetime.timedelta(minutes=3)
    await put_in_state(db, queued.id, "failed", end_time=ended)
    await update_job(db, queued.id, result='{"exc": "E"}')

    await source.cancel_job(queued.id, now=T0)
    row = await job_row(db, queued.id)
    assert row["state"] == "canceled"
    assert row["end_time"] == ended
    assert row["result"] == {"exc": "E"}


async def test_cancel_failed_job_without_end_time_sets_it(source: AsyncMQSource, db: Any) -> None:
    queued = await source.call("q", "m")
    await update_job(db, queued.id, state="failed")
    await source.cancel_job(queued.id, now=T0)
    assert (await job_row(db, queued.id))["end_time"] == T0


async def test_cancel_job_in_other_states_is_a_runtime_error(source: AsyncMQSource, db: Any) -> None:
    for state in ["running", "lost", "completed", "canceled"]:
        queued = await source.call("q", "m")
        await put_in_state(db, queued.id, state)
        before = await job_row(db, queued.id)
        with pytest.raises(RuntimeError, match="not in a valid state"):
            await source.cancel_job(queued.id, now=T0 + datetime.timedelta(days=1))
        assert await job_row(db, queued.id) == before, state


async def test_cancel_job_missing_is_a_lookup_error(source: AsyncMQSource) -> None:
    with pytest.raises(LookupError):
        await source.cancel_job(424242)


async def test_cancel_job_emits_no_event(source: AsyncMQSource, db: Any) -> None:
    for event in (
        "mq.job_finished.canceled.q.m",
        "mq.job_finished.failed.q.m",
        "mq.job_finished.completed.q.m",
    ):
        await insert_listener(db, event)
    queued = await source.call("q", "m")
    await source.cancel_job(queued.id)
    assert await job_ids(db) == [queued.id]


# ---------------------------------------------------------------------------------------------- fail_lost_job


async def test_fail_lost_job_with_a_result(source: AsyncMQSource, db: Any) -> None:
    queued = await source.call("q", "m", cursor_key="c")
    ended = T0 - datetime.timedelta(minutes=1)
    await put_in_state(db, queued.id, "lost", end_time=ended)

    await source.fail_lost_job(queued.id, result={"why": "host died", "n": [1]})
    row = await job_row(db, queued.id)
    assert row["state"] == "failed"
    assert row["result"] == {"why": "host died", "n": [1]}
    assert row["end_time"] == ended
    # The cursor is free again: a new job on it can run.
    assert (
        await db.fetchval(
            "SELECT count(*) FROM mq_job WHERE cursor_key = 'c' AND state IN ('running', 'lost')"
        )
        == 0
    )


async def test_fail_lost_job_without_a_result(source: AsyncMQSource, db: Any) -> None:
    queued = await source.call("q", "m")
    await put_in_state(db, queued.id, "lost")
    await source.fail_lost_job(queued.id)
    row = await job_row(db, queued.id)
    assert row["state"] == "failed"
    assert row["result"] is None
    assert row["end_time"] == T0


async def test_fail_lost_job_in_other_states_is_a_runtime_error(source: AsyncMQSource, db: Any) -> None:
    for state in ["pending", "running", "completed", "failed", "canceled"]:
        queued = await source.call("q", "m")
        await put_in_state(db, queued.id, state)
        before = await job_row(db, queued.id)
        with pytest.raises(RuntimeError, match="not in a lost state"):
            await source.fail_lost_job(queued.id, result={"x": 1})
        assert await job_row(db, queued.id) == before, state


async def test_fail_lost_job_with_a_non_json_result_changes_nothing(
    session: AsyncSession, session_source: AsyncMQSource, source: AsyncMQSource, db: Any
) -> None:
    queued = await source.call("q", "m")
    await put_in_state(db, queued.id, "lost")
    before = await job_row(db, queued.id)

    for result in [{1, 2}, {"t": datetime.datetime(2030, 1, 1)}, math.nan, b"x", {"s": "a\x00"}]:
        with pytest.raises((TypeError, ValueError), match="result"):
            await source.fail_lost_job(queued.id, result=result)
        assert await job_row(db, queued.id) == before, result
        with pytest.raises((TypeError, ValueError), match="result"):
            await session_source.fail_lost_job(queued.id, result=result)
    await session_source.fail_lost_job(queued.id, result={"ok": True})  # the transaction is still usable
    await session.commit()
    assert (await job_row(db, queued.id))["result"] == {"ok": True}


async def test_fail_lost_job_emits_the_failed_event(source: AsyncMQSource, db: Any) -> None:
    """Reference §2.2/§11: ``mq.job_finished.failed.<queue>.<method>`` with the result given."""
    listener_id = await insert_listener(db, "mq.job_finished.failed.q.m")
    await insert_listener(db, "mq.job_finished.lost.q.m")
    queued = await source.call("q", "m")
    await put_in_state(db, queued.id, "lost")

    await source.fail_lost_job(queued.id, result={"why": "gone"})
    ids = await job_ids(db)
    assert len(ids) == 2
    event_job = await job_row(db, ids[1])
    assert (event_job["queue"], event_job["method"], event_job["state"]) == ("q", "m", "pending")
    assert event_job["trace"] == {"mq_listener_ids": [listener_id]}
    event = event_job["args"]["event"]
    assert event["name"] == "mq.job_finished.failed.q.m"
    assert event["listener_id"] == listener_id
    assert event["data"] == {
        "id": queued.id,
        "queue": "q",
        "method": "m",
        "start_time": T0.isoformat(),
        "end_time": T0.isoformat(),
        "result": {"why": "gone"},
    }


async def test_fail_lost_job_wakes_the_next_job_on_its_cursor(source: AsyncMQSource, db: Any) -> None:
    notes = Notifications(db)
    await notes.listen("mq_q", "mq_q2")
    lost = await source.call("q", "m", cursor_key="c", when=T0)
    await put_in_state(db, lost.id, "lost")
    successor = await source.call("q2", "m", cursor_key="c", when=T0)
    await notes.settle()
    assert notes.payloads("mq_q2") == [{"j": successor.id, "t": epoch(T0)}]

    await source.fail_lost_job(lost.id)
    await notes.settle()
    assert notes.payloads("mq_q2") == [{"j": successor.id, "t": epoch(T0)}] * 2
    assert notes.payloads("mq_q") == [{"j": lost.id, "t": epoch(T0)}]


async def test_fail_lost_job_missing_is_a_lookup_error(source: AsyncMQSource) -> None:
    with pytest.raises(LookupError):
        await source.fail_lost_job(424242)


# ---------------------------------------------------------------------------------------------- wait_for_job


async def _listen_connections(db: Any) -> int:
    n: int = await db.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'aiomq wait_for_job' AND pid <> pg_backend_pid()"
    )
    return n


async def _hub_reading(db: Any) -> bool:
    """wait_for_job's connection is set up and LISTENing: it has read a job. (Killed or raced while it
    sets itself up, its connect counts as failed, and the next attempt waits out a backoff.)"""
    query = await db.fetchval(
        "SELECT query FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'aiomq wait_for_job'"
    )
    return query is not None and "= ANY (" in query


async def test_wait_for_job_returns_when_a_worker_completes_it(
    source: AsyncMQSource, make_worker: Callable[..., AsyncMQWorker]
) -> None:
    async def handler(job: JobContext) -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"echo": job.args}

    async with make_worker({"q": handler}, name="w-test"):
        queued = await source.call("q", "m", {"x": 1})
        started = time.monotonic()
        # A long poll interval: the completion NOTIFY is what wakes the waiter.
        info = await source.wait_for_job(queued.id, timeout=10, poll_interval=30)
        elapsed = time.monotonic() - started

    assert isinstance(info, JobInfo)
    assert (info.id, info.queue, info.method, info.args) == (queued.id, "q", "m", {"x": 1})
    assert info.state == "completed"
    assert info.result == {"echo": {"x": 1}}
    assert info.worker == "w-test"
    assert info.start_time is not None
    assert info.end_time is not None
    assert elapsed < 5


async def test_wait_for_job_with_a_dbsession_source(
    source: AsyncMQSource,
    session: AsyncSession,
    session_source: AsyncMQSource,
    make_worker: Callable[..., AsyncMQWorker],
) -> None:
    async def handler(job: JobContext) -> str:
        return "done"

    async with make_worker({"q": handler}):
        queued = await session_source.call("q", "m")
        with pytest.raises(LookupError):  # not committed yet
            await session_source.wait_for_job(queued.id, timeout=2, poll_interval=0.1)
        await session.commit()
        info = await session_source.wait_for_job(queued.id, timeout=10, poll_interval=30)
    assert (info.state, info.result) == ("completed", "done")


async def test_wait_for_job_returns_when_canceled(source: AsyncMQSource) -> None:
    queued = await source.call("q", "m")
    waiter = asyncio.create_task(source.wait_for_job(queued.id, timeout=10, poll_interval=30))
    await asyncio.sleep(0.2)
    assert not waiter.done()
    await source.cancel_job(queued.id)
    info = await asyncio.wait_for(waiter, 5)
    assert info.state == "canceled"
    assert info.end_time is not None


async def test_wait_for_job_returns_at_once_for_a_finished_job(source: AsyncMQSource, db: Any) -> None:
    queued = await source.call("q", "m")
    await put_in_state(db, queued.id, "lost")
    info = await asyncio.wait_for(source.wait_for_job(queued.id, poll_interval=30), 5)
    assert info.state == "lost"


async def test_wait_for_job_times_out(source: AsyncMQSource) -> None:
    queued = await source.call("q", "m")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await source.wait_for_job(queued.id, timeout=0.3, poll_interval=0.1)
    assert 0.25 <= time.monotonic() - started < 3


async def test_wait_for_job_missing_is_a_lookup_error(source: AsyncMQSource) -> None:
    with pytest.raises(LookupError):
        await source.wait_for_job(424242, timeout=2, poll_interval=0.1)


async def test_wait_for_job_polls_for_jobs_finished_without_notify(source: AsyncMQSource, db: Any) -> None:
    queued = await source.call("q", "m")
    waiter = asyncio.create_task(source.wait_for_job(queued.id, timeout=10, poll_interval=0.1))
    await asyncio.sleep(0.25)
    assert not waiter.done()

    await update_job(db, queued.id, state="completed", result='{"by": "psycopg2_mq"}', end_time=T0)
    finished = time.monotonic()
    info = await asyncio.wait_for(waiter, 5)
    assert time.monotonic() - finished < 2
    assert (info.state, info.result, info.end_time) == ("completed", {"by": "psycopg2_mq"}, T0)


async def test_concurrent_waiters_share_one_listen_connection(source: AsyncMQSource, db: Any) -> None:
    jobs = [await source.call("q", "m", {"i": i}) for i in range(10)]
    assert await _listen_connections(db) == 0

    waiters = [asyncio.create_task(source.wait_for_job(j.id, timeout=10, poll_interval=30)) for j in jobs]

    async def one_listener() -> bool:
        return await _listen_connections(db) == 1

    await wait_until(one_listener)
    await asyncio.sleep(0.2)
    assert await _listen_connections(db) == 1
    assert not any(w.done() for w in waiters)

    for job in jobs:
        await source.cancel_job(job.id)
    infos = await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert [i.id for i in infos] == [j.id for j in jobs]
    assert {i.state for i in infos} == {"canceled"}

    # Still open after the last waiter left (a caller waiting for one job at a time reuses it)...
    await asyncio.sleep(0.2)
    assert await _listen_connections(db) == 1


async def test_woken_waiters_read_their_jobs_on_the_shared_connection_not_the_pool(
    database: str, model: Model, db: Any
) -> None:
    engine = create_async_engine(sa.make_url(database).set(drivername="postgresql+asyncpg"))
    source = AsyncMQSource(engine=engine, model=model)
    checkouts: list[object] = []
    try:
        warm = await source.call("q", "m")
        await source.cancel_job(warm.id)
        await source.wait_for_job(warm.id, timeout=5)  # the first wait compares the table through the pool
        jobs = [await source.call("q", "m", {"i": i}) for i in range(20)]
        sa.event.listen(engine.sync_engine, "checkout", lambda *a: checkouts.append(a))
        waiters = [asyncio.create_task(source.wait_for_job(j.id, timeout=10, poll_interval=30)) for j in jobs]
        await asyncio.sleep(0.3)
        assert not any(w.done() for w in waiters)
        # Finished as a worker would finish them: one transaction, a NOTIFY per job.
        async with db.transaction():
            for job in jobs:
                await put_in_state(db, job.id, "completed", end_time=T0)
                await db.execute(
                    "SELECT pg_notify('mq.job_finished', $1)", json.dumps({"j": job.id, "s": "completed"})
                )
        infos = await asyncio.wait_for(asyncio.gather(*waiters), 5)
        assert [(i.id, i.state, i.end_time, i.args) for i in infos] == [
            (j.id, "completed", T0, {"i": n}) for n, j in enumerate(jobs)
        ]
        assert checkouts == [], "a waiter read its job through the engine's pool"
        with pytest.raises(LookupError):  # the shared connection's read tells a missing job too
            await source.wait_for_job(424242, timeout=2)
        assert checkouts == []
    finally:
        await engine.dispose()


async def test_waiters_read_through_the_pool_when_the_engine_sees_other_tables(
    database: str, model: Model, db: Any
) -> None:
    # The engine's search path (from connect_args) finds the queue's tables in a schema of their own;
    # wait_for_job's connection, made from the URL alone, would find public's.
    await db.execute("CREATE SCHEMA tenant")
    url = sa.make_url(database).set(drivername="postgresql+asyncpg")
    engine = create_async_engine(url, connect_args={"server_settings": {"search_path": "tenant"}})
    try:
        async with engine.begin() as conn:
            await conn.run_sync(model.Job.metadata.create_all)
        source = AsyncMQSource(engine=engine, model=model)
        job = await source.call("q", "tenant's")
        await db.execute(  # a job of the same id in public's table, which must not be read
            "INSERT INTO public.mq_job (id, state, created_time, scheduled_time, queue, method, args)"
            " VALUES ($1, 'completed', $2, $2, 'q', 'public''s', 'null')",
            job.id,
            T0,
        )
        waiter = asyncio.create_task(source.wait_for_job(job.id, timeout=10, poll_interval=30))
        await asyncio.sleep(0.2)
        assert not waiter.done()
        await source.cancel_job(job.id)
        info = await asyncio.wait_for(waiter, 5)
        assert (info.method, info.state) == ("tenant's", "canceled")
    finally:
        await engine.dispose()


async def test_a_stuck_read_on_the_shared_connection_gives_it_up(
    source: AsyncMQSource, database: str, db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(aiomq.waiters, "READ_TIMEOUT", 0.3)
    pid_sql = (
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'aiomq wait_for_job' AND state <> 'active'"
    )

    async def listening() -> bool:
        return await db.fetchval(pid_sql) is not None

    async def reading() -> bool:
        return await _hub_reading(db)

    job = await source.call("q", "m")
    waiter = asyncio.create_task(source.wait_for_job(job.id, timeout=20, poll_interval=30))
    await wait_until(reading)
    first_pid = await db.fetchval(pid_sql)
    locker = await asyncpg.connect(database)
    try:
        async with locker.transaction():  # reads of mq_job wait, as on a peer gone silent
            await locker.execute("LOCK TABLE mq_job IN ACCESS EXCLUSIVE MODE")
            await locker.execute(
                "UPDATE mq_job SET state = 'canceled', end_time = $2 WHERE id = $1", job.id, T0
            )
            await db.execute(  # the waiter wakes now, and its read on the shared connection hangs
                "SELECT pg_notify('mq.job_finished', $1)", json.dumps({"j": job.id, "s": "canceled"})
            )
            await asyncio.sleep(1.0)  # past READ_TIMEOUT: given up; the waiter reads through the pool
            assert not waiter.done()
        assert (await asyncio.wait_for(waiter, 5)).state == "canceled"
    finally:
        await locker.close()
    # The connection of the stuck read was dropped: the next wait opens another.
    second = await source.call("q", "m")
    waiter = asyncio.create_task(source.wait_for_job(second.id, timeout=10, poll_interval=30))
    await wait_until(listening)
    assert await db.fetchval(pid_sql) != first_pid
    await source.cancel_job(second.id)
    assert (await asyncio.wait_for(waiter, 5)).state == "canceled"


async def test_waiting_survives_the_shared_connection_being_killed(source: AsyncMQSource, db: Any) -> None:
    async def listening() -> bool:
        return await _listen_connections(db) == 1

    async def reading() -> bool:
        return await _hub_reading(db)

    first = await source.call("q", "m")
    waiter = asyncio.create_task(source.wait_for_job(first.id, timeout=10, poll_interval=0.1))
    await wait_until(reading)
    await db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'aiomq wait_for_job'"
    )
    await source.cancel_job(first.id)  # its NOTIFY is lost with the connection: the poll finds it
    assert (await asyncio.wait_for(waiter, 5)).state == "canceled"
    second = await source.call("q", "m")  # a new wait opens a new connection
    waiter = asyncio.create_task(source.wait_for_job(second.id, timeout=10, poll_interval=30))
    await wait_until(listening)
    await source.cancel_job(second.id)
    assert (await asyncio.wait_for(waiter, 5)).state == "canceled"


async def test_one_wait_after_another_reuses_the_listen_connection_until_the_engine_is_disposed(
    database: str, model: Model, db: Any
) -> None:
    engine = create_async_engine(sa.make_url(database).set(drivername="postgresql+asyncpg"))
    source = AsyncMQSource(engine=engine, model=model)
    try:
        pids = set()

        async def listening() -> bool:
            return await _listen_connections(db) == 1

        for _ in range(3):
            job = await source.call("q", "m")
            waiter = asyncio.create_task(source.wait_for_job(job.id, timeout=10, poll_interval=30))
            await wait_until(listening)
            pids.add(
                await db.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                    " AND application_name = 'aiomq wait_for_job'"
                )
            )
            await source.cancel_job(job.id)
            assert (await asyncio.wait_for(waiter, 5)).state == "canceled"
        assert len(pids) == 1, "a new LISTEN connection per wait"
        assert await _listen_connections(db) == 1
    finally:
        await engine.dispose()

    async def no_listener() -> bool:
        return await _listen_connections(db) == 0

    await wait_until(no_listener)  # closed with the engine
