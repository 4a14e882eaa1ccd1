"""sd_notify (CONTRACT §10): the real daemon against a test-owned NOTIFY_SOCKET, plus unit tests of sdnotify."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import Daemon, Receiver, endpoint
from webhookd import sdnotify


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


class SdDaemon(Daemon):
    """The harness daemon, startable through a wrapper command (to know its pid up front) or a preexec hook."""

    async def start(  # type: ignore[override]
        self,
        env: dict[str, str] | None = None,
        wait: bool = True,
        *,
        wrapper: Sequence[str] = (),
        preexec_fn: Callable[[], Any] | None = None,
    ) -> SdDaemon:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "webhookd", "run", "-c", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            preexec_fn=preexec_fn,
        )
        log.close()
        if wait:
            await self.wait_ready()
        return self


# The daemon's pid is the shell's: exec keeps it. This is how systemd sets WATCHDOG_PID to the main pid.
WATCHDOG_PID_IS_SELF = ("/bin/sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "sh")

CLEAN_ENV = {"WATCHDOG_USEC": "", "WATCHDOG_PID": ""}  # nothing inherited from a CI that runs under systemd


async def healthz(d: Daemon) -> int:
    async with aiohttp.ClientSession() as s, s.get(d.base + "/healthz") as r:
        return r.status


# --- the real daemon ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
async def test_ready_only_once_serving_then_reload_and_stop(tmp_path: Path, abstract: bool) -> None:
    r = await Receiver().start()
    d = SdDaemon(tmp_path, [endpoint("r", r)])
    try:
        async with NotifySocket(tmp_path, abstract) as ns:
            await d.start(env=ns.env(**CLEAN_ENV), wait=False)
            ready = await ns.wait_for("READY", "1")
            # At READY=1 the store is open and both listeners are bound: they answer at once, no retry.
            assert await healthz(d) == 200
            status, body = await d.admin("GET", "/v1/status")
            assert status == 200 and body["pid"] == d.proc.pid  # type: ignore[union-attr]
            assert ns.messages[0] is ready  # nothing before READY=1
            assert ready.fields["STATUS"] == "0 online, 0 utilizing, 0 unplugged, 0 offline; 0 deliveries pending"

            await d.heartbeat("a")
            await d.heartbeat("b", state="utilizing")
            await r.wait_for(2)

            mark = len(ns.messages)
            before = time.monotonic_ns() // 1000
            d.signal(signal.SIGHUP)
            reloading = await ns.wait_for("RELOADING", "1", since=mark)
            after = time.monotonic_ns() // 1000
            # CLOCK_MONOTONIC is system-wide: the daemon's stamp falls between ours.
            assert before <= int(reloading.fields["MONOTONIC_USEC"]) <= after
            again = await ns.wait_for("READY", "1", since=ns.messages.index(reloading) + 1)
            assert again.at >= reloading.at
            assert again.fields["STATUS"].startswith("1 online, 1 utilizing, 0 unplugged, 0 offline;")
            assert any(rec["event"] == "config_reloaded" for rec in d.logs())

            mark = len(ns.messages)
            d.signal(signal.SIGTERM)
            await ns.wait_for("STOPPING", "1", since=mark)
            assert await d.wait_exit() == 0
            await asyncio.sleep(0.05)
            assert not ns.having("READY", since=mark)  # no READY=1 after STOPPING=1
    finally:
        await d.stop()
        await r.stop()


async def test_no_ready_when_startup_fails(tmp_path: Path) -> None:
    busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    d = SdDaemon(tmp_path, [], listen={"http": f"127.0.0.1:{busy.getsockname()[1]}"})
    try:
        async with NotifySocket(tmp_path) as ns:
            await d.start(env=ns.env(**CLEAN_ENV), wait=False)
            assert await d.wait_exit() == 1
            await asyncio.sleep(0.05)
            assert not ns.having("READY")
        assert any(rec["event"] == "startup_failed" for rec in d.logs())
    finally:
        busy.close()


@pytest.mark.parametrize("watchdog_pid", ["unset", "self"])
async def test_watchdog_pings_at_half_watchdog_usec(tmp_path: Path, watchdog_pid: str) -> None:
    d = SdDaemon(tmp_path, [])
    try:
        async with NotifySocket(tmp_path) as ns:
            env = ns.env(WATCHDOG_USEC="400000", WATCHDOG_PID="")
            await d.start(env=env, wait=False, wrapper=WATCHDOG_PID_IS_SELF if watchdog_pid == "self" else ())
            await ns.wait_for("READY", "1")
            assert d.proc is not None
            environ = Path(f"/proc/{d.proc.pid}/environ").read_bytes().split(b"\0")
            expected = str(d.proc.pid).encode() if watchdog_pid == "self" else b""
            assert b"WATCHDOG_PID=" + expected in environ  # the wrapper really named the daemon's own pid
            await asyncio.sleep(1.3)
            pings = [m.at for m in ns.having("WATCHDOG", "1")]
            assert 5 <= len(pings) <= 9, pings  # every 200 ms
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert 0.17 <= statistics.median(gaps) <= 0.26, gaps
            assert max(gaps) < 0.35, gaps
            # pings keep going under load: they come from the event loop, which must never block
            await asyncio.gather(*(d.heartbeat(f"dev-{i}") for i in range(50)))
            n = len(ns.having("WATCHDOG", "1"))
            await asyncio.sleep(0.5)
            assert len(ns.having("WATCHDOG", "1")) >= n + 2
            assert await d.stop() == 0
    finally:
        await d.stop()


async def test_no_watchdog_pings_when_watchdog_pid_is_another_process(tmp_path: Path) -> None:
    d = SdDaemon(tmp_path, [])
    try:
        async with NotifySocket(tmp_path) as ns:
            # WATCHDOG_PID names this test process (the parent), as when the daemon is a child of the main pid.
            await d.start(env=ns.env(WATCHDOG_USEC="400000", WATCHDOG_PID=str(os.getpid())), wait=False)
            await ns.wait_for("READY", "1")
            await asyncio.sleep(0.7)
            assert not ns.having("WATCHDOG")
            assert await d.stop() == 0
    finally:
        await d.stop()


# --- unit tests of webhookd.sdnotify ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("", None, None),
        ("400000", None, 0.2),
        ("30000000", None, 15.0),
        ("400000", "self", 0.2),
        ("400000", "other", None),
        ("400000", "", 0.2),
        ("0", None, None),
        ("-5", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: Any) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid))
    assert sdnotify.watchdog_interval() == expected


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_messages_on_the_wire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, abstract: bool) -> None:
    ns = NotifySocket(tmp_path, abstract)
    ns.sock.setblocking(True)
    ns.sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", ns.address)
    try:
        assert sdnotify.ready("3 online")
        assert ns.sock.recv(4096) == b"READY=1\nSTATUS=3 online"
        assert sdnotify.ready()
        assert ns.sock.recv(4096) == b"READY=1"
        assert sdnotify.status("busy")
        assert ns.sock.recv(4096) == b"STATUS=busy"
        assert sdnotify.watchdog()
        assert ns.sock.recv(4096) == b"WATCHDOG=1"
        assert sdnotify.stopping()
        assert ns.sock.recv(4096) == b"STOPPING=1"
        before = time.monotonic_ns() // 1000
        assert sdnotify.reloading()
        fields = Message(0, ns.sock.recv(4096).decode()).fields
        assert fields["RELOADING"] == "1"
        assert before <= int(fields["MONOTONIC_USEC"]) <= time.monotonic_ns() // 1000
    finally:
        ns.sock.close()


@pytest.mark.parametrize("value", [None, "", "relative/notify.sock", "/nonexistent/notify.sock", "@no-such-name-x"])
def test_no_service_manager_is_a_quiet_no_op(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.ready("x") is False
    assert sdnotify.watchdog() is False


async def test_sigterm_during_a_reload_stops_cleanly(tmp_path: Path) -> None:
    r = await Receiver().start()
    d = SdDaemon(tmp_path, [endpoint("r", r)])
    try:
        async with NotifySocket(tmp_path) as ns:
            await d.start(env=ns.env(**CLEAN_ENV))
            await ns.wait_for("READY", "1")
            await d.heartbeat("a")
            d.cfg["endpoints"] = [endpoint("r2", r)]  # a reload with store work to do
            d.write_config()
            mark = len(ns.messages)
            d.signal(signal.SIGHUP)
            d.signal(signal.SIGTERM)
            assert await d.wait_exit() == 0
            await asyncio.sleep(0.05)
            raws = [m.raw.split("\n")[0] for m in ns.messages[mark:]]
            assert "STOPPING=1" in raws, raws
            assert "READY=1" not in raws[raws.index("STOPPING=1") :], raws  # never READY once stopping
        records = d.logs()
        assert records[-1]["event"] == "daemon_stopped", records[-3:]
        assert not [x for x in records if x["level"] in ("error", "critical")], records
    finally:
        await d.stop()
        await r.stop()


def test_notify_never_blocks_when_nobody_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A notify socket nobody reads fills up (the kernel queues a few datagrams); sends then fail fast."""
    import socket as _socket
    import time as _time

    from webhookd import sdnotify

    path = tmp_path / "n.sock"
    with _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM) as sink:
        sink.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        started = _time.monotonic()
        results = [sdnotify.status(f"n={i}") for i in range(200)]
        assert _time.monotonic() - started < 2.0
        assert results[0] is True and results[-1] is False
