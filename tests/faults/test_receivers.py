"""Receiver faults (CONTRACT §7), each against a real local server and the real daemon as a subprocess.

With `retry_schedule: [100ms, 100ms]` a failing delivery is attempted len(schedule) + 1 = 3 times and then
`dead`; the endpoint stays enabled (disable_after: 0) with consecutive_failures = 3. A 410 disables the
endpoint at once and holds its deliveries. Retry-After on 429/503 moves the next attempt within
[step, 2 * step]. Every test ends by checking the daemon is still healthy, logged no error, and exits 0.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.faults.servers import (
    Conn,
    Hit,
    RawServer,
    ScriptedReceiver,
    read_request,
    reset,
    wait_peer_close,
)
from tests.harness import SECRET, Daemon, free_port

SCHEDULE = ["100ms", "100ms"]
ATTEMPTS = len(SCHEDULE) + 1  # then dead


def ep(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": url, "events": ["all"], "secret": SECRET, **extra}


ModuleDaemon = Callable[..., Awaitable[Daemon]]


@pytest.fixture
def daemon(daemon: DaemonFactory) -> ModuleDaemon:
    """The conftest `daemon` (at teardown it must be healthy, error-free, and exit 0) on this module's schedule
    and info-level logs: `await daemon(endpoints, **delivery)`."""

    async def make(endpoints: list[dict[str, Any]], **delivery: Any) -> Daemon:
        return await daemon(
            endpoints,
            delivery={"retry_schedule": SCHEDULE, "disable_after": 0, **delivery},
            logging={"format": "json", "level": "info"},
        )

    return make


async def deliveries(d: Daemon, endpoint: str) -> list[dict[str, Any]]:
    status, rows = await d.admin("GET", f"/v1/deliveries?endpoint={endpoint}")
    assert status == 200, rows
    return sorted(rows, key=lambda r: r["id"])


async def endpoint_info(d: Daemon, name: str) -> dict[str, Any]:
    status, eps = await d.admin("GET", "/v1/endpoints")
    assert status == 200, eps
    (found,) = [e for e in eps if e["name"] == name]
    return dict(found)


async def settled(d: Daemon, endpoint: str, status: str, n: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Wait until the endpoint has n deliveries, all in `status`; then check nothing moves for a while."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await deliveries(d, endpoint)
        if len(rows) == n and all(r["status"] == status for r in rows):
            break
        final = len(rows) == n and all(r["status"] != "pending" for r in rows)
        if final or time.monotonic() > deadline:  # fail fast when it settled in another state
            raise AssertionError(f"{endpoint}: expected {n} x {status}, got {rows}")
        await asyncio.sleep(0.03)
    await asyncio.sleep(0.25)  # > the schedule's step +20%: a stray extra attempt would show now
    again = await deliveries(d, endpoint)
    assert again == rows, (rows, again)
    return rows


async def assert_dead_after_schedule(
    d: Daemon, name: str, last_status: int | None, error: str, attempts: int = ATTEMPTS
) -> dict[str, Any]:
    (row,) = await settled(d, name, "dead")
    assert row["attempts"] == attempts, row
    assert row["last_status"] == last_status, row
    assert error.lower() in (row["last_error"] or "").lower(), row
    info = await endpoint_info(d, name)
    assert info["enabled"] is True and info["consecutive_failures"] == attempts, info
    assert (info["dead"], info["pending"], info["held"], info["delivered"]) == (1, 0, 0, 0), info
    assert error.lower() in (info["last_error"] or "").lower(), info
    return dict(row)


def assert_paced(times: list[float], step: float = 0.1) -> None:
    """Attempts follow the schedule (step +-20%, or the endpoint's pause), never back to back."""
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.8 * step - 0.01 <= g <= 3 * step + 0.3 for g in gaps), gaps


def attempt_log(d: Daemon, name: str) -> list[str]:
    return [
        r["event"]
        for r in d.logs()
        if r.get("endpoint") == name and r.get("event") in ("delivery_failed", "delivery_dead", "delivery_succeeded")
    ]


# --- transport faults ------------------------------------------------------------------------------------


async def test_connection_refused(daemon: ModuleDaemon, receiver: ReceiverFactory) -> None:
    port = free_port()  # nothing listens there
    d = await daemon([ep("refused", f"http://127.0.0.1:{port}/hook")])
    await d.heartbeat("dev-1")
    await assert_dead_after_schedule(d, "refused", None, f"connection refused (127.0.0.1:{port})")
    assert attempt_log(d, "refused") == ["delivery_failed", "delivery_failed", "delivery_dead"]


async def test_accept_then_hang_times_out_per_attempt(daemon: ModuleDaemon, receiver: ReceiverFactory) -> None:
    async def hang(reader: asyncio.StreamReader, _w: asyncio.StreamWriter, conn: Conn) -> None:
        conn.request = await read_request(reader)
        await wait_peer_close(reader)  # never answers; returns when the daemon gives up

    server = await receiver(RawServer(hang))
    d = await daemon([ep("hang", server.url(), timeout="300ms")])
    await d.heartbeat("dev-1")
    await assert_dead_after_schedule(d, "hang", None, "timeout after 0.3s")
    assert len(server.requests) == ATTEMPTS
    for c in server.requests:
        # The timeout counts from before the connect, the server from its accept: under load that is tens of ms.
        assert c.held_for is not None and 0.2 <= c.held_for < 0.8, c  # the per-attempt timeout
    assert b"Webhook-Attempt: 3" in server.requests[-1].request


def path_of(request: bytes) -> str:
    return request.split(b" ", 2)[1].decode() if request.count(b" ") >= 2 else ""


async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Conn) -> None:
    """/slow-head: headers one byte per 50 ms; /stall: 200 headers, then no body; /dribble: 200 headers, then
    the body one byte per 50 ms. Each would take 10 s; the daemon's timeout is 300 ms."""
    conn.request = await read_request(reader)
    path = path_of(conn.request)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n"
    if path == "/slow-head":
        head, trickle = b"", head[:15] + b"X-Pad: " + b"x" * 200
    elif path == "/dribble":
        trickle = b" " * 200
    else:
        trickle = b""
    writer.write(head)
    gone = asyncio.ensure_future(wait_peer_close(reader))
    try:
        for byte in trickle:
            if gone.done():
                break
            writer.write(bytes([byte]))
            await writer.drain()
            conn.sent += 1
            await asyncio.sleep(0.05)
        await asyncio.wait_for(gone, 10)
    finally:
        conn.closed = time.monotonic()
        gone.cancel()


async def check_timed_out(daemon: ModuleDaemon, receiver: ReceiverFactory, path: str) -> None:
    server = await receiver(RawServer(slow))
    d = await daemon([ep("slow", server.url(path), timeout="300ms")])
    await d.heartbeat("dev-1")
    await assert_dead_after_schedule(d, "slow", None, "timeout after 0.3s")
    assert len(server.requests) == ATTEMPTS
    for c in server.requests:
        # From the accept: the timeout started before the connect (tens of ms under load).
        assert c.held_for is not None and 0.2 <= c.held_for < 0.8, c  # dropped at the timeout, not after 10 s


async def test_slow_headers_time_out(daemon: ModuleDaemon, receiver: ReceiverFactory) -> None:
    await check_timed_out(daemon, receiver, "/slow-head")


async def test_200_with_a_stalled_body_times_out(daemon: ModuleDaemon, receiver: ReceiverFactory) -> None:
    await check_timed_out(daemon, receiver, "/stall")


async def test_200_with_a_body_dribbling_past_the_timeout_times_out(
    daemon: ModuleDaemon, receiver: ReceiverFactory
) -> None:
    await check_timed_out(daemon, receiver, "/dribble")


async def rst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Conn) -> None:
    """A TCP RST in the middle of the status line (/in-head), or in the middle of a 200's body (/in-body)."""
    conn.request = await read_request(reader)
    if path_of(conn.request) == "/in-body":
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"ok"')
    else:
        writer.write(b"HTTP/1.1 20")
    await writer.drain()
    await asyncio.sleep(0.02)
    reset(writer)


async def check_reset(daemon: ModuleDaemon, receiver: ReceiverFactory, path: str) -> None:
    server = await receiver(RawServer(rst))
    d = await daemon([ep("rst", server.url(path))])
    await d.heartbeat("dev-1")
    row = await assert_dead_after_schedule(d, "rst", None, "connection reset")
    assert row["last_error"] == "connection reset", row
    assert len(server.requests) == ATTEMPTS


async def test_connection_reset_in_the_status_line(daemon: ModuleDaemon, receiver: ReceiverFactory) -> None:
    await check_reset(daemon, receiver, "/in-head")


async def test_connection_reset_mid_body_of_a_200(daemon: ModuleDaemon, receiver: ReceiverFactory) -> None:
    await check_reset(daemon, receiver, "/in-body")


# --- HTTP status faults ----------------------------------------------------------------------------------


def answer(code: int, **headers: str) -> web.Response:
    return web.json_response({"status": code}, status=code, headers=headers)


async def test_redirects_are_not_followed(daemon: ModuleDaemon, receiver: ReceiverFactory) -> None:
    codes = (301, 302, 303, 307, 308)
    target = await receiver(ScriptedReceiver())
    recv = await receiver(ScriptedReceiver(lambda hit: answer(int(hit.path[2:]), Location=target.url("/target"))))
    d = await daemon([ep(f"redir-{c}", recv.url(f"/r{c}"), devices=[f"d{c}"]) for c in codes])
    for c in codes:
        await d.heartbeat(f"d{c}")
    # Settled together: each settled() ends with a quiet wait of its own.
    await asyncio.gather(*(assert_dead_after_schedule(d, f"redir-{c}", c, f"redirect {c} not followed") for c in codes))
    for c in codes:
        hits = recv.on(f"/r{c}")
        assert [h.attempt for h in hits] == [1, 2, 3]
        assert len({h.headers["Webhook-Id"] for h in hits}) == 1
        assert_paced([h.at for h in hits])
    assert target.hits == []  # the Location was never followed


async def check_retried_until_dead(
    daemon: ModuleDaemon, receiver: ReceiverFactory, codes: tuple[int, ...], **headers: str
) -> None:
    """Each code, on its own endpoint, is a failed attempt: retried at the schedule's pace, then dead."""
    recv = await receiver(ScriptedReceiver(lambda hit: answer(int(hit.path[2:]), **headers)))
    d = await daemon([ep(f"c{c}", recv.url(f"/c{c}"), devices=[f"d{c}"]) for c in codes])
    for c in codes:
        await d.heartbeat(f"d{c}")
    await asyncio.gather(*(assert_dead_after_schedule(d, f"c{c}", c, f"HTTP {c}") for c in codes))  # together
    for c in codes:
        hits = recv.on(f"/c{c}")
        assert [h.attempt for h in hits] == [1, 2, 3]
        assert_paced([h.at for h in hits])


async def test_4xx_is_a_failure_and_retried(daemon: ModuleDaemon, receiver: ReceiverFactory) -> None:
    await check_retried_until_dead(daemon, receiver, (400, 401, 404, 422))


async def test_5xx_is_a_failure_and_retried(daemon: ModuleDaemon, receiver: ReceiverFactory) -> None:
    # 503 is below, with and without Retry-After. Retry-After is honoured on 429/503 only: on these the
    # retries keep the schedule's pace.
    await check_retried_until_dead(daemon, receiver, (500, 502, 504), **{"Retry-After": "3600"})


async def test_503_without_retry_after_follows_the_schedule(daemon: ModuleDaemon, receiver: ReceiverFactory) -> None:
    recv = await receiver(ScriptedReceiver(lambda _hit: answer(503)))
    d = await daemon([ep("c503", recv.url())])
    await d.heartbeat("dev-1")
    await assert_dead_after_schedule(d, "c503", 503, "HTTP 503")
    assert [h.attempt for h in recv.hits] == [1, 2, 3]
    assert_paced([h.at for h in recv.hits])


async def test_410_disables_the_endpoint_at_once_and_holds(daemon: ModuleDaemon, receiver: ReceiverFactory) -> None:
    gone = await receiver(ScriptedReceiver(lambda _hit: answer(410)))
    fine = await receiver(ScriptedReceiver())
    d = await daemon([ep("gone", gone.url()), ep("fine", fine.url())], disable_after=50)
    for state in ("online", "utilizing", "unplugged"):  # one lane: only its head is ever attempted
        await d.heartbeat("dev-1", state=state)
    rows = await settled(d, "gone", "held", n=3)
    assert [r["attempts"] for r in rows] == [1, 0, 0], rows
    assert rows[0]["last_status"] == 410
    info = await endpoint_info(d, "gone")
    assert info["enabled"] is False and "410" in info["disabled_reason"], info
    assert (info["held"], info["dead"], info["pending"], info["delivered"]) == (3, 0, 0, 0), info
    # New events for the disabled endpoint are recorded as held, and nothing is attempted.
    await d.heartbeat("dev-2")
    await settled(d, "gone", "held", n=4)
    assert len(gone.hits) == 1
    warnings = [r for r in d.logs() if r.get("event") == "endpoint_disabled"]
    assert len(warnings) == 1 and warnings[0]["endpoint"] == "gone" and "410" in warnings[0]["reason"]
    # The other endpoint is not affected.
    await settled(d, "fine", "delivered", n=4)


# --- Retry-After -----------------------------------------------------------------------------------------

STEP = 0.6  # Retry-After is honoured within [STEP, 2 * STEP]; plain retries would be STEP +- 20%


def retry_after_receiver(values: dict[str, tuple[int, Callable[[], str]]]) -> ScriptedReceiver:
    """First attempt on each path: (code, Retry-After value); later attempts: 200. Records what was sent."""
    sent: dict[str, tuple[float, str]] = {}

    def respond(hit: Hit) -> web.Response:
        if hit.path in sent:
            return answer(200)
        code, value = values[hit.path]
        v = value()
        sent[hit.path] = (time.time(), v)
        return answer(code, **{"Retry-After": v})

    recv = ScriptedReceiver(respond)
    recv.sent = sent  # type: ignore[attr-defined]
    return recv


def expected_delay(sent_at: float, value: str) -> float:
    wait = float(value) if value.isdigit() else email.utils.parsedate_to_datetime(value).timestamp() - sent_at
    return min(max(wait, STEP), 2 * STEP)


async def check_retry_after(
    daemon: ModuleDaemon, receiver: ReceiverFactory, values: dict[str, tuple[int, Callable[[], str]]]
) -> None:
    recv = await receiver(retry_after_receiver(values))
    names = {path: path.strip("/") for path in values}
    d = await daemon(
        [ep(n, recv.url(p), devices=[f"{n}.dev"]) for p, n in names.items()],
        retry_schedule=[f"{STEP}s", f"{STEP}s"],
    )
    for n in names.values():
        await d.heartbeat(f"{n}.dev")
    rows = await asyncio.gather(*(settled(d, n, "delivered", timeout=10) for n in names.values()))  # together
    for (path, n), (row,) in zip(names.items(), rows, strict=True):
        assert row["attempts"] == 2, row
        hits = recv.on(path)
        assert [(h.attempt, h.answered) for h in hits] == [(1, values[path][0]), (2, 200)]
        gap = hits[1].at - hits[0].at
        sent_at, value = recv.sent[path]  # type: ignore[attr-defined]
        want = expected_delay(sent_at, value)
        assert STEP - 0.02 <= gap <= 2 * STEP + 0.25, (n, value, gap)
        assert want - 0.03 <= gap <= want + 0.25, (n, value, gap, want)
        assert (await endpoint_info(d, n))["consecutive_failures"] == 0


async def test_429_and_503_retry_after_in_seconds(daemon: ModuleDaemon, receiver: ReceiverFactory) -> None:
    await check_retry_after(
        daemon,
        receiver,
        {
            "/s429": (429, lambda: "1"),  # inside [step, 2 step]: waited exactly
            "/s503": (503, lambda: "1"),
            "/s429-long": (429, lambda: "3600"),  # bounded by 2 * step
            "/s503-zero": (503, lambda: "0"),  # bounded below by the step
        },
    )


def http_date(offset: float) -> Callable[[], str]:
    return lambda: email.utils.formatdate(time.time() + offset, usegmt=True)


async def test_429_and_503_retry_after_as_http_date(daemon: ModuleDaemon, receiver: ReceiverFactory) -> None:
    await check_retry_after(
        daemon,
        receiver,
        {
            "/d429": (429, http_date(1.9)),  # 0.9..1.9 s away (1 s resolution): within or at 2 * step
            "/d503": (503, http_date(1.6)),
            "/d429-far": (429, http_date(3600)),  # bounded by 2 * step
            "/d503-past": (503, http_date(-3600)),  # bounded below by the step
        },
    )


# --- huge response body ----------------------------------------------------------------------------------

HUGE = 50 * 1024 * 1024
CHUNK = 1024 * 1024


def vm_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{key} not in /proc/{pid}/status")


async def test_huge_response_body_is_not_read_into_memory(daemon: ModuleDaemon, receiver: ReceiverFactory) -> None:
    """A 2xx with a 50 MiB body (Content-Length, and chunked): delivered, the body dropped unread."""

    async def huge(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Conn) -> None:
        conn.request = await read_request(reader)
        chunked = b"/chunked " in conn.request
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % HUGE
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n" + framing + b"\r\n\r\n")
        block = b"x" * CHUNK
        if chunked:
            block = b"%x\r\n" % CHUNK + block + b"\r\n"
        try:
            while conn.sent < HUGE:
                writer.write(block)
                await asyncio.wait_for(writer.drain(), 10)
                conn.sent += CHUNK
            if chunked:
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            await wait_peer_close(reader)
        except (ConnectionError, OSError):
            pass
        conn.closed = time.monotonic()

    server = await receiver(RawServer(huge))
    d = await daemon(
        [
            ep("huge", server.url("/length"), devices=["l-*"]),
            ep("huge-chunked", server.url("/chunked"), devices=["c-*"]),
        ]
    )
    assert d.proc is not None
    pid = d.proc.pid
    await d.heartbeat("l-warm")  # both endpoints deliver once, so sessions and code paths are warm
    await d.heartbeat("c-warm")
    await settled(d, "huge", "delivered", n=1)
    await settled(d, "huge-chunked", "delivered", n=1)
    before = vm_kib(pid, "VmHWM")
    for i in range(3):
        await d.heartbeat(f"l-{i}")
        await d.heartbeat(f"c-{i}")
    await settled(d, "huge", "delivered", n=4)
    await settled(d, "huge-chunked", "delivered", n=4)
    for name in ("huge", "huge-chunked"):
        assert all(r["attempts"] == 1 and r["last_status"] == 200 for r in await deliveries(d, name))
    growth_mib = (vm_kib(pid, "VmHWM") - before) / 1024
    rss_mib = vm_kib(pid, "VmRSS") / 1024
    print(f"\nhuge body: RSS {rss_mib:.0f} MiB, peak growth {growth_mib:.1f} MiB over 8 x 50 MiB responses")
    assert growth_mib < 16, growth_mib  # reading even one body would add >= 50 MiB
    # The daemon hung up early instead of draining 50 MiB.
    assert len(server.requests) == 8
    assert all(c.closed is not None and c.sent < HUGE for c in server.requests), server.requests


# --- TLS -------------------------------------------------------------------------------------------------


async def test_tls_self_signed_needs_tls_verify_false_or_ca_file(
    daemon: ModuleDaemon, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server_ctx)
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    recv = await receiver(ScriptedReceiver(ssl_context=server_ctx))
    d = await daemon(
        [
            ep("tls-default", recv.url("/default")),
            ep("tls-insecure", recv.url("/insecure"), tls_verify=False),
            ep("tls-ca", recv.url("/ca"), ca_file=str(ca_pem)),
        ]
    )
    await d.heartbeat("dev-1")
    row = await assert_dead_after_schedule(d, "tls-default", None, "TLS: certificate verify failed")
    assert row["last_error"] == "TLS: certificate verify failed (unable to get local issuer certificate)", row
    for name in ("tls-insecure", "tls-ca"):
        (ok,) = await settled(d, name, "delivered")
        assert ok["attempts"] == 1 and ok["last_status"] == 200, ok
    assert recv.on("/default") == []  # the handshake failed: no request ever reached the receiver
    assert len(recv.on("/insecure")) == 1 and len(recv.on("/ca")) == 1
