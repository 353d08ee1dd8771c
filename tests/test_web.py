"""The dashboard's routes through httpx's ASGI transport, against the real test database: what each page
shows, filters and keyset pagination, the actions and their errors, cross-site refusal, read-only mode,
basic auth, and hostile values in every field a user controls. (The browser tests are test_web_browser.)"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import html
import re
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.routing import Mount

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext, Retry
from aiomq.model import Model
from aiomq.web import app as web_app
from aiomq.web import create_app
from aiomq.web.charts import bars
from aiomq.web.queries import Reader
from aiomq.web.security import CSP, CSRF_COOKIE, CSRF_FIELD

HOSTILE = '"><img src=x onerror=alert(1)><script>alert("x")</script>'


@pytest.fixture
async def client(engine: AsyncEngine, model: Model) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(engine, model, page_size=10, live_interval=None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as c:
        yield c


async def token(client: httpx.AsyncClient, path: str = "/") -> str:
    """Open a page as a browser would: the response sets the cookie and its forms carry the token."""
    page = await client.get(path)
    assert page.status_code == 200, page.text
    found = re.search(rf'name="{CSRF_FIELD}" value="([^"]+)"', page.text)
    value = found.group(1) if found else client.cookies[CSRF_COOKIE]
    assert client.cookies[CSRF_COOKIE] == value
    return value


async def post(client: httpx.AsyncClient, path: str, **headers: str) -> httpx.Response:
    csrf = await token(client)
    return await client.post(path, data={CSRF_FIELD: csrf}, headers=headers)


async def state_of(db: Any, job_id: int) -> str:
    return str(await db.fetchval("SELECT state::text FROM mq_job WHERE id = $1", job_id))


async def failing(job: JobContext) -> None:
    raise ValueError(f"no good: {job.args['n']}")


async def test_overview_shows_queue_stats_and_throughput(
    client: httpx.AsyncClient, source: AsyncMQSource, db: Any
) -> None:
    for n in range(3):
        await source.call("emails", "send", {"n": n})
    await source.call("emails", "send", {}, when=datetime.timedelta(hours=1))
    await source.call("reports", "build", {})
    await db.execute(
        "UPDATE mq_job SET state = 'completed', start_time = now() at time zone 'utc', "
        "end_time = now() at time zone 'utc' WHERE queue = 'reports'"
    )
    await source.pause_queue("emails")
    page = await client.get("/")
    assert page.status_code == 200
    stats = {s.queue: s for s in await source.queue_stats()}
    for queue in ("emails", "reports"):
        row = re.search(rf'<tr data-queue="{queue}">(.*?)</tr>', page.text, re.S)
        assert row is not None
        cells = dict(re.findall(r'data-field="(\w+)">(?:<[^>]+>)?([^<]*)', row.group(1)))
        assert int(cells["pending_due"]) == stats[queue].pending_due
        assert int(cells["pending_later"]) == stats[queue].pending_later
        assert int(cells["running"]) == stats[queue].running
    assert "<svg" in page.text
    assert 'aria-label="1 jobs finished in the last hour"' in page.text
    assert "paused" in page.text
    assert ">Resume</button>" in page.text
    assert ">Pause</button>" in page.text


async def test_jobs_filters(client: httpx.AsyncClient, source: AsyncMQSource) -> None:
    a = await source.call("q1", "alpha", {}, cursor_key="c1")
    b = await source.call("q1", "beta", {})
    c = await source.call("q2", "alpha", {})
    await source.cancel_job(c.id)

    async def ids(**params: str) -> set[int]:
        page = await client.get("/jobs", params=params)
        assert page.status_code == 200, page.text
        return {int(i) for i in re.findall(r'data-job="(\d+)"', page.text)}

    assert await ids() == {a.id, b.id, c.id}
    assert await ids(queue="q1") == {a.id, b.id}
    assert await ids(method="alpha") == {a.id, c.id}
    assert await ids(state="canceled") == {c.id}
    assert await ids(cursor="c1") == {a.id}
    assert await ids(queue="q1", method="alpha", state="pending", cursor="c1") == {a.id}
    assert await ids(queue="nope") == set()
    bad = await client.get("/jobs", params={"state": "exploded"})
    assert bad.status_code == 400
    assert "unknown job state" in bad.text
    bad = await client.get("/jobs", params={"before": "x"})
    assert bad.status_code == 400
    assert "before must be a job id" in bad.text


async def test_keyset_pagination_walks_every_job_once(
    client: httpx.AsyncClient, source: AsyncMQSource
) -> None:
    made = [(await source.call("pages", "m", {"i": i})).id for i in range(25)]
    await source.call("other", "m", {})
    seen: list[int] = []
    url: str | None = "/jobs?queue=pages"
    pages = 0
    while url is not None:
        page = await client.get(url)
        seen += [int(i) for i in re.findall(r'data-job="(\d+)"', page.text)]
        older = re.search(r'rel="next" href="([^"]+)"', page.text)
        url = html.unescape(older.group(1)) if older else None
        pages += 1
    assert seen == sorted(made, reverse=True)
    assert pages == 3
    # "Newer" from the last page leads back to the page before it.
    last = await client.get("/jobs", params={"queue": "pages", "before": str(seen[19])})
    newer = re.search(r'rel="prev" href="([^"]+)"', last.text)
    assert newer is not None
    back = await client.get(html.unescape(newer.group(1)))
    assert [int(i) for i in re.findall(r'data-job="(\d+)"', back.text)] == seen[10:20]


async def test_job_page_shows_everything_and_the_retry_chain(
    client: httpx.AsyncClient, source: AsyncMQSource, make_worker: Any
) -> None:
    job = await source.call("chain", "boom", {"n": 7}, retry=Retry(max_attempts=2, backoff=0), cursor_key="k")
    async with make_worker({"chain": failing}):
        first = await source.wait_for_job(job.id, timeout=20)
        last = await source.wait_for_job(job.id, timeout=20, follow_retries=True)
    assert first.state == last.state == "failed"
    assert last.id != job.id
    page = await client.get(f"/jobs/{job.id}")
    assert page.status_code == 200
    text = page.text
    assert "no good: 7" in text
    assert 'id="traceback"' in text
    assert "Traceback (most recent call last)" in text
    assert "&#34;n&#34;: 7" in text  # the args, as escaped JSON
    chain = re.search(r'<ol class="chain">(.*?)</ol>', text, re.S)
    assert chain is not None
    assert re.findall(r'href="/jobs/(\d+)"', chain.group(1)) == [str(job.id), str(last.id)]
    later = await client.get(f"/jobs/{last.id}")
    later_chain = re.search(r'<ol class="chain">(.*?)</ol>', later.text, re.S)
    assert later_chain is not None
    assert re.findall(r'href="/jobs/(\d+)"', later_chain.group(1)) == [str(job.id), str(last.id)]
    assert "Cursor snapshot" in text
    assert (await client.get("/jobs/999999")).status_code == 404
    assert (await client.get(f"/jobs/{2**63}")).status_code == 404


async def test_actions_change_the_database(client: httpx.AsyncClient, source: AsyncMQSource, db: Any) -> None:
    job = await source.call("acts", "m", {})
    response = await post(client, f"/jobs/{job.id}/cancel")
    assert response.status_code == 303
    assert response.headers["location"] == f"/jobs/{job.id}?notice=canceled"
    assert await state_of(db, job.id) == "canceled"

    response = await post(client, f"/jobs/{job.id}/retry")
    assert response.status_code == 303
    new_id = int(response.headers["location"].split("/")[2].split("?")[0])
    assert await state_of(db, new_id) == "pending"
    shown = await client.get(response.headers["location"])
    assert "Retry queued" in shown.text

    response = await post(client, f"/jobs/{new_id}/abort")
    assert response.status_code == 303
    assert await state_of(db, new_id) == "canceled"

    lost = await source.call("acts", "m", {})
    await db.execute("UPDATE mq_job SET state = 'lost', end_time = now() WHERE id = $1", lost.id)
    response = await post(client, f"/jobs/{lost.id}/fail")
    assert response.status_code == 303
    assert await state_of(db, lost.id) == "failed"
    assert "LostJobError" in await db.fetchval("SELECT result::text FROM mq_job WHERE id = $1", lost.id)

    assert (await post(client, "/queues/acts/pause")).status_code == 303
    assert await db.fetchval("SELECT count(*) FROM aiomq_queue_pause WHERE queue = 'acts'") == 1
    assert (await post(client, "/queues/acts/resume")).status_code == 303
    assert await db.fetchval("SELECT count(*) FROM aiomq_queue_pause") == 0

    schedule = await source.add_schedule("acts", "tick", rrule="FREQ=HOURLY")
    assert (await post(client, f"/schedules/{schedule.id}/disable")).status_code == 303
    assert await db.fetchval("SELECT is_enabled FROM mq_job_schedule WHERE id = $1", schedule.id) is False
    page = await client.get("/schedules")
    assert ">Enable</button>" in page.text
    assert (await post(client, f"/schedules/{schedule.id}/enable")).status_code == 303
    assert await db.fetchval("SELECT is_enabled FROM mq_job_schedule WHERE id = $1", schedule.id) is True


async def test_action_errors_are_pages_not_500s(
    client: httpx.AsyncClient, source: AsyncMQSource, db: Any
) -> None:
    job = await source.call("errs", "m", {})
    await db.execute("UPDATE mq_job SET state = 'completed' WHERE id = $1", job.id)
    response = await post(client, f"/jobs/{job.id}/cancel")
    assert response.status_code == 409
    assert "job is not in a valid state" in response.text
    assert "completed" in response.text
    assert await state_of(db, job.id) == "completed"
    response = await post(client, f"/jobs/{job.id}/fail")
    assert response.status_code == 409
    assert "not in a lost state" in response.text
    response = await post(client, f"/jobs/{job.id}/abort")
    assert response.status_code == 409
    assert (await post(client, "/jobs/424242/retry")).status_code == 404
    assert (await post(client, "/schedules/424242/enable")).status_code == 404
    response = await post(client, "/queues/bad-name!/pause")
    assert response.status_code == 409
    assert "invalid queue name" in response.text
    assert (await post(client, f"/jobs/{2**64}/retry")).status_code == 404


async def test_cross_site_posts_are_refused(
    client: httpx.AsyncClient, source: AsyncMQSource, db: Any
) -> None:
    job = await source.call("csrf", "m", {})
    csrf = await token(client)
    path = f"/jobs/{job.id}/cancel"
    no_token = await client.post(path)
    wrong = await client.post(path, data={CSRF_FIELD: "x" * 43})
    other_site = await client.post(path, data={CSRF_FIELD: csrf}, headers={"sec-fetch-site": "cross-site"})
    other_origin = await client.post(
        path, data={CSRF_FIELD: csrf}, headers={"origin": "https://evil.example"}
    )
    client.cookies.clear()
    no_cookie = await client.post(path, data={CSRF_FIELD: csrf})
    for response in (no_token, wrong, other_site, other_origin, no_cookie):
        assert response.status_code == 403, response.text
        assert "refused" in response.text
    assert await state_of(db, job.id) == "pending"
    same = await post(client, path, **{"sec-fetch-site": "same-origin", "origin": "http://testserver"})
    assert same.status_code == 303
    assert await state_of(db, job.id) == "canceled"
    assert (await client.get(path)).status_code == 405  # actions are POSTs only


async def test_the_cookie_is_strict_and_http_only(client: httpx.AsyncClient) -> None:
    page = await client.get("/")
    cookie = page.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    assert "path=/" in cookie
    assert page.headers["content-security-policy"] == CSP
    assert "unsafe-inline" not in CSP
    assert "unsafe-eval" not in CSP
    assert page.headers["x-content-type-options"] == "nosniff"
    again = await client.get("/jobs")
    assert "set-cookie" not in again.headers  # the token stays for the session


async def test_read_only_shows_no_action_and_refuses_posts(
    engine: AsyncEngine, model: Model, source: AsyncMQSource, db: Any
) -> None:
    job = await source.call("ro", "m", {})
    await db.execute("UPDATE mq_job SET state = 'failed' WHERE id = $1", job.id)
    await source.add_schedule("ro", "tick", rrule="FREQ=HOURLY")
    app = create_app(engine, model, read_only=True, live_interval=None)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        for path in ("/", f"/jobs/{job.id}", "/schedules", "/jobs", "/lost"):
            page = await client.get(path)
            assert page.status_code == 200, path
            assert set(re.findall(r"<button[^>]*>([^<]*)</button>", page.text)) <= {"Filter"}, path
            assert "read-only" in page.text
        response = await post(client, f"/jobs/{job.id}/retry")
        assert response.status_code == 403
        assert "read-only" in response.text
    assert await db.fetchval("SELECT count(*) FROM mq_job") == 1


async def test_basic_auth(engine: AsyncEngine, model: Model) -> None:
    app = create_app(engine, model, auth=("admin", "s3cret:x"), live_interval=None)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver"
    ) as client:
        anonymous = await client.get("/")
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].startswith("Basic")
        assert (await client.get("/static/htmx.min.js")).status_code == 401
        assert (await client.get("/", auth=("admin", "wrong"))).status_code == 401
        assert (await client.get("/", auth=("admin2", "s3cret:x"))).status_code == 401
        garbage = {"authorization": "Basic " + base64.b64encode(b"no colon").decode()}
        assert (await client.get("/", headers=garbage)).status_code == 401
        assert (await client.get("/", headers={"authorization": "Basic !!!"})).status_code == 401
        assert (await client.get("/", auth=("admin", "s3cret:x"))).status_code == 200
    with pytest.raises(ValueError, match="non-empty"):
        create_app(engine, model, auth=("admin", ""))


async def test_hostile_values_are_escaped(client: httpx.AsyncClient, source: AsyncMQSource, db: Any) -> None:
    job = await source.call("hostile", HOSTILE, {HOSTILE: HOSTILE}, cursor_key=HOSTILE, trace={"x": HOSTILE})
    await db.execute(
        "UPDATE mq_job SET state = 'failed', result = $2::jsonb WHERE id = $1",
        job.id,
        '{"exc": "%s", "message": "%s", "tb": ["%s"]}' % ((HOSTILE.replace('"', '\\"'),) * 3),
    )
    await db.execute(
        "INSERT INTO mq_job_cursor (key, properties) VALUES ($1, $2::jsonb)", HOSTILE, '{"k": "<b>x</b>"}'
    )
    await source.add_schedule("hostile", HOSTILE, {"a": HOSTILE}, rrule="FREQ=DAILY", cursor_key=HOSTILE)
    await source.add_listener("ev" + HOSTILE, "hostile", HOSTILE, {"a": HOSTILE})
    for path in (
        f"/jobs/{job.id}",
        "/jobs",
        "/jobs?cursor=" + HOSTILE,
        "/jobs?method=" + HOSTILE,
        "/cursors",
        "/schedules",
        "/listeners",
        "/",
    ):
        page = await client.get(path)
        assert page.status_code == 200, path
        assert "<script>alert" not in page.text, path
        assert "<img src=x" not in page.text, path
        assert "<b>x</b>" not in page.text, path
    job_page = await client.get(f"/jobs/{job.id}")
    assert "&lt;script&gt;" in job_page.text
    assert "&lt;img src=x onerror=alert(1)&gt;" in job_page.text
    error = await client.get("/jobs", params={"state": HOSTILE})
    assert error.status_code == 400
    assert "<img src=x" not in error.text


async def test_cursors_schedules_listeners_lost_and_workers(
    client: httpx.AsyncClient, source: AsyncMQSource, db: Any, make_worker: Any
) -> None:
    await db.execute("INSERT INTO mq_job_cursor (key, properties) VALUES ('cur-1', '{\"seen\": 3}')")
    await source.add_schedule("sched", "tick", rrule="FREQ=MINUTELY")
    await source.add_listener("something.happened", "sched", "react")
    lost = await source.call("sched", "m", {})
    await db.execute("UPDATE mq_job SET state = 'lost', end_time = now() WHERE id = $1", lost.id)
    await db.execute(
        "INSERT INTO mq_lock (ns, key, lock_id, worker) VALUES ('queue-schedules', 'gone', 99, 'w-dead')"
    )
    cursors = await client.get("/cursors")
    assert "cur-1" in cursors.text
    assert "seen" in cursors.text
    schedules = await client.get("/schedules")
    assert "FREQ=MINUTELY" in schedules.text
    assert ">Disable</button>" in schedules.text
    assert "something.happened" in (await client.get("/listeners")).text
    lost_page = await client.get("/lost")
    assert f'data-job="{lost.id}"' in lost_page.text
    assert ">Fail</button>" in lost_page.text

    locks = re.search(r"Locks \(mq_lock\).*?</table>", (await client.get("/workers")).text, re.S)
    assert locks is not None
    assert "w-dead" in locks.group(0)
    assert "gone</span>" in locks.group(0)

    started = asyncio.Event()

    async def hold(job: JobContext) -> None:
        started.set()
        await asyncio.sleep(3600)  # until the abort below cancels it

    running = await source.call("held", "m", {})
    worker: AsyncMQWorker = make_worker({"held": hold})
    async with worker:
        try:
            await asyncio.wait_for(started.wait(), 20)
            page = await client.get("/workers")
            holders = re.search(r"Running jobs by worker.*?</table>", page.text, re.S)
            assert holders is not None
            assert worker.name in holders.group(0)
            assert "held</span>" in holders.group(0)
            assert "gone</span>" not in holders.group(0)
        finally:
            await source.abort_job(running.id)
            await source.wait_for_job(running.id, timeout=20)


async def test_mounted_under_a_prefix(engine: AsyncEngine, model: Model, source: AsyncMQSource) -> None:
    job = await source.call("mounted", "m", {})
    outer = Starlette(routes=[Mount("/mq", create_app(engine, model))])
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=outer), base_url="http://testserver"
    ) as client:
        page = await client.get("/mq/")
        assert page.status_code == 200
        assert 'href="/mq/jobs?queue=mounted"' in page.text
        assert 'src="/mq/static/htmx.min.js"' in page.text
        assert "path=/mq" in page.headers["set-cookie"].lower()
        assert 'hx-get="/mq/"' in page.text
        assert 'data-events="/mq/events"' in page.text
        job_page = await client.get(f"/mq/jobs/{job.id}?notice=x")
        assert f'hx-get="/mq/jobs/{job.id}?notice=x"' in job_page.text
        assert (await client.get("/mq/static/htmx.min.js")).status_code == 200
        csrf = client.cookies[CSRF_COOKIE]
        response = await client.post(f"/mq/jobs/{job.id}/cancel", data={CSRF_FIELD: csrf})
        assert response.status_code == 303
        assert response.headers["location"] == f"/mq/jobs/{job.id}?notice=canceled"


async def test_events_stream_off_and_metrics(
    engine: AsyncEngine, model: Model, client: httpx.AsyncClient
) -> None:
    assert (await client.get("/events")).status_code == 204
    if web_app.metrics_route(engine, model) is None:
        assert (await client.get("/metrics")).status_code == 404
        return
    source = AsyncMQSource(engine=engine, model=model)
    for _ in range(3):
        await source.call("metered", "m")
    await source.pause_queue("metered")
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    lines = metrics.text.splitlines()
    # The database's figures, read at the scrape, then the default registry's (the process's own).
    assert 'aiomq_queue_jobs{queue="metered",state="pending_due"} 3.0' in lines
    assert 'aiomq_queue_paused{queue="metered"} 1.0' in lines
    assert any(line.startswith("process_") or line.startswith("python_") for line in lines)


async def test_queries_are_bounded(engine: AsyncEngine, model: Model) -> None:
    reader = Reader(engine, model, lock_key=1, timeout=0.25)
    async with reader._read() as conn:
        assert await conn.scalar(sa.text("SHOW statement_timeout")) == "250ms"
        assert await conn.scalar(sa.text("SHOW transaction_read_only")) == "on"
    async with engine.connect() as conn:  # LOCAL: nothing leaks into the pool's connections
        assert await conn.scalar(sa.text("SHOW statement_timeout")) == "0"


async def test_a_query_past_its_timeout_is_a_page(engine: AsyncEngine, model: Model, database: str) -> None:
    app = create_app(engine, model, statement_timeout=0.2, live_interval=None)
    blocker = await asyncpg.connect(database)
    try:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE mq_job IN ACCESS EXCLUSIVE MODE")  # every read of it waits
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                page = await client.get("/jobs")
        assert page.status_code == 503
        assert "statement timeout" in page.text
    finally:
        await blocker.close()


def test_vendored_htmx_is_the_pinned_release() -> None:
    data = (web_app.STATIC / "htmx.min.js").read_bytes()
    assert hashlib.sha256(data).hexdigest() == web_app.HTMX_SHA256
    assert web_app.HTMX_VERSION.startswith("2.0.")


def test_default_lock_key_is_the_workers() -> None:
    import inspect

    assert inspect.signature(AsyncMQWorker).parameters["lock_key"].default == web_app.DEFAULT_LOCK_KEY


def test_bars() -> None:
    assert bars([0, 0], [0, 0]) == []
    out = bars([1, 0, 4], [0, 0, 4], width=30, height=16)
    assert [(b.kind, b.height) for b in out] == [("completed", 2.0), ("completed", 8.0), ("failed", 8.0)]
    assert out[-1].y == 0
    assert "this minute" in out[-1].title
    assert "2 min ago" in out[0].title
    with pytest.raises(ValueError, match="one count per minute"):
        bars([1], [])
