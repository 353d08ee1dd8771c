"""Running one handler: on the event loop (``async def``) or in a worker thread (plain functions), through
the worker's middleware, within the job's timeout, turning what it returned or raised into an
:class:`Outcome`.

An async handler past its timeout is cancelled; a sync one cannot be, so it is reported overdue and its
job fails when its thread returns. An aborted job (``AsyncMQSource.abort_job``) ends ``canceled``: the
worker cancels an async handler's task, a sync handler sees ``job.abort_requested``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import anyio.to_thread

from .errors import FailedJobError
from .model import JobStates
from .records import JobContext

__all__ = ["Executor", "Handler", "Middleware", "Outcome", "check_middleware"]

#: ``async def mw(job, call_next) -> result``: wraps every handler call; ``await call_next()`` runs the rest.
Middleware = Callable[[JobContext, Callable[[], Awaitable[Any]]], Awaitable[Any]]

log = logging.getLogger(__name__)


class Handler:
    """A queue's handler: ``execute_job(job)`` or a plain callable, sync (run in a thread) or async."""

    def __init__(self, queue: str, handler: Any) -> None:
        fn = getattr(handler, "execute_job", None)
        if fn is None:
            if not callable(handler):
                raise TypeError(
                    f"handler for queue {queue!r} must have an execute_job(job) method or be callable"
                )
            fn = handler
        self.fn: Callable[[JobContext], Any] = fn
        self.is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
            getattr(fn, "__call__", None)  # noqa: B004
        )


class Outcome:
    """What a handler's run came to: the job's new ``state``, its ``result``, whether to save its cursor,
    whether a retry policy applies (the handler raised, or ran past its timeout), and whether it timed out."""

    __slots__ = ("result", "retryable", "save_cursor", "state", "timed_out")

    def __init__(
        self, state: str, result: Any, save_cursor: bool, *, retryable: bool = False, timed_out: bool = False
    ) -> None:
        self.state = state
        self.result = result
        self.save_cursor = save_cursor
        self.retryable = retryable
        self.timed_out = timed_out


def check_middleware(middleware: Sequence[Any]) -> list[Middleware]:
    """The worker's ``middleware``, each a callable taking ``(job, call_next)``."""
    if isinstance(middleware, str | bytes) or not isinstance(middleware, Sequence):
        raise TypeError(f"middleware must be a sequence of callables, got {type(middleware).__name__}")
    for i, mw in enumerate(middleware):
        if not callable(mw):
            raise TypeError(f"middleware[{i}] must be callable as mw(job, call_next), got {mw!r}")
    return list(middleware)


class _Overdue(Exception):
    """A sync handler returned after its timeout."""


class Executor:
    """Runs handlers; sync ones in threads, at most ``concurrency`` at once."""

    def __init__(
        self,
        *,
        states: type[JobStates],
        worker_name: str,
        concurrency: int,
        result_from_error: Callable[[BaseException], Any],
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self._states = states
        self._name = worker_name
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._result_from_error = result_from_error
        self._middleware = list(middleware)
        #: Jobs whose sync handler is still running past its timeout.
        self.overdue: set[int] = set()

    async def execute(self, handler: Handler, job: JobContext, timeout: float | None = None) -> Outcome:
        """Run ``handler`` on ``job`` within ``timeout`` seconds. Cancellation (``stop(timeout)``, an
        abort) propagates; anything else is an outcome: ``FailedJobError`` fails the job with its result,
        other errors (a timeout among them) with an error result, and a retry policy may apply."""
        states = self._states
        try:
            if handler.is_async and timeout is None and not self._middleware:
                result = await handler.fn(job)  # the common case, without a coroutine in between
            elif handler.is_async:
                result = await self._run_async(handler, job, timeout)
            else:
                result = await self._run_sync(handler, job, timeout)
        except FailedJobError as ex:
            if job.abort_requested:
                return self.aborted(job)
            log.info("job %s failed on purpose (update_cursor=%s)", job.id, ex.update_cursor)
            return Outcome(states.FAILED, ex.result, ex.update_cursor)
        except _Overdue as ex:
            return self._timed_out(job, ex.args[0], None)
        except Exception as ex:
            if isinstance(ex, TimeoutError) and ex.args and ex.args[0] is _DEADLINE:
                return self._timed_out(job, timeout, ex.__traceback__)
            if job.abort_requested:
                return self.aborted(job)
            log.exception("error while handling job=%s", job.id)
            return Outcome(states.FAILED, self._result_from_error(ex), False, retryable=True)
        if job.abort_requested:  # a sync handler returned (or a handler swallowed the cancel) after it
            return self.aborted(job)
        return Outcome(states.COMPLETED, result, True)

    def aborted(self, job: JobContext) -> Outcome:
        log.warning("job %s: aborted on request", job.id)
        return Outcome(self._states.CANCELED, None, False)

    def _timed_out(self, job: JobContext, timeout: float | None, tb: Any) -> Outcome:
        if job.abort_requested:  # the handler was past its time and aborted: the request wins
            return self.aborted(job)
        error = TimeoutError(f"job {job.id} exceeded its timeout of {timeout:g} s").with_traceback(tb)
        log.error("job %s failed: %s", job.id, error)
        result = self._result_from_error(error)
        return Outcome(self._states.FAILED, result, False, retryable=True, timed_out=True)

    def _chain(self, job: JobContext, handler: Callable[[], Awaitable[Any]]) -> Awaitable[Any]:
        """The middleware around ``handler``, outermost first."""
        call = handler
        for mw in reversed(self._middleware):
            call = functools.partial(mw, job, call)
        return call()

    async def _run_async(self, handler: Handler, job: JobContext, timeout: float | None) -> Any:
        if timeout is None:
            return await self._chain(job, functools.partial(handler.fn, job))
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                return await self._chain(job, functools.partial(handler.fn, job))
        except TimeoutError as ex:
            if scope.expired():
                raise TimeoutError(_DEADLINE) from ex
            raise

    async def _run_sync(self, handler: Handler, job: JobContext, timeout: float | None) -> Any:
        async def in_thread() -> Any:
            return await anyio.to_thread.run_sync(
                _call_in_thread, handler.fn, job, self._name, abandon_on_cancel=True, limiter=self._limiter
            )

        if timeout is None:
            return await self._chain(job, in_thread)
        timer = asyncio.get_running_loop().call_later(timeout, self._overdue, job, timeout)
        try:
            result = await self._chain(job, in_thread)
        except Exception:
            if job.id in self.overdue:  # what it raised after its time is discarded, as a result would be
                raise _Overdue(timeout) from None
            raise
        finally:
            timer.cancel()
            overdue = job.id in self.overdue
            self.overdue.discard(job.id)
        if overdue:
            raise _Overdue(timeout)
        return result

    def _overdue(self, job: JobContext, timeout: float) -> None:
        self.overdue.add(job.id)
        log.warning(
            "job %s: its sync handler is still running after its timeout of %g s; it cannot be interrupted, "
            "and the job will fail when it returns",
            job.id,
            timeout,
        )


#: The argument of the TimeoutError that marks a job's own deadline (not one the handler raised).
_DEADLINE = "aiomq job deadline"


def _call_in_thread(fn: Callable[[JobContext], Any], job: JobContext, name: str) -> Any:
    thread = threading.current_thread()
    old = thread.name
    thread.name = f"{name},job={job.id}"
    try:
        return fn(job)
    except Exception:
        raise
    except BaseException as ex:  # SystemExit and friends from a handler fail the job, not the worker
        raise RuntimeError(f"handler raised {type(ex).__name__}: {ex}") from ex
    finally:
        thread.name = old
