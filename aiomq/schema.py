"""The queue's schema in a database: its DDL, creating what is missing, and checking that it is there.

The tables themselves are declared in :mod:`aiomq.model`. Every check of "are the tables there" and the
error that names a missing one (:class:`~aiomq.errors.SchemaMissingError`) go through this module.
"""

from __future__ import annotations

import contextlib
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
    "Created",
    "check_schema",
    "create_schema",
    "describe_created",
    "model_tables",
    "schema_ddl",
    "schema_errors",
]

#: What create_schema made: (kind, name, table), e.g. ("index", "ix_aiomq_job_pending_due", "mq_job").
Created = tuple[str, str, str | None]

_MISSING_TABLE = re.compile(r'relation "([^"]+)" does not exist')


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
    ]
    mine = {cls.__table__ for cls in classes if cls is not None}
    return [t for t in model.Job.__table__.metadata.sorted_tables if t in mine]


async def check_schema(conn: AsyncConnection, model: Model) -> list[str]:
    """``SchemaMissingError`` naming the first of psycopg2_mq's tables that the database lacks; the names of
    aiomq's own tables (``aiomq_*``, 0.2 features) that it lacks are returned."""
    preparer = conn.dialect.identifier_preparer
    optional = {cls.__table__ for cls in (model.AbortRequest,) if cls is not None}
    missing = []
    for table in model_tables(model):
        if await conn.scalar(sa.select(sa.func.to_regclass(preparer.format_table(table)))) is None:
            if table not in optional:
                raise SchemaMissingError(table.fullname)
            missing.append(table.fullname)
    return missing


@contextlib.contextmanager
def schema_errors() -> Iterator[None]:
    """A statement that failed on a missing table surfaces as ``SchemaMissingError`` naming it."""
    try:
        yield
    except sa.exc.DBAPIError as ex:
        if sqlstate(ex) == "42P01":
            match = _MISSING_TABLE.search(str(ex))
            raise SchemaMissingError(match.group(1) if match else "mq_job") from ex
        raise


def schema_ddl(model: Model) -> str:
    """The statements ``create_all`` runs on an empty database, compiled for PostgreSQL."""
    statements: list[str] = []

    def collect(statement: Any, *multiparams: Any, **params: Any) -> None:
        statements.append(str(statement.compile(dialect=mock.dialect)).strip())

    mock = sa.create_mock_engine(sa.make_url("postgresql://"), collect)
    tables = model_tables(model)
    tables[0].metadata.create_all(mock, tables=tables, checkfirst=False)
    # Each table's indexes come out in set order: sort them so the output is the same on every run.
    ordered: list[str] = []
    indexes: list[str] = []
    for statement in [*statements, ""]:
        if re.match(r"CREATE (UNIQUE )?INDEX ", statement):
            indexes.append(statement)
            continue
        ordered += sorted(indexes, key=lambda s: s.split(" ON ")[0].split()[-1])
        indexes = []
        ordered.append(statement)
    text = "".join(f"{s};\n\n" for s in ordered if s)
    return "\n".join(line.rstrip() for line in text.splitlines()).rstrip() + "\n"


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


async def create_schema(engine: AsyncEngine, model: Model) -> list[Created]:
    """Create the model's missing types, tables and indexes; return them as (kind, name, table)."""
    tables = model_tables(model)

    def create(conn: sa.Connection) -> list[Created]:
        created: list[Created] = []

        def record(conn: sa.Connection, element: Any, *args: Any) -> None:
            if isinstance(element, sa.schema.ExecutableDDLElement):
                created.append(_describe_ddl(element))

        # Two concurrent creators would both see a table missing and one would fail: take turns.
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('aiomq schema --create'))"))
        sa.event.listen(conn, "before_execute", record)
        try:
            existing = {t.name for t in tables if sa.inspect(conn).has_table(t.name, schema=t.schema)}
            tables[0].metadata.create_all(conn, tables=tables, checkfirst=True)
            # Tables made by psycopg2_mq lack aiomq's own indexes; create_all skips existing tables.
            for table in tables:
                if table.name in existing:
                    for index in sorted(table.indexes, key=lambda i: str(i.name)):
                        index.create(conn, checkfirst=True)
        finally:
            sa.event.remove(conn, "before_execute", record)
        return created

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
        else:
            lines.append(f"created {kind} {name}" + (f" on {table}" if table else ""))
    return "\n".join(lines)
