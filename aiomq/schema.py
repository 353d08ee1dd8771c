"""The queue's schema in a database: its DDL, creating what is missing, and checking that it is there.

The tables themselves are declared in :mod:`aiomq.model`. Every check of "are the tables there" and the
error that names a missing one (:class:`~aiomq.errors.SchemaMissingError`) go through this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .dberrors import sqlstate
from .errors import SchemaMissingError
from .model import Model

__all__ = [
    "OBSOLETE_INDEXES",
    "Created",
    "Step",
    "check_schema",
    "create_schema",
    "describe_created",
    "model_tables",
    "schema_ddl",
    "schema_errors",
    "upgrade_ddl",
]

#: What create_schema made: (kind, name, table), e.g. ("index", "ix_aiomq_job_pending_due", "mq_job").
Created = tuple[str, str, str | None]

#: aiomq's own indexes of earlier versions, each with the index that replaced it: ``create_schema`` drops
#: one where the model has its replacement (psycopg2_mq never used them).
OBSOLETE_INDEXES = {"ix_aiomq_job_pending_cursor": "ix_aiomq_job_pending_cursor_due"}

_MISSING_TABLE = re.compile(r'relation "([^"]+)" does not exist')
_MISSING_COLUMN_OF = re.compile(r'column "([^"]+)" of relation "([^"]+)" does not exist')
_MISSING_COLUMN = re.compile(r"column (\w+)\.(\w+) does not exist")


def model_tables(model: Model) -> list[sa.Table]:
    """The model's own tables, in creation order (a model's metadata may hold an application's tables too)."""
    classes = [
        model.Job,
        model.Lock,
        model.JobCursor,
        model.JobListener,
        model.JobSchedule,
        model.JobListenerLink,
        model.JobScheduleLink,
        model.AbortRequest,
        model.QueuePause,
    ]
    mine = {cls.__table__ for cls in classes if cls is not None}
    return [t for t in model.Job.__table__.metadata.sorted_tables if t in mine]


def _optional_tables(model: Model) -> set[sa.Table]:
    """aiomq's own tables: a worker without them goes on, without their feature."""
    return {cls.__table__ for cls in (model.AbortRequest, model.QueuePause) if cls is not None}


async def check_schema(conn: AsyncConnection, model: Model) -> list[str]:
    """``SchemaMissingError`` naming the first of psycopg2_mq's tables, or of the model's columns on them,
    that the database lacks; the names of aiomq's own tables (``aiomq_*``, 0.2 features) that it lacks
    are returned."""
    preparer = conn.dialect.identifier_preparer
    optional = _optional_tables(model)
    missing = []
    for table in model_tables(model):
        if await conn.scalar(sa.select(sa.func.to_regclass(preparer.format_table(table)))) is None:
            if table not in optional:
                raise SchemaMissingError(table.fullname)
            missing.append(table.fullname)
            continue
        present = set(await conn.run_sync(_column_names, table))
        for column in table.columns:
            if column.name not in present:
                raise SchemaMissingError(table.fullname, column.name)
    return missing


def _column_names(conn: sa.Connection, table: sa.Table) -> list[str]:
    return [c["name"] for c in sa.inspect(conn).get_columns(table.name, schema=table.schema)]


@contextlib.contextmanager
def schema_errors() -> Iterator[None]:
    """A statement that failed on a missing table or column surfaces as ``SchemaMissingError`` naming it."""
    try:
        yield
    except sa.exc.DBAPIError as ex:
        state = sqlstate(ex)
        if state == "42P01":
            match = _MISSING_TABLE.search(str(ex))
            raise SchemaMissingError(match.group(1) if match else "mq_job") from ex
        if state == "42703":
            column = _missing_column(str(ex))
            if column is not None:
                raise SchemaMissingError(*column) from ex
        raise


def _missing_column(message: str) -> tuple[str, str] | None:
    """(table, column) of PostgreSQL's "column ... does not exist", in either of its two wordings."""
    match = _MISSING_COLUMN_OF.search(message)
    if match:
        return match.group(2), match.group(1)
    match = _MISSING_COLUMN.search(message)
    return (match.group(1), match.group(2)) if match else None


@dataclasses.dataclass(frozen=True)
class Step:
    """One statement of creating or upgrading the schema."""

    kind: str  # "type", "table", "column", "index" or "drop index"
    name: str
    table: str | None
    ddl: sa.ExecutableDDLElement

    @property
    def created(self) -> Created:
        return self.kind, self.name, self.table


def _creation_steps(tables: list[sa.Table]) -> list[Step]:
    """What ``create_all`` runs for ``tables`` on a database that has none of them (types included)."""
    elements: list[Any] = []

    def collect(statement: Any, *multiparams: Any, **params: Any) -> None:
        elements.append(statement)

    mock = sa.create_mock_engine(sa.make_url("postgresql://"), collect)
    if tables:
        tables[0].metadata.create_all(mock, tables=tables, checkfirst=False)
    steps = [Step(*_describe_ddl(e), e) for e in elements]
    # Each table's indexes come out in set order: sort them so the output is the same on every run.
    ordered: list[Step] = []
    indexes: list[Step] = []
    for step in [*steps, None]:
        if step is not None and step.kind == "index":
            indexes.append(step)
            continue
        ordered += sorted(indexes, key=lambda i: i.name)
        indexes = []
        if step is not None:
            ordered.append(step)
    return ordered


def _upgrade_steps(conn: sa.Connection, model: Model) -> list[Step]:
    """The statements that bring the database's schema up to ``model``'s: missing tables (with their
    types and indexes), then missing columns and indexes on the tables that exist (a psycopg2_mq or
    aiomq 0.1 database). A missing column without a server default cannot be added behind psycopg2_mq's
    back: that is ``SchemaMissingError``."""
    inspector = sa.inspect(conn)
    tables = model_tables(model)
    present = [t for t in tables if inspector.has_table(t.name, schema=t.schema)]
    # create_all of a few tables still creates the metadata's enum types: skip those that exist
    types = {e["name"] for e in inspector.get_enums()}  # type: ignore[attr-defined]
    steps = [
        step
        for step in _creation_steps([t for t in tables if t not in present])
        if not (step.kind == "type" and step.name in types)
    ]
    preparer = conn.dialect.identifier_preparer
    for table in present:
        columns = {c["name"] for c in inspector.get_columns(table.name, schema=table.schema)}
        for column in table.columns:
            if column.name in columns:
                continue
            if column.server_default is None and not column.nullable:
                raise SchemaMissingError(table.fullname, column.name)
            spec = sa.schema.CreateColumn(column).compile(dialect=conn.dialect)
            ddl = sa.DDL(f"ALTER TABLE {preparer.format_table(table)} ADD COLUMN {spec}")  # type: ignore[no-untyped-call]
            steps.append(Step("column", column.name, table.name, ddl))
        indexes = {i["name"] for i in inspector.get_indexes(table.name, schema=table.schema)}
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            if index.name not in indexes:
                steps.append(Step("index", str(index.name), table.name, sa.schema.CreateIndex(index)))
        steps += _obsolete_index_steps(table, {str(name) for name in indexes}, preparer)
    return steps


def _obsolete_index_steps(table: sa.Table, present: set[str], preparer: Any) -> list[Step]:
    """Drop aiomq's own indexes of an earlier version once the model has what replaced them."""
    mine = {str(index.name) for index in table.indexes}
    steps = []
    for name in sorted(present & OBSOLETE_INDEXES.keys()):
        if OBSOLETE_INDEXES[name] in mine and name not in mine:
            qualified = (
                preparer.quote(name)
                if table.schema is None
                else f"{preparer.quote_schema(table.schema)}.{preparer.quote(name)}"
            )
            ddl = sa.DDL(f"DROP INDEX {qualified}")  # type: ignore[no-untyped-call]
            steps.append(Step("drop index", name, table.name, ddl))
    return steps


def _sql_text(steps: Sequence[Step], dialect: Any) -> str:
    text = "".join(f"{str(step.ddl.compile(dialect=dialect)).strip()};\n\n" for step in steps)
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip() + "\n"


def schema_ddl(model: Model) -> str:
    """The statements ``create_all`` runs on an empty database, compiled for PostgreSQL."""
    return _sql_text(_creation_steps(model_tables(model)), pg.dialect())  # type: ignore[no-untyped-call]


def _describe_ddl(element: Any) -> Created:
    """(kind, name, table) of a DDL statement."""
    target = element.element
    if isinstance(element, sa.schema.CreateTable):
        return "table", target.name, None
    if isinstance(element, sa.schema.CreateIndex):
        return "index", str(target.name), target.table.name
    if isinstance(element, pg.CreateEnumType):
        return "type", target.name, None
    return type(element).__name__, str(getattr(target, "name", "")), None


async def upgrade_ddl(engine: AsyncEngine, model: Model) -> str:
    """The statements :func:`create_schema` would run on this database now ("" if none)."""
    async with engine.connect() as conn:
        steps = await conn.run_sync(lambda c: _upgrade_steps(c, model))
        return _sql_text(steps, conn.dialect) if steps else ""


async def create_schema(engine: AsyncEngine, model: Model) -> list[Created]:
    """Create the model's missing types, tables, columns and indexes; return them as (kind, name, table).

    Idempotent, and safe beside running psycopg2_mq and aiomq processes: it only adds (an added column has
    a server default), in one transaction."""

    def create(conn: sa.Connection) -> list[Created]:
        # Two concurrent creators would both see a table missing and one would fail: take turns.
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('aiomq schema --create'))"))
        steps = _upgrade_steps(conn, model)
        for step in steps:
            conn.execute(step.ddl)
        return [step.created for step in steps]

    async with engine.begin() as conn:
        return await conn.run_sync(create)


def describe_created(created: Sequence[Created]) -> str:
    """What create_schema made, one line per type or table (a new table's indexes counted on its line)."""
    new_tables = {name for kind, name, _ in created if kind == "table"}
    counts = {name: sum(1 for k, _, t in created if k == "index" and t == name) for name in new_tables}
    lines = []
    for kind, name, table in created:
        if kind == "table":
            n = counts[name]
            lines.append(f"created table {name}" + (f" ({n} index{'es' if n > 1 else ''})" if n else ""))
        elif kind == "index" and table in new_tables:
            continue
        elif kind == "column":
            lines.append(f"added column {table}.{name}")
        elif kind == "drop index":
            lines.append(f"dropped index {name} on {table} (replaced by {OBSOLETE_INDEXES[name]})")
        else:
            lines.append(f"created {kind} {name}" + (f" on {table}" if table else ""))
    return "\n".join(lines)
