"""The web-path benchmark's HTTP client, in a process of its own (so its CPU is not the server's).

    python -m benchmarks.http_client BASE_URL PATH BODY_JSON REQUESTS CONCURRENCY

Sends REQUESTS POSTs of BODY_JSON to PATH, CONCURRENCY at a time over keep-alive connections (aiohttp),
after 20 warm-up requests; prints one JSON line: the seconds taken and every request's latency in ms.
A response that is not 2xx is an error (exit 1).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp


async def run(base: str, path: str, body: object, requests: int, concurrency: int) -> dict[str, object]:
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(base, connector=connector) as http:

        async def one() -> None:
            start = time.perf_counter()
            async with http.post(path, json=body) as response:
                await response.read()
                if response.status >= 300:
                    raise RuntimeError(f"POST {path}: {response.status} {await response.text()}")
            latencies.append((time.perf_counter() - start) * 1000)

        for _ in range(20):
            await one()
        latencies.clear()
        left = iter(range(requests))

        async def loop() -> None:
            for _ in left:
                await one()

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "latencies_ms": latencies}


def main() -> None:
    base, path, body, requests, concurrency = sys.argv[1:6]
    result = asyncio.run(run(base, path, json.loads(body), int(requests), int(concurrency)))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
