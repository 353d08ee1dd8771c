"""A PgBouncer of the tests' own: a config in a temp dir, a free port, in front of the suite's server.

Debian's ``pgbouncer`` package (``/usr/sbin/pgbouncer``); :func:`find_pgbouncer` returns None without
it, and the tests that need one skip saying so.
"""

from __future__ import annotations

import os
import pathlib
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from .pgserver import _free_port, _unprivileged_user

__all__ = ["PgBouncer", "find_pgbouncer", "start_pgbouncer"]


def find_pgbouncer() -> str | None:
    """The pgbouncer binary on PATH or in /usr/sbin (Debian's place), or None."""
    found = shutil.which("pgbouncer")
    if found is None and os.access("/usr/sbin/pgbouncer", os.X_OK):
        found = "/usr/sbin/pgbouncer"
    return found


@dataclass
class PgBouncer:
    """A running PgBouncer; :meth:`url` gives a database's URL through it."""

    port: int
    pool_mode: str
    log: pathlib.Path
    _proc: subprocess.Popen[bytes] = field(repr=False)

    def url(self, database_url: str) -> str:
        """``database_url`` (a libpq URL on the suite's server) through this PgBouncer."""
        url = sa.make_url(database_url)
        return url.set(host="127.0.0.1", port=self.port, password=None, query={}).render_as_string(
            hide_password=False
        )

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)  # shut down at once, closing every connection
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)


def _server(server_dsn: str) -> tuple[str, int, str, str | None]:
    """Host (or socket directory), port, user and password of the suite's server."""
    url = sa.make_url(server_dsn)
    host = url.host or str(url.query.get("host") or "/var/run/postgresql")
    return host, url.port or 5432, url.username or "postgres", url.password


def _run_as(host: str) -> str | None:
    """PgBouncer refuses to run as root: it runs as the owner of the server's socket directory (the only
    user that may enter it), or as an unprivileged user for a TCP server."""
    if os.geteuid() != 0:
        return None
    if host.startswith("/"):
        return pwd.getpwuid(os.stat(host).st_uid).pw_name
    user = _unprivileged_user()
    assert user is not None
    return user.name


def start_pgbouncer(
    server_dsn: str, directory: pathlib.Path, *, pool_mode: str = "transaction", **settings: Any
) -> PgBouncer:
    """Start PgBouncer in ``pool_mode`` in front of every database of ``server_dsn``'s server.

    Clients are let in without a password (``auth_type = any``) and logged in as the server's user.
    With ``server_round_robin`` and several server connections per database, consecutive transactions
    of one client land on different server sessions, so nothing that relies on a session passes by luck.
    """
    binary = find_pgbouncer()
    if binary is None:
        raise FileNotFoundError("pgbouncer is not installed")
    host, port, user, password = _server(server_dsn)
    directory.mkdir(parents=True, exist_ok=True)
    listen = _free_port()
    target = f"host={host} port={port} user={user}" + (f" password={password}" if password else "")
    config = {
        "listen_addr": "127.0.0.1",
        "listen_port": listen,
        "unix_socket_dir": "",
        "auth_type": "any",
        "pool_mode": pool_mode,
        "default_pool_size": 4,
        "server_round_robin": 1,
        "max_client_conn": 500,
        "logfile": directory / "pgbouncer.log",
        "server_login_retry": 1,
        **settings,
    }
    ini = directory / "pgbouncer.ini"
    lines = ["[databases]", f"* = {target}", "[pgbouncer]", *(f"{k} = {v}" for k, v in config.items())]
    ini.write_text("\n".join(lines) + "\n")
    run_as = _run_as(host)
    command = [binary, str(ini)]
    if run_as is not None:
        entry = pwd.getpwnam(run_as)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
        os.chown(ini, entry.pw_uid, entry.pw_gid)
        command[1:1] = ["-u", run_as]
    stderr = directory / "stderr"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    bouncer = PgBouncer(port=listen, pool_mode=pool_mode, log=directory / "pgbouncer.log", _proc=proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = stderr.read_text(errors="replace").strip()
            raise RuntimeError(f"pgbouncer exited with status {proc.returncode}: {text}")
        try:
            socket.create_connection(("127.0.0.1", listen), timeout=1).close()
            return bouncer
        except OSError:
            time.sleep(0.05)
    bouncer.stop()
    raise RuntimeError(f"pgbouncer did not listen on port {listen} within 10 seconds")
