"""The dashboard's actions (POST): retry, cancel, abort, fail a lost job; pause and resume a queue; enable
and disable a schedule. Each goes through :class:`~aiomq.AsyncMQSource`'s own method, so the dashboard
changes nothing the library would not. Refused in read-only mode and for any request that may come from
another site (:mod:`.security`); a refusal or a failure (a job in the wrong state, an unknown id) is a page
saying why, never a 500. Success redirects (303) to the page showing the result.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from ..records import check_queue_name
from . import security
from .render import Dashboard, describe_error

__all__ = ["action_routes"]

log = logging.getLogger(__name__)

#: Longest form body read (it holds a token and nothing else).
MAX_FORM_BYTES = 4096
#: The result a lost job failed from the dashboard gets.
FAILED_BY_HAND = {"exc": "LostJobError", "message": "marked failed from the aiomq dashboard"}

#: What an action does, given its target (a job id, queue name or schedule id): the redirect's path.
Action = Callable[[Dashboard, str], Awaitable[str]]


async def _retry(d: Dashboard, job_id: str) -> str:
    new = await d.source.retry_job(int(job_id))
    return f"/jobs/{new.id}?notice=retried"


async def _cancel(d: Dashboard, job_id: str) -> str:
    await d.source.cancel_job(int(job_id))
    return f"/jobs/{job_id}?notice=canceled"


async def _abort(d: Dashboard, job_id: str) -> str:
    before = await d.source.get_job(int(job_id))
    await d.source.abort_job(int(job_id))
    pending = before.state == d.source.model.JobStates.PENDING
    return f"/jobs/{job_id}?notice={'canceled' if pending else 'abort-requested'}"


async def _fail(d: Dashboard, job_id: str) -> str:
    await d.source.fail_lost_job(int(job_id), result=FAILED_BY_HAND)
    return f"/jobs/{job_id}?notice=failed"


async def _pause(d: Dashboard, queue: str) -> str:
    changed = await d.source.pause_queue(check_queue_name(queue))
    return f"/?notice={'paused' if changed else 'already-paused'}"


async def _resume(d: Dashboard, queue: str) -> str:
    changed = await d.source.resume_queue(check_queue_name(queue))
    return f"/?notice={'resumed' if changed else 'not-paused'}"


async def _enable(d: Dashboard, schedule_id: str) -> str:
    await d.source.enable_schedule(int(schedule_id))
    return "/schedules?notice=enabled"


async def _disable(d: Dashboard, schedule_id: str) -> str:
    await d.source.disable_schedule(int(schedule_id))
    return "/schedules?notice=disabled"


#: path, action, where to go back to on failure ({} is the target).
ACTIONS: list[tuple[str, Action, str]] = [
    ("/jobs/{target:int}/retry", _retry, "/jobs/{}"),
    ("/jobs/{target:int}/cancel", _cancel, "/jobs/{}"),
    ("/jobs/{target:int}/abort", _abort, "/jobs/{}"),
    ("/jobs/{target:int}/fail", _fail, "/jobs/{}"),
    ("/queues/{target}/pause", _pause, "/"),
    ("/queues/{target}/resume", _resume, "/"),
    ("/schedules/{target:int}/enable", _enable, "/schedules"),
    ("/schedules/{target:int}/disable", _disable, "/schedules"),
]


async def _form_token(request: Request) -> str | None:
    """The token field of a urlencoded form (read by hand: no multipart parser needed for one field)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    values = parse_qs(body.decode("latin-1"), max_num_fields=20).get(security.CSRF_FIELD)
    return values[0] if values else None


def action_routes(d: Dashboard) -> list[Route]:
    def endpoint(action: Action, back: str) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            target = str(request.path_params["target"])
            back_to = back.format(target)
            if target.isdigit() and int(target) >= 2**63:
                return d.error(request, 404, f"there is no {target}", back_to)
            if d.read_only:
                return d.error(request, 403, "this dashboard is read-only: actions are turned off", back_to)
            refused = security.cross_site_reason(request.headers, request.cookies, await _form_token(request))
            if refused is not None:
                log.warning("refused %s %s: %s", request.method, request.url.path, refused)
                return d.error(request, 403, f"refused: {refused}", back_to)
            try:
                location = await action(d, target)
            except LookupError as ex:
                return d.error(request, 404, describe_error(ex), back_to)
            except (RuntimeError, ValueError) as ex:
                return d.error(request, 409, f"cannot do that: {describe_error(ex)}", back_to)
            log.info("dashboard: %s", request.url.path)
            return RedirectResponse(request.scope.get("root_path", "") + location, status_code=303)

        return run

    return [Route(path, endpoint(action, back), methods=["POST"]) for path, action, back in ACTIONS]
