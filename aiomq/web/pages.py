"""The dashboard's pages (GET): queues, jobs, one job, lost jobs, cursors, schedules, listeners, workers."""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..records import utcnow
from .queries import JobFilters
from .render import Dashboard

__all__ = ["page_routes"]

log = logging.getLogger(__name__)

#: Messages of the ``notice`` query parameter an action redirects with (anything else shows nothing).
NOTICES = {
    "retried": "Retry queued: this is the new job.",
    "canceled": "Job canceled.",
    "abort-requested": "Abort requested: the worker running the job will cancel it.",
    "failed": "Lost job marked failed.",
    "paused": "Queue paused.",
    "resumed": "Queue resumed.",
    "already-paused": "The queue was paused already.",
    "not-paused": "The queue was not paused.",
    "enabled": "Schedule enabled.",
    "disabled": "Schedule disabled.",
}


class BadRequest(ValueError):
    """A query parameter the dashboard cannot use; shown to the user as a 400."""


def _int(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a job id (an integer), got {raw!r}") from None
    if not 0 <= value < 2**63:
        raise BadRequest(f"{name} is out of range: {raw!r}")
    return value


def _text(request: Request, name: str) -> str | None:
    value = request.query_params.get(name, "").strip()
    return value or None


class Pages:
    def __init__(self, d: Dashboard) -> None:
        self.d = d

    @staticmethod
    def notice(request: Request) -> str | None:
        return NOTICES.get(request.query_params.get("notice", ""))

    async def queues_page(self, request: Request) -> Response:
        stats, charts = await self.d.reader.overview(utcnow())
        return self.d.render(request, "queues.html", stats=stats, charts=charts, notice=self.notice(request))

    async def jobs_page(self, request: Request, *, lost: bool = False) -> Response:
        filters = JobFilters(
            queue=_text(request, "queue"),
            method=_text(request, "method"),
            state=self.d.reader.model.JobStates.LOST if lost else _text(request, "state"),
            cursor_key=_text(request, "cursor"),
        )
        try:
            before, after = _int(request, "before"), _int(request, "after")
            self.d.reader.check_filters(filters)
        except ValueError as ex:
            return self.d.error(request, 400, str(ex), back="/jobs")
        page = await self.d.reader.jobs(filters, before=before, after=after, limit=self.d.page_size)
        params: dict[str, Any] = {
            "queue": filters.queue,
            "method": filters.method,
            "state": None if lost else filters.state,
            "cursor": filters.cursor_key,
        }
        return self.d.render(
            request,
            "jobs.html",
            page=page,
            filters=filters,
            params=params,
            lost=lost,
            path="/lost" if lost else "/jobs",
            notice=self.notice(request),
        )

    async def lost_page(self, request: Request) -> Response:
        return await self.jobs_page(request, lost=True)

    async def job_page(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        found = await self.d.reader.job(job_id) if job_id < 2**63 else None
        if found is None:
            return self.d.error(request, 404, f"there is no job {job_id}", back="/jobs")
        job, cursor, aborting, chain = found
        return self.d.render(
            request,
            "job.html",
            job=job,
            cursor=cursor,
            aborting=aborting,
            chain=chain,
            st=self.d.reader.model.JobStates,
            notice=self.notice(request),
        )

    async def cursors_page(self, request: Request) -> Response:
        page = await self.d.reader.cursors(after=_text(request, "after"), limit=self.d.page_size)
        return self.d.render(request, "cursors.html", page=page)

    async def schedules_page(self, request: Request) -> Response:
        page = await self.d.reader.schedules(after=_int(request, "after"), limit=self.d.page_size)
        return self.d.render(request, "schedules.html", page=page, notice=self.notice(request))

    async def listeners_page(self, request: Request) -> Response:
        page = await self.d.reader.listeners(after=_int(request, "after"), limit=self.d.page_size)
        return self.d.render(request, "listeners.html", page=page)

    async def workers_page(self, request: Request) -> Response:
        locks, holders = await self.d.reader.workers()
        return self.d.render(request, "workers.html", locks=locks, holders=holders)


def page_routes(d: Dashboard) -> list[Route]:
    pages = Pages(d)
    return [
        Route("/", pages.queues_page, name="queues"),
        Route("/jobs", pages.jobs_page, name="jobs"),
        Route("/jobs/{job_id:int}", pages.job_page, name="job"),
        Route("/lost", pages.lost_page, name="lost"),
        Route("/cursors", pages.cursors_page, name="cursors"),
        Route("/schedules", pages.schedules_page, name="schedules"),
        Route("/listeners", pages.listeners_page, name="listeners"),
        Route("/workers", pages.workers_page, name="workers"),
    ]
