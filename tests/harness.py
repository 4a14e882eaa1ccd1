"""Real parts for whole-daemon tests: the daemon as a subprocess, receivers as aiohttp servers on 127.0.0.1, and a
NOTIFY_SOCKET like systemd's. Tests get daemons and receivers from the `daemon` and `receiver` fixtures
(tests/conftest.py), which stop them and check the daemon's health at teardown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from multidict import CIMultiDict

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # test-only secret (standard-webhooks compatible)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Received:
    path: str
    headers: CIMultiDict[str]
    body: bytes
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1. `status` decides each answer; it can be stopped and restarted."""

    port: int = field(default_factory=free_port)
    status: Callable[[Received], int] = lambda _r: 200
    got: list[Received] = field(default_factory=list)
    attempts: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.Response:
        r = Received(request.path, CIMultiDict(request.headers), await request.read(), time.monotonic())
        self.attempts += 1
        code = self.status(r)
        if 200 <= code < 300:
            self.got.append(r)
        return web.json_response({"ok": 200 <= code < 300}, status=code)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def events(self) -> list[dict[str, Any]]:
        return [r.json for r in self.got]

    async def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.got) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver got {len(self.got)} webhooks, expected {n}")
            await asyncio.sleep(0.02)
        return self.got


def endpoint(name: str, receiver: Receiver, **extra: Any) -> dict[str, Any]:
    ep: dict[str, Any] = {"name": name, "url": receiver.url, "events": ["all"], "secret": SECRET}
    ep.update(extra)
    return ep


class Daemon:
    """`webhookd run` as a subprocess on a config written into a temp dir."""

    def __init__(self, tmp: Path, endpoints: list[dict[str, Any]], **overrides: Any) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.config_path = tmp / "webhookd.yaml"
        self.log_path = tmp / "daemon.log"
        cfg: dict[str, Any] = {
            "state_dir": str(tmp / "state"),
            "listen": {"http": f"127.0.0.1:{self.port}"},
            "admin": {"socket": str(tmp / "admin.sock")},
            "presence": {"silence_timeout": "1h"},
            "delivery": {
                "concurrency": 16,
                "timeout": "2s",
                "retry_schedule": ["200ms", "400ms", "800ms"],
                "disable_after": 0,
            },
            "endpoints": endpoints,
            "logging": {"format": "json", "level": "debug"},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        self.cfg = cfg
        self.proc: subprocess.Popen[bytes] | None = None
        self.killed = False  # SIGKILLed by kill() and not started again
        self.last_healthz: int | None = None  # what /healthz answered when last asked (wait_ready, probe_healthz)
        self.probe_on_stop = False  # stop() asks /healthz first (the conftest `daemon` fixture sets it)
        self._log_file: tuple[int, int] | None = None  # logs(): (inode, device) of the file parsed so far,
        self._log_offset = 0  # how far (bytes, whole lines) ...
        self._log_records: list[dict[str, Any]] = []  # ... and its records
        self.write_config()

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.cfg))

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "webhookd", "run", "-c", str(self.config_path)]

    async def start(
        self,
        env: dict[str, str] | None = None,
        wait: bool = True,
        *,
        wrapper: Sequence[str] = (),
        preexec_fn: Callable[[], Any] | None = None,
    ) -> Daemon:
        """Start the daemon (through `wrapper`, e.g. a shell that sets WATCHDOG_PID, when given); with `wait`,
        return once /healthz answers 200 and the admin socket exists.

        free_port() cannot reserve a port: under xdist another test may bind the same one between our pick and the
        daemon's bind. When the daemon's own harness-chosen heartbeat port was taken that way at its first start,
        it is started again on a new one (up to twice; that failed start's log is dropped)."""
        first = not self.log_path.exists()
        for attempt in range(3):
            log = self.log_path.open("ab")
            self.proc = subprocess.Popen(
                [*wrapper, *self.command()],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                preexec_fn=preexec_fn,
            )
            log.close()
            self.killed = False
            if not wait:
                return self
            try:
                await self.wait_ready()
                return self
            except AssertionError:
                if attempt == 2 or not first or not self._lost_its_port():
                    raise
            self.log_path.unlink()
            self.port = free_port()
            self.cfg["listen"] = {**self.cfg["listen"], "http": f"127.0.0.1:{self.port}"}
            self.write_config()
        return self

    def _lost_its_port(self) -> bool:
        """The daemon exited because the heartbeat port the harness chose for it was in use."""
        ours = self.cfg.get("listen", {}).get("http") == f"127.0.0.1:{self.port}"
        exited = self.proc is not None and self.proc.poll() is not None
        taken = f"cannot listen on 127.0.0.1:{self.port} for the heartbeat API" in self.logs_text()
        return ours and exited and taken and "address already in use" in self.logs_text()

    async def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.logs_text()}")
                try:
                    async with s.get(self.base + "/healthz") as r:
                        if r.status == 200 and (self.tmp / "admin.sock").exists():
                            self.last_healthz = 200
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError("daemon did not become ready:\n" + self.logs_text())
                await asyncio.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError("daemon did not exit:\n" + self.logs_text())
            await asyncio.sleep(0.02)
        return self.proc.returncode

    async def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        if self.probe_on_stop:
            await self.probe_healthz()
        self.signal(signal.SIGTERM)
        return await self.wait_exit()

    async def kill(self) -> None:
        self.signal(signal.SIGKILL)
        await self.wait_exit()
        self.killed = True

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def probe_healthz(self, timeout: float = 5.0) -> int | None:
        """GET /healthz; its status (None when it did not answer) is kept in `last_healthz`."""
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s,
                s.get(self.base + "/healthz") as r,
            ):
                self.last_healthz = r.status
        except (aiohttp.ClientError, TimeoutError, OSError):
            self.last_healthz = None
        return self.last_healthz

    def problems(self, *, errors: bool = True) -> list[str]:
        """What a healthy run never shows in its output: a traceback, and (with `errors`) error-level lines or
        lines that are not JSON."""
        text = self.logs_text()
        found = ["a Traceback in the output"] if "Traceback" in text else []
        if errors:
            for line in text.splitlines():
                try:
                    level = json.loads(line).get("level")
                except (json.JSONDecodeError, AttributeError):
                    level = "not JSON"
                if level in ("error", "critical", "not JSON"):
                    found.append(f"{level} line: {line[:500]}")
        return found

    def logs_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logs(self) -> list[dict[str, Any]]:
        """The output's lines, parsed (a line that is not JSON as {"event": "<not json>", "line": ...}). Tests poll
        this many times a second while the daemon writes debug lines: each call parses only the complete lines
        appended since the last one (the records before are kept), and the unfinished last line, if any, anew."""
        try:
            with self.log_path.open("rb") as f:
                st = os.fstat(f.fileno())
                if (st.st_ino, st.st_dev) != self._log_file or st.st_size < self._log_offset:  # a new file
                    self._log_file, self._log_offset, self._log_records = (st.st_ino, st.st_dev), 0, []
                f.seek(self._log_offset)
                data = f.read()
        except FileNotFoundError:
            self._log_file, self._log_offset, self._log_records = None, 0, []
            return []
        complete = data.rfind(b"\n") + 1  # a whole line ends with \n: cut there, never inside a UTF-8 sequence
        self._log_records += _parse_lines(data[:complete].decode(errors="replace"))
        self._log_offset += complete
        return self._log_records + _parse_lines(data[complete:].decode(errors="replace"))

    async def heartbeat(self, device: str, state: str | None = None, **fields: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"device": device, **fields}
        if state is not None:
            body["state"] = state
        async with aiohttp.ClientSession() as s, s.post(self.base + "/v1/heartbeat", json=body) as r:
            assert r.status == 200, await r.text()
            result: dict[str, Any] = await r.json()
            return result

    async def request(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s, s.request(method, self.base + path, **kw) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except json.JSONDecodeError:
                return r.status, text

    async def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = aiohttp.UnixConnector(path=str(self.tmp / "admin.sock"))
        async with (
            aiohttp.ClientSession(connector=conn) as s,
            s.request(method, "http://webhookd" + path, json=body) as r,
        ):
            return r.status, await r.json(content_type=None)

    async def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The real CLI in a subprocess; awaited, so receivers in this test's loop keep answering."""
        return await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "webhookd", *args, "-c", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
        )


def _parse_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append({"event": "<not json>", "line": line})
    return out


@dataclass
class Message:
    at: float  # time.monotonic() when received
    raw: str

    @property
    def fields(self) -> dict[str, str]:
        out = {}
        for line in self.raw.split("\n"):
            key, sep, value = line.partition("=")
            if sep:
                out[key] = value
        return out


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket, bound to a path or to an abstract name."""

    def __init__(self, tmp: Path, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"webhookd-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            path = tmp / "notify.sock"
            path.unlink(missing_ok=True)
            self.sock.bind(str(path))
            self.address = str(path)
        self.sock.setblocking(False)
        self.messages: list[Message] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> NotifySocket:
        self._task = asyncio.get_running_loop().create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        self.sock.close()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 65536)
            self.messages.append(Message(time.monotonic(), data.decode()))

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, **extra}

    def having(self, key: str, value: str | None = None, since: int = 0) -> list[Message]:
        return [m for m in self.messages[since:] if key in m.fields and (value is None or m.fields[key] == value)]

    async def wait_for(self, key: str, value: str | None = None, since: int = 0, timeout: float = 10.0) -> Message:
        deadline = time.monotonic() + timeout
        while True:
            found = self.having(key, value, since)
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {key}={value or '*'} notification; got {[m.raw for m in self.messages]}")
            await asyncio.sleep(0.005)


async def eventually(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
