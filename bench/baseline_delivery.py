"""Bare delivery: an aiohttp client loop POSTing the same body to the same receiver, same concurrency.

    python -m bench.baseline_delivery --url http://127.0.0.1:8479/hook --n 20000 --concurrency 64 [--body FILE]

`concurrency` workers share one ClientSession (one keep-alive pool, like the daemon's) and POST until N
requests got a 2xx. `--body` is a JSON file {"body": str, "headers": {...}} as the receiver's /sample gives
(one webhook the daemon sent): the same body with the same headers, signature included (not recomputed).
Prints one `RESULT {json}` line with deliveries/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import aiohttp

from bench.common import run_main

DEFAULT_BODY = (
    b'{"id":"evt_00000000000000000000000000000000","type":"device.online","time":"2026-01-01T00:00:00.000Z",'
    b'"reason":"heartbeat","device":{"id":"dlv-000000","name":null,"state":"online","previous_state":"unknown",'
    b'"address":"127.0.0.1","owner":null,"last_seen":"2026-01-01T00:00:00.000Z"},"offline_for":null,'
    b'"endpoint":"bench"}'
)


SKIP_HEADERS = {"host", "content-length", "connection", "accept-encoding", "accept"}


async def deliver(url: str, n: int, concurrency: int, body: bytes, headers: dict[str, str]) -> dict[str, float]:
    left = n
    failures = 0

    async def worker(s: aiohttp.ClientSession) -> None:
        nonlocal left, failures
        while left > 0:
            left -= 1
            async with s.post(url, data=body, headers=headers) as r:
                await r.read()
                if not 200 <= r.status < 300:
                    failures += 1
                    left += 1

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as s:
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"rate": n / elapsed, "seconds": elapsed, "failures": failures, "cpu": cpu / elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--body", type=Path)
    args = p.parse_args()
    body, headers = DEFAULT_BODY, {"Content-Type": "application/json", "Webhook-Id": "evt_0", "Webhook-Attempt": "1"}
    if args.body:
        sample = json.loads(args.body.read_text())
        body = sample["body"].encode()
        headers = {k: v for k, v in sample["headers"].items() if k.lower() not in SKIP_HEADERS}
    result = run_main(lambda: deliver(args.url, args.n, args.concurrency, body, headers))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
