"""sd_notify (CONTRACT §10): the real daemon against a test-owned NOTIFY_SOCKET, plus unit tests of sdnotify."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import Message, NotifySocket, endpoint
from webhookd import sdnotify

# The daemon's pid is the shell's: exec keeps it. This is how systemd sets WATCHDOG_PID to the main pid.
WATCHDOG_PID_IS_SELF = ("/bin/sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "sh")

CLEAN_ENV = {"WATCHDOG_USEC": "", "WATCHDOG_PID": ""}  # nothing inherited from a CI that runs under systemd


# --- the real daemon ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
async def test_ready_only_once_serving_then_reload_and_stop(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path, abstract: bool
) -> None:
    r = await receiver()
    d = await daemon([endpoint("r", r)], start=False)
    async with NotifySocket(tmp_path, abstract) as ns:
        await d.start(env=ns.env(**CLEAN_ENV), wait=False)
        ready = await ns.wait_for("READY", "1")
        # At READY=1 the store is open and both listeners are bound: they answer at once, no retry.
        assert await d.probe_healthz() == 200
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


async def test_no_ready_when_startup_fails(daemon: DaemonFactory, tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        # check=False: it is meant to fail; what it must do instead is asserted here.
        d = await daemon([], start=False, check=False, listen={"http": f"127.0.0.1:{busy.getsockname()[1]}"})
        async with NotifySocket(tmp_path) as ns:
            await d.start(env=ns.env(**CLEAN_ENV), wait=False)
            assert await d.wait_exit() == 1
            await asyncio.sleep(0.05)
            assert not ns.having("READY")
    assert any(rec["event"] == "startup_failed" for rec in d.logs())
    assert "Traceback" not in d.logs_text()


@pytest.mark.parametrize("watchdog_pid", ["unset", "self"])
async def test_watchdog_pings_at_half_watchdog_usec(daemon: DaemonFactory, tmp_path: Path, watchdog_pid: str) -> None:
    d = await daemon([], start=False)
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


async def test_no_watchdog_pings_when_watchdog_pid_is_another_process(daemon: DaemonFactory, tmp_path: Path) -> None:
    d = await daemon([], start=False)
    async with NotifySocket(tmp_path) as ns:
        # WATCHDOG_PID names this test process (the parent), as when the daemon is a child of the main pid.
        await d.start(env=ns.env(WATCHDOG_USEC="400000", WATCHDOG_PID=str(os.getpid())), wait=False)
        await ns.wait_for("READY", "1")
        await asyncio.sleep(0.7)
        assert not ns.having("WATCHDOG")
        assert await d.stop() == 0


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


async def test_sigterm_during_a_reload_stops_cleanly(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    r = await receiver()
    d = await daemon([endpoint("r", r)], start=False)
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
