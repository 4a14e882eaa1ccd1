"""A local webhook receiver for the benchmarks, in its own process: answers every POST with 200.

    python -m bench.receiver --port 8479

`GET /stats` -> {"count": N, "first": t, "last": t} (monotonic seconds of the first and last webhook);
`GET /sample` -> the last body received, with its headers (so the bare delivery loop can POST the same body).
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


class Receiver:
    def __init__(self) -> None:
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.sample: dict[str, Any] = {}

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        now = time.monotonic()
        self.count += 1
        if self.first is None:
            self.first = now
            self.sample = {"body": body.decode(), "headers": dict(request.headers)}
        self.last = now
        return web.Response(body=b'{"ok":true}', content_type="application/json")

    async def stats(self, request: web.Request) -> web.Response:
        return web.Response(
            body=_encoder.encode({"count": self.count, "first": self.first, "last": self.last}),
            content_type="application/json",
        )

    async def get_sample(self, request: web.Request) -> web.Response:
        return web.Response(body=_encoder.encode(self.sample), content_type="application/json")

    async def reset(self, request: web.Request) -> web.Response:
        self.count = 0
        self.first = self.last = None
        return web.Response(body=b"{}", content_type="application/json")


async def serve(port: int) -> None:
    r = Receiver()
    app = web.Application()
    app.router.add_get("/stats", r.stats)
    app.router.add_get("/sample", r.get_sample)
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
    args = p.parse_args()
    run_main(lambda: serve(args.port))


if __name__ == "__main__":
    main()
