"""``aiomq pause``, ``resume``, ``queues`` and ``prune``, run as ``python -m aiomq`` against the test
database: what they print equals the database's state, and bad input changes nothing."""

from __future__ import annotations

import datetime
import re
from typing import Any

import pytest

from aiomq import AsyncMQSource

from .test_cli import cli, ok, one_line_error


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None, microsecond=0)


async def finish(db: Any, job_id: int, state: str, ended: datetime.datetime) -> None:
    """Finish a job at ``ended``, as if it had been enqueued a second before (a job ends after it began)."""
    await db.execute(
        "UPDATE mq_job SET state = $2, start_time = $3, end_time = $3, "
        "created_time = $3::timestamp - interval '1s', scheduled_time = $3::timestamp - interval '1s' "
        "WHERE id = $1",
        job_id,
        state,
        ended,
    )


def table(out: str) -> dict[str, list[str]]:
    """``aiomq queues``'s rows by queue name (the header and the closing line checked and left out)."""
    lines = out.strip().splitlines()
    assert lines[0].split() == ["QUEUE", "DUE", "LATER", "RUNNING", "LOST", "PAUSED", "OLDEST", "DUE"]
    assert lines[-1].startswith("DUE and LATER are pending jobs")
    return {line.split()[0]: line.split()[1:] for line in lines[1:-1]}


async def test_help_names_the_commands() -> None:
    out = ok(await cli("--help"))
    for command in ("pause", "resume", "queues", "prune"):
        assert re.search(rf"^\s+{command}\s", out, re.M), command
    prune = ok(await cli("prune", "--help"))
    for option in ("--older-than", "--state", "--queue", "--batch-size", "--dry-run"):
        assert option in prune


async def test_pause_queues_resume(database: str, source: AsyncMQSource, db: Any) -> None:
    NOW = utcnow()
    assert ok(await cli("queues", "--database-url", database)).startswith("no queues")
    for _ in range(3):
        await source.call("mail", "send", when=NOW - datetime.timedelta(minutes=5), now=NOW)
    await source.call("mail", "send", when=NOW + datetime.timedelta(hours=1), now=NOW)
    lost = await source.call("report", "build")
    await db.execute("UPDATE mq_job SET state = 'lost', lock_id = 1, worker = 'gone' WHERE id = $1", lost.id)

    out = ok(await cli("pause", "mail", "--database-url", database))
    assert out.startswith("paused queue mail:")
    assert await db.fetchval("SELECT count(*) FROM aiomq_queue_pause WHERE queue = 'mail'") == 1
    assert (
        ok(await cli("pause", "mail", "--database-url", database)).strip() == "queue mail was already paused"
    )
    rows = table(ok(await cli("queues", "--database-url", database)))
    assert rows["mail"][:5] == ["3", "1", "0", "0", "paused"]
    assert re.fullmatch(r"[45]m\d\ds", rows["mail"][5]), rows["mail"]  # waited five minutes
    assert rows["report"] == ["0", "0", "0", "1", "-", "-"]
    assert [s.queue for s in await source.queue_stats()] == list(rows)

    assert ok(await cli("resume", "mail", "--database-url", database)).strip() == "resumed queue mail"
    assert await db.fetchval("SELECT count(*) FROM aiomq_queue_pause") == 0
    assert ok(await cli("resume", "mail", "--database-url", database)).strip() == "queue mail was not paused"
    assert table(ok(await cli("queues", "--database-url", database)))["mail"][4] == "-"


async def test_prune(database: str, source: AsyncMQSource, db: Any) -> None:
    NOW = utcnow()
    old, recent = NOW - datetime.timedelta(days=10), NOW - datetime.timedelta(days=1)
    ids: dict[str, int] = {}
    for name, queue, state, ended in (
        ("old_done", "a", "completed", old),
        ("old_done_b", "b", "completed", old),
        ("old_canceled", "a", "canceled", old),
        ("old_failed", "a", "failed", old),
        ("recent_done", "a", "completed", recent),
        ("pending", "a", None, None),
    ):
        ids[name] = (await source.call(queue, name)).id
        if state is not None and ended is not None:
            await finish(db, ids[name], state, ended)

    async def left() -> set[str]:
        rows = await db.fetch("SELECT method FROM mq_job")
        return {r["method"] for r in rows}

    out = ok(await cli("prune", "--older-than", "7d", "--dry-run", "--database-url", database))
    assert out.startswith("would prune 3 canceled, completed jobs that ended before"), out
    assert len(await left()) == 6
    out = ok(await cli("prune", "--older-than", "7d", "--queue", "a", "--database-url", database))
    assert out.startswith("pruned 2 canceled, completed jobs of queue a that ended before"), out
    assert await left() == {"old_done_b", "old_failed", "recent_done", "pending"}
    out = ok(
        await cli(
            "prune", "--older-than", "1d12h", "--state", "failed", "--state", "completed",
            "--batch-size", "1", "--database-url", database,
        )
    )  # fmt: skip
    assert out.startswith("pruned 2 completed, failed jobs that ended before"), out
    assert await left() == {"recent_done", "pending"}
    # A moment instead of a duration
    moment = (NOW - datetime.timedelta(hours=1)).isoformat()
    out = ok(await cli("prune", "--older-than", moment, "--database-url", database))
    assert out.startswith("pruned 1 canceled, completed job that ended before"), out
    assert await left() == {"pending"}


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (("prune", "--older-than", "7x"), 2, "expected a duration such as 7d"),
        (("prune",), 2, "--older-than"),
        (("prune", "--older-than", "2999-01-01"), 1, "older_than is in the future"),
        (("prune", "--older-than", "1d", "--state", "pending"), 1, "cannot prune jobs in state 'pending'"),
        (("prune", "--older-than", "1d", "--queue", "no way"), 1, "invalid queue name 'no way'"),
        (("prune", "--older-than", "1d", "--batch-size", "0"), 2, "expected an integer from 1 to"),
        (("pause", "no way"), 1, "invalid queue name 'no way'"),
        (("resume", "9lives"), 1, "invalid queue name '9lives'"),
        (("pause",), 2, "QUEUE"),
    ],
)
async def test_bad_input_changes_nothing(
    database: str, source: AsyncMQSource, db: Any, args: tuple[str, ...], code: int, fragment: str
) -> None:
    NOW = utcnow()
    job = await source.call("a", "m")
    await finish(db, job.id, "completed", NOW - datetime.timedelta(days=30))
    proc = await cli(*args, "--database-url", database)
    one_line_error(proc, code, fragment)
    assert await db.fetchval("SELECT count(*) FROM mq_job") == 1
    assert await db.fetchval("SELECT count(*) FROM aiomq_queue_pause") == 0
