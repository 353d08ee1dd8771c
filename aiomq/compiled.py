"""SQLAlchemy statements compiled once to asyncpg's SQL, for the worker's own connection.

The claim, the next-due query and their kin run many times a second on the worker's dedicated asyncpg
connection (``listener.Listener``). Compiling them once and running them on the driver skips SQLAlchemy's
per-execution work (about 0.1 ms of CPU each) and a pool checkout; asyncpg prepares them on first use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.compiler import SQLCompiler

__all__ = ["Compiled"]


class Compiled:
    """``statement`` as asyncpg SQL (``$1``, ``$2``, ...) and the order of its parameters.

    Values the statement carries (literals SQLAlchemy turned into parameters) are kept; the named
    ``bindparam``s must be given to :meth:`args` each time. No bind processors run: the parameters these
    statements take (text, integers, timestamps and arrays of them) are what asyncpg encodes natively.
    """

    def __init__(self, statement: sa.ClauseElement, dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        if not isinstance(compiled, SQLCompiler) or compiled.positiontup is None:
            raise TypeError(f"{dialect.name} did not compile this statement to positional SQL")
        self.sql = compiled.string
        self._names = list(compiled.positiontup)
        binds = compiled.binds
        self._required = {name for name in self._names if binds[name].required}
        self._fixed = {n: v for n, v in compiled.params.items() if n not in self._required}

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        """The positional arguments for ``params``; a missing one raises ``KeyError`` naming it."""
        return [params[name] if name in self._required else self._fixed[name] for name in self._names]
