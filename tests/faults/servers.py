"""Misbehaving webhook receivers on 127.0.0.1 for fault tests: raw asyncio servers and a scriptable aiohttp one."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from tests.harness import free_port


@dataclass
class Hit:
    """One request a receiver saw: when, on which path, with which headers, and what it answered."""

    path: str
    headers: CIMultiDict[str]
    body: bytes
    at: float
    answered: int | None = None

    @property
    def attempt(self) -> int:
        return int(self.headers.get("Webhook-Attempt", "0"))


Responder = Callable[[Hit], web.StreamResponse | Awaitable[web.StreamResponse]]


@dataclass
class ScriptedReceiver:
    """An aiohttp receiver whose answer to each request is decided by `respond` (per path if a dict)."""

    respond: Responder = lambda _hit: web.json_response({"ok": True})
    ssl_context: ssl.SSLContext | None = None
    port: int = field(default_factory=free_port)
    hits: list[Hit] = field(default_factory=list)
    _runner: web.AppRunner | None = None

    def url(self, path: str = "/hook") -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def on(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        hit = Hit(request.path, CIMultiDict(request.headers), await request.read(), time.monotonic())
        self.hits.append(hit)
        resp = self.respond(hit)
        if not isinstance(resp, web.StreamResponse):
            resp = await resp
        hit.answered = resp.status
        return resp

    async def start(self) -> ScriptedReceiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True, ssl_context=self.ssl_context)
        await site.start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@dataclass
class Conn:
    """One TCP connection to a RawServer: when it was accepted, whether a request arrived, when the peer left."""

    accepted: float
    request: bytes = b""
    closed: float | None = None  # when the peer closed it (or writing to it failed)
    sent: int = 0  # response bytes written

    @property
    def held_for(self) -> float | None:
        return None if self.closed is None else self.closed - self.accepted


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Conn], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """Read one HTTP/1.1 request (headers and a Content-Length body); b'' if the peer went away first."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return b""
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    try:
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return b""
    return head + body


async def wait_peer_close(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class RawServer:
    """A plain asyncio TCP server that hands every connection to `handler`; records each connection."""

    handler: RawHandler
    port: int = field(default_factory=free_port)
    conns: list[Conn] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(time.monotonic())
        self.conns.append(conn)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer, conn)
        except (ConnectionError, OSError):
            pass
        finally:
            if conn.closed is None:
                conn.closed = time.monotonic()
            writer.transport.abort()
            self._tasks.discard(task)

    async def start(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    @property
    def requests(self) -> list[Conn]:
        return [c for c in self.conns if c.request]
