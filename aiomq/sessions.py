"""The session the shared job code runs on: an ``AsyncSession``, or a sync ``Session`` seen through
:class:`SyncSessionView`.

The enqueue path and the job operations are written once, as coroutines awaiting a :class:`SessionLike`.
``AsyncMQSource`` awaits them on its ``AsyncSession``. ``SyncMQSource`` hands them a sync session behind
awaitable methods that return at once, so the coroutine never suspends and :func:`complete` runs it to its
end in one step, on the caller's thread: the same statements, in the same order, with no event loop.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

from sqlalchemy.engine import Result, ScalarResult
from sqlalchemy.orm import Session

__all__ = ["SessionLike", "SyncSessionView", "complete"]

_T = TypeVar("_T")


class SessionLike(Protocol):
    """What the shared code uses of a session (``AsyncSession`` has it all)."""

    async def execute(self, statement: Any, params: Any = None) -> Result[Any]: ...

    async def scalars(self, statement: Any, params: Any = None) -> ScalarResult[Any]: ...

    async def scalar(self, statement: Any, params: Any = None) -> Any: ...

    async def get(
        self, entity: Any, ident: Any, *, populate_existing: bool = False, with_for_update: Any = None
    ) -> Any: ...

    async def flush(self) -> None: ...

    def expunge(self, instance: object) -> None: ...


class SyncSessionView:
    """A sync ``Session`` as a :class:`SessionLike`: each method runs the session's own at once."""

    def __init__(self, session: Session) -> None:
        self.session = session

    async def execute(self, statement: Any, params: Any = None) -> Result[Any]:
        return self.session.execute(statement, params)

    async def scalars(self, statement: Any, params: Any = None) -> ScalarResult[Any]:
        return self.session.scalars(statement, params)

    async def scalar(self, statement: Any, params: Any = None) -> Any:
        return self.session.scalar(statement, params)

    async def get(
        self, entity: Any, ident: Any, *, populate_existing: bool = False, with_for_update: Any = None
    ) -> Any:
        return self.session.get(
            entity, ident, populate_existing=populate_existing, with_for_update=with_for_update
        )

    async def flush(self) -> None:
        self.session.flush()

    def expunge(self, instance: object) -> None:
        self.session.expunge(instance)


def complete(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro``, which awaits only a :class:`SyncSessionView`, to its end, synchronously.

    Something that really suspends (an async ``conflict_resolver`` waiting on I/O) cannot finish without
    an event loop: it is closed and ``RuntimeError`` says so; the caller's transaction should be rolled back.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError(
        "SyncMQSource ran into an awaitable that waits for the event loop "
        "(an async conflict_resolver?); give it a sync callable"
    )
