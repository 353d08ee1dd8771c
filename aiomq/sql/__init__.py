"""Every statement aiomq runs, by concern, built once per model from its table objects.

Each group is a small class whose attributes are statements (SQLAlchemy Core, compiled by the caller once
or cached by SQLAlchemy), each with a comment naming its parameters and what it locks.
``tests/test_sql_snapshot.py`` compiles every one for PostgreSQL and compares it with
``tests/sql_snapshot.sql``, so a change to any statement's SQL shows up in review.

- :mod:`.claims`: claim, next due time, adopt, the worker's advisory lock;
- :mod:`.enqueue`: insert or collapse, insert many, NOTIFY, link rows;
- :mod:`.outcomes`: finish one or many, save cursors, requeue, mark one lost, successor hints;
- :mod:`.maintenance`: lost jobs, stale locks, re-stamping after a reconnect, keepalive;
- :mod:`.schedules`: scheduler ownership and firing;
- :mod:`.lookups`: what the source reads (job info, find_jobs, cursors, listeners);
- :mod:`.aborts`: abort requests;
- :mod:`.queues`: pausing and resuming queues, queue statistics;
- :mod:`.prune`: deleting finished jobs.
"""

from __future__ import annotations

import functools

from ..model import Model
from .aborts import AbortStatements
from .claims import ClaimStatements
from .enqueue import EnqueueStatements
from .lookups import LookupStatements
from .maintenance import MaintenanceStatements
from .outcomes import OutcomeStatements
from .parts import Parts
from .prune import PruneStatements
from .queues import QueueStatements
from .schedules import SCHEDULER_NS, ScheduleStatements

__all__ = ["SCHEDULER_NS", "Statements", "statements"]


class Statements:
    """The statements of one model, by concern."""

    def __init__(self, model: Model) -> None:
        parts = Parts(model)
        self.parts = parts
        #: None when the model has no abort table.
        self.aborts = (
            None if model.AbortRequest is None else AbortStatements(parts, model.AbortRequest.__table__)
        )
        self.claims = ClaimStatements(parts)
        self.enqueue = EnqueueStatements(parts)
        self.outcomes = OutcomeStatements(parts)
        self.maintenance = MaintenanceStatements(parts, self.aborts)
        self.schedules = ScheduleStatements(parts)
        self.lookups = LookupStatements(parts)
        self.queues = QueueStatements(parts, None if model.QueuePause is None else model.QueuePause.__table__)
        self.prune = PruneStatements(parts)
        #: Send a NOTIFY (``channel``, ``payload``) inside the current transaction.
        self.notify = self.enqueue.notify


@functools.cache
def statements(model: Model) -> Statements:
    """The statements of ``model``, built on first use."""
    return Statements(model)
