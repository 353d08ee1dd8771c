"""Recurring schedules (reference §10).

Source methods run with an injected ``now``; firing runs through ``run_until_idle()`` with an injected clock;
scheduler ownership (``mq_lock('queue-schedules', queue)``) is checked with fake owners and with live workers;
a few live runs check the NOTIFY wake-up, the handover and a mixed psycopg2_mq + aiomq deployment.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import random
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psycopg2_mq
import pytest
import sqlalchemy as sa

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext

from .conftest import Clock

MakeWorker = Callable[..., AsyncMQWorker]

LOCK_KEY = 1250360252  # the default of both libraries
NS = "queue-schedules"
EPOCH = datetime.datetime(1970, 1, 1)
SEC = datetime.timedelta(seconds=1)
MIN = datetime.timedelta(minutes=1)
#: A creation time with microseconds: dateutil drops them from dtstart, so occurrences fall on :30.
T0 = datetime.datetime(2030, 1, 1, 12, 0, 30, 123000)
PARIS_DAILY_9AM = "DTSTART;TZID=Europe/Paris:20300101T090000\nRRULE:FREQ=DAILY"


def epoch(when: datetime.datetime) -> int:
    return int((when - EPOCH).total_seconds())


def at(hour: int, minute: int, second: int = 0) -> datetime.datetime:
    return datetime.datetime(2030, 1, 1, hour, minute, second)


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


# ---------------------------------------------------------------------------------------------- helpers


class Notes:
    """The notifications of one channel, received on the raw test connection."""

    def __init__(self, db: Any, channel: str) -> None:
        self.db = db
        self.channel = channel
        self._payloads: list[str] = []
        self._arrived = asyncio.Event()

    async def start(self) -> Notes:
        await self.db.add_listener(self.channel, self._on_notify)
        return self

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._payloads.append(payload)
        self._arrived.set()

    async def settle(self) -> list[Any]:
        """Every notification committed before this call (decoded), then forget them.

        A sentinel sent now is delivered after everything committed earlier, so "nothing before the
        sentinel" proves that no notification was sent, without sleeping.
        """
        token = f"sentinel-{uuid.uuid4().hex}"
        await self.db.execute("SELECT pg_notify($1, $2)", self.channel, token)
        async with asyncio.timeout(10):
            while token not in self._payloads:
                self._arrived.clear()
                await self._arrived.wait()
        index = self._payloads.index(token)
        before, self._payloads = self._payloads[:index], self._payloads[index + 1 :]
        return [json.loads(p) for p in before]


@pytest.fixture
async def tick_notes(db: Any) -> Notes:
    """Notifications on ``mq_tick``, the channel of queue ``tick``."""
    return await Notes(db, "mq_tick").start()


async def wait_until(check: Callable[[], Awaitable[bool]], *, timeout: float = 5, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def schedule_row(db: Any, schedule_id: int) -> dict[str, Any]:
    row = await db.fetchrow("SELECT * FROM mq_job_schedule WHERE id = $1", schedule_id)
    assert row is not None, f"no schedule {schedule_id}"
    out = dict(row)
    out["args"] = json.loads(out["args"])
    return out


async def next_time(db: Any, schedule_id: int) -> datetime.datetime | None:
    value: datetime.datetime | None = await db.fetchval(
        "SELECT next_execution_time FROM mq_job_schedule WHERE id = $1", schedule_id
    )
    return value


def _decode(row: Any) -> dict[str, Any]:
    out = dict(row)
    for key in ("args", "trace", "result", "cursor_snapshot"):
        if out.get(key) is not None:
            out[key] = json.loads(out[key])
    return out


async def jobs_in(db: Any, queue: str) -> list[dict[str, Any]]:
    rows = await db.fetch("SELECT * FROM mq_job WHERE queue = $1 ORDER BY id", queue)
    return [_decode(r) for r in rows]


async def job_row(db: Any, job_id: int) -> dict[str, Any]:
    row = await db.fetchrow("SELECT * FROM mq_job WHERE id = $1", job_id)
    assert row is not None, f"no job {job_id}"
    return _decode(row)


async def schedule_links(db: Any) -> list[tuple[int, int]]:
    rows = await db.fetch("SELECT job_id, schedule_id FROM mq_job_schedule_link ORDER BY job_id, schedule_id")
    return [(r["job_id"], r["schedule_id"]) for r in rows]


async def fired_times(db: Any, schedule_id: int) -> list[datetime.datetime]:
    """The scheduled times of the jobs linked to a schedule, in order."""
    rows = await db.fetch(
        "SELECT j.scheduled_time FROM mq_job j JOIN mq_job_schedule_link l ON l.job_id = j.id "
        "WHERE l.schedule_id = $1 ORDER BY j.scheduled_time",
        schedule_id,
    )
    return [r["scheduled_time"] for r in rows]


async def owners(db: Any, queue: str = "tick") -> list[tuple[int, str]]:
    rows = await db.fetch("SELECT lock_id, worker FROM mq_lock WHERE ns = $1 AND key = $2", NS, queue)
    return [(r["lock_id"], r["worker"]) for r in rows]


def lock_id_of(worker: AsyncMQWorker) -> int:
    lock_id = worker.get_status()["lock_id"]
    assert isinstance(lock_id, int)
    return lock_id


async def unheld_lock_id(db: Any) -> int:
    while True:
        lock_id = random.randint(1, 2**31 - 1)
        held = await db.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::int::oid "
            "AND objid = $2::int::oid",
            LOCK_KEY,
            lock_id,
        )
        if held == 0:
            return lock_id


class Recorder:
    """An async handler that records what each job saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, list[int] | None, Any]] = []

    async def __call__(self, job: JobContext) -> Any:
        self.seen.append((job.id, job.schedule_ids, job.args))
        return {"ran": job.id}


async def noop(job: JobContext) -> None:
    return None


# ---------------------------------------------------------------------------------------------- add_schedule


async def test_add_schedule_stores_the_row_and_notifies(
    source: AsyncMQSource, db: Any, tick_notes: Notes
) -> None:
    first = at(12, 1, 30)  # microseconds of dtstart dropped, strictly after 12:00:30.123
    for cursor_key, collapse, stored in [
        (None, None, False),
        ("c", None, True),  # aiomq: collapse by default when a cursor is given
        ("c", False, False),
        ("c", True, True),
        (None, False, False),
    ]:
        schedule = await source.add_schedule(
            "tick",
            "beat",
            {"n": 1},
            rrule="FREQ=MINUTELY",
            cursor_key=cursor_key,
            collapse_on_cursor=collapse,
            now=T0,
        )
        assert await schedule_row(db, schedule.id) == {
            "id": schedule.id,
            "created_time": T0,
            "is_enabled": True,
            "rrule": "FREQ=MINUTELY",
            "queue": "tick",
            "method": "beat",
            "args": {"n": 1},
            "cursor_key": cursor_key,
            "collapse_on_cursor": stored,  # always an explicit value, never NULL
            "next_execution_time": first,
        }, (cursor_key, collapse)
        # The returned row is detached and fully loaded.
        assert (schedule.created_time, schedule.next_execution_time, schedule.collapse_on_cursor) == (
            T0,
            first,
            stored,
        )
        assert await tick_notes.settle() == [{"s": None, "t": epoch(first)}]
    assert await db.fetchval("SELECT count(*) FROM mq_job") == 0


async def test_add_schedule_defaults_and_reload_false(
    source: AsyncMQSource, db: Any, tick_notes: Notes
) -> None:
    schedule = await source.add_schedule("tick", "beat", rrule="FREQ=HOURLY", now=T0, reload=False)
    row = await schedule_row(db, schedule.id)
    assert row["args"] == {}
    assert row["next_execution_time"] == at(13, 0, 30)
    assert await tick_notes.settle() == [], "reload=False must not notify"


async def test_add_schedule_without_now_uses_the_current_time(source: AsyncMQSource, db: Any) -> None:
    before = utcnow()
    schedule = await source.add_schedule("tick", "beat", rrule="FREQ=SECONDLY;INTERVAL=10")
    after = utcnow()
    row = await schedule_row(db, schedule.id)
    assert before <= row["created_time"] <= after
    assert row["created_time"] < row["next_execution_time"] <= after + 10 * SEC


async def test_rrule_with_tzid_is_evaluated_in_its_zone_and_stored_as_naive_utc(
    source: AsyncMQSource, db: Any, tick_notes: Notes
) -> None:
    for now, expected in [
        # Paris is UTC+1 in winter and UTC+2 in summer: 09:00 local is 08:00 or 07:00 UTC.
        (at(12, 0), datetime.datetime(2030, 1, 2, 8, 0)),
        (datetime.datetime(2030, 7, 1, 12, 0), datetime.datetime(2030, 7, 2, 7, 0)),
        (datetime.datetime(2030, 7, 2, 6, 59, 59), datetime.datetime(2030, 7, 2, 7, 0)),
        (datetime.datetime(2030, 7, 2, 7, 0), datetime.datetime(2030, 7, 3, 7, 0)),  # strictly after
    ]:
        schedule = await source.add_schedule("tick", "beat", rrule=PARIS_DAILY_9AM, now=now)
        assert await next_time(db, schedule.id) == expected, now
        assert schedule.next_execution_time == expected
        assert schedule.next_execution_time.tzinfo is None
        assert await tick_notes.settle() == [{"s": None, "t": epoch(expected)}]


async def test_aware_now_is_converted_to_naive_utc(source: AsyncMQSource, db: Any, tick_notes: Notes) -> None:
    paris = datetime.timezone(datetime.timedelta(hours=1))
    schedule = await source.add_schedule(
        "tick", "beat", rrule="FREQ=MINUTELY", now=datetime.datetime(2030, 1, 1, 13, 0, 30, tzinfo=paris)
    )
    row = await schedule_row(db, schedule.id)
    assert (row["created_time"], row["next_execution_time"]) == (at(12, 0, 30), at(12, 1, 30))
    await tick_notes.settle()
    queued = await source.call_schedule(
        schedule.id,
        now=datetime.datetime(2030, 1, 1, 13, 5, tzinfo=paris),
        when=datetime.timedelta(minutes=2),
    )
    job = await job_row(db, queued.id)
    assert (job["created_time"], job["scheduled_time"]) == (at(12, 5), at(12, 7))
    assert await next_time(db, schedule.id) == at(12, 5, 30)


async def test_tzid_rule_advances_in_its_zone_on_call_and_enable(source: AsyncMQSource, db: Any) -> None:
    schedule = await source.add_schedule("tick", "beat", rrule=PARIS_DAILY_9AM, now=at(12, 0))
    await source.call_schedule(schedule.id, now=datetime.datetime(2030, 7, 1, 12, 0))
    assert await next_time(db, schedule.id) == datetime.datetime(2030, 7, 2, 7, 0)
    await source.disable_schedule(schedule.id)
    await source.enable_schedule(schedule.id, now=datetime.datetime(2030, 11, 1, 12, 0))
    assert await next_time(db, schedule.id) == datetime.datetime(2030, 11, 2, 8, 0)


async def test_exhausted_rule_has_no_next_time_and_never_fires(
    source: AsyncMQSource, make_worker: MakeWorker, clock: Clock, db: Any
) -> None:
    ids = []
    for rrule in [
        "FREQ=MINUTELY;COUNT=1",  # the only occurrence is dtstart itself, not after now
        "FREQ=DAILY;UNTIL=20200101T000000",
        "DTSTART:20200101T000000\nRRULE:FREQ=DAILY;COUNT=3",  # its own DTSTART wins, all in the past
    ]:
        schedule = await source.add_schedule("tick", "beat", rrule=rrule, now=clock.now)
        row = await schedule_row(db, schedule.id)
        assert (row["is_enabled"], row["next_execution_time"]) == (True, None), rrule
        ids.append(schedule.id)
    clock.advance(days=30)
    await make_worker({"tick": noop}, clock=clock, timeout=3600).run_until_idle()
    assert await jobs_in(db, "tick") == []
    assert [await next_time(db, i) for i in ids] == [None, None, None]


async def test_rule_exhausted_after_its_last_occurrence(
    source: AsyncMQSource, make_worker: MakeWorker, clock: Clock, db: Any
) -> None:
    t0 = clock.now
    schedule = await source.add_schedule("tick", "beat", rrule="FREQ=MINUTELY;COUNT=2", now=t0)
    assert await next_time(db, schedule.id) == t0 + MIN
    clock.advance(minutes=1)
    await make_worker({"tick": noop}, clock=clock, timeout=3600).run_until_idle()
    assert [j["scheduled_time"] for j in await jobs_in(db, "tick")] == [t0 + MIN]
    assert await next_time(db, schedule.id) is None
    clock.advance(hours=1)
    await make_worker({"tick": noop}, clock=clock, timeout=3600).run_until_idle()
    assert len(await jobs_in(db, "tick")) == 1


async def test_disabled_on_add_still_stores_next_time_but_never_fires(
    source: AsyncMQSource, make_worker: MakeWorker, clock: Clock, db: Any
) -> None:
    t0 = clock.now
    schedule = await source.add_schedule("tick", "beat", rrule="FREQ=MINUTELY", is_enabled=False, now=t0)
    row = await schedule_row(db, schedule.id)
    assert (row["is_enabled"], row["next_execution_time"]) == (False, t0 + MIN)
    clock.advance(minutes=5)
    await make_worker({"tick": noop}, clock=clock, timeout=3600).run_until_idle()
    assert await jobs_in(db, "tick") == []
    assert await next_time(db, schedule.id) == t0 + MIN


async def test_add_schedule_rejects_bad_input_and_writes_nothing(
    source: AsyncMQSource, db: Any, tick_notes: Notes
) -> None:
    cases: list[tuple[dict[str, Any], type[Exception]]] = [
        ({"rrule": "FREQ=NEVER"}, ValueError),
        ({"rrule": "bogus"}, ValueError),
        ({"rrule": ""}, ValueError),
        ({"rrule": "FREQ=DAILY;BYHOUR=99"}, ValueError),
        ({"rrule": "FREQ=DAILY", "collapse_on_cursor": True}, ValueError),
        ({"rrule": "FREQ=DAILY", "queue": "bad-queue"}, ValueError),
        ({"rrule": "FREQ=DAILY", "queue": "9lives"}, ValueError),
        ({"rrule": "FREQ=DAILY", "queue": ""}, ValueError),
        ({"rrule": "FREQ=DAILY", "args": {"a": {1, 2}}}, TypeError),
    ]
    for overrides, error in cases:
        kw: dict[str, Any] = {"queue": "tick", "method": "beat", "args": {}, "now": T0, **overrides}
        with pytest.raises(error):
            await source.add_schedule(kw.pop("queue"), kw.pop("method"), kw.pop("args"), **kw)
    assert await db.fetchval("SELECT count(*) FROM mq_job_schedule") == 0
    assert await tick_notes.settle() == []


async def test_get_schedule(source: AsyncMQSource) -> None:
    schedule = await source.add_schedule("tick", "beat", {"n": 2}, rrule="FREQ=MINUTELY", now=T0)
    got = await source.get_schedule(schedule.id)
    assert (got.id, got.queue, got.method, got.args, got.rrule, got.next_execution_time) == (
        schedule.id,
        "tick",
        "beat",
        {"n": 2},
        "FREQ=MINUTELY",
        at(12, 1, 30),
    )
    with pytest.raises(LookupError):
        await source.get_schedule(schedule.id + 1000)
    assert await source.get_schedule(schedule.id + 1000, raises=False) is None


# ------------------------------------------------------------------------------------------- enable / disable


async def test_disable_and_enable_schedule(source: AsyncMQSource, db: Any, tick_notes: Notes) -> None:
    schedule = await source.add_schedule("tick", "beat", rrule="FREQ=MINUTELY", now=T0)
    await tick_notes.settle()

    await source.disable_schedule(schedule.id)
    row = await schedule_row(db, schedule.id)
    assert (row["is_enabled"], row["next_execution_time"]) == (False, None)
    assert await tick_notes.settle() == [], "disable_schedule sends no NOTIFY"

    await source.disable_schedule(schedule.id)  # already disabled: a no-op
    assert await schedule_row(db, schedule.id) == row
    assert await tick_notes.settle() == []

    # Next time from created_time (occurrences on :30), strictly after now.
    await source.enable_schedule(schedule.id, now=at(12, 5, 30))
    row = await schedule_row(db, schedule.id)
    assert (row["is_enabled"], row["next_execution_time"]) == (True, at(12, 6, 30))
    assert row["created_time"] == T0
    assert await tick_notes.settle() == [{"s": None, "t": epoch(at(12, 6, 30))}]

    await source.enable_schedule(schedule.id, now=at(12, 9))  # already enabled: a no-op
    assert await next_time(db, schedule.id) == at(12, 6, 30)
    assert await tick_notes.settle() == []

    await source.disable_schedule(schedule.id)
    await source.enable_schedule(schedule.id, now=at(12, 9), reload=False)
    assert await next_time(db, schedule.id) == at(12, 9, 30)
    assert await tick_notes.settle() == [], "reload=False must not notify"


async def test_enable_exhausted_schedule_keeps_next_time_null(
    source: AsyncMQSource, db: Any, tick_notes: Notes
) -> None:
    schedule = await source.add_schedule("tick", "beat", rrule="FREQ=MINUTELY;COUNT=3", now=T0)
    await source.disable_schedule(schedule.id)
    await tick_notes.settle()
    await source.enable_schedule(schedule.id, now=at(13, 0))
    row = await schedule_row(db, schedule.id)
    assert (row["is_enabled"], row["next_execution_time"]) == (True, None)
    assert await tick_notes.settle() == []


async def test_schedule_methods_on_a_missing_id_raise_lookup_error(source: AsyncMQSource) -> None:
    with pytest.raises(LookupError):
        await source.disable_schedule(12345)
    with pytest.raises(LookupError):
        await source.enable_schedule(12345)
    with pytest.raises(LookupError):
        await source.call_schedule(12345)


# ---------------------------------------------------------------------------------------------- call_schedule


async def test_call_schedule_enqueues_a_linked_job_and_consumes_occurrences(
    source: AsyncMQSource, db: Any, tick_notes: Notes
) -> None:
    schedule = await source.add_schedule("tick", "beat", {"n": 3}, rrule="FREQ=MINUTELY", now=T0)
    await tick_notes.settle()
    now = at(12, 3, 45)
    queued = await source.call_schedule(schedule.id, now=now)
    assert (queued.queue, queued.method, queued.cursor_key, queued.scheduled_time, queued.created) == (
        "tick",
        "beat",
        None,
        now,
        True,
    )
    job = await job_row(db, queued.id)
    assert job["state"] == "pending"
    assert (job["created_time"], job["scheduled_time"]) == (now, now)
    assert job["args"] == {"n": 3}
    assert job["trace"] == {"mq_schedule_ids": [schedule.id]}
    assert job["collapsible"] is False
    assert await schedule_links(db) == [(queued.id, schedule.id)]
    # 12:01:30 .. 12:03:30 are consumed; the next is the first occurrence strictly after now.
    assert await next_time(db, schedule.id) == at(12, 4, 30)
    assert await tick_notes.settle() == [
        {"j": queued.id, "t": epoch(now)},
        {"s": None, "t": epoch(at(12, 4, 30))},
    ]


async def test_call_schedule_when_and_reload_false(source: AsyncMQSource, db: Any, tick_notes: Notes) -> None:
    schedule = await source.add_schedule("tick", "beat", rrule="FREQ=MINUTELY", now=T0)
    await tick_notes.settle()
    now = at(12, 3, 45)
    when = at(13, 0)
    queued = await source.call_schedule(schedule.id, now=now, when=when, reload=False)
    job = await job_row(db, queued.id)
    assert (job["created_time"], job["scheduled_time"]) == (now, when)
    assert await next_time(db, schedule.id) == at(12, 4, 30)
    assert await tick_notes.settle() == [{"j": queued.id, "t": epoch(when)}]


async def test_call_schedule_on_a_disabled_schedule(
    source: AsyncMQSource, db: Any, tick_notes: Notes
) -> None:
    schedule = await source.add_schedule("tick", "beat", rrule="FREQ=MINUTELY", now=T0)
    await source.disable_schedule(schedule.id)
    await tick_notes.settle()
    now = at(12, 3, 45)
    queued = await source.call_schedule(schedule.id, now=now)
    job = await job_row(db, queued.id)
    assert (job["scheduled_time"], job["trace"]) == (now, {"mq_schedule_ids": [schedule.id]})
    assert await schedule_links(db) == [(queued.id, schedule.id)]
    row = await schedule_row(db, schedule.id)
    assert (row["is_enabled"], row["next_execution_time"]) == (False, None)
    assert await tick_notes.settle() == [{"j": queued.id, "t": epoch(now)}]


async def test_call_collapsing_schedules_join_one_job(source: AsyncMQSource, db: Any) -> None:
    first = await source.add_schedule(
        "tick", "beat", {"from": 1}, rrule="FREQ=HOURLY", cursor_key="c", now=T0
    )
    second = await source.add_schedule(
        "tick", "beat", {"from": 2}, rrule="FREQ=DAILY", cursor_key="c", now=T0
    )
    a = await source.call_schedule(first.id, now=at(12, 5))
    b = await source.call_schedule(second.id, now=at(12, 6))
    assert (a.id, a.created, b.id, b.created) == (a.id, True, a.id, False)
    [job] = await jobs_in(db, "tick")
    assert job["args"] == {"from": 1}
    assert job["scheduled_time"] == at(12, 5)
    assert sorted(job["trace"]["mq_schedule_ids"]) == sorted([first.id, second.id])
    assert await schedule_links(db) == sorted([(a.id, first.id), (a.id, second.id)])


async def test_reload_scheduler(source: AsyncMQSource, tick_notes: Notes) -> None:
    await source.reload_scheduler("tick", now=T0)
    assert await tick_notes.settle() == [{"s": None, "t": epoch(T0)}]
    with pytest.raises(ValueError, match="queue"):
        await source.reload_scheduler("not a queue", now=T0)


# ---------------------------------------------------------------------------------------------- firing


async def test_worker_fires_a_due_schedule_once_without_backfill(
    source: AsyncMQSource, make_worker: MakeWorker, clock: Clock, db: Any
) -> None:
    t0 = clock.now
    schedule = await source.add_schedule("tick", "beat", {"n": 1}, rrule="FREQ=MINUTELY", now=t0)
    handler = Recorder()

    await make_worker({"tick": handler}, clock=clock, timeout=3600).run_until_idle()
    assert await jobs_in(db, "tick") == [], "fired before its time"
    assert await next_time(db, schedule.id) == t0 + MIN

    clock.advance(minutes=1)  # exactly the occurrence
    await make_worker({"tick": handler}, clock=clock, timeout=3600).run_until_idle()
    [job] = await jobs_in(db, "tick")
    assert (job["scheduled_time"], job["created_time"]) == (t0 + MIN, t0 + MIN)
    assert job["trace"] == {"mq_schedule_ids": [schedule.id]}
    assert (job["state"], job["result"]) == ("completed", {"ran": job["id"]})
    assert await schedule_links(db) == [(job["id"], schedule.id)]
    assert handler.seen == [(job["id"], [schedule.id], {"n": 1})]
    assert await next_time(db, schedule.id) == t0 + 2 * MIN

    # Three occurrences missed (t0+2m, +3m, +4m), within the stale window: one job, for the oldest.
    clock.advance(minutes=3, seconds=10)
    await make_worker({"tick": handler}, clock=clock, timeout=3600).run_until_idle()
    jobs = await jobs_in(db, "tick")
    assert len(jobs) == 2
    assert (jobs[1]["scheduled_time"], jobs[1]["created_time"]) == (t0 + 2 * MIN, clock.now)
    assert await next_time(db, schedule.id) == t0 + 5 * MIN


async def test_worker_leaves_other_queues_and_disabled_schedules_alone(
    source: AsyncMQSource, make_worker: MakeWorker, clock: Clock, db: Any
) -> None:
    t0 = clock.now
    other = await source.add_schedule("other", "beat", rrule="FREQ=MINUTELY", now=t0)
    disabled = await source.add_schedule("tick", "off", rrule="FREQ=MINUTELY", now=t0)
    await source.disable_schedule(disabled.id)
    disabled_later = await source.add_schedule(
        "tick", "off_too", rrule="FREQ=MINUTELY", is_enabled=False, now=t0
    )
    live = await source.add_schedule("tick", "on", rrule="FREQ=MINUTELY", now=t0)
    clock.advance(minutes=2)
    await make_worker({"tick": noop}, clock=clock, timeout=3600).run_until_idle()
    assert [j["method"] for j in await jobs_in(db, "tick")] == ["on"]
    assert await jobs_in(db, "other") == []
    assert await next_time(db, other.id) == t0 + MIN, "a schedule of a queue the worker does not serve"
    assert await next_time(db, disabled.id) is None
    assert await next_time(db, disabled_later.id) == t0 + MIN
    assert await next_time(db, live.id) == t0 + 3 * MIN
    assert await owners(db, "other") == []


async def test_stale_schedules_skip_to_the_cutoff_and_fire_at_most_once(
    source: AsyncMQSource,
    make_worker: MakeWorker,
    clock: Clock,
    db: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="aiomq")
    t0 = clock.now
    # Occurrences at t0 + 60k s and at t0 + 12 + 60k s; both are due at t0 + 1 min (+12 s).
    firing = await source.add_schedule("tick", "firing", rrule="FREQ=MINUTELY", now=t0)
    waiting = await source.add_schedule("tick", "waiting", rrule="FREQ=MINUTELY", now=t0 + 12 * SEC)
    clock.advance(seconds=602)  # now = t0+10m2s; with timeout=5 the cut-off is t0+9m57s
    await make_worker({"tick": noop}, clock=clock, timeout=5).run_until_idle()
    jobs = await jobs_in(db, "tick")
    # "firing" skips to t0+10m (<= now) and fires once; "waiting" skips to t0+10m12s, not yet due.
    assert [(j["method"], j["scheduled_time"], j["created_time"]) for j in jobs] == [
        ("firing", t0 + 600 * SEC, clock.now)
    ]
    assert await next_time(db, firing.id) == t0 + 660 * SEC
    assert await next_time(db, waiting.id) == t0 + 612 * SEC
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for method in ("firing", "waiting"):
        assert any(method in w for w in warnings), f"no WARNING about skipping schedule {method}: {warnings}"


async def test_collapsing_schedules_fired_by_the_worker_share_one_pending_job(
    source: AsyncMQSource, make_worker: MakeWorker, clock: Clock, db: Any
) -> None:
    t0 = clock.now
    first = await source.add_schedule(
        "tick", "beat", {"from": 1}, rrule="FREQ=MINUTELY", cursor_key="c", now=t0
    )
    second = await source.add_schedule(
        "tick", "beat", {"from": 2}, rrule="FREQ=MINUTELY", cursor_key="c", now=t0
    )
    assert (first.collapse_on_cursor, second.collapse_on_cursor) == (True, True)
    # A job running on cursor "c" for a live (advisory-locked) owner keeps the collapsed job pending.
    blocker = await source.call("tick", "block", cursor_key="c", collapse_on_cursor=False, now=t0)
    lock_id = await unheld_lock_id(db)
    assert await db.fetchval("SELECT pg_try_advisory_lock($1::int4, $2::int4)", LOCK_KEY, lock_id)
    await db.execute(
        "UPDATE mq_job SET state = 'running', lock_id = $2, worker = 'elsewhere', start_time = $3 "
        "WHERE id = $1",
        blocker.id,
        lock_id,
        t0,
    )
    clock.advance(minutes=1)
    await make_worker({"tick": noop}, clock=clock, timeout=3600).run_until_idle()
    pending = [j for j in await jobs_in(db, "tick") if j["method"] == "beat"]
    assert len(pending) == 1, pending
    [job] = pending
    assert job["state"] == "pending"
    assert job["collapsible"] is True
    assert job["scheduled_time"] == t0 + MIN
    assert sorted(job["trace"]["mq_schedule_ids"]) == sorted([first.id, second.id])
    assert await schedule_links(db) == sorted([(job["id"], first.id), (job["id"], second.id)])
    assert await next_time(db, first.id) == t0 + 2 * MIN
    assert await next_time(db, second.id) == t0 + 2 * MIN
    await db.execute("SELECT pg_advisory_unlock($1::int4, $2::int4)", LOCK_KEY, lock_id)


async def test_a_schedule_aiomq_cannot_evaluate_does_not_block_the_others(
    source: AsyncMQSource, make_worker: MakeWorker, clock: Clock, db: Any
) -> None:
    """A schedule row whose rrule cannot be evaluated (edited by hand, written by other code) is one bad
    row: the other due schedules of the queue still fire."""
    t0 = clock.now
    good = await source.add_schedule("tick", "good", rrule="FREQ=MINUTELY", now=t0)
    bad = await source.add_schedule("tick", "bad", rrule="FREQ=MINUTELY", now=t0)
    await db.execute("UPDATE mq_job_schedule SET rrule = 'FREQ=MINUTLY' WHERE id = $1", bad.id)
    clock.advance(minutes=1)
    async with asyncio.timeout(30):
        await make_worker({"tick": noop}, clock=clock, timeout=3600).run_until_idle()
    assert [j["method"] for j in await jobs_in(db, "tick")] == ["good"]
    assert await next_time(db, good.id) == t0 + 2 * MIN


async def test_a_stale_schedule_aiomq_cannot_evaluate_does_not_block_maintenance(
    source: AsyncMQSource, make_worker: MakeWorker, clock: Clock, db: Any
) -> None:
    """The stale skip runs in the maintenance transaction: one bad rrule must not stop lost-job detection
    (nor the other schedules) for good."""
    t0 = clock.now
    good = await source.add_schedule("tick", "good", rrule="FREQ=MINUTELY", now=t0)
    bad = await source.add_schedule("tick", "bad", rrule="FREQ=MINUTELY", now=t0)
    await db.execute("UPDATE mq_job_schedule SET rrule = 'FREQ=MINUTLY' WHERE id = $1", bad.id)
    orphan = await source.call("tick", "orphan", now=t0)
    await db.execute(
        "UPDATE mq_job SET state = 'running', lock_id = $2, worker = 'gone', start_time = $3 WHERE id = $1",
        orphan.id,
        await unheld_lock_id(db),
        t0,
    )
    clock.advance(seconds=602)  # both schedules are stale (timeout=5)
    async with asyncio.timeout(30):
        await make_worker({"tick": noop}, clock=clock, timeout=5).run_until_idle()
    assert (await job_row(db, orphan.id))["state"] == "lost", "maintenance did not mark the lost job"
    assert [
        (j["method"], j["scheduled_time"]) for j in await jobs_in(db, "tick") if j["method"] != "orphan"
    ] == [("good", t0 + 600 * SEC)]
    assert await next_time(db, good.id) == t0 + 660 * SEC


# ---------------------------------------------------------------------------------------------- ownership


async def test_scheduler_row_of_a_live_owner_is_respected_and_a_stale_one_taken_over(
    source: AsyncMQSource,
    make_worker: MakeWorker,
    clock: Clock,
    db: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="aiomq")
    t0 = clock.now
    schedule = await source.add_schedule("tick", "beat", rrule="FREQ=MINUTELY", now=t0)
    # Someone else owns the queue's schedules and is alive (its advisory lock is held).
    lock_id = await unheld_lock_id(db)
    assert await db.fetchval("SELECT pg_try_advisory_lock($1::int4, $2::int4)", LOCK_KEY, lock_id)
    await db.execute(
        "INSERT INTO mq_lock (ns, key, lock_id, worker) VALUES ($1, 'tick', $2, 'other-owner')", NS, lock_id
    )
    clock.advance(minutes=1)
    await make_worker({"tick": noop}, clock=clock, timeout=3600).run_until_idle()
    assert await jobs_in(db, "tick") == [], "a worker that does not own the queue's schedules fired one"
    assert await next_time(db, schedule.id) == t0 + MIN
    assert await owners(db) == [(lock_id, "other-owner")]

    # The owner dies: its row is stale, deleted by maintenance, and the worker takes over.
    await db.execute("SELECT pg_advisory_unlock($1::int4, $2::int4)", LOCK_KEY, lock_id)
    await make_worker({"tick": noop}, clock=clock, timeout=3600).run_until_idle()
    [job] = await jobs_in(db, "tick")
    assert job["scheduled_time"] == t0 + MIN
    assert await next_time(db, schedule.id) == t0 + 2 * MIN
    assert await owners(db) == [], "run_until_idle releases the ownership it took"
    assert any(r.levelno == logging.WARNING and "other-owner" in r.getMessage() for r in caplog.records), (
        "a released stale lock is logged at WARNING"
    )


async def test_live_workers_own_and_hand_over_scheduling(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    t0 = at(12, 0)
    schedule = await source.add_schedule("tick", "beat", rrule="FREQ=MINUTELY", now=t0)
    # Two clocks: for w1 (the owner) the schedule is not due yet; for w2 it is. So a job can only
    # come from w2 firing, which it may do only once it owns the queue's schedules.
    w1 = make_worker({"tick": noop}, timeout=0.5, name="w1", clock=lambda: t0)
    w2 = make_worker({"tick": noop}, timeout=0.5, name="w2", clock=lambda: t0 + MIN)
    await w1.__aenter__()
    lock1 = lock_id_of(w1)

    async def w1_owns() -> bool:
        return await owners(db) == [(lock1, "w1")]

    await wait_until(w1_owns, what="w1 to own the schedules of queue tick")
    async with w2:
        lock2 = lock_id_of(w2)
        await asyncio.sleep(1.2)  # a few maintenance passes of w2
        assert await owners(db) == [(lock1, "w1")]
        assert await jobs_in(db, "tick") == [], "w2 fired a schedule it does not own"
        assert await next_time(db, schedule.id) == t0 + MIN

        await w1.stop()  # graceful: its mq_lock row is gone at once
        assert (lock1, "w1") not in await owners(db)

        async def w2_owns() -> bool:
            return await owners(db) == [(lock2, "w2")]

        await wait_until(w2_owns, timeout=3, what="w2 to take over the schedules of queue tick")

        async def fired() -> bool:
            return len(await jobs_in(db, "tick")) > 0

        await wait_until(fired, timeout=3, what="w2 to fire the schedule")
        [job] = await jobs_in(db, "tick")
        assert (job["scheduled_time"], job["created_time"]) == (t0 + MIN, t0 + MIN)
    assert await owners(db) == []


async def test_two_live_workers_fire_each_occurrence_exactly_once(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    w1 = make_worker({"tick": noop}, timeout=0.5, name="w1")
    w2 = make_worker({"tick": noop}, timeout=0.5, name="w2")
    async with w1, w2:
        locks = {lock_id_of(w1), lock_id_of(w2)}

        async def one_owner() -> bool:
            rows = await owners(db)
            return len(rows) == 1 and rows[0][0] in locks

        await wait_until(one_owner, what="one of the workers to own the schedules")
        schedule = await source.add_schedule("tick", "beat", rrule="FREQ=SECONDLY")
        await asyncio.sleep(3.2)
        assert len(await owners(db)) == 1
    times = await fired_times(db, schedule.id)
    assert len(times) >= 2, times
    assert len(times) == len(set(times)), f"an occurrence fired twice: {times}"
    assert times == [times[0] + i * SEC for i in range(len(times))], f"an occurrence was skipped: {times}"


async def test_idle_owner_wakes_on_add_schedule_notify(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any
) -> None:
    worker = make_worker({"tick": noop}, timeout=30)  # its timer alone would wake it in 30 s
    async with worker:
        lock_id = lock_id_of(worker)

        async def owns() -> bool:
            return await owners(db) == [(lock_id, worker.name)]

        await wait_until(owns, what="the worker to own the schedules of queue tick")
        schedule = await source.add_schedule("tick", "beat", rrule="FREQ=SECONDLY;INTERVAL=2")

        async def fired() -> bool:
            return bool(await fired_times(db, schedule.id))

        await wait_until(fired, timeout=4, what="the schedule to fire")
    job = (await jobs_in(db, "tick"))[0]
    assert job["scheduled_time"] == schedule.next_execution_time
    late = job["created_time"] - job["scheduled_time"]
    assert datetime.timedelta(0) <= late < datetime.timedelta(seconds=0.5), late


# ---------------------------------------------------------------------------------------------- psycopg2_mq


@pytest.fixture
def sync_engine(database: str) -> Iterator[sa.Engine]:
    engine = sa.create_engine(sa.make_url(database).set(drivername="postgresql+psycopg2"))
    try:
        yield engine
    finally:
        engine.dispose()


class P2Tick:
    """A psycopg2_mq handler."""

    def execute_job(self, job: Any) -> Any:
        return {"by": "psycopg2_mq"}


@pytest.mark.interop
async def test_psycopg2_mq_and_aiomq_workers_elect_one_scheduler(
    source: AsyncMQSource, make_worker: MakeWorker, db: Any, sync_engine: sa.Engine
) -> None:
    p2 = psycopg2_mq.MQWorker(
        engine=sync_engine,
        queues={"tick": P2Tick()},
        model=psycopg2_mq.make_default_model(sa.MetaData()),
        capture_signals=False,
        jitter=0,
        timeout=1,
        retry_intervals=(0.1, 0.2, 0.5, 1),
        name="p2",
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            p2.run()
        except BaseException as ex:
            errors.append(ex)

    thread = threading.Thread(target=run, name="psycopg2_mq worker", daemon=True)
    thread.start()
    try:

        async def p2_owns() -> bool:
            assert thread.is_alive(), errors
            lock_id = p2._lock_id
            return lock_id is not None and await owners(db) == [(lock_id, "p2")]

        await wait_until(p2_owns, timeout=10, what="psycopg2_mq to own the schedules of queue tick")
        p2_lock = p2._lock_id
        async with make_worker({"tick": noop}, timeout=1, name="aio") as aio:
            aio_lock = lock_id_of(aio)
            schedule = await source.add_schedule("tick", "beat", rrule="FREQ=SECONDLY")
            await asyncio.sleep(2.2)
            assert await owners(db) == [(p2_lock, "p2")], "exactly one scheduler for queue tick"
            p2_phase = await fired_times(db, schedule.id)

            p2.shutdown_gracefully()
            await asyncio.to_thread(thread.join, 10)
            assert not thread.is_alive(), "psycopg2_mq worker did not stop"
            assert not errors, errors
            handover = utcnow()

            async def aio_owns() -> bool:
                return await owners(db) == [(aio_lock, "aio")]

            await wait_until(aio_owns, timeout=4, what="aiomq to take over the schedules of queue tick")
            await asyncio.sleep(2.2)
            assert await owners(db) == [(aio_lock, "aio")]
    finally:
        if thread.is_alive():
            p2.shutdown_gracefully()
            await asyncio.to_thread(thread.join, 10)
    times = await fired_times(db, schedule.id)
    assert len(times) == len(set(times)), f"an occurrence fired twice: {times}"
    assert len(p2_phase) >= 1, "psycopg2_mq, the owner, fired nothing"
    created = [
        r["created_time"]
        for r in await db.fetch(
            "SELECT j.created_time FROM mq_job j JOIN mq_job_schedule_link l ON l.job_id = j.id "
            "WHERE l.schedule_id = $1",
            schedule.id,
        )
    ]
    assert any(c > handover for c in created), "aiomq fired nothing after taking over"
