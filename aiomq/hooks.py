"""Job hooks: what a worker tells observers (metrics, tracing) about each job it runs, without log parsing.

A :class:`JobHooks` sees every job at three points, all on the worker's event loop:

- ``started(job, scheduled_time, start_time)`` when the job is claimed and its task is created;
- ``finished(job, outcome)`` when its handler's :class:`~aiomq.execution.Outcome` is known (``None``: the
  handler was cancelled by ``stop(timeout)`` and the job is put back or marked lost);
- ``recorded(job, state, retried)`` once the outcome is committed: the job's final ``state``, and whether
  a retry was scheduled (DESIGN §7.1) in the same transaction.

It may also give a :attr:`JobHooks.middleware` (DESIGN §7.5), which wraps the handler outside the
worker's own middleware, so that what those do happens inside it (a tracing span, say).

Opt-in and free when unused: a worker without hooks keeps ``None`` and pays one ``is None`` test per point.
Hooks must be quick and should not raise; one that raises is logged and skipped, never failing a job.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable

from .execution import Middleware, Outcome
from .records import JobContext

__all__ = ["HookSet", "JobHooks", "hook_set"]

log = logging.getLogger(__name__)


class JobHooks:
    """Observes a worker's jobs; override the methods you need (each does nothing here)."""

    #: Wraps every handler call, outside the worker's own middleware; None: none.
    middleware: Middleware | None = None

    def started(
        self, job: JobContext, scheduled_time: datetime.datetime, start_time: datetime.datetime
    ) -> None:
        """The job was claimed (``start_time``, the worker's clock) and is about to run."""

    def finished(self, job: JobContext, outcome: Outcome | None) -> None:
        """The handler's outcome is known; None if ``stop(timeout)`` cancelled the handler."""

    def recorded(self, job: JobContext, state: str, retried: bool) -> None:
        """The outcome was committed: the job is ``state`` now, and ``retried`` if a retry was scheduled."""


class HookSet:
    """Several hooks called in order; one that raises is logged and the others still run."""

    __slots__ = ("_hooks", "middleware")

    def __init__(self, hooks: Iterable[JobHooks]) -> None:
        self._hooks = tuple(hooks)
        self.middleware: list[Middleware] = [h.middleware for h in self._hooks if h.middleware is not None]

    def started(
        self, job: JobContext, scheduled_time: datetime.datetime, start_time: datetime.datetime
    ) -> None:
        for hook in self._hooks:
            try:
                hook.started(job, scheduled_time, start_time)
            except Exception:
                log.exception("job hook %r failed in started() for job %s", hook, job.id)

    def finished(self, job: JobContext, outcome: Outcome | None) -> None:
        for hook in self._hooks:
            try:
                hook.finished(job, outcome)
            except Exception:
                log.exception("job hook %r failed in finished() for job %s", hook, job.id)

    def recorded(self, job: JobContext, state: str, retried: bool) -> None:
        for hook in self._hooks:
            try:
                hook.recorded(job, state, retried)
            except Exception:
                log.exception("job hook %r failed in recorded() for job %s", hook, job.id)


def hook_set(hooks: Iterable[JobHooks], *, first: Iterable[JobHooks] = ()) -> HookSet | None:
    """aiomq's own hooks (``first``) and the caller's (``hooks``, checked) as one, or None when there are
    none (the worker's zero-cost case)."""
    hooks = list(hooks)
    for i, hook in enumerate(hooks):
        if not isinstance(hook, JobHooks):
            raise TypeError(f"hooks[{i}] must be an aiomq.hooks.JobHooks, got {hook!r}")
    every = [*first, *hooks]
    return HookSet(every) if every else None
