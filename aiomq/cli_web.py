"""``aiomq web``: serve the dashboard (:mod:`aiomq.web`, ``pip install aiomq[web]``) with uvicorn::

    aiomq web [--database-url URL] [--host 127.0.0.1] [--port 8080] [--read-only] [--model MODULE:ATTR]

It binds 127.0.0.1 unless told otherwise. Basic auth is on when ``AIOMQ_WEB_USER`` and
``AIOMQ_WEB_PASSWORD`` are both set (setting only one is an error: a dashboard meant to be protected
must not start open).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
from collections.abc import Callable
from typing import Any

from .cli_args import tcp_port
from .dsn import DatabaseURL, check_connection, make_engine
from .errors import CliError, UsageError
from .model import Model
from .schema import check_schema

__all__ = ["MISSING_EXTRA", "add_command", "basic_auth_from_env"]

log = logging.getLogger(__name__)

MISSING_EXTRA = "the dashboard needs the web extra: pip install 'aiomq[web]'"
USER_VAR, PASSWORD_VAR = "AIOMQ_WEB_USER", "AIOMQ_WEB_PASSWORD"


def basic_auth_from_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> tuple[str, str] | None:
    user, password = environ.get(USER_VAR, ""), environ.get(PASSWORD_VAR, "")
    if bool(user) != bool(password):
        raise UsageError(f"set both {USER_VAR} and {PASSWORD_VAR} for basic auth, or neither")
    return (user, password) if user else None


def add_command(
    commands: Any,
    options: Callable[[argparse.ArgumentParser], None],
    env: Callable[[str, str | None], str | None],
    database: Callable[[argparse.Namespace], DatabaseURL],
    load_model: Callable[[str | None], Model],
) -> None:
    """Register ``web`` (``options`` adds --model, --database-url and --log-level; ``env`` reads an
    option's AIOMQ_* variable; ``database`` and ``load_model`` are the CLI's)."""
    web = commands.add_parser("web", help="serve the dashboard (pip install 'aiomq[web]')")
    web.add_argument(
        "--host", default=env("host", "127.0.0.1"), help="address to bind (default 127.0.0.1; env AIOMQ_HOST)"
    )
    web.add_argument(
        "--port",
        type=tcp_port,
        default=env("port", "8080"),
        help="port to bind (default 8080; env AIOMQ_PORT)",
    )
    web.add_argument(
        "--read-only", action="store_true", help="show no actions and refuse them (env AIOMQ_READ_ONLY=1)"
    )
    options(web)

    def run(args: argparse.Namespace) -> int:
        if importlib.util.find_spec("starlette") is None or importlib.util.find_spec("uvicorn") is None:
            raise CliError(MISSING_EXTRA)
        read_only = args.read_only or os.environ.get("AIOMQ_READ_ONLY", "") not in ("", "0")
        return asyncio.run(
            serve(
                database(args), load_model(args.model), args.host, args.port, read_only, basic_auth_from_env()
            )
        )

    web.set_defaults(func=run, default_log_level="INFO")


async def serve(
    db: DatabaseURL, model: Model, host: str, port: int, read_only: bool, auth: tuple[str, str] | None
) -> int:
    import uvicorn

    from .web import create_app

    engine = make_engine(db, pool_size=5, max_overflow=5)
    try:
        await check_connection(engine, db)
        async with engine.connect() as conn:
            await check_schema(conn, model)
        app = create_app(engine, model, read_only=read_only, auth=auth)
        config = uvicorn.Config(
            app, host=host, port=port, log_config=None, timeout_graceful_shutdown=2, access_log=False
        )
        log.info(
            "dashboard on http://%s:%s/%s%s",
            host,
            port,
            " (read-only)" if read_only else "",
            " with basic auth" if auth else "",
        )
        await uvicorn.Server(config).serve()
    finally:
        await engine.dispose()
    return 0
