"""Which database errors are worth retrying."""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["is_retryable", "is_unique_violation", "sqlstate"]

# Serialization failure, deadlock, unique violation (a claim race), and the server going away.
_RETRYABLE_STATES = {"40001", "40P01", "23505", "57P01", "57P02", "57P03", "55006", "53300"}


def sqlstate(ex: BaseException) -> str | None:
    """The SQLSTATE of a driver error, wrapped by SQLAlchemy or not."""
    seen: set[int] = set()
    current: BaseException | None = ex
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "sqlstate", None)
        if isinstance(code, str):
            return code
        current = getattr(current, "orig", None) or current.__cause__
    return None


def is_unique_violation(ex: BaseException) -> bool:
    return sqlstate(ex) == "23505"


def is_retryable(ex: BaseException) -> bool:
    """Lost connections, admin shutdowns, serialization failures, deadlocks and unique violations."""
    if isinstance(ex, sa.exc.DBAPIError) and ex.connection_invalidated:
        return True
    code = sqlstate(ex)
    if code is not None:
        return code in _RETRYABLE_STATES or code.startswith("08")
    if isinstance(ex, sa.exc.InterfaceError | sa.exc.OperationalError):
        return True
    # asyncpg raises these (unwrapped by SQLAlchemy in some paths) when the connection dies.
    cause: BaseException | None = ex
    while cause is not None:
        if isinstance(cause, OSError | ConnectionError | TimeoutError):
            return True
        name = type(cause).__name__
        if name in {"ConnectionDoesNotExistError", "InterfaceError", "ConnectionFailureError"}:
            return True
        cause = cause.__cause__
    return False
