"""Running one handler: on the event loop (``async def``) or in a worker thread (plain functions), turning
what it returned or raised into an :class:`Outcome`. The home of timeouts, abort and middleware."""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread

from .errors import FailedJobError
from .model import JobStates
from .records import JobContext

__all__ = ["Executor", "Handler", "Outcome"]

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
    """What a handler's run came to: the job's new ``state``, its ``result``, whether to save its cursor."""

    __slots__ = ("result", "save_cursor", "state")

    def __init__(self, state: str, result: Any, save_cursor: bool) -> None:
        self.state = state
        self.result = result
        self.save_cursor = save_cursor


class Executor:
    """Runs handlers; sync ones in threads, at most ``concurrency`` at once."""

    def __init__(
        self,
        *,
        states: type[JobStates],
        worker_name: str,
        concurrency: int,
        result_from_error: Callable[[BaseException], Any],
    ) -> None:
        self._states = states
        self._name = worker_name
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._result_from_error = result_from_error

    async def execute(self, handler: Handler, job: JobContext) -> Outcome:
        """Run ``handler`` on ``job``. Cancellation (``stop(timeout)``) propagates; anything else is an
        outcome: ``FailedJobError`` fails the job with its result, other errors with an error result."""
        states = self._states
        try:
            if handler.is_async:
                result = await handler.fn(job)
            else:
                result = await anyio.to_thread.run_sync(
                    _call_in_thread,
                    handler.fn,
                    job,
                    self._name,
                    abandon_on_cancel=True,
                    limiter=self._limiter,
                )
        except FailedJobError as ex:
            log.info("job %s failed on purpose (update_cursor=%s)", job.id, ex.update_cursor)
            return Outcome(states.FAILED, ex.result, ex.update_cursor)
        except Exception as ex:
            log.exception("error while handling job=%s", job.id)
            return Outcome(states.FAILED, self._result_from_error(ex), False)
        return Outcome(states.COMPLETED, result, True)


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
