"""The dashboard's defences: HTTP basic auth, protection of actions against cross-site requests, and the
headers every response carries (a strict Content-Security-Policy among them).

Cross-site requests: an action is a POST that must carry a token equal to the one in the dashboard's
cookie (a "double submit": another site can make a browser send the cookie but cannot read it to put it
in the form, and the cookie is ``SameSite=Strict`` besides). The browser's ``Sec-Fetch-Site`` and
``Origin`` headers, when present, must also say the request comes from the dashboard's own origin. All
three must pass.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hmac
import logging
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "CSP",
    "CSRF_COOKIE",
    "CSRF_FIELD",
    "BasicAuth",
    "SecurityHeaders",
    "cross_site_reason",
    "new_token",
]

log = logging.getLogger(__name__)

#: The cookie holding the token, and the form field that must repeat it.
CSRF_COOKIE = "aiomq_csrf"
CSRF_FIELD = "csrf_token"

#: Scripts, styles and connections only from the dashboard itself; no inline script or style, no frames.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
]


def new_token() -> str:
    return secrets.token_urlsafe(32)


def cross_site_reason(headers: Headers, cookies: Mapping[str, str], form_token: str | None) -> str | None:
    """Why this action POST may come from another site, or None when it is the dashboard's own."""
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site not in ("same-origin", "none"):
        return f"a request from another site (Sec-Fetch-Site: {fetch_site})"
    origin = headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != headers.get("host"):
        return "a request from another origin"
    cookie = cookies.get(CSRF_COOKIE)
    if not cookie or not form_token:
        return "the form's security token is missing (reload the page and try again)"
    if not hmac.compare_digest(cookie.encode(), form_token.encode()):
        return "the form's security token does not match (reload the page and try again)"
    return None


@dataclasses.dataclass(frozen=True)
class BasicAuth:
    """HTTP basic auth with one user; both parts compared in constant time."""

    user: str
    password: str

    def __post_init__(self) -> None:
        if not self.user or not self.password:
            raise ValueError("basic auth needs a non-empty user and password")
        if ":" in self.user:
            raise ValueError("a basic auth user name cannot contain ':'")

    def allows(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        # Both comparisons run whatever the first's outcome: no timing hint of which part was wrong.
        user_ok = hmac.compare_digest(user, self.user.encode())
        password_ok = hmac.compare_digest(password, self.password.encode())
        return bool(sep) and user_ok and password_ok


class SecurityHeaders:
    """ASGI middleware: basic auth (when configured) before anything else, and the security headers on
    every HTTP response."""

    def __init__(self, app: ASGIApp, auth: BasicAuth | None) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.auth is not None and not self.auth.allows(Headers(scope=scope).get("authorization")):
            await _unauthorized(send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in _HEADERS if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _unauthorized(send: Send) -> None:
    body = b"authentication required\n"
    headers: list[tuple[bytes, bytes]] = [
        (b"www-authenticate", b'Basic realm="aiomq", charset="UTF-8"'),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        *_HEADERS,
    ]
    start: dict[str, Any] = {"type": "http.response.start", "status": 401, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body})
