"""The claim's plan on a backlog of 100,000 pending jobs of mixed priorities (DESIGN §7.6: a claim's cost
stays independent of the backlog): PostgreSQL walks ``ix_aiomq_job_pending_priority`` in order and stops
after a few rows; it neither scans the table nor sorts the backlog. Read from EXPLAIN ANALYZE, so the test
fails on the plan, never on a time."""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterator
from typing import Any

from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

from aiomq.compiled import Compiled
from aiomq.model import Model
from aiomq.sql import Statements

BACKLOG = 100_000
INSERT = (
    "INSERT INTO mq_job (state, created_time, scheduled_time, queue, method, args, collapsible, priority) "
)


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


async def test_claim_walks_the_priority_index_on_a_big_backlog(db: Any, model: Model) -> None:
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    # Priorities -5..5 spread over the backlog, the highest ones late in id and due order; a small queue
    # beside it; a few jobs not due yet, with the highest priority of all.
    await db.execute(
        INSERT + "SELECT 'pending', $1::timestamp - make_interval(secs => $2 - i), "
        "$1::timestamp - make_interval(secs => $2 - i), 'big', 'm', '{}', false, (i * 7919) % 11 - 5 "
        "FROM generate_series(1, $2) AS i",
        now,
        BACKLOG,
    )
    await db.execute(
        INSERT + "SELECT 'pending'::mq_job_state, $1::timestamp, $1::timestamp + interval '1 hour', 'big', "
        "'later', '{}'::jsonb, false, 9 "
        "FROM generate_series(1, 50) UNION ALL "
        "SELECT 'pending', $1::timestamp, $1::timestamp, 'small', 'm', '{}', false, 0 "
        "FROM generate_series(1, 100)",
        now,
    )
    await db.execute("ANALYZE mq_job")
    claim = Compiled(Statements(model).claims.claim, PGDialect_asyncpg())  # type: ignore[no-untyped-call]
    params = {"queues": ["big", "small"], "now": now, "limit": 10, "lock_id": 1, "name": "plan"}
    transaction = db.transaction()
    await transaction.start()
    try:
        [row] = await db.fetch("EXPLAIN (ANALYZE, FORMAT JSON) " + claim.sql, *claim.args(params))
        plan = json.loads(row[0])[0]["Plan"]
        claimed = await db.fetch(
            "SELECT priority, method FROM mq_job WHERE state = 'running' AND worker = 'plan' ORDER BY id"
        )
    finally:
        await transaction.rollback()  # EXPLAIN ANALYZE ran the claim: leave the jobs pending

    scans = [n for n in nodes(plan) if n.get("Relation Name") == "mq_job" and "Scan" in n["Node Type"]]
    assert not [n for n in scans if n["Node Type"] == "Seq Scan"], json.dumps(plan, indent=1)
    walks = [n for n in scans if n.get("Index Name") == "ix_aiomq_job_pending_priority"]
    assert walks, json.dumps(plan, indent=1)
    # Each walk stops after the claim's few rows (two queues, limit 10): no read of the backlog.
    for walk in walks:
        assert walk["Actual Rows"] * walk["Actual Loops"] <= 20, json.dumps(walk, indent=1)
    for sort in (n for n in nodes(plan) if n["Node Type"] == "Sort"):
        assert sort["Actual Rows"] <= 20, json.dumps(sort, indent=1)
    # The claim took the highest due priority (5) first; never the later jobs of priority 9.
    assert len(claimed) == 10
    assert {r["priority"] for r in claimed} == {5}
