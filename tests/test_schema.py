"""aiomq's schema is psycopg2_mq 0.13.6's schema, compared in PostgreSQL's own catalogs.

Each library creates its tables in a fresh database of its own; both databases are then read back from
``pg_catalog`` (not through SQLAlchemy's reflection, which would smooth over differences) and compared.
aiomq may add indexes named ``ix_aiomq_*`` and tables named ``aiomq_*``; nothing else may differ.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import psycopg2_mq
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

import aiomq
from aiomq import JobStates, make_default_model
from aiomq.model import Model

from .pgserver import PgServer

AIOMQ_EXTRA_INDEX = re.compile(r"ix_aiomq_[a-z0-9_]+")
AIOMQ_TABLE_PREFIX = "aiomq_"
AIOMQ_TABLES = {"aiomq_abort_request", "aiomq_queue_pause"}
#: Columns aiomq adds to psycopg2_mq's tables (DESIGN §1.2): each has a server default, so psycopg2_mq's
#: inserts fill it without knowing it.
AIOMQ_COLUMNS = {("mq_job", "priority")}

# -------------------------------------------------------------------------------------------------- catalogs

# Every query is limited to the schema the tables were created in (the connection's current schema).
_RELATIONS = """
SELECT c.relname, c.relkind::text, c.relpersistence::text, coalesce(c.reloptions, '{}')::text[]
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema()
"""

_COLUMNS = """
SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid), a.attidentity::text, a.attgenerated::text,
       coalesce(co.collname, ''), a.attndims
FROM pg_attribute a
JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> 0
WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND a.attnum > 0 AND NOT a.attisdropped
"""

_ENUMS = """
SELECT t.typname, array_agg(e.enumlabel::text ORDER BY e.enumsortorder)
FROM pg_type t
JOIN pg_namespace n ON n.oid = t.typnamespace
JOIN pg_enum e ON e.enumtypid = t.oid
WHERE n.nspname = current_schema()
GROUP BY t.typname
"""

# Types of the schema other than the row and array types that come with each relation.
_TYPES = """
SELECT t.typname, t.typtype::text
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE n.nspname = current_schema()
  AND NOT (t.typtype = 'c'
           AND EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.typrelid AND c.relkind <> 'c'))
  AND NOT (t.typcategory = 'A' AND t.typelem <> 0)
"""

_INDEXES = """
SELECT ic.relname, tc.relname, am.amname, i.indisunique, i.indisprimary, i.indisexclusion, i.indimmediate,
       i.indisvalid, pg_get_indexdef(i.indexrelid), pg_get_expr(i.indpred, i.indrelid)
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_class tc ON tc.oid = i.indrelid
JOIN pg_am am ON am.oid = ic.relam
JOIN pg_namespace n ON n.oid = tc.relnamespace
WHERE n.nspname = current_schema()
"""

_CONSTRAINTS = """
SELECT tc.relname, con.conname, con.contype::text, pg_get_constraintdef(con.oid),
       con.condeferrable, con.condeferred, con.convalidated,
       coalesce(fc.relname, ''), con.confupdtype::text, con.confdeltype::text, con.confmatchtype::text,
       ARRAY(SELECT a.attname::text FROM unnest(con.conkey) WITH ORDINALITY k(num, ord)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.num ORDER BY k.ord),
       ARRAY(SELECT a.attname::text FROM unnest(con.confkey) WITH ORDINALITY k(num, ord)
             JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.num ORDER BY k.ord),
       coalesce(ic.relname, '')
FROM pg_constraint con
JOIN pg_class tc ON tc.oid = con.conrelid
JOIN pg_namespace n ON n.oid = tc.relnamespace
LEFT JOIN pg_class fc ON fc.oid = con.confrelid
LEFT JOIN pg_class ic ON ic.oid = con.conindid
WHERE n.nspname = current_schema()
"""

_SEQUENCES = """
SELECT s.sequencename, s.data_type::text, s.start_value, s.min_value, s.max_value, s.increment_by,
       s.cycle, s.cache_size
FROM pg_sequences s
WHERE s.schemaname = current_schema()
"""

# Which column owns each sequence (bigserial: deptype 'a'; identity: deptype 'i').
_SEQUENCE_OWNERS = """
SELECT seq.relname, tbl.relname, a.attname, d.deptype::text
FROM pg_depend d
JOIN pg_class seq ON seq.oid = d.objid AND seq.relkind = 'S'
JOIN pg_class tbl ON tbl.oid = d.refobjid AND d.refclassid = 'pg_class'::regclass
JOIN pg_attribute a ON a.attrelid = tbl.oid AND a.attnum = d.refobjsubid
JOIN pg_namespace n ON n.oid = seq.relnamespace
WHERE n.nspname = current_schema() AND d.classid = 'pg_class'::regclass
"""

_TRIGGERS = """
SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid)
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema() AND NOT t.tgisinternal
"""

_FUNCTIONS = """
SELECT p.proname, pg_get_function_identity_arguments(p.oid)
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = current_schema()
"""

_CATEGORIES: dict[str, str] = {
    "relations": _RELATIONS,
    "columns": _COLUMNS,
    "enums": _ENUMS,
    "types": _TYPES,
    "indexes": _INDEXES,
    "constraints": _CONSTRAINTS,
    "sequences": _SEQUENCES,
    "sequence_owners": _SEQUENCE_OWNERS,
    "triggers": _TRIGGERS,
    "functions": _FUNCTIONS,
}

Snapshot = dict[str, set[tuple[Any, ...]]]


def _normalise(value: Any) -> Any:
    """Catalog text with the schema qualification and runs of whitespace taken out; lists as tuples."""
    if isinstance(value, str):
        value = re.sub(r"\bpublic\.", "", value)
        return re.sub(r"\s+", " ", value).strip()
    if isinstance(value, list):
        return tuple(_normalise(v) for v in value)
    return value


async def snapshot(dsn: str) -> Snapshot:
    """Everything about the schema of ``dsn`` that a client of the tables could notice."""
    conn = await asyncpg.connect(dsn)
    try:
        result: Snapshot = {}
        for category, query in _CATEGORIES.items():
            rows = await conn.fetch(query)
            result[category] = {tuple(_normalise(v) for v in row.values()) for row in rows}
        return result
    finally:
        await conn.close()


def _is_aiomq_extra(category: str, row: tuple[Any, ...]) -> bool:
    """An index of aiomq's own (or its pg_class row), or a table of aiomq's own (``aiomq_*``, DESIGN §1.2)
    with its columns, indexes and constraints: allowed only in the aiomq database."""
    if category in ("columns", "constraints") and row[0].startswith(AIOMQ_TABLE_PREFIX):
        return True
    if category == "columns" and (row[0], row[2]) in AIOMQ_COLUMNS:
        return True
    if category == "constraints" and row[11] and all((row[0], c) in AIOMQ_COLUMNS for c in row[11]):
        # PostgreSQL 18 lists NOT NULL as a constraint; no other on aiomq's columns
        return bool(row[2] == "n")
    if category == "indexes":
        return bool(AIOMQ_EXTRA_INDEX.fullmatch(row[0])) or row[1].startswith(AIOMQ_TABLE_PREFIX)
    if category == "relations":
        return (row[1] == "i" and bool(AIOMQ_EXTRA_INDEX.fullmatch(row[0]))) or row[0].startswith(
            AIOMQ_TABLE_PREFIX
        )
    return False


def diff(aiomq_schema: Snapshot, reference: Snapshot) -> list[str]:
    """Human-readable differences, aiomq's ``ix_aiomq_*`` indexes left out."""
    lines = []
    for category in _CATEGORIES:
        mine, theirs = aiomq_schema[category], reference[category]
        for row in sorted(mine - theirs, key=repr):
            if not _is_aiomq_extra(category, row):
                lines.append(f"{category}: only in aiomq:       {row}")
        for row in sorted(theirs - mine, key=repr):
            lines.append(f"{category}: only in psycopg2_mq: {row}")
    return lines


def aiomq_extras(aiomq_schema: Snapshot, reference: Snapshot) -> dict[str, set[tuple[Any, ...]]]:
    return {
        category: {
            row for row in aiomq_schema[category] - reference[category] if _is_aiomq_extra(category, row)
        }
        for category in _CATEGORIES
    }


# ------------------------------------------------------------------------------------------------- databases


def _url(dsn: str, database: str, driver: str = "postgresql") -> str:
    return sa.make_url(dsn).set(drivername=driver, database=database).render_as_string(hide_password=False)


@pytest.fixture
async def new_database(pg_server: PgServer) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """A factory of fresh empty databases (libpq URLs), all dropped after the test."""
    names: list[str] = []

    async def make() -> str:
        name = f"aiomq_s_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(pg_server.dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        finally:
            await conn.close()
        names.append(name)
        return _url(pg_server.dsn, name)

    yield make
    conn = await asyncpg.connect(pg_server.dsn)
    try:
        for name in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def create_with_aiomq(dsn: str, states: type[JobStates] = JobStates) -> None:
    metadata = sa.MetaData()
    make_default_model(metadata, JobStates=states)
    engine = create_async_engine(_url(dsn, sa.make_url(dsn).database or "", "postgresql+asyncpg"))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
    finally:
        await engine.dispose()


def _create_with_psycopg2_mq(dsn: str, states: type[Any]) -> None:
    metadata = sa.MetaData()
    psycopg2_mq.make_default_model(metadata, JobStates=states)
    engine = sa.create_engine(_url(dsn, sa.make_url(dsn).database or "", "postgresql+psycopg2"))
    try:
        metadata.create_all(engine)
    finally:
        engine.dispose()


async def create_with_psycopg2_mq(dsn: str, states: type[Any] = psycopg2_mq.model.JobStates) -> None:
    await asyncio.to_thread(_create_with_psycopg2_mq, dsn, states)


class ShoutingStates(JobStates):
    """Renamed enum values, which both libraries allow (reference §2.1)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    LOST = "LOST"


EXPECTED_TABLES = {
    "mq_job",
    "mq_job_cursor",
    "mq_job_schedule",
    "mq_job_listener",
    "mq_job_schedule_link",
    "mq_job_listener_link",
    "mq_lock",
}

# ----------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("states", [JobStates, ShoutingStates], ids=["default-states", "renamed-states"])
async def test_schema_matches_psycopg2_mq(
    new_database: Callable[[], Awaitable[str]], states: type[JobStates]
) -> None:
    mine_dsn, theirs_dsn = await new_database(), await new_database()
    await create_with_aiomq(mine_dsn, states)
    await create_with_psycopg2_mq(theirs_dsn, states)
    mine, theirs = await snapshot(mine_dsn), await snapshot(theirs_dsn)

    # The snapshot saw the schema at all (an empty query result would make every comparison pass).
    tables = {row[0] for row in theirs["relations"] if row[1] == "r"}
    assert tables == EXPECTED_TABLES
    assert {"uq_mq_job_pending_cursor_key_queue_method", "uq_mq_job_active_cursor_key"} <= {
        row[0] for row in theirs["indexes"]
    }
    assert {row[1] for row in theirs["constraints"]} >= {"ck_mq_job_lock_id", "mq_job_pkey"}
    assert ("mq_job_state", tuple(_state_values(states))) in theirs["enums"]

    assert diff(mine, theirs) == []

    extras = aiomq_extras(mine, theirs)
    extra_indexes = extras.pop("indexes")
    extra_relations = extras.pop("relations")
    # aiomq's own tables bring their columns and constraints, on those tables only
    added_columns = {(row[0], row[2]): row for row in extras.pop("columns") if row[0] not in AIOMQ_TABLES}
    assert set(added_columns) == AIOMQ_COLUMNS
    for row in added_columns.values():
        # psycopg2_mq never names it: a server default fills it, and it comes after psycopg2_mq's columns
        assert row[5] is not None, row
        assert row[1] > max(r[1] for r in theirs["columns"] if r[0] == row[0]), row
    for row in extras.pop("constraints"):
        assert row[0] in AIOMQ_TABLES or (row[2] == "n" and (row[0], *row[11]) in AIOMQ_COLUMNS), row
    assert all(not rows for rows in extras.values()), extras
    extra_tables = {row[0] for row in extra_relations if row[1] == "r"}
    assert extra_tables == AIOMQ_TABLES
    assert {row[0] for row in extra_relations} - extra_tables == {row[0] for row in extra_indexes}
    for name, table, _am, unique, primary, exclusion, *_ in extra_indexes:
        if table in AIOMQ_TABLES:
            continue
        assert table in EXPECTED_TABLES, name
        # psycopg2_mq must be able to ignore aiomq's indexes: none may refuse a row it writes.
        assert not unique, f"{name} is unique"
        assert not primary, name
        assert not exclusion, name


def _state_values(states: type[Any]) -> list[str]:
    return [states.PENDING, states.RUNNING, states.COMPLETED, states.FAILED, states.CANCELED, states.LOST]


async def test_schema_details_are_the_references(new_database: Callable[[], Awaitable[str]]) -> None:
    """Spot checks of reference §3, so a change made in both libraries at once would still be seen."""
    dsn = await new_database()
    await create_with_aiomq(dsn)
    schema = await snapshot(dsn)

    assert ("mq_job_state", ("pending", "running", "completed", "failed", "canceled", "lost")) in schema[
        "enums"
    ]
    columns = {(row[0], row[2]): row for row in schema["columns"]}
    assert columns["mq_job", "id"][3:6] == ("bigint", True, "nextval('mq_job_id_seq'::regclass)")
    assert columns["mq_job", "state"][3:5] == ("mq_job_state", True)
    assert columns["mq_job", "trace"][3:5] == ("jsonb", False)
    assert columns["mq_job", "lock_id"][3:5] == ("integer", False)
    assert columns["mq_job", "scheduled_time"][3:5] == ("timestamp without time zone", True)
    assert columns["mq_job_listener", "when"][3:5] == ("interval", False)
    assert columns["mq_job_cursor", "properties"][3:6] == ("jsonb", True, None)

    indexes = {row[0]: row for row in schema["indexes"]}
    collapse = indexes["uq_mq_job_pending_cursor_key_queue_method"]
    assert collapse[3] is True
    assert collapse[9] == "((state = 'pending'::mq_job_state) AND (collapsible = true))"
    active = indexes["uq_mq_job_active_cursor_key"]
    assert active[3] is True
    assert active[9] == (
        "((cursor_key IS NOT NULL) AND (state = ANY (ARRAY['running'::mq_job_state, 'lost'::mq_job_state])))"
    )
    for name in (
        "ix_mq_job_state",
        "ix_mq_job_scheduled_time",
        "ix_mq_job_queue",
        "ix_mq_job_listener_event",
    ):
        assert indexes[name][3] is False

    constraints = {row[1]: row for row in schema["constraints"]}
    check = constraints["ck_mq_job_lock_id"]
    assert check[2] == "c"
    assert check[3] == "CHECK (((state <> 'running'::mq_job_state) OR (lock_id IS NOT NULL)))"
    fks = {(row[0], tuple(row[11])): row for row in schema["constraints"] if row[2] == "f"}
    cursor_fk = fks["mq_job_cursor", ("updated_job_id",)]
    assert cursor_fk[7:10] == ("mq_job", "c", "n")  # ON UPDATE CASCADE, ON DELETE SET NULL
    for table, column, target in (
        ("mq_job_schedule_link", "job_id", "mq_job"),
        ("mq_job_schedule_link", "schedule_id", "mq_job_schedule"),
        ("mq_job_listener_link", "job_id", "mq_job"),
        ("mq_job_listener_link", "listener_id", "mq_job_listener"),
    ):
        assert fks[table, (column,)][7:10] == (target, "c", "c")
    pks = {
        row[0]: tuple(row[11]) for row in schema["constraints"] if row[2] == "p" and row[0] in EXPECTED_TABLES
    }
    assert pks == {
        "mq_job": ("id",),
        "mq_job_cursor": ("key",),
        "mq_job_schedule": ("id",),
        "mq_job_listener": ("id",),
        "mq_job_schedule_link": ("job_id", "schedule_id"),
        "mq_job_listener_link": ("job_id", "listener_id"),
        "mq_lock": ("ns", "key"),
    }
    assert {row[0] for row in schema["sequences"]} == {
        "mq_job_id_seq",
        "mq_job_schedule_id_seq",
        "mq_job_listener_id_seq",
    }
    # Apart from the sequences, no server-side defaults: the library fills every NOT NULL column.
    # aiomq's added columns have theirs (DESIGN §1.2).
    defaults = {(row[0], row[2]): row[5] for row in schema["columns"] if row[5] is not None}
    assert set(defaults) - AIOMQ_COLUMNS == {
        ("mq_job", "id"),
        ("mq_job_schedule", "id"),
        ("mq_job_listener", "id"),
    }
    assert defaults["mq_job", "priority"] == "0"
    assert columns["mq_job", "priority"][3:5] == ("smallint", True)


async def test_comparison_sees_differences(new_database: Callable[[], Awaitable[str]]) -> None:
    """The comparison itself must fail on the kinds of drift it is meant to catch."""
    mine_dsn, theirs_dsn = await new_database(), await new_database()
    await create_with_aiomq(mine_dsn)
    await create_with_psycopg2_mq(theirs_dsn)
    before = await snapshot(mine_dsn)
    theirs = await snapshot(theirs_dsn)
    assert diff(before, theirs) == []

    conn = await asyncpg.connect(mine_dsn)
    try:
        await conn.execute("ALTER TABLE mq_job ALTER COLUMN worker SET NOT NULL")
        await conn.execute("ALTER TABLE mq_job_schedule ALTER COLUMN is_enabled SET DEFAULT true")
        await conn.execute("ALTER TYPE mq_job_state ADD VALUE 'zombie'")
        await conn.execute("CREATE INDEX ix_mq_job_method ON mq_job (method)")
        await conn.execute("CREATE UNIQUE INDEX ix_aiomq_unique_worker ON mq_job (worker)")
        await conn.execute("DROP INDEX uq_mq_job_active_cursor_key")
        await conn.execute(
            "CREATE UNIQUE INDEX uq_mq_job_active_cursor_key ON mq_job (cursor_key) WHERE state = 'running'"
        )
        await conn.execute("ALTER TABLE mq_job_cursor DROP CONSTRAINT mq_job_cursor_updated_job_id_fkey")
        await conn.execute(
            "ALTER TABLE mq_job_cursor ADD CONSTRAINT mq_job_cursor_updated_job_id_fkey "
            "FOREIGN KEY (updated_job_id) REFERENCES mq_job (id) ON DELETE CASCADE ON UPDATE CASCADE"
        )
        await conn.execute("ALTER TABLE mq_job DROP CONSTRAINT ck_mq_job_lock_id")
        await conn.execute(
            "ALTER TABLE mq_job ADD CONSTRAINT ck_mq_job_lock_id "
            "CHECK (state <> 'running' OR worker IS NOT NULL)"
        )
        await conn.execute("ALTER SEQUENCE mq_job_schedule_id_seq INCREMENT BY 2")
    finally:
        await conn.close()
    after = await snapshot(mine_dsn)
    found = "\n".join(diff(after, theirs))
    for expected in (
        "columns: only in aiomq:       ('mq_job', 16, 'worker', 'text', True",
        "columns: only in aiomq:       ('mq_job_schedule', 3, 'is_enabled', 'boolean', True, 'true'",
        "enums: only in aiomq:       ('mq_job_state', ('pending', 'running', 'completed', 'failed', "
        "'canceled', 'lost', 'zombie'))",
        "indexes: only in aiomq:       ('ix_mq_job_method'",
        "relations: only in aiomq:       ('ix_mq_job_method', 'i'",
        "indexes: only in aiomq:       ('uq_mq_job_active_cursor_key'",
        "indexes: only in psycopg2_mq: ('uq_mq_job_active_cursor_key'",
        "constraints: only in aiomq:       ('mq_job_cursor', 'mq_job_cursor_updated_job_id_fkey'",
        "constraints: only in psycopg2_mq: ('mq_job', 'ck_mq_job_lock_id'",
        "sequences: only in aiomq:       ('mq_job_schedule_id_seq'",
    ):
        assert expected in found, f"{expected!r} not in:\n{found}"
    # An ix_aiomq_* index is tolerated by the diff, but not when it is unique.
    extra = aiomq_extras(after, theirs)["indexes"]
    assert {row[0]: row[3] for row in extra}["ix_aiomq_unique_worker"] is True


def test_model_channel_prefix_and_states() -> None:
    assert Model.channel_prefix == "mq_"
    model = make_default_model(sa.MetaData())
    assert model.channel_prefix == "mq_"
    assert model.JobStates is JobStates
    assert aiomq.JobStates is JobStates
    expected = {
        "PENDING": "pending",
        "RUNNING": "running",
        "COMPLETED": "completed",
        "FAILED": "failed",
        "CANCELED": "canceled",
        "LOST": "lost",
    }
    assert {name: getattr(JobStates, name) for name in expected} == expected
    reference = psycopg2_mq.model.JobStates
    assert {name: getattr(reference, name) for name in expected} == expected
    assert psycopg2_mq.make_default_model(sa.MetaData()).channel_prefix == model.channel_prefix

    # The enum lists the states in the reference's order; the model exposes the reference's classes.
    job_table = model.Job.__table__
    assert list(job_table.c.state.type.enums) == list(expected.values())
    for name in (
        "Job",
        "JobCursor",
        "JobSchedule",
        "JobListener",
        "JobScheduleLink",
        "JobListenerLink",
        "Lock",
    ):
        assert getattr(model, name) is not None, name
    assert {t.name for t in model.Job.metadata.sorted_tables} == EXPECTED_TABLES | AIOMQ_TABLES


def test_renamed_states_reach_the_model() -> None:
    model = make_default_model(sa.MetaData(), JobStates=ShoutingStates)
    assert model.JobStates is ShoutingStates
    assert list(model.Job.__table__.c.state.type.enums) == _state_values(ShoutingStates)
