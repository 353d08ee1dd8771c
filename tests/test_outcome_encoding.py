"""Turning a handler's outcome into what is stored, and what a state change sends, without a database."""

from __future__ import annotations

import json
from typing import Any

import pytest

from aiomq import JobContext, JobStates
from aiomq.events import announcement, finished_event
from aiomq.execution import Handler, Outcome
from aiomq.outcomes import prepare, rejected


def job(cursor_key: str | None = None, cursor: Any = None) -> JobContext:
    return JobContext(id=1, queue="q", method="m", args={}, cursor_key=cursor_key, cursor=cursor, trace=None)


def test_a_result_and_a_cursor_are_encoded() -> None:
    record = prepare(JobStates, job("k", {"n": 1}), Outcome(JobStates.COMPLETED, {"ok": [1, 2]}, True))
    assert (record.state, record.result_json, record.cursor_json) == ("completed", '{"ok":[1,2]}', '{"n":1}')
    assert record.result == {"ok": [1, 2]}


def test_no_result_is_sql_null_and_a_failure_keeps_the_cursor_unsaved() -> None:
    record = prepare(JobStates, job("k", {"n": 1}), Outcome(JobStates.FAILED, None, False))
    assert (record.result_json, record.cursor_json, record.result) == (None, None, None)


def test_a_cursor_without_a_cursor_key_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    record = prepare(JobStates, job(None, {"n": 1}), Outcome(JobStates.COMPLETED, 1, True))
    assert record.cursor_json is None
    assert "ignoring the cursor" in caplog.text


@pytest.mark.parametrize(
    ("result", "why"), [({1, 2}, "cannot be stored as JSON"), ("a\x00b", "NUL"), (float("nan"), "JSON")]
)
def test_an_unstorable_result_fails_the_job_saying_why(result: Any, why: str) -> None:
    record = prepare(JobStates, job("k", {}), Outcome(JobStates.COMPLETED, result, True))
    assert record.state == "failed"
    assert record.cursor_json is None
    assert why in json.loads(record.result_json or "null")["message"]


def test_an_unstorable_cursor_fails_the_job() -> None:
    record = prepare(JobStates, job("k", {"s": {1}}), Outcome(JobStates.COMPLETED, "fine", True))
    assert record.state == "failed"
    assert "cursor" in json.loads(record.result_json or "null")["message"]


def test_a_rejected_outcome_becomes_a_failure_with_the_reason() -> None:
    record = rejected(job("k"), JobStates, ValueError("value too long"))
    assert record.state == "failed"
    assert json.loads(record.result_json or "null")["message"] == (
        "the database rejected the job's outcome: value too long"
    )


def test_what_a_state_change_sends() -> None:
    def plan(
        state: str, cursor_key: str | None = "k", listeners: bool = True, held: bool = True
    ) -> tuple[bool, bool, bool]:
        a = announcement(JobStates, state, cursor_key=cursor_key, has_listeners=listeners, held_cursor=held)
        return a.event, a.finished_note, a.successor_hint

    assert plan("completed") == (True, True, True)
    assert plan("failed") == (True, True, True)
    assert plan("lost") == (True, True, False)  # a lost job keeps its cursor
    assert plan("canceled") == (False, True, True)  # an aborted job: psycopg2_mq emits nothing on cancel
    assert plan("canceled", held=False) == (False, True, False)  # cancel_job: pending or failed
    assert plan("completed", cursor_key=None, listeners=False) == (False, True, False)


class Row:
    id = 5
    queue = "q"
    method = "m"
    start_time = None
    end_time = None


def test_finished_event_shapes() -> None:
    assert finished_event("completed", Row(), result=1) == (
        "mq.job_finished.completed.q.m",
        {"id": 5, "queue": "q", "method": "m", "start_time": None, "end_time": None, "result": 1},
    )
    name, data = finished_event("lost", Row(), lost=True)
    assert name == "mq.job_finished.lost.q.m"
    assert data == {"job": 5, "queue": "q", "method": "m", "start_time": None, "end_time": None}


def test_handler_kinds() -> None:
    async def coro(job: JobContext) -> None:
        return None

    class Obj:
        def execute_job(self, job: JobContext) -> None:
            return None

    class AsyncCallable:
        async def __call__(self, job: JobContext) -> None:
            return None

    assert Handler("q", coro).is_async
    assert not Handler("q", Obj()).is_async
    assert Handler("q", AsyncCallable()).is_async
    with pytest.raises(TypeError, match="execute_job"):
        Handler("q", 42)
