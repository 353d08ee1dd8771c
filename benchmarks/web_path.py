"""Scenario 14: the web path. ``examples/fastapi_app.py`` under uvicorn (``benchmarks.web_server``), driven
by an HTTP client in another process (``benchmarks.http_client``), one request at a time and 20 at once;
each aiomq route beside its twin that does the same database work by hand.

    python -m benchmarks.web_path [URL] [--requests 500] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from .common import Row, fresh_database, median
from .harness import Context, Scenario, Sizes, repeat
from .wakeup_latency import summary

__all__ = ["web_path"]

_ROOT = Path(__file__).resolve().parent.parent

ORDER = {"item": "book", "quantity": 1}
ECHO = {"message": "hi"}
#: (what, aiomq's route, the twin's route, body): the twin does the same database work by hand.
PAIRS = [
    ("enqueue in the request", "/orders", "/bench/orders", ORDER),
    ("enqueue and await", "/echo", "/bench/enqueue", ECHO),
]
PLAIN = "/bench/plain"
CONCURRENCY = (1, 20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


async def _serve(url: str, port: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.web_server", url, str(port), cwd=_ROOT, env=_env()
    )
    for _ in range(300):  # the lifespan creates the tables and starts the worker first
        if proc.returncode is not None:
            raise RuntimeError(f"the benchmark server exited {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        await writer.wait_closed()
        return proc
    proc.kill()
    raise RuntimeError("the benchmark server did not start within 30 s")


async def _client(port: int, path: str, body: Any, requests: int, concurrency: int) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.http_client",
        f"http://127.0.0.1:{port}",
        path,
        json.dumps(body),
        str(requests),
        str(concurrency),
        cwd=_ROOT,
        env=_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"http client on {path} exited {proc.returncode}:\n{err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return {"rps": requests / result["seconds"], **summary(result["latencies_ms"], "requests")}


async def measure(server: str, requests: int, runs: int, ctx: Context) -> dict[str, dict[str, list[Any]]]:
    """Per concurrency and route: one result per run, routes interleaved."""
    out: dict[str, dict[str, list[Any]]] = {}
    async with fresh_database(server) as url:
        port = _free_port()
        proc = await _serve(url, port)
        try:
            for concurrency in CONCURRENCY:
                sides: dict[str, Any] = {}
                results: dict[str, list[Any]] = {}
                for path, body in [(PLAIN, ORDER), *((p, b) for _, a, t, b in PAIRS for p in (a, t))]:

                    async def side(
                        path: str = path,
                        body: Any = body,
                        concurrency: int = concurrency,
                        results: dict[str, list[Any]] = results,
                    ) -> float:
                        result = await _client(port, path, body, requests, concurrency)
                        results.setdefault(path, []).append(result)
                        return float(result["rps"])

                    sides[f"{path} x{concurrency}"] = side
                await repeat(ctx, runs, sides, lambda rps: f"{rps:,.0f} requests/s")
                out[str(concurrency)] = results
        finally:
            proc.terminate()
            await proc.wait()
    return out


def _rows(out: dict[str, dict[str, list[Any]]]) -> list[Row]:
    rows = []
    for concurrency, results in out.items():

        def med(path: str, key: str, results: dict[str, list[Any]] = results) -> float:
            return median([r[key] for r in results[path]])

        at = "one at a time" if concurrency == "1" else f"{concurrency} at once"
        plain = f"no-database route: {med(PLAIN, 'rps'):,.0f} requests/s, p50 {med(PLAIN, 'p50_ms'):.2f} ms"
        for what, route, twin, _ in PAIRS:
            name = f"14 web, {at}"
            base = f"{twin} (same SQL by hand)"
            rows.append(
                Row(
                    name,
                    f"{what} ({route}), requests/s",
                    "req/s",
                    med(route, "rps"),
                    base,
                    med(twin, "rps"),
                    plain,
                )
            )
            for p in ("p50", "p99"):
                key = f"{p}_ms"
                rows.append(Row(name, f"{what} ({route}), {p}", "ms", med(route, key), base, med(twin, key)))
    return rows


async def web_path(ctx: Context) -> Scenario:
    requests = max(100, ctx.sizes.enqueue // 4)
    out = await measure(ctx.server, requests, ctx.sizes.runs, ctx)
    return Scenario(
        "web_path",
        f"the FastAPI example under uvicorn, {requests} requests a run from another process, "
        f"{ctx.sizes.runs} interleaved runs",
        {"requests": requests, "runs": ctx.sizes.runs, "concurrency": list(CONCURRENCY)},
        out,
        _rows(out),
    )


async def amain() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", nargs="?", default=os.environ.get("AIOMQ_DATABASE_URL"))
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if args.url is None:
        parser.error("give a server URL (or set AIOMQ_DATABASE_URL)")
    ctx = Context(args.url, Sizes.quick())
    out = await measure(args.url, args.requests, args.runs, ctx)
    for row in _rows(out):
        print(row.as_json())


if __name__ == "__main__":
    asyncio.run(amain())
