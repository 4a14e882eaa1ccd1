"""Bare ingest: an aiohttp app whose heartbeat handler only parses the same JSON and answers.

    python -m bench.baseline_ingest --port 8470 [--raw]

Same JSON library (msgspec) and the same answer shape as the daemon; no validation, no state, no store.
Runs on the same event loop the daemon would pick (uvloop unless WEBHOOKD_NO_UVLOOP).
`--raw` serves the same answer from a bare asyncio Protocol with a minimal HTTP/1.1 parser instead of aiohttp:
not a fair baseline for the daemon, but the floor of what one heartbeat costs in Python on this machine.
"""

from __future__ import annotations

import argparse
import asyncio

import msgspec
from aiohttp import web

from bench.common import run_main

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


async def heartbeat(request: web.Request) -> web.Response:
    hb = _decoder.decode(await request.read())
    answer = {"device": hb["device"], "state": hb.get("state") or "online", "changed": False}
    return web.Response(body=_encoder.encode(answer), content_type="application/json")


def app() -> web.Application:
    a = web.Application()
    a.router.add_post("/v1/heartbeat", heartbeat)
    return a


class RawHeartbeat(asyncio.Protocol):
    """Just enough HTTP/1.1: keep-alive, Content-Length bodies, one fixed kind of answer."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            length = 0
            close = False
            for line in self.buf[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection":
                    close = value.strip().lower() == b"close"
            if len(self.buf) < end + 4 + length:
                return
            body, self.buf = self.buf[end + 4 : end + 4 + length], self.buf[end + 4 + length :]
            hb = _decoder.decode(body)
            out = _encoder.encode({"device": hb["device"], "state": hb.get("state") or "online", "changed": False})
            assert self.transport is not None
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
                % (len(out), b"Connection: close\r\n" if close else b"", out)
            )
            if close:
                self.transport.close()
                return


async def serve_raw(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(RawHeartbeat, "127.0.0.1", port, reuse_address=True)
    print(f"LISTENING {port}", flush=True)
    async with server:
        await asyncio.Event().wait()


async def serve(port: int, stop: asyncio.Event | None = None) -> None:
    runner = web.AppRunner(app(), handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    print(f"LISTENING {port}", flush=True)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--raw", action="store_true", help="a bare asyncio Protocol instead of aiohttp (the floor)")
    args = p.parse_args()
    run_main(lambda: serve_raw(args.port) if args.raw else serve(args.port))


if __name__ == "__main__":
    main()
