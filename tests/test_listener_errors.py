"""The heartbeat API's answers to wrong requests (issue 10, item 4): unknown query parameters, GET on the POST-only
route, and the body limit named as configured. Whole-daemon tests; bad input records nothing and logs no
traceback (the `daemon` fixture checks the log at teardown)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import Daemon, endpoint
from webhookd.config.units import parse_size
from webhookd.listener import size_text


async def _answer(d: Daemon, method: str, path: str, **kw: Any) -> tuple[int, dict[str, str], Any]:
    """Status, headers and the JSON body (or None for a HEAD)."""
    async with aiohttp.ClientSession() as s, s.request(method, d.base + path, **kw) as r:
        text = await r.text()
        return r.status, dict(r.headers), json.loads(text) if text else None


async def _raw(d: Daemon, request: bytes) -> tuple[int, Any]:
    """One raw HTTP/1.1 request (bytes as they are): the status and the JSON body of its answer. The answer is
    read by its Content-Length: a server refusing a body it was promised may hold the connection to drain it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")
        length = next(int(v) for k, _, v in (x.partition(":") for x in lines[1:]) if k.lower() == "content-length")
        body = await asyncio.wait_for(reader.readexactly(length), 5)
    finally:
        writer.close()
    return int(lines[0].split(" ", 2)[1]), json.loads(body)


UNKNOWN_QUERY: list[tuple[str, str, dict[str, Any], str]] = [
    # method, path, request keywords, the parameter named
    ("GET", "/v1/heartbeat/x?stat=online", {}, "stat"),
    ("GET", "/v1/heartbeat/x?state=online&stat=online", {}, "stat"),
    ("GET", "/v1/heartbeat/x?foo", {}, "foo"),
    ("GET", "/v1/heartbeat/x?=online", {}, ""),
    ("GET", "/v1/heartbeat/x?State=online", {}, "State"),
    ("POST", "/v1/heartbeat/x?stat=online", {"json": {"name": "n"}}, "stat"),
    ("POST", "/v1/heartbeat/x?stat=online", {}, "stat"),
    ("POST", "/v1/heartbeat?stat=online", {"json": {"device": "x"}}, "stat"),
    ("POST", "/v1/heartbeat?state=online", {"json": {"device": "x"}}, "state"),  # state goes in the body here
    ("POST", "/v1/heartbeats?device=x", {"json": [{"device": "x"}]}, "device"),
    ("GET", "/v1/heartbeat/x?" + "k" * 200 + "=1", {}, "k" * 64),
]


async def test_unknown_query_parameters_are_400_naming_the_parameter(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    r = await receiver()
    d = await daemon([endpoint("r", r)])
    for method, path, kw, name in UNKNOWN_QUERY:
        status, _, body = await _answer(d, method, path, **kw)
        assert status == 400, (method, path, status, body)
        assert body["error"].startswith(f"unknown query parameter {name!r} ("), (path, body)
        assert body["field"] == name, (path, body)
    status, _, body = await _answer(d, "GET", "/v1/heartbeat/x?stat=online")
    assert body == {"error": "unknown query parameter 'stat' (this route takes ?state= and ?token=)", "field": "stat"}
    status, _, body = await _answer(d, "POST", "/v1/heartbeat?state=online", json={"device": "x"})
    assert body == {
        "error": "unknown query parameter 'state' (a heartbeat's fields go in the JSON body)",
        "field": "state",
    }
    # Percent-encoded bytes that are not UTF-8 (a surrogate, a lone 0xff) or a control character: still a JSON
    # 400, never a 500. (The raw bytes themselves are refused by aiohttp's parser, before the listener.)
    for query in (b"%ED%A0%80=1", b"%ff=1", b"a%7Fb=1", b"%00=1"):
        status, body = await _raw(
            d, b"GET /v1/heartbeat/x?" + query + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert status == 400 and body["error"].startswith("unknown query parameter"), (query, body)
    # The other errors are unchanged by a valid query; a wrong device is still named first by its own check.
    status, _, body = await _answer(d, "GET", "/v1/heartbeat/x?state=nope")
    assert (status, body["field"]) == (400, "state")
    status, _, body = await _answer(d, "GET", "/v1/heartbeat/-x?state=online")
    assert (status, body["field"]) == (400, "device")
    # Nothing was recorded, nothing was delivered.
    _, devices = await d.admin("GET", "/v1/devices")
    assert devices == []
    await asyncio.sleep(0.3)
    assert r.attempts == 0

    # The parameters each route does take still work: ?state= and ?token= (no tokens configured: ignored), an
    # empty query, a bare "&".
    status, _, body = await _answer(d, "GET", "/v1/heartbeat/a?state=utilizing")
    assert (status, body) == (200, {"device": "a", "state": "utilizing", "changed": True})
    status, _, body = await _answer(d, "GET", "/v1/heartbeat/b?token=t&state=online")
    assert (status, body["changed"]) == (200, True)
    status, _, body = await _answer(d, "GET", "/v1/heartbeat/c?")
    assert (status, body["state"]) == (200, "online")
    status, _, body = await _answer(d, "GET", "/v1/heartbeat/c2?&")
    assert (status, body["state"]) == (200, "online")
    status, _, body = await _answer(d, "POST", "/v1/heartbeat/e?state=unplugged", json={"name": "E"})
    assert (status, body["state"]) == (200, "unplugged")
    status, _, body = await _answer(d, "POST", "/v1/heartbeat?token=t", json={"device": "f"})
    assert (status, body["changed"]) == (200, True)
    status, _, body = await _answer(d, "POST", "/v1/heartbeats?token=t", json=[{"device": "g"}])
    assert (status, body[0]["changed"]) == (200, True)
    _, devices = await d.admin("GET", "/v1/devices")
    assert sorted(x["id"] for x in devices) == ["a", "b", "c", "c2", "e", "f", "g"]


async def test_a_token_is_checked_before_the_query(daemon: DaemonFactory) -> None:
    d = await daemon([], listen={"tokens": ["t0ken-one"]})
    status, _, body = await _answer(d, "GET", "/v1/heartbeat/x?stat=online")
    assert status == 401 and "token" in body["error"]
    status, _, body = await _answer(d, "GET", "/v1/heartbeat/x?token=t0ken-one&stat=online")
    assert status == 400 and body["field"] == "stat"
    bearer = {"Authorization": "Bearer t0ken-one"}
    status, _, body = await _answer(d, "POST", "/v1/heartbeat?stat=1", json={"device": "x"}, headers=bearer)
    assert status == 400 and body["field"] == "stat"
    status, _, body = await _answer(d, "GET", "/v1/heartbeat/x?token=t0ken-one&state=online")
    assert status == 200 and body["changed"] is True


async def test_get_on_the_post_route_hints_at_the_per_device_path(daemon: DaemonFactory) -> None:
    d = await daemon([])
    status, headers, body = await _answer(d, "GET", "/v1/heartbeat")
    assert status == 405 and headers["Allow"] == "POST"
    assert body == {
        "error": "method not allowed: to report by GET use /v1/heartbeat/{device} (optionally ?state=...); "
        "/v1/heartbeat takes POST with a JSON body"
    }
    status, _, body = await _answer(d, "GET", "/v1/heartbeat?state=online")
    assert status == 405 and "/v1/heartbeat/{device}" in body["error"]
    status, headers, body = await _answer(d, "HEAD", "/v1/heartbeat")
    assert status == 405 and headers["Allow"] == "POST" and body is None
    # The other 405s keep their message, and say what is allowed.
    for method, path, allow in [
        ("PUT", "/v1/heartbeat", "POST"),
        ("DELETE", "/v1/heartbeat/a", "GET, POST"),
        ("GET", "/v1/heartbeats", "POST"),
        ("POST", "/healthz", "GET, HEAD"),
    ]:
        status, headers, body = await _answer(d, method, path)
        assert (status, headers["Allow"], body) == (405, allow, {"error": "method not allowed"}), (method, path)
    # GET /v1/heartbeat/{device} is where the hint leads, and records a heartbeat there.
    status, _, body = await _answer(d, "GET", "/v1/heartbeat/dev-1")
    assert (status, body) == (200, {"device": "dev-1", "state": "online", "changed": True})
    _, devices = await d.admin("GET", "/v1/devices")
    assert [x["id"] for x in devices] == ["dev-1"]


@pytest.mark.parametrize(
    ("configured", "shown", "size"),
    [("1KiB", "1KiB", 1024), (3000, "3KB", 3000), ("1500B", "1500B", 1500), ("2MiB", "2MiB", 2 * 1024**2)],
)
async def test_413_names_the_limit_as_configured(
    daemon: DaemonFactory, configured: str | int, shown: str, size: int
) -> None:
    d = await daemon([], listen={"max_body": configured})
    too_big = {"error": f"request body larger than {shown} (listen.max_body)"}
    # Content-Length over the limit: answered before the body is read (none is sent here).
    for path in ("/v1/heartbeat", "/v1/heartbeat/a", "/v1/heartbeats"):
        request = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size + 1}\r\nConnection: close\r\n\r\n"
        )
        assert await _raw(d, request.encode()) == (413, too_big), path
    if size <= 4096:  # a body actually sent, with a length and chunked
        big = {"device": "b", "name": "n" * size}
        status, _, body = await _answer(d, "POST", "/v1/heartbeat", json=big)
        assert (status, body) == (413, too_big)

        async def chunks() -> AsyncIterator[bytes]:
            payload = json.dumps(big).encode()
            for i in range(0, len(payload), 500):
                yield payload[i : i + 500]

        headers = {"Content-Type": "application/json"}
        status, _, body = await _answer(d, "POST", "/v1/heartbeat", data=chunks(), headers=headers, chunked=True)
        assert (status, body) == (413, too_big)
    _, devices = await d.admin("GET", "/v1/devices")
    assert devices == []


def test_size_text_spells_sizes_as_the_config_does() -> None:
    assert size_text(256 * 1024) == "256KiB"  # the default listen.max_body
    assert size_text(1024) == "1KiB"
    assert size_text(1024**2) == "1MiB"
    assert size_text(3 * 1024**3) == "3GiB"
    assert size_text(1024**4) == "1TiB"
    assert size_text(1000) == "1KB"
    assert size_text(10**6) == "1MB"
    assert size_text(1024 * 1000) == "1000KiB"  # not 1024KB: the smaller number
    assert size_text(1536) == "1536B"
    assert size_text(1) == "1B"
    for n in [*range(1, 5000), 64 * 1024, 10**9, 5 * 1024**4, 1024**4 * 1024]:
        assert parse_size(size_text(n)) == n, n
