"""Fixtures of the destructive tests: a PostgreSQL cluster of their own, a fresh database per test, a fleet.

The cluster (``chaos_cluster``, one per session) is started from the system binaries on a port of its own,
as the ``postgres`` OS user when the tests run as root, so a test may kill and restart it without touching
any other server. Without system binaries the chaos tests skip with the reason.

``CHAOS_REPORT=<file>`` appends each test's figures to that file as JSON lines (docs/reliability.md).
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import Cluster, ClusterUnavailable, Fleet, Report


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "chaos: destructive fault-injection runs on a test-owned PostgreSQL (nox -s chaos)"
    )


@pytest.fixture(scope="session")
def chaos_cluster() -> Iterator[Cluster]:
    """The session's own PostgreSQL cluster (started; tests may stop and restart it)."""
    try:
        cluster = Cluster.create()
    except ClusterUnavailable as ex:
        pytest.skip(f"the chaos tests need a PostgreSQL cluster of their own: {ex}")
    try:
        asyncio.run(cluster.start())
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
async def chaos_db(chaos_cluster: Cluster) -> AsyncIterator[str]:
    """A fresh database on the chaos cluster with aiomq's tables and the ledger; its libpq URL."""
    await chaos_cluster.start()  # a previous test may have left it stopped
    name = f"chaos_{uuid.uuid4().hex[:12]}"
    url = await chaos_cluster.create_database(name)
    try:
        yield url
    finally:
        await chaos_cluster.start()
        await chaos_cluster.drop_database(name)


@pytest.fixture
async def fleet(chaos_db: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    """Worker processes on ``chaos_db`` (logs in ``tmp_path/workers``); any left alive are killed after."""
    log_dir = tmp_path / "workers"
    log_dir.mkdir()
    workers = Fleet(chaos_db, log_dir)
    try:
        yield workers
    finally:
        procs = [w.proc for w in workers.alive.values()]
        workers.abort()
        for proc in procs:
            await proc.wait()


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Report:
    """Record a test's figures: printed, kept as a junit property, and appended to ``$CHAOS_REPORT``."""

    def record(figures: dict[str, Any]) -> None:
        line = json.dumps({"test": request.node.nodeid, **figures}, default=str, sort_keys=True)
        print(f"\nCHAOS FIGURES {line}")
        request.node.user_properties.append(("chaos_figures", line))
        path = os.environ.get("CHAOS_REPORT")
        if path:
            with open(path, "a", encoding="utf-8") as out:
                out.write(line + "\n")

    return record
