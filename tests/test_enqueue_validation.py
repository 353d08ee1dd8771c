"""A call validated into a frozen record before any SQL, without a database (aiomq.enqueue)."""

from __future__ import annotations

import dataclasses
import datetime

import pytest

from aiomq.enqueue import Call, collapse_rule, merge_ids, validate_call, validate_call_item

from .conftest import MODEL

COLUMNS = MODEL.Job.__table__.c
NOW = datetime.datetime(2030, 1, 1)


def test_a_call_becomes_a_frozen_record() -> None:
    call = validate_call(
        COLUMNS, "q", "m", {"a": 1}, now=NOW, when=datetime.timedelta(minutes=5), trace={"t": 1}
    )
    assert call.scheduled_time == NOW + datetime.timedelta(minutes=5)
    assert (call.args_json, call.trace_json, call.collapsible) == ('{"a":1}', '{"t":1}', False)
    assert call.bulk_insertable
    with pytest.raises(dataclasses.FrozenInstanceError):
        call.queue = "other"  # type: ignore[misc]
    assert call.params()["queue"] == "q"


def test_defaults_and_provenance() -> None:
    call = validate_call(COLUMNS, "q", "m", None, now=NOW, cursor_key="k", schedule_ids=[3, 1, 3])
    assert (call.args_json, call.trace_json) == ("{}", '{"mq_schedule_ids":[1,3]}')
    assert call.collapsible
    assert call.linked
    assert not call.bulk_insertable
    assert call.slot == ("k", "q", "m")
    aware = datetime.datetime(2030, 1, 1, 2, tzinfo=datetime.timezone(datetime.timedelta(hours=2)))
    assert validate_call(COLUMNS, "q", "m", None, when=aware, now=NOW).scheduled_time == NOW


def test_collapse_rule() -> None:
    assert collapse_rule(None, "k") is True
    assert collapse_rule(None, None) is False
    assert collapse_rule(False, "k") is False
    with pytest.raises(ValueError, match="needs a cursor_key"):
        collapse_rule(True, None)
    with pytest.raises(TypeError, match="cursor_key must be a string"):
        collapse_rule(None, 5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"queue": "bad-name"}, ValueError, "invalid queue name"),
        ({"method": ""}, ValueError, "method must be a non-empty string"),
        ({"args": {1, 2}}, TypeError, "args cannot be stored as JSON"),
        ({"args": "a\x00"}, ValueError, "NUL"),
        ({"trace": object()}, TypeError, "trace cannot be stored"),
        ({"cursor_key": "k" * 1025}, ValueError, "1025 bytes"),
        ({"job_kwargs": {"state": "running"}}, ValueError, "job_kwargs cannot set 'state'"),
        ({"job_kwargs": {"nope": 1}}, ValueError, "job_kwargs cannot set 'nope'"),
        ({"conflict_resolver": 3}, TypeError, "conflict_resolver must be callable"),
        ({"when": "tomorrow"}, TypeError, "when must be a datetime or a timedelta"),
    ],
)
def test_bad_calls_raise_before_any_sql(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    params: dict[str, object] = {"queue": "q", "method": "m", "args": None, **kwargs}
    queue, method, args = params.pop("queue"), params.pop("method"), params.pop("args")
    with pytest.raises(error, match=message):
        validate_call(COLUMNS, queue, method, args, **params)  # type: ignore[arg-type]


def test_call_many_items_name_their_position() -> None:
    assert isinstance(validate_call_item(COLUMNS, 0, {"queue": "q", "method": "m"}, NOW), Call)
    with pytest.raises(TypeError, match=r"call 2: needs queue and method.*unknown: \['colour'\]"):
        validate_call_item(COLUMNS, 2, {"queue": "q", "method": "m", "colour": 1}, NOW)
    with pytest.raises(ValueError, match="call 1: invalid queue name"):
        validate_call_item(COLUMNS, 1, {"queue": "1q", "method": "m"}, NOW)


def test_merge_ids() -> None:
    assert merge_ids(None, "k", ()) is None
    assert merge_ids({"k": [2]}, "k", [1, 2]) == {"k": [1, 2]}
    assert merge_ids("not a dict", "k", [1]) == {"k": [1]}
