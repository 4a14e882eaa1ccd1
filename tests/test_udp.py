"""UDP heartbeats (listen.udp): the datagram parser, the listener's bounds, and the whole daemon over UDP."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Coroutine
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import Daemon, Receiver, endpoint, eventually
from webhookd import udp
from webhookd.listener import BadInput
from webhookd.presence import Heartbeat
from webhookd.store import StoreError
from webhookd.udp import Throttle, UDPListener, parse_datagram, peer_ip

PEER = "192.0.2.7"

# --- the parser ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"dev-1", Heartbeat("dev-1", address=PEER, source="udp")),
        (b"dev-1\n", Heartbeat("dev-1", address=PEER, source="udp")),
        (b"dev-1 \r\n", Heartbeat("dev-1", address=PEER, source="udp")),
        (b"dev-1 utilizing\n", Heartbeat("dev-1", state="utilizing", address=PEER, source="udp")),
        (b"a.b:c@d-e shutdown", Heartbeat("a.b:c@d-e", state="shutdown", address=PEER, source="udp")),
        (b"dev-1\treboot", Heartbeat("dev-1", state="reboot", address=PEER, source="udp")),
        (b'{"device": "dev-1"}', Heartbeat("dev-1", address=PEER, source="udp")),
        (b'  {"device": "dev-1"}\n', Heartbeat("dev-1", address=PEER, source="udp")),
        (
            b'{"device": "d", "name": "Lab", "state": "unplugged", "owner": "o@x", "address": "10.0.0.9"}',
            Heartbeat("d", state="unplugged", name="Lab", owner="o@x", address="10.0.0.9", source="udp"),
        ),
    ],
)
def test_parse_good_datagrams(data: bytes, expected: Heartbeat) -> None:
    assert parse_datagram(data, PEER) == expected


@pytest.mark.parametrize(
    ("data", "error", "field"),
    [
        (b"", "empty", None),
        (b" \r\n", "empty", None),
        (b"-bad", "match", "device"),
        (b"dev/1", "match", "device"),
        (b"x" * 129, "match", "device"),
        (b"dev-1 sleeping", "state must be one of", "state"),
        (b"dev-1 online extra", "expected", None),
        (b"dev\xff\xfe", "not UTF-8", None),
        (b"d\xc3\xa9v", "match", "device"),  # valid UTF-8, not an allowed id character
        (b"dev\x00", "match", "device"),
        (b'{"device": "dev-1"', "malformed JSON", None),
        (b'{"device": "\xff"}', "malformed JSON", None),
        (b'[{"device": "dev-1"}]', "JSON object", None),
        (b'{"device": "dev-1", "state": "sleeping"}', "state must be one of", "state"),
        (b'{"device": "dev-1", "color": "red"}', "unknown field", "color"),
        (b'{"state": "online"}', "required", "device"),
        (b'{"device": "dev-1", "address": "nope"}', "IP address", "address"),
        (b'{"device": "dev-1", "name": "a\\u0007b"}', "control", "name"),
        (b"[" * 5000 + b"]" * 5000, "", None),
    ],
)
def test_parse_bad_datagrams(data: bytes, error: str, field: str | None) -> None:
    with pytest.raises(BadInput) as exc:
        parse_datagram(data, PEER)
    assert error.lower() in exc.value.error.lower()
    if error:
        assert exc.value.field == field


def test_parse_size_limit() -> None:
    hb = b'{"device": "dev-1"}'
    padded = hb + b" " * (100 - len(hb))
    assert parse_datagram(padded, PEER, max_size=100).device == "dev-1"
    with pytest.raises(BadInput) as exc:
        parse_datagram(padded + b" ", PEER, max_size=100)
    assert exc.value.status == 413


def test_peer_ip() -> None:
    assert peer_ip(("127.0.0.1", 5000)) == "127.0.0.1"
    assert peer_ip(("::ffff:10.1.2.3", 5000, 0, 0)) == "10.1.2.3"
    assert peer_ip(("2001:db8::1", 5000, 0, 0)) == "2001:db8::1"
    assert peer_ip(("not-an-ip", 1)) is None
    assert peer_ip(None) is None


def test_throttle_allows_one_per_interval_and_counts_the_rest() -> None:
    now = [0.0]
    t = Throttle(1.0, clock=lambda: now[0])
    assert t() == 0
    assert t() is None
    assert t() is None
    now[0] = 1.0
    assert t() == 2
    now[0] = 1.5
    assert t() is None
    now[0] = 2.5
    assert t() == 1


# --- the listener with a fake tracker -------------------------------------------------------------------------


class FakeTracker:
    def __init__(self) -> None:
        self.seen: list[Heartbeat] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail = False

    def heartbeat_nowait(self, hb: Heartbeat) -> Coroutine[Any, Any, object]:
        return self.heartbeats([hb])  # every heartbeat takes the slow path here: it exercises the bounds

    async def heartbeats(self, hbs: list[Heartbeat]) -> list[tuple[str, str, bool]]:
        await self.gate.wait()
        if self.fail:
            raise StoreError("disk full")
        self.seen.extend(hbs)
        return [(hb.device, "online", True) for hb in hbs]


def _listener(tracker: FakeTracker, **kw: Any) -> UDPListener:
    return UDPListener(tracker, 256 * 1024, **kw)  # type: ignore[arg-type]


async def test_listener_counts_and_bounds_the_heartbeats_in_flight() -> None:
    tracker = FakeTracker()
    tracker.gate.clear()
    u = _listener(tracker, max_inflight=3)
    addr = ("127.0.0.1", 40000)
    for i in range(5):
        u.datagram_received(f"d{i}".encode(), addr)
    u.datagram_received(b"not valid!", addr)
    assert (u.received, u.rejected, u.dropped, u.inflight) == (6, 1, 2, 3)
    tracker.gate.set()
    await eventually(lambda: u.inflight == 0, timeout=2)
    assert [hb.device for hb in tracker.seen] == ["d0", "d1", "d2"]
    assert all(hb.address == "127.0.0.1" for hb in tracker.seen)
    await u.close()


async def test_bad_datagrams_are_counted_by_reason_and_summarised_once_a_minute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    u = UDPListener(FakeTracker(), 1024, clock=lambda: now[0])  # type: ignore[arg-type]
    monkeypatch.setattr(udp, "REJECT_SUMMARY_INTERVAL", 0.2)  # the minute, shortened (the loop's timer is real)
    addr = ("192.0.2.9", 5000)
    with capture_logs() as cap:
        u.datagram_received(b"", addr)  # the first: at once
        assert [e["event"] for e in cap] == ["udp_datagrams_rejected"]
        assert cap[0]["log_level"] == "info" and cap[0]["reasons"] == {"empty": 1}
        for data in (b"{", b"a b c", b"x" * 2000, b"{"):
            u.datagram_received(data, addr)
        assert len(cap) == 1  # held for the rest of the interval
        now[0] += 0.2
        await eventually(lambda: len(cap) == 2, timeout=2)
        assert cap[1]["rejected"] == 4
        assert cap[1]["reasons"] == {"too_large": 1, "malformed_json": 2, "invalid": 1}
        assert (cap[1]["last_error"], cap[1]["last_peer"]) == ("malformed JSON", "192.0.2.9:5000")
        u.datagram_received(b"\xff", addr)  # within the next interval: held until close
        await u.close()
    assert [e["event"] for e in cap].count("udp_datagrams_rejected") == 3
    assert cap[2]["reasons"] == {"not_utf8": 1}
    assert u.rejected == 6
    assert u.rejected_by == {"too_large": 1, "empty": 1, "not_utf8": 1, "malformed_json": 2, "invalid": 1}


async def test_listener_coalesces_repeats_of_the_heartbeat_in_flight_only() -> None:
    tracker = FakeTracker()
    tracker.gate.clear()
    u = _listener(tracker)
    addr = ("127.0.0.1", 40000)
    for data in (b"d1", b"d1\n", b"d2", b"d1 utilizing", b"d1 utilizing", b"d1", b"d1"):
        u.datagram_received(data, addr)
    assert (u.received, u.coalesced, u.inflight) == (7, 3, 4)
    tracker.gate.set()
    await eventually(lambda: u.inflight == 0, timeout=2)
    assert [(hb.device, hb.state) for hb in tracker.seen] == [
        ("d1", None),
        ("d2", None),
        ("d1", "utilizing"),
        ("d1", None),
    ]
    u.datagram_received(b"d1", addr)  # nothing in flight any more: applied again
    await eventually(lambda: u.inflight == 0, timeout=2)
    assert len(tracker.seen) == 5 and u.coalesced == 3


async def test_listener_counts_store_errors_and_keeps_going() -> None:
    tracker = FakeTracker()
    tracker.fail = True
    u = _listener(tracker)
    for i in range(3):
        u.datagram_received(f"d{i}".encode(), ("127.0.0.1", 40000))
    await eventually(lambda: u.inflight == 0, timeout=2)
    assert u.failed == 3
    tracker.fail = False
    u.datagram_received(b"d9", ("127.0.0.1", 40000))
    await eventually(lambda: u.inflight == 0, timeout=2)
    assert u.failed == 3 and [hb.device for hb in tracker.seen] == ["d9"]


async def test_listener_close_waits_for_heartbeats_in_flight() -> None:
    tracker = FakeTracker()
    tracker.gate.clear()
    u = _listener(tracker)
    await u.start("127.0.0.1", 0)
    u.datagram_received(b"d1", ("127.0.0.1", 40000))
    asyncio.get_running_loop().call_later(0.1, tracker.gate.set)
    await u.close(grace=5)
    assert u.sock is None and [hb.device for hb in tracker.seen] == ["d1"]


async def test_listener_reads_in_windows_and_drains_floods() -> None:
    """A quiet socket is read READ_WINDOW after its first datagram, with whatever followed it; a flood larger
    than DRAIN_MAX is read in several turns of the loop, without the window between them."""
    from webhookd import udp

    tracker = FakeTracker()
    u = _listener(tracker)
    await u.start("127.0.0.1", 0)
    assert u.sock is not None
    target = u.sock.getsockname()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
        out.sendto(b"first", target)
        await asyncio.sleep(udp.READ_WINDOW / 5)
        out.sendto(b"second", target)
        await asyncio.sleep(udp.READ_WINDOW / 5)
        assert u.received == 0  # still inside the window
        await eventually(lambda: u.received == 2, timeout=2)
        await eventually(lambda: u.inflight == 0, timeout=2)
        assert [hb.device for hb in tracker.seen] == ["first", "second"]
        n = 3 * udp.DRAIN_MAX + 7
        for i in range(n):
            out.sendto(f"flood-{i}".encode(), target)
        started = asyncio.get_running_loop().time()
        await eventually(lambda: u.received == 2 + n, timeout=5)
        assert asyncio.get_running_loop().time() - started < 2 * udp.READ_WINDOW + 1.0
        out.sendto(b"last", target)
        await u.close(grace=5)  # reads what is waiting, then stops
    assert u.received == 3 + n and tracker.seen[-1].device == "last"


async def test_listener_keeps_reading_after_a_datagram_blows_up(monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = FakeTracker()
    u = _listener(tracker)
    await u.start("127.0.0.1", 0)
    assert u.sock is not None
    real = u.datagram_received

    def fragile(data: bytes, addr: Any) -> None:
        if data == b"boom":
            raise RuntimeError("a bug somewhere below")
        real(data, addr)

    monkeypatch.setattr(u, "datagram_received", fragile)
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
        out.sendto(b"boom", u.sock.getsockname())
        await eventually(lambda: errors, timeout=2)  # reported through the loop's exception handler
        out.sendto(b"after", u.sock.getsockname())
        await eventually(lambda: [hb.device for hb in tracker.seen] == ["after"], timeout=2)
    await u.close()


# --- the whole daemon ----------------------------------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sender:
    def __init__(self, port: int) -> None:
        self.addr = ("127.0.0.1", port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def send(self, data: bytes | str) -> None:
        self.sock.sendto(data.encode() if isinstance(data, str) else data, self.addr)

    def close(self) -> None:
        self.sock.close()


async def udp_daemon(daemon: DaemonFactory, r: Receiver, **listen: Any) -> tuple[Daemon, Sender]:
    port = free_udp_port()
    d = await daemon([endpoint("r", r)], listen={"udp": f"127.0.0.1:{port}", **listen})
    return d, Sender(port)


def udp_stats(d: Daemon) -> dict[str, Any]:
    stopped = [e for e in d.logs() if e.get("event") == "udp_stopped"]
    assert len(stopped) == 1, d.logs_text()
    return stopped[0]


async def test_udp_heartbeats_plain_text_and_json(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    r = await receiver()
    d, s = await udp_daemon(daemon, r)
    s.send("lamp-1\n")
    await r.wait_for(1)
    e = r.events()[0]
    assert e["type"] == "device.online" and e["reason"] == "heartbeat"
    assert e["device"]["id"] == "lamp-1" and e["device"]["address"] == "127.0.0.1"

    s.send("lamp-1 utilizing")
    await r.wait_for(2)
    e = r.events()[1]
    assert e["type"] == "device.utilizing" and e["device"]["state"] == "utilizing"

    s.send(json.dumps({"device": "gw-7", "name": "Gateway 7", "state": "unplugged"}))
    await r.wait_for(3)
    e = r.events()[2]
    assert e["device"]["id"] == "gw-7" and e["device"]["name"] == "Gateway 7"
    assert e["device"]["state"] == "unplugged" and e["device"]["address"] == "127.0.0.1"

    s.send("lamp-1 shutdown\n")
    await r.wait_for(4)
    e = r.events()[3]
    assert e["type"] == "device.offline" and e["reason"] == "shutdown"
    assert e["device"]["id"] == "lamp-1"

    _, dev = await d.admin("GET", "/v1/devices/lamp-1")
    assert dev["state"] == "offline"
    s.close()
    assert await d.stop() == 0
    stats = udp_stats(d)
    assert (stats["received"], stats["rejected"], stats["dropped"], stats["failed"]) == (4, 0, 0, 0)


async def test_bad_datagrams_record_nothing_and_the_daemon_keeps_serving(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    r = await receiver()
    d, s = await udp_daemon(daemon, r, max_body="16KiB")
    bad: list[bytes] = [
        b"",
        b"\n",
        b"-bad-id",
        b"dev-1 sleeping",
        b"dev-1 online now",
        b'{"device": "dev-1"',
        b'{"device": "dev-1", "state": "sleeping"}',
        b'[{"device": "dev-1"}]',
        b"dev\xff\xfe",
        b'{"device": "dev-1"}' + b" " * 20_000,  # valid but over max_body
        b"x" * 60_000,
    ]
    for data in bad:
        s.send(data)
    s.send(b"good-1")  # sent last: once it is in, every bad datagram before it has been read
    await r.wait_for(1)
    await asyncio.sleep(0.2)
    assert [e["device"]["id"] for e in r.events()] == ["good-1"]
    _, devices = await d.admin("GET", "/v1/devices")
    assert [dev["id"] for dev in devices] == ["good-1"]
    status, _ = await d.request("GET", "/healthz")
    assert status == 200
    assert (await d.heartbeat("http-1"))["changed"] is True  # HTTP unaffected
    s.close()
    assert await d.stop() == 0
    stats = udp_stats(d)
    assert (stats["received"], stats["rejected"]) == (len(bad) + 1, len(bad))
    # Summarised at info: the first at once, the rest (within the minute) when the listener closes.
    rejected_lines = [e for e in d.logs() if e.get("event") == "udp_datagrams_rejected"]
    assert 1 <= len(rejected_lines) <= 2, rejected_lines
    assert {e["level"] for e in rejected_lines} == {"info"}
    assert sum(e["rejected"] for e in rejected_lines) == len(bad)
    reasons: dict[str, int] = {}
    for e in rejected_lines:
        for reason, n in e["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    assert reasons == {"empty": 2, "invalid": 5, "malformed_json": 1, "not_utf8": 1, "too_large": 2}
    assert not [e for e in d.logs() if e.get("event") == "udp_datagram_rejected"]  # no line per datagram


async def test_burst_of_2000_datagrams_for_200_devices(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    r = await receiver()
    d, s = await udp_daemon(daemon, r)
    for i in range(2000):
        s.send(f"burst-{i % 200:03d}")
    ids = {f"burst-{i:03d}" for i in range(200)}

    async def online() -> set[str]:
        _, devices = await d.admin("GET", "/v1/devices?state=online")
        return {dev["id"] for dev in devices}

    deadline = asyncio.get_running_loop().time() + 10
    while (got := await online()) != ids:
        assert asyncio.get_running_loop().time() < deadline, sorted(ids - got)[:10]
        await asyncio.sleep(0.1)
    await r.wait_for(200)
    status, body = await d.request("GET", "/healthz")
    assert status == 200 and body == {"status": "ok"}
    assert (await d.heartbeat("after-burst"))["changed"] is True
    s.close()
    assert await d.stop() == 0
    stats = udp_stats(d)
    assert stats["rejected"] == 0 and stats["dropped"] == 0 and stats["failed"] == 0
    assert 200 <= stats["received"] <= 2000  # the kernel may drop some of a burst; every device got through


async def test_udp_port_in_use_fails_startup_with_a_clear_message(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    r = await receiver(start=False)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        # check=False: it is meant to fail; what it must do instead is asserted here.
        d = await daemon([endpoint("r", r)], start=False, check=False, listen={"udp": f"127.0.0.1:{port}"})
        await d.start(wait=False)
        assert await d.wait_exit() == 1
    failed = [e for e in d.logs() if e.get("event") == "startup_failed"]
    assert failed and f"cannot listen on 127.0.0.1:{port} for UDP heartbeats" in failed[0]["error"]
    assert "Traceback" not in d.logs_text()


async def test_tokens_warn_that_udp_is_unauthenticated(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    r = await receiver()
    d, s = await udp_daemon(daemon, r, tokens=["t0ken-one"])
    warned = [e for e in d.logs() if e.get("event") == "udp_unauthenticated"]
    assert len(warned) == 1 and warned[0]["level"] == "warning"
    assert "t0ken-one" not in d.logs_text()
    s.send("tok-1")
    await r.wait_for(1)
    assert r.events()[0]["device"]["id"] == "tok-1"
    s.close()
