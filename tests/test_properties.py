"""Property tests: random sequences of source calls and worker runs, against the database and a model.

A hypothesis state machine drives the real ``AsyncMQSource`` and ``AsyncMQWorker.run_until_idle()`` on a
real database, and a small pure-Python model of the reference's cursor and collapse rules (reference §4,
§8: states and transitions, the collapse slot per (cursor_key, queue, method), one running or lost job per
cursor across queues, due order within a cursor, the cursor saved on success or with
``FailedJobError(update_cursor=True)``, lost jobs blocking their cursor). After every step every job row
and every cursor row must equal the model's.

Steps: ``call`` (with and without cursors, ``collapse_on_cursor`` None/True/False, ``when`` as a delay, a
naive or an aware datetime, a plain or a coroutine ``conflict_resolver``), ``cancel_job``, ``retry_job``,
``fail_lost_job``, a worker run whose handlers succeed, raise, or raise
``FailedJobError(update_cursor=True)`` (chosen per method), a crash (a job claimed by a worker that dies:
its next maintenance marks it lost), and moving the clock.

Retries (DESIGN §7.1): the worker retries the jobs of queue ``pb`` that raise (``RETRY``: two runs, five
seconds apart), so a failure there is recorded with a new pending job on the same cursor, its trace
pointing back (``mq_source_job_id``, ``aiomq_attempt``) and the failed job's pointing forward
(``aiomq_retried_by``). ``FailedJobError`` is never retried, and a retry that fails again has no run left.
The retry's id comes from the database (ids are not predictable: a collapsing insert consumes one too);
everything else about it is the model's.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime
import itertools
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from aiomq import AsyncMQSource, AsyncMQWorker, FailedJobError, JobContext, QueuedJob, Retry

from .conftest import METADATA, MODEL, asyncpg_url

T = TypeVar("T")

QUEUES = ("pa", "pb")
METHODS = ("m1", "m2")
# Draws lean on few collapse slots and cursors, so that joins, blocked cursors and cross-queue cursors
# come up within a few steps.
QUEUE_DRAWS = ("pa", "pa", "pb")
METHOD_DRAWS = ("m1", "m1", "m1", "m2")
CURSOR_DRAWS = (None, "c1", "c1", "c1", "c2", "c2")
MODES = ("ok", "raise", "fail_update")
LOCK_KEY = 1250360252
GHOST_LOCK_ID = 7  # an advisory lock nobody holds: a job running under it belongs to a dead worker
RETRY_QUEUE = "pb"
RETRY = Retry(max_attempts=2, backoff=5)

SETTINGS = settings(
    max_examples=int(os.environ.get("AIOMQ_PROPERTY_EXAMPLES", "20")),
    stateful_step_count=20,
    deadline=None,
    # The machine builds its own engine on the test's database URL; only that URL comes from a
    # function-scoped fixture, and each example starts by emptying the tables.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclasses.dataclass(frozen=True)
class Call:
    """One ``call``: ``offset`` is ``when`` in seconds from now (None: not given), passed as a delay, a
    naive or an aware datetime."""

    queue: str
    method: str
    cursor_key: str | None
    collapse: bool | None
    offset: int | None
    when_kind: str
    resolver: str | None


VARIANTS = st.builds(
    Call,
    queue=st.just(QUEUES[0]),
    method=st.just(METHODS[0]),
    cursor_key=st.none(),
    collapse=st.sampled_from([None, None, True, False]),
    offset=st.sampled_from([None, -5, 0, 3, 30]),
    when_kind=st.sampled_from(["delay", "naive", "aware"]),
    resolver=st.sampled_from([None, "sync", "async"]),
)
CALLS = st.builds(
    Call,
    queue=st.sampled_from(QUEUE_DRAWS),
    method=st.sampled_from(METHOD_DRAWS),
    cursor_key=st.sampled_from(CURSOR_DRAWS),
    collapse=st.sampled_from([None, None, True, False]),
    offset=st.sampled_from([None, -5, 0, 3, 30]),
    when_kind=st.sampled_from(["delay", "naive", "aware"]),
    resolver=st.sampled_from([None, "sync", "async"]),
)
SLOTS = st.tuples(st.sampled_from(QUEUES), st.sampled_from(METHODS), st.sampled_from(("c1", "c2")))


@dataclasses.dataclass(frozen=True)
class Raised:
    """The expected result of a job whose handler raised ``RuntimeError(message)``."""

    message: str


@dataclasses.dataclass
class MJob:
    id: int
    queue: str
    method: str
    cursor_key: str | None
    collapsible: bool
    scheduled_time: datetime.datetime
    created_time: datetime.datetime
    args: dict[str, Any]
    trace: Any
    state: str = "pending"
    result: Any = None

    def due_key(self) -> tuple[datetime.datetime, datetime.datetime, int]:
        return (self.scheduled_time, self.created_time, self.id)


class QueueModel:
    """The reference's rules for job states, collapsing and cursors, in plain Python."""

    def __init__(self, now: datetime.datetime) -> None:
        self.now = now
        self.jobs: dict[int, MJob] = {}
        self.cursors: dict[str, dict[str, Any]] = {}
        self.updated_by: dict[str, int] = {}

    def busy_cursors(self) -> set[str]:
        return {j.cursor_key for j in self.jobs.values() if j.cursor_key and j.state in ("running", "lost")}

    def collapse_target(self, queue: str, method: str, cursor_key: str) -> MJob | None:
        for job in self.jobs.values():
            slot = (job.cursor_key, job.queue, job.method)
            if job.state == "pending" and job.collapsible and slot == (cursor_key, queue, method):
                return job
        return None

    def claimable(self) -> list[MJob]:
        """What a claim could take now: due pending jobs, the first in due order on each free cursor."""
        busy = self.busy_cursors()
        firsts: list[MJob] = []
        seen: set[str] = set()
        for job in sorted(self.jobs.values(), key=MJob.due_key):
            if job.state != "pending" or job.scheduled_time > self.now:
                continue
            if job.cursor_key is None:
                firsts.append(job)
            elif job.cursor_key not in busy and job.cursor_key not in seen:
                seen.add(job.cursor_key)
                firsts.append(job)
        return firsts

    def work(self, modes: dict[str, str], retried_by: dict[int, int]) -> None:
        """run_until_idle: maintenance marks dead workers' jobs lost, then every due job on a free cursor
        runs, in due order within each cursor. ``retried_by``: the database's ids of the retries of the
        jobs that failed (a retry is due ``RETRY.backoff`` later, so none runs in the same pass)."""
        for job in self.jobs.values():
            if job.state == "running":
                job.state = "lost"
        busy = self.busy_cursors()
        for job in sorted(self.jobs.values(), key=MJob.due_key):
            if job.state != "pending" or job.scheduled_time > self.now or job.cursor_key in busy:
                continue
            self.run(job, modes[job.method])
            if job.state == "failed" and isinstance(job.result, Raised):
                self.maybe_retry(job, retried_by)

    def maybe_retry(self, job: MJob, retried_by: dict[int, int]) -> None:
        attempt = (job.trace or {}).get("aiomq_attempt", 1) if isinstance(job.trace, dict) else 1
        if job.queue != RETRY_QUEUE or not RETRY.runs_left(attempt):
            assert job.id not in retried_by, f"job {job.id} was retried without a run left"
            return
        assert job.id in retried_by, f"job {job.id} failed with a run left but was not retried"
        retry_id = retried_by[job.id]
        trace = dict(job.trace) if isinstance(job.trace, dict) else {}
        job.trace = {**trace, "aiomq_retried_by": retry_id}
        trace.pop("aiomq_retried_by", None)  # a retry_job copy of a retried job carries its original's
        self.jobs[retry_id] = MJob(
            id=retry_id,
            queue=job.queue,
            method=job.method,
            cursor_key=job.cursor_key,
            collapsible=False,
            scheduled_time=self.now + datetime.timedelta(seconds=RETRY.wait(attempt)),
            created_time=self.now,
            args=copy.deepcopy(job.args),
            trace={**trace, "mq_source_job_id": job.id, "aiomq_attempt": attempt + 1},
        )

    def run(self, job: MJob, mode: str) -> None:
        seen = None
        if job.cursor_key is not None:
            seen = self.cursors.get(job.cursor_key, {}).get("n", 0)
        if mode == "ok":
            job.state, job.result = "completed", {"seen": seen}
        elif mode == "raise":
            job.state, job.result = "failed", Raised(f"boom {job.id}")
        else:
            job.state, job.result = "failed", {"seen": seen, "failed": True}
        if job.cursor_key is not None and mode != "raise":
            assert seen is not None
            new = {"n": seen + 1, "last": job.id}
            if self.cursors.get(job.cursor_key) != new:
                self.cursors[job.cursor_key] = new
                self.updated_by[job.cursor_key] = job.id


class Runner:
    """Runs coroutines on one event loop of the state machine's own (the test itself is synchronous)."""

    def __init__(self) -> None:
        self._runner = asyncio.Runner(loop_factory=asyncio.new_event_loop)

    def __call__(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return self._runner.run(factory())

    def close(self) -> None:
        self._runner.close()


def machine_for(database: str) -> type[RuleBasedStateMachine]:
    url = asyncpg_url(database)

    class QueueMachine(RuleBasedStateMachine):
        jobs = Bundle("jobs")

        def __init__(self) -> None:
            super().__init__()
            self.run = Runner()
            self.engine: AsyncEngine = create_async_engine(url, pool_size=5)
            self.source = AsyncMQSource(engine=self.engine, model=MODEL)
            now = datetime.datetime(2030, 1, 1, 12, 0, 0)
            self.model = QueueModel(now)
            self.tags = itertools.count(1)
            self.modes: dict[str, str] = {}
            self.active: set[str] = set()
            self.overlaps: list[str] = []
            self.worker = AsyncMQWorker(
                engine=self.engine,
                queues=dict.fromkeys(QUEUES, self.handle),
                model=MODEL,
                clock=lambda: self.model.now,
                timeout=3600,
                retry_intervals=(0.05, 0.1),
                retry={RETRY_QUEUE: RETRY},
                lost_grace=10**9,  # the model leaves lost jobs to a person (tests/test_abort_and_lost.py)
            )
            self.run(self._empty_tables)

        async def _empty_tables(self) -> None:
            tables = ", ".join(t.name for t in METADATA.sorted_tables)
            async with self.engine.begin() as conn:
                await conn.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))

        def teardown(self) -> None:
            try:
                # Every example ends with the queue drained once more, so it exercises the worker.
                self.advance(60)
                self.work({"m1": "ok", "m2": "fail_update"})
                self.database_matches_model()
            finally:
                try:
                    self.run(self.engine.dispose)
                finally:
                    self.run.close()

        async def handle(self, job: JobContext) -> Any:
            """The handler of both queues: counts on the cursor, then ends as this step's mode says."""
            if job.cursor_key is not None:
                if job.cursor_key in self.active:
                    self.overlaps.append(f"job {job.id} started while cursor {job.cursor_key} was busy")
                self.active.add(job.cursor_key)
            try:
                await asyncio.sleep(0)  # let other jobs interleave
                seen = None
                if job.cursor is not None:
                    seen = job.cursor.get("n", 0)
                    job.cursor["n"] = seen + 1
                    job.cursor["last"] = job.id
                mode = self.modes[job.method]
                if mode == "raise":
                    raise RuntimeError(f"boom {job.id}")
                if mode == "fail_update":
                    raise FailedJobError({"seen": seen, "failed": True}, update_cursor=True)
                return {"seen": seen}
            finally:
                if job.cursor_key is not None:
                    self.active.discard(job.cursor_key)

        # ------------------------------------------------------------------------------ rules

        @initialize(target=jobs, specs=st.lists(CALLS, min_size=3, max_size=8))
        def start_with_jobs(self, specs: list[Call]) -> Any:
            return multiple(*(i for i in (self.call_one(spec) for spec in specs) if i is not None))

        @rule(target=jobs, spec=CALLS)
        def call(self, spec: Call) -> Any:
            job_id = self.call_one(spec)
            return multiple() if job_id is None else job_id

        @rule(target=jobs, slot=SLOTS, variants=st.lists(VARIANTS, min_size=2, max_size=4))
        def call_burst(self, slot: tuple[str, str, str], variants: list[Call]) -> Any:
            """Several calls on one collapse slot: joins, earlier times, resolvers, non-collapsing calls."""
            queue, method, cursor_key = slot
            specs = [
                dataclasses.replace(v, queue=queue, method=method, cursor_key=cursor_key) for v in variants
            ]
            return multiple(*{i for i in (self.call_one(spec) for spec in specs) if i is not None})

        def call_one(self, spec: Call) -> int | None:
            """``call`` on the database and the model; the job's id, or None when the call is refused."""
            model = self.model
            tag = next(self.tags)
            when: datetime.datetime | datetime.timedelta | None = None
            when_time = model.now
            if spec.offset is not None:
                when_time = model.now + datetime.timedelta(seconds=spec.offset)
                if spec.when_kind == "delay":
                    when = datetime.timedelta(seconds=spec.offset)
                elif spec.when_kind == "naive":
                    when = when_time
                else:
                    when = when_time.replace(tzinfo=datetime.UTC)

            def join(job: Any) -> None:
                args = dict(job.args)
                args["joined"] = [*args.get("joined", []), tag]
                job.args = args

            async def join_async(job: Any) -> None:
                join(job)

            resolve = {None: None, "sync": join, "async": join_async}[spec.resolver]

            async def do_call() -> Any:
                return await self.source.call(
                    spec.queue,
                    spec.method,
                    {"tag": tag},
                    when=when,
                    now=model.now,
                    cursor_key=spec.cursor_key,
                    collapse_on_cursor=spec.collapse,
                    conflict_resolver=resolve,
                )

            if spec.collapse and spec.cursor_key is None:
                with pytest.raises(ValueError, match="cursor_key"):
                    self.run(do_call)
                return None
            collapsing = spec.cursor_key is not None if spec.collapse is None else spec.collapse
            target = None
            if collapsing and spec.cursor_key is not None:
                target = model.collapse_target(spec.queue, spec.method, spec.cursor_key)
            queued: QueuedJob = self.run(do_call)
            if target is not None:
                assert not queued.created, (queued, target)
                assert queued.id == target.id, (queued, target)
                target.scheduled_time = min(target.scheduled_time, when_time)
                if spec.resolver is not None:
                    target.args = {**target.args, "joined": [*target.args.get("joined", []), tag]}
                assert queued.scheduled_time == target.scheduled_time
                return queued.id
            assert queued.created, queued
            assert queued.id not in model.jobs, queued
            assert queued.scheduled_time == when_time
            model.jobs[queued.id] = MJob(
                id=queued.id,
                queue=spec.queue,
                method=spec.method,
                cursor_key=spec.cursor_key,
                collapsible=collapsing,
                scheduled_time=when_time,
                created_time=model.now,
                args={"tag": tag},
                trace=None,
            )
            return queued.id

        @rule(job_id=jobs)
        def cancel(self, job_id: int) -> None:
            job = self.model.jobs[job_id]
            if job.state in ("pending", "failed"):
                self.run(lambda: self.source.cancel_job(job_id, now=self.model.now))
                job.state = "canceled"
            else:
                with pytest.raises(RuntimeError, match="not in a valid state"):
                    self.run(lambda: self.source.cancel_job(job_id, now=self.model.now))

        @rule(target=jobs, job_id=jobs)
        def retry(self, job_id: int) -> int:
            original = self.model.jobs[job_id]
            queued = self.run(lambda: self.source.retry_job(job_id, now=self.model.now))
            assert queued.created, queued
            assert queued.id not in self.model.jobs, queued
            trace = copy.deepcopy(original.trace) if isinstance(original.trace, dict) else {}
            trace.pop("aiomq_retried_by", None)  # the original's retry is not this job's
            self.model.jobs[queued.id] = MJob(
                id=queued.id,
                queue=original.queue,
                method=original.method,
                cursor_key=original.cursor_key,
                collapsible=False,
                scheduled_time=original.scheduled_time,
                created_time=self.model.now,
                args=copy.deepcopy(original.args),
                trace={**trace, "mq_source_job_id": job_id},
            )
            return queued.id

        @rule(job_id=jobs)
        def fail_lost(self, job_id: int) -> None:
            job = self.model.jobs[job_id]
            if job.state == "lost":
                self.run(lambda: self.source.fail_lost_job(job_id, result={"ghost": True}))
                job.state, job.result = "failed", {"ghost": True}
            else:
                with pytest.raises(RuntimeError, match="not in a lost state"):
                    self.run(lambda: self.source.fail_lost_job(job_id))

        @rule(modes=st.fixed_dictionaries({m: st.sampled_from(MODES) for m in METHODS}))
        def work(self, modes: dict[str, str]) -> None:
            self.modes = modes
            self.run(self.worker.run_until_idle)
            self.model.work(modes, self.run(self._retried_by))
            assert self.overlaps == [], self.overlaps

        @precondition(lambda self: any(j.state == "lost" for j in self.model.jobs.values()))
        @rule(target=jobs, data=st.data(), action=st.sampled_from(["cancel", "retry", "fail"]))
        def act_on_lost(self, data: st.DataObject, action: str) -> Any:
            """What an operator may try on a lost job: cancel (refused), retry (blocked), fail it."""
            lost = sorted(j.id for j in self.model.jobs.values() if j.state == "lost")
            job_id = data.draw(st.sampled_from(lost), label="lost job")
            if action == "retry":
                return self.retry(job_id)
            if action == "cancel":
                self.cancel(job_id)
            else:
                self.fail_lost(job_id)
            return multiple()

        @rule(
            seconds=st.sampled_from([5, 30]),
            modes=st.fixed_dictionaries({m: st.sampled_from(MODES) for m in METHODS}),
        )
        def advance_and_work(self, seconds: int, modes: dict[str, str]) -> None:
            self.advance(seconds)
            self.work(modes)

        @precondition(lambda self: bool(self.model.claimable()))
        @rule(data=st.data())
        def crash(self, data: st.DataObject) -> None:
            """A worker claims a job and dies before finishing it: the job is running under a dead lock."""
            candidates = sorted(j.id for j in self.model.claimable())
            job_id = data.draw(st.sampled_from(candidates), label="crashed job")
            job = MODEL.Job.__table__

            async def ghost_claim() -> None:
                async with self.engine.begin() as conn:
                    await conn.execute(
                        job.update()
                        .where(job.c.id == job_id)
                        .values(
                            state="running", lock_id=GHOST_LOCK_ID, worker="ghost", start_time=self.model.now
                        )
                    )

            self.run(ghost_claim)
            self.model.jobs[job_id].state = "running"

        @rule(seconds=st.sampled_from([1, 5, 30]))
        def advance(self, seconds: int) -> None:
            self.model.now += datetime.timedelta(seconds=seconds)

        # ------------------------------------------------------------------------------ the check

        @invariant()
        def database_matches_model(self) -> None:
            jobs, cursors = self.run(self._snapshot)
            model = self.model
            assert set(jobs) == set(model.jobs), (sorted(jobs), sorted(model.jobs))
            for job_id, row in jobs.items():
                want = model.jobs[job_id]
                got = {
                    "state": row.state,
                    "queue": row.queue,
                    "method": row.method,
                    "cursor_key": row.cursor_key,
                    "collapsible": row.collapsible,
                    "scheduled_time": row.scheduled_time,
                    "created_time": row.created_time,
                    "args": row.args,
                    "trace": row.trace,
                }
                expected = {f: getattr(want, f) for f in got}
                assert got == expected, f"job {job_id}: database {got} != model {expected}"
                if isinstance(want.result, Raised):
                    assert isinstance(row.result, dict), (job_id, row.result)
                    assert (row.result.get("exc"), row.result.get("message")) == (
                        "RuntimeError",
                        want.result.message,
                    ), (job_id, row.result)
                else:
                    assert row.result == want.result, f"job {job_id}: result {row.result} != {want.result}"
            assert cursors == {k: (v, model.updated_by[k]) for k, v in model.cursors.items()}

        async def _retried_by(self) -> dict[int, int]:
            """The database's retries of the jobs the model does not know to be failed yet."""
            job = MODEL.Job.__table__
            async with self.engine.connect() as conn:
                rows = (
                    await conn.execute(sa.select(job.c.id, job.c.trace).where(job.c.state == "failed"))
                ).all()
            known = {i for i, j in self.model.jobs.items() if j.state == "failed"}
            return {
                r.id: r.trace["aiomq_retried_by"]
                for r in rows
                if r.id not in known and isinstance(r.trace, dict) and "aiomq_retried_by" in r.trace
            }

        async def _snapshot(self) -> tuple[dict[int, Any], dict[str, tuple[Any, int]]]:
            job = MODEL.Job.__table__
            cursor = MODEL.JobCursor.__table__
            async with self.engine.connect() as conn:
                rows = (await conn.execute(sa.select(job))).all()
                cursor_rows = (await conn.execute(sa.select(cursor))).all()
            return (
                {r.id: r for r in rows},
                {r.key: (r.properties, r.updated_job_id) for r in cursor_rows},
            )

    return QueueMachine


@pytest.mark.timeout(900)  # room for hypothesis to shrink a failure
def test_database_matches_the_cursor_and_collapse_model(database: str) -> None:
    run_state_machine_as_test(machine_for(database), settings=SETTINGS)
