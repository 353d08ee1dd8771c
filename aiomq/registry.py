"""Schedules and listeners: the rows that make jobs later (RRULE schedules) or on events (listeners).

:class:`Registry` is the part of :class:`~aiomq.source.AsyncMQSource` that adds, reads and toggles them;
firing schedules is the worker's duty (:mod:`aiomq.scheduler`), turning events into jobs is
:func:`aiomq.events.emit_to_listeners`.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import json
import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from . import channels
from .enqueue import Enqueuer, as_time, check_method, collapse_rule, validate_call
from .model import Model
from .records import QueuedJob, check_queue_name, to_naive_utc, utcnow
from .schedules import check_rrule, next_rrule_time
from .serialize import dump_json
from .sql import Statements

__all__ = ["Registry"]

log = logging.getLogger(__name__)


class Registry(abc.ABC):
    """Schedules and listeners of one model, in a session the subclass opens (``_session``): the caller's,
    or one of its own that commits (then rows it returns are detached with every column loaded)."""

    model: Model
    dbsession: AsyncSession | None
    _st: Statements
    _enqueuer: Enqueuer

    @abc.abstractmethod
    def _session(self) -> contextlib.AbstractAsyncContextManager[AsyncSession]:
        """The caller's session, or a new one in a transaction that commits on leaving."""

    @abc.abstractmethod
    async def _get_row(self, cls: type[Any], what: str, row_id: int, for_update: bool, raises: bool) -> Any:
        """The ORM row ``row_id`` of ``cls``; ``LookupError`` naming ``what`` (or None) if missing."""

    async def _notify_schedules(self, session: AsyncSession, queue: str, when: datetime.datetime) -> None:
        """Tell the worker owning ``queue``'s schedules to re-read them (the next one is due ``when``)."""
        await session.execute(
            self._st.notify,
            {
                "channel": channels.queue_channel(self.model.channel_prefix, queue),
                "payload": channels.schedule_payload(when),
            },
        )

    # ---------------------------------------------------------------- schedules

    async def add_schedule(
        self,
        queue: str,
        method: str,
        args: Any = None,
        *,
        rrule: str,
        is_enabled: bool = True,
        cursor_key: str | None = None,
        collapse_on_cursor: bool | None = None,
        schedule_kwargs: dict[str, Any] | None = None,
        now: datetime.datetime | None = None,
        reload: bool = True,
    ) -> Any:
        """Add a recurring schedule (RFC 5545 RRULE); returns the ``model.JobSchedule`` row."""
        check_queue_name(queue)
        check_method(method)
        collapse = collapse_rule(collapse_on_cursor, cursor_key)
        now = utcnow() if now is None else to_naive_utc(now)
        check_rrule(rrule, now)
        args = {} if args is None else args
        args = json.loads(dump_json(args, "args"))
        next_time = next_rrule_time(rrule, now, now)
        schedule = self.model.JobSchedule(
            **(schedule_kwargs or {}),
            created_time=now,
            is_enabled=bool(is_enabled),
            rrule=rrule,
            queue=queue,
            method=method,
            args=args,
            cursor_key=cursor_key,
            collapse_on_cursor=collapse,
            next_execution_time=next_time,
        )
        async with self._session() as session:
            session.add(schedule)
            await session.flush()
            if reload and is_enabled and next_time is not None:
                await self._notify_schedules(session, queue, next_time)
            if self.dbsession is None:
                session.expunge(schedule)
        log.info("added schedule %s (%s.%s, rrule=%r)", schedule.id, queue, method, rrule)
        return schedule

    async def get_schedule(self, schedule_id: int, *, for_update: bool = False, raises: bool = True) -> Any:
        """The ``model.JobSchedule`` row; ``LookupError`` (or None with ``raises=False``) if missing."""
        return await self._get_row(self.model.JobSchedule, "schedule", schedule_id, for_update, raises)

    async def disable_schedule(self, schedule_id: int) -> None:
        async with self._session() as session:
            schedule = await self._locked_row(session, self.model.JobSchedule, "schedule", schedule_id)
            if not schedule.is_enabled:
                log.info("schedule %s is already disabled", schedule_id)
                return
            schedule.is_enabled = False
            schedule.next_execution_time = None
            await session.flush()
        log.info("disabled schedule %s", schedule_id)

    async def enable_schedule(
        self, schedule_id: int, *, now: datetime.datetime | None = None, reload: bool = True
    ) -> None:
        now = utcnow() if now is None else to_naive_utc(now)
        async with self._session() as session:
            schedule = await self._locked_row(session, self.model.JobSchedule, "schedule", schedule_id)
            if schedule.is_enabled:
                log.info("schedule %s is already enabled", schedule_id)
                return
            schedule.is_enabled = True
            schedule.next_execution_time = next_rrule_time(schedule.rrule, schedule.created_time, now)
            await session.flush()
            if reload and schedule.next_execution_time is not None:
                await self._notify_schedules(session, schedule.queue, schedule.next_execution_time)
        log.info("enabled schedule %s", schedule_id)

    async def call_schedule(
        self,
        schedule_id: int,
        *,
        now: datetime.datetime | None = None,
        reload: bool = True,
        when: datetime.datetime | datetime.timedelta | None = None,
    ) -> QueuedJob:
        """Enqueue the schedule's job now; an enabled schedule then advances past ``now``."""
        now = utcnow() if now is None else to_naive_utc(now)
        async with self._session() as session:
            schedule = await self._locked_row(session, self.model.JobSchedule, "schedule", schedule_id)
            call = validate_call(
                self._st.parts.job.c,
                schedule.queue,
                schedule.method,
                schedule.args,
                when=now if when is None else as_time(when, now, "when"),
                now=now,
                cursor_key=schedule.cursor_key,
                collapse_on_cursor=bool(schedule.collapse_on_cursor),
                schedule_ids=[schedule.id],
            )
            job = await self._enqueuer.insert_or_join(session, call)
            if schedule.is_enabled:
                schedule.next_execution_time = next_rrule_time(schedule.rrule, schedule.created_time, now)
                await session.flush()
                if reload and schedule.next_execution_time is not None:
                    await self._notify_schedules(session, schedule.queue, schedule.next_execution_time)
            return job

    async def reload_scheduler(self, queue: str, *, now: datetime.datetime | None = None) -> None:
        """Ask the worker owning ``queue``'s schedules to re-read them now."""
        check_queue_name(queue)
        now = utcnow() if now is None else to_naive_utc(now)
        async with self._session() as session:
            await self._notify_schedules(session, queue, now)

    # ---------------------------------------------------------------- listeners and events

    async def add_listener(
        self,
        event: str,
        queue: str,
        method: str,
        args: Any = None,
        *,
        when: datetime.timedelta | None = None,
        is_enabled: bool = True,
        context_arg_key: str | None = None,
        cursor_key: str | None = None,
        collapse_on_cursor: bool | None = None,
        listener_kwargs: dict[str, Any] | None = None,
        now: datetime.datetime | None = None,
    ) -> Any:
        """Turn every ``emit_event(event, ...)`` into a job; returns the ``model.JobListener`` row."""
        if not isinstance(event, str) or not event:
            raise ValueError(f"event must be a non-empty string, got {event!r}")
        check_queue_name(queue)
        check_method(method)
        collapse = collapse_rule(collapse_on_cursor, cursor_key)
        if when is not None and not isinstance(when, datetime.timedelta):
            raise TypeError(
                f"when must be a timedelta (the delay after the event), got {type(when).__name__}"
            )
        if context_arg_key is None:
            context_arg_key = "events" if collapse else "event"
        now = utcnow() if now is None else to_naive_utc(now)
        args = json.loads(dump_json({} if args is None else args, "args"))
        if not isinstance(args, dict):
            raise TypeError("a listener's args must be a dict (the event is added under context_arg_key)")
        listener = self.model.JobListener(
            **(listener_kwargs or {}),
            created_time=now,
            is_enabled=bool(is_enabled),
            event=event,
            queue=queue,
            method=method,
            args=args,
            context_arg_key=context_arg_key,
            when=when,
            cursor_key=cursor_key,
            collapse_on_cursor=collapse,
        )
        async with self._session() as session:
            session.add(listener)
            await session.flush()
            if self.dbsession is None:
                session.expunge(listener)
        log.info("added listener %s (%s -> %s.%s)", listener.id, event, queue, method)
        return listener

    async def get_listener(self, listener_id: int, *, for_update: bool = False, raises: bool = True) -> Any:
        """The ``model.JobListener`` row; ``LookupError`` (or None with ``raises=False``) if missing."""
        return await self._get_row(self.model.JobListener, "listener", listener_id, for_update, raises)

    async def enable_listener(self, listener_id: int, *, now: datetime.datetime | None = None) -> None:
        await self._toggle_listener(listener_id, True)

    async def disable_listener(self, listener_id: int) -> None:
        await self._toggle_listener(listener_id, False)

    async def _toggle_listener(self, listener_id: int, enabled: bool) -> None:
        async with self._session() as session:
            listener = await self._locked_row(session, self.model.JobListener, "listener", listener_id)
            if listener.is_enabled == enabled:
                log.info("listener %s is already %s", listener_id, "enabled" if enabled else "disabled")
                return
            listener.is_enabled = enabled
            await session.flush()

    async def _locked_row(self, session: AsyncSession, cls: type[Any], what: str, row_id: int) -> Any:
        row = await session.get(cls, row_id, with_for_update=True, populate_existing=True)
        if row is None:
            raise LookupError(f"cannot find {what}", row_id)
        return row
