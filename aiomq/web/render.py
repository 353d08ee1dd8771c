"""The dashboard's shared state and its page rendering: Jinja2 with autoescaping on every template, so no
job argument, result, queue name or cursor key can become markup; links that know where the app is
mounted; and the cross-site token handed to each page's forms.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import pathlib
import re
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse

from ..source import AsyncMQSource
from . import charts, security
from .live import LiveUpdates
from .queries import Reader

__all__ = ["Dashboard", "describe_error", "pretty_json"]

log = logging.getLogger(__name__)

TEMPLATES = pathlib.Path(__file__).parent / "templates"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{32,64}")
#: Longest JSON shown in a list cell before it is cut.
CELL_CHARS = 120


def pretty_json(value: Any, indent: int | None = 2) -> str:
    return json.dumps(value, indent=indent, sort_keys=True, ensure_ascii=False, default=str)


def _short_json(value: Any) -> str:
    text = pretty_json(value, None)
    return text if len(text) <= CELL_CHARS else text[: CELL_CHARS - 1] + "…"


def _when(value: datetime.datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _age(value: datetime.timedelta | None) -> str:
    if value is None:
        return ""
    s = int(value.total_seconds())
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _here(request: Request, prefix: str) -> str:
    """This page's path and query, inside the app (a mounted app's scope path includes its prefix)."""
    path = request.url.path
    if prefix and path.startswith(prefix):
        path = path[len(prefix) :] or "/"
    return path + (f"?{request.url.query}" if request.url.query else "")


def describe_error(ex: BaseException) -> str:
    """``RuntimeError("job is not in a valid state", 5, "completed")`` as one readable sentence."""
    if not ex.args:
        return type(ex).__name__
    head, *rest = ex.args
    return f"{head} ({', '.join(str(a) for a in rest)})" if rest else str(head)


@dataclasses.dataclass
class Dashboard:
    """What every route needs: the reader, an engine source for the actions, the live updates, and the
    settings of this app."""

    reader: Reader
    source: AsyncMQSource
    live: LiveUpdates | None
    read_only: bool
    page_size: int
    title: str
    env: jinja2.Environment = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            autoescape=True,  # every template, whatever its name
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(json=pretty_json, short_json=_short_json, when=_when, age=_age)
        self.env.globals.update(bars=charts.bars, chart_width=charts.WIDTH, chart_height=charts.HEIGHT)

    def render(self, request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        token = request.cookies.get(security.CSRF_COOKIE, "")
        fresh = not _TOKEN.fullmatch(token)
        if fresh:
            token = security.new_token()
        prefix = str(request.scope.get("root_path", ""))
        context.setdefault("notice", None)

        def url(path: str, **params: Any) -> str:
            query = {k: v for k, v in params.items() if v is not None and v != ""}
            return prefix + path + ("?" + urlencode(query) if query else "")

        html = self.env.get_template(template).render(
            request=request,
            url=url,
            here=_here(request, prefix),
            csrf_token=token,
            csrf_field=security.CSRF_FIELD,
            read_only=self.read_only,
            live=self.live is not None,
            title=self.title,
            states=self.reader.states,
            **context,
        )
        response = HTMLResponse(html, status_code=status_code)
        response.headers["cache-control"] = "no-store"
        if fresh:
            response.set_cookie(
                security.CSRF_COOKIE,
                token,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                path=prefix or "/",
            )
        return response

    def error(
        self, request: Request, status_code: int, message: str, back: str | None = None
    ) -> HTMLResponse:
        return self.render(request, "error.html", status_code, message=message, back=back)
