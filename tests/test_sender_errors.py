"""Delivery errors in words (issue 10 §1): every failed attempt's `error` (what `last_error` shows) is a short
reason a person reads at a glance, and its `detail` (logged beside it) keeps aiohttp's full story.

Each case against a real local server (or a real port with nothing on it, a name that cannot resolve); the
last test runs the real daemon: the log line carries the detail, and a success clears the endpoint's
last_error."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trustme
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.faults.servers import Conn, Hit, RawServer, ScriptedReceiver, read_request, reset, wait_peer_close
from tests.harness import SECRET, free_port
from webhookd.config import EndpointConfig, parse_config
from webhookd.dispatch import AttemptResult, Sender, Target
from webhookd.dispatch.sender import describe


def endpoint_config(tmp_path: Path, url: str, **extra: Any) -> EndpointConfig:
    raw = {
        "state_dir": str(tmp_path),
        "listen": {"http": f"127.0.0.1:{free_port()}"},
        "admin": {"socket": str(tmp_path / "admin.sock")},
        "endpoints": [{"name": "ep", "url": url, "events": ["all"], "secret": SECRET, **extra}],
    }
    return parse_config(raw, tmp_path, env={}).endpoints[0]


@pytest.fixture
async def sender() -> AsyncIterator[Sender]:
    s = Sender(5.0)
    s.open()
    yield s
    await s.close()


async def attempt(sender: Sender, tmp_path: Path, url: str, **extra: Any) -> AttemptResult:
    result = await sender.attempt(Target(endpoint_config(tmp_path, url, **extra)), "evt-1", b"{}", 1)
    assert not result.ok and result.error is not None and result.detail is not None, result
    assert len(result.error) <= 200 and "\n" not in result.error, result
    assert "\n" not in result.detail, result
    return result


# --- the transport ---------------------------------------------------------------------------------------


async def test_connection_refused_names_the_address(sender: Sender, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    r = await attempt(sender, tmp_path, f"http://127.0.0.1:{port}/hook")
    assert r.error == f"connection refused (127.0.0.1:{port})"
    assert r.status is None
    assert "ssl:" not in r.error  # aiohttp's `ssl:default` on a plain http URL stays in the detail only
    assert "ClientConnectorError" in r.detail and "Connect call failed" in r.detail, r.detail


async def test_a_name_that_does_not_resolve(sender: Sender, tmp_path: Path) -> None:
    r = await attempt(sender, tmp_path, "http://nonexistent.invalid/hook")
    # NXDOMAIN is "not found"; a resolver that cannot be reached at all says why instead.
    assert r.error == "DNS: nonexistent.invalid not found" or r.error.startswith(
        "DNS: nonexistent.invalid lookup failed"
    ), r
    assert "ClientConnectorDNSError" in r.detail and "gaierror" in r.detail, r.detail


async def test_a_hanging_receiver_times_out(sender: Sender, tmp_path: Path, receiver: ReceiverFactory) -> None:
    async def hang(reader: asyncio.StreamReader, _w: asyncio.StreamWriter, conn: Conn) -> None:
        conn.request = await read_request(reader)
        await wait_peer_close(reader)

    server = await receiver(RawServer(hang))
    r = await attempt(sender, tmp_path, server.url(), timeout="300ms")
    assert r.error == "timeout after 0.3s"
    assert 0.25 <= r.latency < 2.0, r
    assert "TimeoutError" in r.detail, r.detail


async def test_a_body_stalled_after_a_200_head_times_out(
    sender: Sender, tmp_path: Path, receiver: ReceiverFactory
) -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Conn) -> None:
        conn.request = await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        await wait_peer_close(reader)

    server = await receiver(RawServer(stall))
    r = await attempt(sender, tmp_path, server.url(), timeout="300ms")
    assert r.error == "timeout after 0.3s"
    assert r.detail.startswith("after the response head (HTTP 200): "), r.detail


async def rst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Conn) -> None:
    """/at-once: a TCP RST before reading anything; /in-head: in the status line; /in-body: in a 200's body;
    /close: a plain close (FIN) after reading the request, no answer at all."""
    line = await reader.readuntil(b"\r\n")
    path = line.split(b" ")[1]
    if path == b"/at-once":
        reset(writer)
        return
    conn.request = line + await read_request(reader)
    if path == b"/close":
        writer.close()
        return
    if path == b"/in-body":
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"ok"')
    else:
        writer.write(b"HTTP/1.1 20")
    await writer.drain()
    await asyncio.sleep(0.02)
    reset(writer)


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("/at-once", "connection reset"),
        ("/in-head", "connection reset"),
        ("/in-body", "connection reset"),
        ("/close", "connection closed without a response"),
    ],
)
async def test_resets_and_closes(
    sender: Sender, tmp_path: Path, receiver: ReceiverFactory, path: str, error: str
) -> None:
    server = await receiver(RawServer(rst))
    r = await attempt(sender, tmp_path, server.url(path))
    assert r.error == error, r
    assert r.status is None


async def test_a_response_that_is_not_http(sender: Sender, tmp_path: Path, receiver: ReceiverFactory) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Conn) -> None:
        conn.request = await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        await wait_peer_close(reader)

    server = await receiver(RawServer(garbage))
    r = await attempt(sender, tmp_path, server.url())
    assert r.error == "invalid HTTP response (Bad status line)", r
    assert "SSH-2.0" in r.detail, r.detail


# --- HTTP answers ----------------------------------------------------------------------------------------


async def test_redirects_are_named_not_followed(sender: Sender, tmp_path: Path, receiver: ReceiverFactory) -> None:
    target = await receiver(ScriptedReceiver())
    recv = await receiver(
        ScriptedReceiver(lambda hit: web.Response(status=int(hit.path[2:]), headers={"Location": target.url("/new")}))
    )
    for code in (301, 302, 307, 308):
        r = await attempt(sender, tmp_path, recv.url(f"/r{code}"))
        assert (r.status, r.error) == (code, f"redirect {code} not followed"), r
        assert f"Location: {target.url('/new')}" in r.detail, r.detail
    assert target.hits == []


async def test_an_http_error_keeps_its_reason_in_the_detail_never_the_body(
    sender: Sender, tmp_path: Path, receiver: ReceiverFactory
) -> None:
    # A receiver that echoes the request: its answer holds the signature and the endpoint's own headers.
    recv = await receiver(ScriptedReceiver(lambda hit: web.json_response(dict(hit.headers), status=503)))
    r = await attempt(sender, tmp_path, recv.url(), headers={"Authorization": "Bearer hdr-secret-123"})
    assert (r.status, r.error, r.detail) == (503, "HTTP 503", "HTTP 503 Service Unavailable")


async def test_the_detail_never_carries_the_urls_query(
    sender: Sender, tmp_path: Path, receiver: ReceiverFactory
) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: Conn) -> None:
        conn.request = await read_request(reader)
        writer.write(b"NOT HTTP\r\n\r\n")
        await writer.drain()
        await wait_peer_close(reader)

    server = await receiver(RawServer(garbage))
    r = await attempt(sender, tmp_path, server.url("/hook?key=q-secret-456"))
    assert r.error.startswith("invalid HTTP response"), r
    assert "q-secret-456" not in r.detail and "/hook?***" in r.detail, r.detail
    redirect = await receiver(
        ScriptedReceiver(
            lambda _hit: web.Response(status=301, headers={"Location": "https://u:pw@new.test/h?key=k1#f"})
        )
    )
    r = await attempt(sender, tmp_path, redirect.url())
    assert r.error == "redirect 301 not followed"
    assert "Location: https://new.test/h;" in r.detail and "k1" not in r.detail and "pw" not in r.detail, r.detail


# --- TLS -------------------------------------------------------------------------------------------------


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


async def test_tls_self_signed(sender: Sender, tmp_path: Path, receiver: ReceiverFactory, ca: trustme.CA) -> None:
    recv = await receiver(ScriptedReceiver(ssl_context=server_context(ca, "127.0.0.1", "localhost")))
    r = await attempt(sender, tmp_path, recv.url())
    assert r.error == "TLS: certificate verify failed (unable to get local issuer certificate)", r
    assert "CERTIFICATE_VERIFY_FAILED" in r.detail, r.detail
    assert recv.hits == []


async def test_tls_name_mismatch(sender: Sender, tmp_path: Path, receiver: ReceiverFactory, ca: trustme.CA) -> None:
    recv = await receiver(ScriptedReceiver(ssl_context=server_context(ca, "hooks.example.com")))
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    r = await attempt(sender, tmp_path, recv.url(), ca_file=str(ca_pem))
    assert r.error.startswith("TLS: certificate verify failed (IP address mismatch"), r


async def test_https_to_a_plain_http_server(sender: Sender, tmp_path: Path, receiver: ReceiverFactory) -> None:
    plain = await receiver(ScriptedReceiver())
    r = await attempt(sender, tmp_path, plain.url().replace("http://", "https://"))
    assert r.error == "TLS: wrong version number (not a TLS server?)", r


# --- link-local ------------------------------------------------------------------------------------------


async def test_a_link_local_literal_is_blocked_before_connecting(sender: Sender, tmp_path: Path) -> None:
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[fe80::1]/hook"):
        # Built past check-config, which may refuse such a URL itself: the sender must refuse it anyway.
        cfg = msgspec.structs.replace(endpoint_config(tmp_path, "http://127.0.0.1/hook"), url=url)
        r = await sender.attempt(Target(cfg), "evt-1", b"{}", 1)
        assert r.detail is not None
        assert (r.error, r.latency) == ("blocked: link-local address", 0.0), r
        assert "allow_link_local: true" in r.detail, r.detail


class MetadataResolver(AbstractResolver):
    """Answers every name with the cloud metadata address, as a poisoned or hostile DNS would."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host="169.254.169.254", port=port, family=socket.AF_INET, proto=0, flags=0)
        ]

    async def close(self) -> None:
        pass


async def test_a_name_resolving_to_link_local_is_blocked(sender: Sender, tmp_path: Path) -> None:
    sender._resolver._inner = MetadataResolver()  # type: ignore[assignment]
    r = await attempt(sender, tmp_path, f"http://metadata.webhookd.test:{free_port()}/hook")
    assert r.error == "blocked: link-local address (metadata.webhookd.test)", r
    assert "resolves only to link-local addresses" in r.detail, r.detail


# --- whatever else ---------------------------------------------------------------------------------------


def test_anything_else_is_its_type_and_first_line() -> None:
    error, detail = describe(ValueError("Cannot combine AUTHORIZATION header\nwith AUTH argument"), 5.0)
    assert error == "ValueError: Cannot combine AUTHORIZATION header"
    assert detail == "ValueError: Cannot combine AUTHORIZATION header with AUTH argument"
    error, _ = describe(RuntimeError("x" * 500), 5.0)
    assert error == "RuntimeError: " + "x" * 186 and len(error) == 200
    assert describe(KeyError(), 5.0)[0] == "KeyError: (no message)"
    try:
        try:
            raise OSError("inner cause")
        except OSError as inner:
            raise LookupError("outer") from inner
    except LookupError as e:
        assert describe(e, 5.0) == ("LookupError: outer", "LookupError: outer <- OSError: inner cause")


# --- the daemon: the detail in the log line, and a success clears last_error ------------------------------


async def test_the_log_keeps_the_detail_and_a_success_clears_last_error(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    answers = iter([503, 503])

    def respond(_hit: Hit) -> web.Response:
        code = next(answers, 200)
        return web.json_response({"ok": code == 200}, status=code)

    recv = await receiver(ScriptedReceiver(respond))
    d = await daemon(
        [{"name": "flaky", "url": recv.url(), "events": ["all"], "secret": SECRET}],
        delivery={"retry_schedule": ["100ms", "100ms", "100ms"], "disable_after": 0},
        logging={"format": "json", "level": "info"},
    )
    await d.heartbeat("dev-1")

    deadline = time.monotonic() + 10
    while True:
        _, eps = await d.admin("GET", "/v1/endpoints")
        (info,) = eps
        if info["delivered"] == 1:
            break
        assert time.monotonic() < deadline, info
        await asyncio.sleep(0.02)
    assert info["last_error"] is None and info["consecutive_failures"] == 0, info
    failed = [r for r in d.logs() if r.get("event") == "delivery_failed"]
    assert [r["error"] for r in failed] == ["HTTP 503", "HTTP 503"], failed
    assert all(r["detail"] == "HTTP 503 Service Unavailable" for r in failed), failed
    # The row went with the success's receipt: a restart still shows it cleared.
    assert await d.stop() == 0
    await d.start()
    _, eps = await d.admin("GET", "/v1/endpoints")
    assert eps[0]["last_error"] is None and eps[0]["delivered"] == 1, eps
