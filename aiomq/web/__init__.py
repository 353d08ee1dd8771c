"""The aiomq dashboard (``pip install aiomq[web]``): :func:`create_app` builds it as an ASGI app; ``aiomq
web`` serves it. See the README's "Dashboard" section."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
