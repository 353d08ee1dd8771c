"""The NOTIFY protocol, encoded and parsed without a database (aiomq.channels)."""

from __future__ import annotations

import datetime
import json

import pytest
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.dialects import postgresql

from aiomq import channels

T = datetime.datetime(2030, 5, 17, 12, 30, 15, 999_999)


def test_job_payload_is_psycopg2_mqs_bytes() -> None:
    assert channels.job_payload(7, T) == json.dumps(
        {"j": 7, "t": int(T.replace(tzinfo=datetime.UTC).timestamp())}
    )
    assert channels.job_payload(7, 1234) == '{"j": 7, "t": 1234}'


def test_epoch_rounds_down_and_round_trips() -> None:
    seconds = channels.epoch(T)
    assert channels.from_epoch(seconds) == T.replace(microsecond=0)
    assert channels.epoch(datetime.datetime(1969, 12, 31, 23, 59, 59)) == -1


def test_schedule_and_finished_payloads() -> None:
    assert json.loads(channels.schedule_payload(T)) == {"s": None, "t": channels.epoch(T)}
    assert json.loads(channels.finished_payload(3, "failed")) == {"j": 3, "s": "failed"}
    assert channels.queue_channel("mq_", "q1") == "mq_q1"


@given(st.integers(min_value=1, max_value=2**63 - 1), st.integers(min_value=-(10**10), max_value=10**10))
def test_job_notes_parse_back(job_id: int, t: int) -> None:
    note = channels.parse_queue_note(channels.job_payload(job_id, t))
    assert note.kind == "job"
    assert note.when == channels.from_epoch(t)


def test_schedule_note_and_others() -> None:
    assert channels.parse_queue_note(channels.schedule_payload(T)).kind == "schedule"
    assert channels.parse_queue_note('{"t": 5, "x": 1}').kind == "other"
    assert channels.parse_queue_note('{"j": "not an id", "t": 5.9}').when == channels.from_epoch(5)


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "nope",
        "[]",
        "null",
        '{"j": 1}',
        '{"j": 1, "t": "x"}',
        '{"j": 1, "t": 1e400}',
        '{"j": 1, "t": -1e14}',
    ],
)
def test_malformed_queue_notes_raise_value_error(payload: str) -> None:
    with pytest.raises(ValueError, match=r"JSON|'t'"):
        channels.parse_queue_note(payload)


def test_finished_notes() -> None:
    assert channels.parse_finished('{"j": 9, "s": "completed"}') == channels.FinishedNote(9, "completed")
    assert channels.parse_finished('{"j" : 9, "s" : "lost"}') == channels.FinishedNote(9, "lost")
    assert channels.parse_finished('{"j": 9}').state is None
    for bad in ("x", "{}", '{"j": "9"}', '{"j": true}', "[1]"):
        with pytest.raises(ValueError, match=r"JSON|'j'"):
            channels.parse_finished(bad)


def test_sql_payloads_match_python() -> None:
    """The payloads statements build read back as the Python ones (the job hint byte for byte)."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    job = sa.select(channels.job_payload_sql(sa.literal(7), sa.literal(1234)))
    text = str(job.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    assert "concat('{\"j\": ', 7, ', \"t\": ', 1234, '}')" in text
    finished = sa.select(channels.finished_payload_sql(sa.literal(7), sa.literal("completed")))
    assert "json_build_object" in str(finished.compile(dialect=dialect))
