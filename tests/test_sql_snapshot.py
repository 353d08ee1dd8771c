"""Every statement aiomq runs, compiled for PostgreSQL, against a checked-in snapshot (no database needed).

A change to any statement's SQL changes ``tests/sql_snapshot.sql``, so it shows up in review. After a
deliberate change, regenerate it: ``AIOMQ_UPDATE_SNAPSHOT=1 pytest tests/test_sql_snapshot.py``.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

from aiomq.compiled import Compiled
from aiomq.enqueue import Call
from aiomq.sql import Statements

from .conftest import MODEL

SNAPSHOT = pathlib.Path(__file__).with_name("sql_snapshot.sql")

# One call per shape the enqueue path compiles: the default columns, and with a job_kwargs column.
_CALL = Call(
    queue="q",
    method="m",
    created_time=sa.func.now(),  # type: ignore[arg-type]
    scheduled_time=sa.func.now(),  # type: ignore[arg-type]
    cursor_key=None,
    collapsible=False,
    args_json="{}",
    trace_json="null",
)


def statements(st: Statements) -> Iterator[tuple[str, Any]]:
    """(name, statement) for every statement, by group, in a stable order."""
    for group in ("claims", "enqueue", "outcomes", "maintenance", "schedules", "lookups", "aborts"):
        for name, value in vars(getattr(st, group)).items():
            if isinstance(value, sa.sql.ClauseElement) and not isinstance(value, sa.Table):
                if name.startswith("_") or isinstance(value, sa.ColumnElement):
                    continue
                yield f"{group}.{name}", value
    yield "enqueue.enqueue_notify(call)", st.enqueue.enqueue_notify(_CALL.params())
    yield "enqueue.enqueue_notify(call, worker)", st.enqueue.enqueue_notify({**_CALL.params(), "worker": "w"})
    yield "lookups.find_jobs(none)", st.lookups.find_jobs({})
    yield (
        "lookups.find_jobs(all)",
        st.lookups.find_jobs(dict.fromkeys(("queue", "method", "state", "cursor_key"))),
    )


def render() -> str:
    st = Statements(MODEL)
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    parts = []
    for name, statement in statements(st):
        sql = str(statement.compile(dialect=dialect))
        parts.append(f"-- {name}\n" + "\n".join(line.rstrip() for line in sql.strip().splitlines()) + ";\n")
    return "\n".join(parts)


def test_statements_match_the_snapshot() -> None:
    text = render()
    if os.environ.get("AIOMQ_UPDATE_SNAPSHOT"):
        SNAPSHOT.write_text(text)
    assert SNAPSHOT.exists(), "no snapshot: run with AIOMQ_UPDATE_SNAPSHOT=1 to write it"
    expected = SNAPSHOT.read_text()
    assert text == expected, (
        "a statement's SQL changed: review the difference, then AIOMQ_UPDATE_SNAPSHOT=1 pytest "
        "tests/test_sql_snapshot.py (and commit tests/sql_snapshot.sql)"
    )


def test_the_worker_statements_compile_for_asyncpg() -> None:
    """The statements run on the worker's own connection compile to positional ``$n`` SQL."""
    dialect = PGDialect_asyncpg()  # type: ignore[no-untyped-call]
    st = Statements(MODEL)
    for statement in (st.claims.claim, st.claims.adopt, st.claims.next_due, st.claims.try_lock):
        compiled = Compiled(statement, dialect)
        assert "$1" in compiled.sql
        assert ":" + "queues" not in compiled.sql
    quiet = Compiled(st.outcomes.finish_quiet, dialect)
    assert quiet.args({"ids": [1], "states": ["completed"], "results": [None], "cursors": [None], "now": 0})
