"""The dashboard in a real browser: Debian's Chromium, headless, driven by Playwright, against the dashboard
served by uvicorn on a free port and the test's real database. What an operator sees and does: the
overview's numbers are the database's, a failed job shows its traceback, Retry and Fail change the
database, a page updates by itself when a job finishes, read-only and basic-auth modes.

Skipped (with the reason) only when no ``chromium`` binary is installed. Set ``AIOMQ_SCREENSHOT`` to a
path to save the overview test's screenshot there (docs/dashboard.png is made so).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import pathlib
import shutil
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import uvicorn
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright, expect
from sqlalchemy.ext.asyncio import create_async_engine

from aiomq import AsyncMQSource, AsyncMQWorker, JobContext, Retry
from aiomq.model import Model
from aiomq.web import create_app

from .conftest import asyncpg_url

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary installed (apt-get install chromium)"
)

TIMEOUT_MS = 20_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(database_url: str, model: Model, **options: Any) -> Iterator[str]:
    """The dashboard on its own engine and event loop, in a thread; yields its base URL."""
    port = _free_port()
    holder: dict[str, uvicorn.Server] = {}
    failed: list[BaseException] = []

    async def main() -> None:
        engine = create_async_engine(asyncpg_url(database_url), pool_size=5)
        app = create_app(engine, model, **options)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=1, lifespan="on"
        )
        server = holder["server"] = uvicorn.Server(config)
        try:
            await server.serve()
        finally:
            await engine.dispose()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as ex:  # reported by the test thread
            failed.append(ex)

    thread = threading.Thread(target=run, name="dashboard", daemon=True)
    thread.start()
    for _ in range(200):
        if failed or ("server" in holder and holder["server"].started):
            break
        threading.Event().wait(0.05)
    if failed:
        raise failed[0]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        holder["server"].should_exit = True
        thread.join(15)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
def served(database: str, model: Model) -> Iterator[Callable[..., str]]:
    """Start dashboards (``create_app`` options as keywords); each stops at teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda **options: stack.enter_context(serve(database, model, **options))


class Pages:
    """Pages of one browser; every console error (a CSP violation, a failing script or request) is kept
    in ``errors``, which must be empty at the end of the test (clear it after an expected one)."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.errors: list[str] = []
        self.pages: list[Page] = []

    async def open(self, url: str, **context: Any) -> Page:
        page = await (await self.browser.new_context(**context)).new_page()
        page.set_default_timeout(TIMEOUT_MS)

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                self.errors.append(message.text)

        page.on("console", on_console)
        self.pages.append(page)
        await page.goto(url)
        return page


@pytest.fixture
async def pages(browser: Browser, served: Any) -> AsyncIterator[Pages]:
    # Depends on ``served`` so that the pages close before their servers stop.
    opened = Pages(browser)
    yield opened
    for page in opened.pages:
        await page.context.close()
    assert not opened.errors, opened.errors


async def failing(job: JobContext) -> None:
    raise ValueError(f"the disk is full ({job.args['n']})")


async def fine(job: JobContext) -> dict[str, Any]:
    return {"ok": job.args.get("n")}


async def realistic_state(source: AsyncMQSource, make_worker: Any, db: Any) -> None:
    """A few queues with completed, failed, pending and scheduled jobs, one paused; the finished jobs
    spread over the last hour, as a live queue's would be."""
    for n in range(60):
        await source.call("emails", "send_welcome", {"n": n, "to": f"user{n}@example.com"})
    for n in range(6):
        await source.call("reports", "build_monthly", {"n": n}, retry=Retry(max_attempts=1))
    async with make_worker({"emails": fine, "reports": failing}):
        for job in await source.find_jobs(limit=100):
            await source.wait_for_job(job.id, timeout=30)
    await db.execute(
        "UPDATE mq_job SET end_time = end_time - ((id * 37) % 58) * interval '1 minute', "
        "start_time = start_time - ((id * 37) % 58) * interval '1 minute'"
    )
    for n in range(7):
        await source.call("emails", "send_digest", {"n": n})
    for n in range(3):
        await source.call("reports", "build_weekly", {"n": n}, when=datetime.timedelta(hours=n + 1))
    for n in range(5):
        await source.call("thumbnails", "resize", {"image": f"img-{n}.png"}, cursor_key=f"album-{n % 2}")
    await source.pause_queue("thumbnails")
    await source.add_schedule("reports", "build_weekly", rrule="FREQ=WEEKLY;BYDAY=MO;BYHOUR=6")


async def test_overview_numbers_are_the_databases(
    served: Any, source: AsyncMQSource, make_worker: Any, pages: Pages, db: Any
) -> None:
    await realistic_state(source, make_worker, db)
    stats = {s.queue: s for s in await source.queue_stats()}
    base = served()
    page = await pages.open(base + "/", viewport={"width": 1280, "height": 640})
    for queue, s in stats.items():
        row = page.locator(f'tr[data-queue="{queue}"]')
        for field in ("pending_due", "pending_later", "running", "lost"):
            await expect(row.locator(f'[data-field="{field}"]')).to_have_text(str(getattr(s, field)))
        await expect(row.locator('[data-field="paused"]')).to_contain_text(
            "paused" if s.paused else "running"
        )
    await expect(page.locator('tr[data-queue="emails"] [data-field="finished"]')).to_have_text("60")
    await expect(page.locator('tr[data-queue="reports"] rect.failed').first).to_be_visible()
    await expect(page.locator('tr[data-queue="thumbnails"] button')).to_have_text("Resume")
    shot = await page.screenshot(full_page=True)
    assert shot.startswith(b"\x89PNG")
    target = os.environ.get("AIOMQ_SCREENSHOT")
    if target:
        await asyncio.to_thread(pathlib.Path(target).write_bytes, shot)


async def test_failed_job_shows_its_traceback_and_retry_changes_the_database(
    served: Any, source: AsyncMQSource, make_worker: Any, pages: Pages, db: Any
) -> None:
    job = await source.call("reports", "build", {"n": 3})
    async with make_worker({"reports": failing}):
        await source.wait_for_job(job.id, timeout=30)
    base = served()
    page = await pages.open(f"{base}/jobs/{job.id}")
    await expect(page.locator("#traceback")).to_contain_text("Traceback (most recent call last)")
    await expect(page.locator("#traceback")).to_contain_text("ValueError: the disk is full (3)")
    await page.get_by_role("button", name="Retry", exact=True).click()
    await expect(page.locator(".notice")).to_have_text("Retry queued: this is the new job.")
    new_id = int(page.url.rsplit("/", 1)[1].split("?")[0])
    assert new_id != job.id
    assert await db.fetchval("SELECT state::text FROM mq_job WHERE id = $1", new_id) == "pending"
    assert await db.fetchval("SELECT trace->>'mq_source_job_id' FROM mq_job WHERE id = $1", new_id) == str(
        job.id
    )
    await expect(page.locator("ol.chain li")).to_have_count(2)


async def test_an_action_on_a_stale_page_shows_the_error(
    source: AsyncMQSource, served: Any, pages: Pages, db: Any
) -> None:
    job = await source.call("emails", "send", {})
    base = served(live_interval=None)  # no live refresh: the second page stays stale
    first = await pages.open(f"{base}/jobs/{job.id}")
    stale = await pages.open(f"{base}/jobs/{job.id}")
    await first.get_by_role("button", name="Cancel", exact=True).click()
    await expect(first.locator(".notice")).to_have_text("Job canceled.")
    await stale.get_by_role("button", name="Cancel", exact=True).click()
    await expect(stale.locator(".error")).to_contain_text("job is not in a valid state")
    await expect(stale.locator(".error")).to_contain_text("canceled")
    assert await db.fetchval("SELECT state::text FROM mq_job WHERE id = $1", job.id) == "canceled"
    assert pages.errors == ["Failed to load resource: the server responded with a status of 409 (Conflict)"]
    pages.errors.clear()


async def test_fail_a_lost_job_from_the_lost_page(
    served: Any, source: AsyncMQSource, pages: Pages, db: Any
) -> None:
    job = await source.call("emails", "send", {"to": "x@example.com"})
    await db.execute("UPDATE mq_job SET state = 'lost', end_time = now() WHERE id = $1", job.id)
    base = served()
    page = await pages.open(base + "/lost")
    await page.locator(f'tr[data-job="{job.id}"]').get_by_role("button", name="Fail").click()
    await expect(page.locator(".notice")).to_have_text("Lost job marked failed.")
    assert await db.fetchval("SELECT state::text FROM mq_job WHERE id = $1", job.id) == "failed"


async def test_the_page_updates_itself_when_a_job_finishes(
    served: Any, source: AsyncMQSource, make_worker: Any, pages: Pages
) -> None:
    release = asyncio.Event()

    async def waits(job: JobContext) -> str:
        await release.wait()
        return "done"

    job = await source.call("live", "slow", {})
    worker: AsyncMQWorker = make_worker({"live": waits})
    async with worker:
        await source.call("live", "slow", {})  # a second one keeps the queue busy
        base = served()
        page = await pages.open(f"{base}/jobs/{job.id}")
        await expect(page.locator("h1 .state")).to_have_text("running")
        overview = await pages.open(base + "/")
        await expect(overview.locator('tr[data-queue="live"] [data-field="running"]')).to_have_text("2")
        release.set()
        # No reload: the NOTIFY of the finish reaches the page over server-sent events.
        await expect(page.locator("h1 .state")).to_have_text("completed")
        await expect(page.locator("#result")).to_contain_text('"done"')
        await expect(overview.locator('tr[data-queue="live"] [data-field="finished"]')).to_have_text("2")
        assert not await page.locator(".notice").count()


async def test_read_only_and_basic_auth(served: Any, source: AsyncMQSource, pages: Pages, db: Any) -> None:
    job = await source.call("emails", "send", {})
    await db.execute("UPDATE mq_job SET state = 'failed' WHERE id = $1", job.id)
    base = served(read_only=True, auth=("ops", "pa55"))
    denied = await pages.open(base + "/", http_credentials={"username": "ops", "password": "wrong"})
    await expect(denied.locator("body")).to_contain_text("authentication required")
    page = await pages.open(f"{base}/jobs/{job.id}", http_credentials={"username": "ops", "password": "pa55"})
    await expect(page.locator("h1")).to_contain_text(f"Job {job.id}")
    await expect(page.locator("header .badge").first).to_have_text("read-only")
    assert await page.locator("form.action").count() == 0
    for name in ("Retry", "Cancel", "Pause"):
        assert await page.get_by_role("button", name=name).count() == 0
    # A hand-made POST is refused too.
    status = await page.evaluate(
        "async (url) => (await fetch(url, {method: 'POST'})).status", f"{base}/jobs/{job.id}/retry"
    )
    assert status == 403
    assert await db.fetchval("SELECT count(*) FROM mq_job") == 1
    assert all("401" in e or "403" in e for e in pages.errors), pages.errors
    pages.errors.clear()
