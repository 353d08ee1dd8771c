"""The exceptions aiomq raises or understands. Callers mostly catch built-ins (DESIGN §2)."""

from __future__ import annotations

from typing import Any

__all__ = ["CliError", "FailedJobError", "SchemaMissingError", "UsageError"]


class FailedJobError(Exception):
    """Raise from a handler to fail the job with ``result`` stored verbatim.

    The job's cursor is saved only with ``update_cursor=True``. Unlike other exceptions it is not logged
    with a traceback.
    """

    def __init__(self, result: Any, *, update_cursor: bool = False) -> None:
        super().__init__("Job execution manually aborted.")
        self.result = result
        self.update_cursor = update_cursor


class SchemaMissingError(RuntimeError):
    """The queue's tables, or a column aiomq added to them, are not in the database."""

    def __init__(self, table: str, column: str | None = None) -> None:
        if column is None:
            message = (
                f"table {table!r} does not exist in this database: create the queue's tables with "
                "`await conn.run_sync(metadata.create_all)` (metadata given to make_default_model) "
                "or `aiomq schema --create`"
            )
        else:
            message = (
                f"column {table}.{column} does not exist in this database (a psycopg2_mq or aiomq 0.1 "
                "schema): add aiomq's columns, tables and indexes with `aiomq schema --create`"
            )
        super().__init__(message)
        self.table = table
        self.column = column


class CliError(Exception):
    """A failure the ``aiomq`` command reports as one line on stderr; ``code`` is the exit status."""

    code = 1


class UsageError(CliError):
    """Bad arguments (a bad URL among them): exit status 2, as argparse uses."""

    code = 2
