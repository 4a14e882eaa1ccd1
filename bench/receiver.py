"""A local webhook receiver for the benchmarks, in its own process: answers every POST with 200.

    python -m bench.receiver --port 8479
    python -m bench.receiver --port 8479 --delay 1     # a slow receiver: each 200 comes 1 s after the body

`--delay` is bounded (at most 4 s, below the bench endpoints' 5 s attempt timeout, so attempts succeed slowly
rather than time out); `inflight_max` in /stats says how many requests it held at once.

`GET /stats` -> {"count": N, "first": t, "last": t, "inflight": n, "inflight_max": n} (monotonic seconds of
the first and last webhook);
`GET /sample` -> the last body received, with its headers (so the bare delivery loop can POST the same body).
`--record` (bench.mqtt, row 12): every webhook's arrival is kept as [monotonic seconds, type, device id], and
`GET /records` returns them (parsing each body costs a little: off unless asked).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import msgspec
from aiohttp import web

from bench.common import run_main

_encoder = msgspec.json.Encoder()


MAX_DELAY = 4.0


class Receiver:
    def __init__(self, delay: float = 0.0, record: bool = False) -> None:
        self.delay = min(max(delay, 0.0), MAX_DELAY)
        self.record = record
        self.records: list[tuple[float, str, str]] = []
        self.inflight = 0
        self.inflight_max = 0
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.sample: dict[str, Any] = {}

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.delay:
            self.inflight += 1
            self.inflight_max = max(self.inflight_max, self.inflight)
            try:
                await asyncio.sleep(self.delay)
            finally:
                self.inflight -= 1
        now = time.monotonic()
        if self.record:
            try:
                event = msgspec.json.decode(body)
                self.records.append((now, str(event.get("type")), str((event.get("device") or {}).get("id"))))
            except (msgspec.DecodeError, AttributeError):
                self.records.append((now, "?", "?"))
        self.count += 1
        if self.first is None:
            self.first = now
            self.sample = {"body": body.decode(), "headers": dict(request.headers)}
        self.last = now
        return web.Response(body=b'{"ok":true}', content_type="application/json")

    async def stats(self, request: web.Request) -> web.Response:
        return web.Response(
            body=_encoder.encode(
                {
                    "count": self.count,
                    "first": self.first,
                    "last": self.last,
                    "inflight": self.inflight,
                    "inflight_max": self.inflight_max,
                }
            ),
            content_type="application/json",
        )

    async def get_sample(self, request: web.Request) -> web.Response:
        return web.Response(body=_encoder.encode(self.sample), content_type="application/json")

    async def get_records(self, request: web.Request) -> web.Response:
        return web.Response(body=_encoder.encode(self.records), content_type="application/json")

    async def reset(self, request: web.Request) -> web.Response:
        self.records = []
        self.count = 0
        self.first = self.last = None
        return web.Response(body=b"{}", content_type="application/json")


async def serve(port: int, delay: float = 0.0, record: bool = False) -> None:
    r = Receiver(delay, record)
    app = web.Application()
    app.router.add_get("/stats", r.stats)
    app.router.add_get("/sample", r.get_sample)
    app.router.add_get("/records", r.get_records)
    app.router.add_post("/reset", r.reset)
    app.router.add_post("/{tail:.*}", r.hook)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True, backlog=1024).start()
    print(f"LISTENING {port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay", type=float, default=0.0, help=f"seconds before each answer (at most {MAX_DELAY:g})")
    p.add_argument("--record", action="store_true", help="keep [time, type, device] of every webhook (GET /records)")
    args = p.parse_args()
    run_main(lambda: serve(args.port, args.delay, args.record))


if __name__ == "__main__":
    main()
