"""Bad input, fuzzed (issue 4, item 4), against ONE running daemon per module (a subprocess, real sockets).

- Hypothesis drives the heartbeat API (single, per-device path, batch) with random JSON, wrong types,
  huge/unicode/control-character ids, deep nesting and invalid UTF-8, and UDP with random datagrams.
- A bounded raw-socket fuzzer (asyncio streams) sends truncated and pipelined requests, garbage request lines
  and headers, slowloris connections and 500 idle connections while a normal client keeps being served.
- Every answer must be < 500 (a 4xx carries a JSON `error`), and at the end the process is alive, /healthz is
  200, nothing was logged at error level, no traceback, and RSS grew by a bounded amount. Figures are printed
  (`pytest -s`): requests tried, 5xx seen, crashes, RSS growth.
- Random and adversarial YAML configs through config.parse_config / load_config: a ConfigError whose problems
  are all `key.path: message` lines, or a valid Config; never another exception.

Slowloris, what bounds it: aiohttp (3.14) has no separate header-read timeout. Its server arms the keep-alive
timer when a connection is accepted and closes a connection still waiting for a complete request head when the
timer fires, so a client dribbling header bytes is cut off `keepalive_timeout` after it connected (the daemon
sets 75 s; aiohttp's own AppRunner default is 3630 s); the heartbeat API bounds the body read separately
(listener.BODY_TIMEOUT, answered 408). Meanwhile each such connection costs one file descriptor and a few KiB:
the number is bounded by the process's RLIMIT_NOFILE (LimitNOFILE=65536 in the systemd unit). The quick test
shows the daemon keeps serving others during a slowloris; the long one waits for the cut-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import random
import re
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import Daemon, free_port
from webhookd.config import ConfigError, _key, load_config, parse_config
from webhookd.listener import BadInput
from webhookd.udp import parse_datagram

MAX_BODY = 64 * 1024
_COMMON: dict[str, Any] = {
    "deadline": None,
    "database": None,  # no .hypothesis/ directory in the work tree
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
}
QUICK = settings(max_examples=150, derandomize=True, **_COMMON)  # `make test`: bounded and reproducible
LONG = settings(max_examples=3000, derandomize=False, **_COMMON)  # `make test-long`: explores


def fuzz(name: str, fn: Callable[..., None], /, **strategies: st.SearchStrategy[Any]) -> None:
    """Register `test_<name>` (quick) and `test_<name>_long` (marked long) running `fn` under Hypothesis."""
    module = globals()
    module[f"test_{name}"] = QUICK(given(**strategies)(fn))
    module[f"test_{name}_long"] = pytest.mark.long(pytest.mark.timeout(1800)(LONG(given(**strategies)(fn))))


# ----------------------------------------------------------------------------------------------- the daemon


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"VmRSS:\s+(\d+)\s+kB", status)
    assert m is not None
    return int(m.group(1))


@dataclass
class Target:
    d: Daemon
    udp_port: int
    rss_start: int = 0
    requests: int = 0
    server_errors: list[str] = field(default_factory=list)
    datagrams: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        assert self.d.proc is not None
        return self.d.proc.pid

    def alive(self) -> bool:
        return self.d.proc is not None and self.d.proc.poll() is None

    def record(self, status: int, what: str) -> None:
        self.requests += 1
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status >= 500:
            self.server_errors.append(f"{status} for {what[:300]}")


def _healthz(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    finally:
        conn.close()


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One daemon for the whole module (under xdist: per worker that runs any of these tests), checked at the end
    like the conftest `daemon` fixture does (which is per test, too short-lived for this)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    udp_port = free_port()
    d = Daemon(
        tmp,
        [],
        listen={"udp": f"127.0.0.1:{udp_port}", "max_body": MAX_BODY},
        logging={"format": "json", "level": "info"},
    )
    asyncio.run(d.start())
    t = Target(d, udp_port)
    # Warm up (imports, first allocations), then take the baseline.
    for i in range(200):
        _post(t, "/v1/heartbeat", json.dumps({"device": f"warm-{i}"}).encode())
    t.requests = 0
    t.statuses.clear()
    t.rss_start = rss_kib(t.pid)
    yield t
    crashes = 0 if t.alive() else 1
    healthz = _healthz(d.port) if t.alive() else None
    rss_end = rss_kib(t.pid) if t.alive() else 0
    growth = rss_end - t.rss_start
    print(
        f"\nFUZZ FIGURES: requests tried {t.requests} (HTTP) + {t.datagrams} UDP datagrams; "
        f"5xx seen {len(t.server_errors)}; crashes {crashes}; "
        f"RSS {t.rss_start / 1024:.1f} -> {rss_end / 1024:.1f} MiB (growth {growth / 1024:+.1f} MiB); "
        f"statuses {dict(sorted(t.statuses.items()))}"
    )
    code = asyncio.run(d.stop())
    assert crashes == 0, d.logs_text()[-3000:]
    assert healthz == 200
    assert not t.server_errors, t.server_errors[:20]
    assert growth < 64 * 1024, f"RSS grew by {growth} KiB"
    assert code == 0, d.logs_text()[-3000:]
    problems = d.problems()  # a Traceback, error-level or non-JSON lines: what the `daemon` fixture checks too
    assert not problems, problems[:5]


class Client:
    """One keep-alive HTTP connection, reopened whenever the server closed it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self.conn.request(method, path, body=body, headers=headers)
                resp = self.conn.getresponse()
                data = resp.read()
                if resp.will_close:
                    self.conn.close()
                    self.conn = None
                return resp.status, data
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


_clients: dict[int, Client] = {}


def _send(t: Target, method: str, path: str, body: bytes | None, ctype: str | None = "application/json") -> int:
    client = _clients.setdefault(t.d.port, Client(t.d.port))
    headers = {"Content-Type": ctype} if ctype is not None else {}
    status, data = client.request(method, path, body, headers)
    t.record(status, f"{method} {path} {body[:200] if body else b''!r}")
    assert b"Traceback" not in data
    if method == "HEAD":
        assert data == b""
    elif 400 <= status < 500 and data.startswith(b"{"):
        answer = json.loads(data)
        assert isinstance(answer, dict) and isinstance(answer.get("error"), str), data[:300]
    elif status == 200 and path != "/healthz":
        answer = json.loads(data)
        items = answer if isinstance(answer, list) else [answer]
        for item in items:
            assert set(item) == {"device", "state", "changed"}, data[:300]
            assert item["state"] in ("online", "utilizing", "unplugged", "offline"), data[:300]
    return status


def _post(t: Target, path: str, body: bytes, ctype: str | None = "application/json") -> int:
    return _send(t, "POST", path, body, ctype)


# ------------------------------------------------------------------------------------------- strategies

FIELDS = ("device", "name", "state", "address", "owner")
STATES = ("online", "utilizing", "unplugged", "offline", "shutdown", "reboot", "unknown", "ONLINE", "")

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
ids = st.one_of(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}", fullmatch=True),  # valid
    st.text(max_size=300),  # any unicode, control characters included
    st.text(alphabet=st.characters(max_codepoint=31), min_size=1, max_size=10),
    st.integers(min_value=1, max_value=3).map(lambda n: "x" * (127 + n)),  # just too long
    st.just("x" * 20_000),  # huge
    st.sampled_from(["", " ", "-lead", ".", "a/b", "a b", "dev\u00e9", "dev\u200b", "\ufeffdev", "a\x00b", "../x"]),
)
texts = st.one_of(st.none(), st.text(max_size=300), st.just("n" * 300), json_values)
addresses = st.one_of(
    st.none(),
    st.sampled_from(["10.0.0.1", "::1", "fe80::1%eth0", "256.1.1.1", "1.2.3", "::ffff:10.0.0.1", "x" * 70, ""]),
    st.ip_addresses().map(str),
    json_values,
)


@st.composite
def heartbeats(draw: st.DrawFn) -> Any:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(json_values)  # not even an object, most of the time
    obj: dict[str, Any] = {}
    if draw(st.booleans()) or kind > 5:
        obj["device"] = draw(ids | json_values) if kind < 3 else draw(ids)
    if draw(st.booleans()):
        obj["state"] = draw(st.sampled_from(STATES) | json_values)
    for key in ("name", "owner"):
        if draw(st.booleans()):
            obj[key] = draw(texts)
    if draw(st.booleans()):
        obj["address"] = draw(addresses)
    if kind == 1:
        obj[draw(st.text(max_size=10))] = draw(json_values)  # an unknown field (or a known one again)
    return obj


def _encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


# ------------------------------------------------------------------------------------------- HTTP fuzzing


def _single_heartbeat_fuzz(target: Target, hb: Any) -> None:
    _post(target, "/v1/heartbeat", _encode(hb))


fuzz("single_heartbeat_fuzz", _single_heartbeat_fuzz, hb=heartbeats())


def _batch_fuzz(target: Target, items: Any) -> None:
    _post(target, "/v1/heartbeats", _encode(items))


fuzz("batch_fuzz", _batch_fuzz, items=st.lists(heartbeats(), max_size=8) | json_values)


def _path_heartbeat_fuzz(
    target: Target, device: str, state: str | None, method: str, body: bytes | None, raw_path: bool
) -> None:
    if raw_path:  # the bytes as they are, percent-encoded as UTF-8 or as raw (invalid UTF-8) octets
        quoted = urllib.parse.quote(device.encode("utf-8", "surrogatepass")[:2000], safe="")
    else:
        quoted = urllib.parse.quote(device.encode("latin-1", "replace")[:2000], safe="")
    path = f"/v1/heartbeat/{quoted}"
    if state is not None:
        path += "?state=" + urllib.parse.quote(state.encode("utf-8", "surrogatepass"), safe="")
    status = _send(target, method, path, body if method != "GET" else None)
    if method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        assert status in (404, 405)  # 404 when the id makes the path match no route (empty, a "/")


fuzz(
    "path_heartbeat_fuzz",
    _path_heartbeat_fuzz,
    device=ids | st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    state=st.none() | st.sampled_from(STATES) | st.text(max_size=20),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
    body=st.none() | heartbeats().map(_encode) | st.binary(max_size=64),
    raw_path=st.booleans(),
)


def _raw_body_fuzz(target: Target, body: bytes, path: str, ctype: str | None) -> None:
    _post(target, path, body, ctype)


fuzz(
    "raw_body_fuzz",
    _raw_body_fuzz,
    body=st.one_of(
        st.binary(max_size=512),
        st.binary(max_size=64).map(lambda b: b'{"device": "' + b + b'"}'),  # invalid UTF-8 in a string
        st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * n),  # deep nesting
        st.integers(1, 50_000).map(lambda n: b'{"device": ' + b'{"a": ' * n + b"1" + b"}" * n + b"}"),
        st.integers(1, 10_000).map(lambda n: b'{"device": "d", "name": ' + b"[" * n + b"]" * n + b"}"),
        st.sampled_from(
            [
                b"",
                b"null",
                b"{}",
                b"[]",
                b'{"device": "a", "device": "b"}',
                b'{"device": "\\ud800"}',
                b'{"device": "ok\\u0000"}',
                b'{"device": 1e999}',
                b'{"device": "x", "name": "\\u0007"}',
                b"\xef\xbb\xbf" + b'{"device": "bom"}',
                b'{"device": "x"} trailing',
                b'{"device": "x"',
                b"NaN",
                b'[{"device": "x"}]' * 2,
            ]
        ),
    ),
    path=st.sampled_from(["/v1/heartbeat", "/v1/heartbeats", "/v1/heartbeat/dev-raw"]),
    ctype=st.sampled_from(
        [
            "application/json",
            "application/json; charset=latin-1",
            "application/vnd.x+json",
            "text/plain",
            "application/x-www-form-urlencoded",
            "",
            "application/json; boundary=\x7f",
        ]
    )
    | st.none(),
)


def _bodies_near_and_over_the_limit(target: Target, size: int) -> None:
    body = b'{"device": "big", "name": "' + b"n" * size + b'"}'
    status = _post(target, "/v1/heartbeat", body)
    assert status in (400, 413)
    if len(body) > MAX_BODY:
        assert status == 413


fuzz(
    "bodies_near_and_over_the_limit",
    _bodies_near_and_over_the_limit,
    size=st.integers(min_value=MAX_BODY - 64, max_value=4 * MAX_BODY),
)


def test_batches_of_every_size(target: Target) -> None:
    for n in (0, 1, 999, 1000, 1001, 2000):
        body = json.dumps([{"device": f"b-{i % 50}"} for i in range(n)], separators=(",", ":")).encode()
        assert len(body) < MAX_BODY
        status = _post(target, "/v1/heartbeats", body)
        assert status == (200 if n <= 1000 else 400), n


# -------------------------------------------------------------------------------------------- UDP fuzzing


def _udp_fuzz(target: Target, data: bytes) -> None:
    # EMSGSIZE for > 64 KiB is the kernel's limit, not the daemon's.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
        s.sendto(data, ("127.0.0.1", target.udp_port))
        target.datagrams += 1
    if target.datagrams % 50 == 0:
        assert target.alive()


fuzz(
    "udp_fuzz",
    _udp_fuzz,
    data=st.one_of(
        st.binary(max_size=2048),
        heartbeats().map(_encode),
        st.tuples(ids, st.sampled_from(["", " online", " shutdown", " bogus", "\n"])).map(
            lambda p: (p[0] + p[1]).encode("utf-8", "surrogatepass")
        ),
        st.integers(1, 100_000).map(lambda n: b"[" * n),
    ),
)


@pytest.mark.parametrize("data", [b"\x0b", b"\x0c", b"\x1c\x1d\x1e\x1f", "\u00a0".encode(), "\u2003\r\n".encode()])
def test_udp_whitespace_only_datagrams_are_rejected(data: bytes) -> None:
    """Whitespace that bytes.rstrip keeps but str.split splits on (found by the long fuzz run: an IndexError in
    the datagram callback, logged by the event loop at error level)."""
    with pytest.raises(BadInput, match="empty"):
        parse_datagram(data, "192.0.2.1")


def test_udp_oversized_and_flood_then_still_served(target: Target) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x" * 65000, ("127.0.0.1", target.udp_port))
        for i in range(3000):
            s.sendto(f"flood-{i % 100}".encode(), ("127.0.0.1", target.udp_port))
        target.datagrams += 3001
        s.sendto(b"udp-still-served", ("127.0.0.1", target.udp_port))
    _status, devices = asyncio.run(_admin_devices(target.d))
    deadline = time.monotonic() + 5
    while "udp-still-served" not in devices and time.monotonic() < deadline:
        time.sleep(0.05)
        _status, devices = asyncio.run(_admin_devices(target.d))
    assert "udp-still-served" in devices
    assert _healthz(target.d.port) == 200


async def _admin_devices(d: Daemon) -> tuple[int, set[str]]:
    status, rows = await d.admin("GET", "/v1/devices")
    return status, {r["id"] for r in rows}


# -------------------------------------------------------------------------------------- raw-socket fuzzing

REQUEST = b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"


def _request(device: str) -> bytes:
    body = json.dumps({"device": device}).encode()
    return REQUEST % (len(body), body)


STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


async def _exchange(
    port: int, data: bytes, *, half_close: bool = True, timeout: float = 3.0, expect: int | None = None
) -> list[int]:
    """Send `data` on a fresh connection and collect every status code the server answers with (until it
    closes, `timeout` passes, or `expect` answers arrived)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            if half_close and writer.can_write_eof():
                writer.write_eof()
        got = b""
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(timeout):
                while chunk := await reader.read(65536):
                    got += chunk
                    if expect is not None and len(STATUS_LINE.findall(got)) >= expect:
                        break
        return [int(m.group(1)) for m in STATUS_LINE.finditer(got)]
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


GARBAGE = [
    b"\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"BREW /v1/heartbeat HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/heartbeat HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/heartbeat HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    b"POST /v1/heartbeat HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n{}",
    b"POST /v1/heartbeat HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    b"POST /v1/heartbeat HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"POST /v1/heartbeat HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"POST /v1/heartbeat HTTP/1.1\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
    b"Content-Length: 4\r\n\r\nabcd",
    b"POST /v1/heartbeat HTTP/1.1\r\nContent-Type: application/json\r\nContent-Encoding: br\r\n"
    b"Content-Length: 4\r\n\r\nabcd",
    b"POST /v1/heartbeat HTTP/1.1\r\nContent-Type: application/json\r\nContent-Encoding: deflate\r\n"
    b"Content-Length: 4\r\n\r\nabcd",
    b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
    b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
    b"".join(b"X-%d: y\r\n" % i for i in range(500)).join([b"GET /healthz HTTP/1.1\r\n", b"\r\n"]),
    b"GET /healthz HTTP/1.1\r\nBad Header\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n\x00: \x01\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: \xff\xfe\r\n\r\n",
    b"GET /v1/heartbeat/%ff%fe HTTP/1.1\r\n\r\n",
    b"GET /v1/heartbeat/%00 HTTP/1.1\r\n\r\n",
    b"GET /v1/heartbeat/dev?state=%ff HTTP/1.1\r\n\r\n",
    b"GET /v1/heartbeat/dev?token=%ff HTTP/1.1\r\n\r\n",
    b"GET http://evil/v1/heartbeat/dev HTTP/1.1\r\n\r\n",
    b"GET * HTTP/1.1\r\n\r\n",
    b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
    b"POST /v1/heartbeat HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 20\r\n\r\n",
    b"POST /v1/heartbeat HTTP/1.1\r\nExpect: 999-nonsense\r\nContent-Length: 2\r\n\r\n{}",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),  # a TLS ClientHello on plain HTTP
]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.randint(0, 3)
        pos = rng.randint(0, max(len(b) - 1, 0))
        if op == 0 and b:
            b[pos] = rng.randint(0, 255)
        elif op == 1:
            b[pos:pos] = bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 8)))
        elif op == 2 and b:
            del b[pos : pos + rng.randint(1, 8)]
        else:
            b[pos:pos] = rng.choice([b"\r\n", b":", b" ", b"\r\n\r\n", b"\x00", b"%", b"chunked"])
    return bytes(b)


async def _raw_fuzz(t: Target, rounds: int, seed: int) -> int:
    rng = random.Random(seed)
    port = t.d.port
    sent = 0

    async def one(data: bytes, **kw: Any) -> None:
        nonlocal sent
        statuses = await _exchange(port, data, **kw)
        sent += 1
        for s in statuses or [0]:
            t.record(s, repr(data[:200]))

    # Garbage request lines and headers.
    for data in GARBAGE:
        await one(data)
    # Truncated requests: a valid request cut anywhere, then closed, or half-closed (the server sees EOF but
    # could still answer), or left open (the client waits; the server waits for the rest).
    full = _request("trunc-1")
    await asyncio.gather(
        *(one(full[:cut], half_close=cut % 3 == 0, timeout=0.0 if cut % 3 == 1 else 0.5) for cut in range(len(full)))
    )
    # Pipelined requests: all answered, in order, on one connection.
    pipelined = b"".join(_request(f"pipe-{i}") for i in range(50))
    statuses = await _exchange(port, pipelined, half_close=False, expect=50)
    assert statuses == [200] * 50, statuses
    for s in statuses:
        t.record(s, "pipelined")
    # Pipelined with garbage in the middle: what comes before is served, the rest never gets a 5xx.
    await one(b"".join(_request(f"pipe-{i}") for i in range(5)) + b"GARBAGE\r\n\r\n" + _request("pipe-after"))
    # Mutated requests (bit flips, insertions, deletions), some of them pipelined.
    seeds = [_request("mut-1"), *GARBAGE[:12], b"GET /v1/heartbeat/mut-2?state=online HTTP/1.1\r\n\r\n"]
    sem = asyncio.Semaphore(32)

    async def mutated(i: int) -> None:
        data = _mutate(rng, rng.choice(seeds))
        if i % 5 == 0:
            data += _mutate(rng, rng.choice(seeds))
        async with sem:
            await one(data, timeout=1.0)

    await asyncio.gather(*(mutated(i) for i in range(rounds)))
    return sent


async def _serving_latency(port: int, n: int = 20) -> float:
    """The slowest of n fresh-connection heartbeats, in seconds (each must answer 200)."""
    worst = 0.0
    for i in range(n):
        started = time.monotonic()
        statuses = await _exchange(port, _request(f"probe-{i}"), half_close=False, expect=1)
        worst = max(worst, time.monotonic() - started)
        assert statuses == [200], statuses
    return worst


async def test_raw_socket_fuzz(target: Target) -> None:
    sent = await _raw_fuzz(target, rounds=400, seed=4)
    assert target.alive()
    assert _healthz(target.d.port) == 200
    print(f"\nraw-socket fuzzer: {sent} connections")


@pytest.mark.long
@pytest.mark.timeout(1800)
async def test_raw_socket_fuzz_long(target: Target) -> None:
    seed = random.randrange(1 << 30)
    sent = await _raw_fuzz(target, rounds=20_000, seed=seed)
    assert target.alive(), f"seed {seed}"
    assert _healthz(target.d.port) == 200, f"seed {seed}"
    print(f"\nraw-socket fuzzer (long, seed {seed}): {sent} connections")


async def _slowloris(port: int, conns: int, seconds: float, body: bool) -> list[asyncio.StreamWriter]:
    """Open `conns` connections that dribble a request one byte at a time (the head, or a body that never
    completes) for `seconds`; returns the writers (still open)."""
    writers = []
    for _ in range(conns):
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        writers.append(w)
    head = b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    data = (head + b"Content-Length: 60000\r\n\r\n" + b" " * 60000) if body else (head + b"X-Slow: " + b"a" * 10000)
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        for w in writers:
            with contextlib.suppress(ConnectionError):
                w.write(data[i : i + 1])
        i += 1
        await asyncio.sleep(0.05)
    return writers


async def test_slowloris_and_many_idle_connections_do_not_stop_service(target: Target) -> None:
    await _crowd(target, idle_conns=500, slow_heads=100, slow_bodies=50, seconds=2.0)


@pytest.mark.long
@pytest.mark.timeout(600)
async def test_slowloris_and_many_idle_connections_long(target: Target) -> None:
    await _crowd(target, idle_conns=5000, slow_heads=1000, slow_bodies=500, seconds=20.0)


async def _crowd(target: Target, idle_conns: int, slow_heads: int, slow_bodies: int, seconds: float) -> None:
    port = target.d.port
    baseline = await _serving_latency(port)
    idle = []
    for _ in range(idle_conns):
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        idle.append(w)
    slow_task = asyncio.create_task(_slowloris(port, slow_heads, seconds, body=False))
    body_task = asyncio.create_task(_slowloris(port, slow_bodies, seconds, body=True))
    await asyncio.sleep(0.3)
    during = await _serving_latency(port)
    slow, bodies = await slow_task, await body_task
    assert target.alive() and _healthz(port) == 200
    rss = rss_kib(target.pid)
    for w in idle + slow + bodies:
        w.close()
    print(
        f"\n{idle_conns} idle + {slow_heads} slowloris-header + {slow_bodies} slow-body connections: worst latency "
        f"{baseline * 1000:.0f} ms before, {during * 1000:.0f} ms during; RSS {rss / 1024:.1f} MiB"
    )
    for _ in range(len(idle) + len(slow) + len(bodies)):
        target.record(0, "held connection")
    assert during < 1.0, during
    await asyncio.sleep(0.3)
    assert await _serving_latency(port, 5) < 1.0


@pytest.mark.long
@pytest.mark.timeout(300)
async def test_slowloris_is_cut_off(target: Target) -> None:
    """The long run: a connection dribbling its head is closed by the server (keepalive_timeout after it
    connected), and one dribbling its body gets 408 after listener.BODY_TIMEOUT."""
    port = target.d.port
    head_r, head_w = await asyncio.open_connection("127.0.0.1", port)
    body_r, body_w = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    head_w.write(b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\n")
    body_w.write(
        b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n"
    )
    closed: dict[str, float] = {}
    answers: dict[str, bytes] = {}

    async def drip(name: str, r: asyncio.StreamReader, w: asyncio.StreamWriter, byte: bytes) -> None:
        while time.monotonic() - started < 200:
            try:
                w.write(byte)
                await w.drain()
                got = await asyncio.wait_for(r.read(65536), 1.0)
            except TimeoutError:
                continue
            except ConnectionError:
                got = b""
            answers[name] = answers.get(name, b"") + got
            closed[name] = time.monotonic() - started
            return

    await asyncio.gather(drip("head", head_r, head_w, b"a"), drip("body", body_r, body_w, b" "))
    print(f"\nslowloris cut off after: {closed}; answers {answers}")
    assert closed.get("head", 999) < 90
    assert closed.get("body", 999) < 45 and b" 408 " in answers["body"]
    for w in (head_w, body_w):
        w.close()


# ------------------------------------------------------------------------------------------ config fuzzing

PROBLEM = re.compile(r"^(?P<path>[^\n]+?): (?P<message>[^\n]+)$")
TOP_KEYS = ["state_dir", "listen", "admin", "presence", "devices", "delivery", "endpoints", "logging"]
SUB_KEYS = {
    "listen": ["http", "udp", "tokens", "max_body"],
    "admin": ["socket"],
    "presence": ["silence_timeout", "notify_online_after_utilizing"],
    "delivery": ["concurrency", "timeout", "retry_schedule", "disable_after", "retention"],
    "logging": ["format", "level"],
}
EP_KEYS = [
    "name",
    "url",
    "description",
    "events",
    "devices",
    "format",
    "secret",
    "secret_file",
    "signature",
    "signature_header",
    "secret_field",
    "headers",
    "timeout",
    "concurrency",
    "tls_verify",
    "ca_file",
    "allow_link_local",
]
RULE_KEYS = ["match", "silence_timeout", "name", "owner"]
plausible = st.one_of(
    st.sampled_from(
        [
            "30s",
            "500ms",
            "1d",
            "0",
            "-1s",
            "1e9",
            "64KiB",
            "1MiB",
            "127.0.0.1:8470",
            "[::1]:80",
            ":0",
            "host:99999",
            "http://127.0.0.1:9/hook",
            "https://u:p@example.com/x",
            "ftp://x",
            "all",
            "online",
            "webhookd",
            "remoteit",
            "standard-webhooks",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "${HOME}",
            "${NOPE}",
            "${",
            "$${x}",
            "*",
            "a" * 600,
            "\x00",
            "",
            "./var",
            "/nonexistent/secret",
        ]
    ),
    json_values,
)


def _section(keys: list[str]) -> st.SearchStrategy[Any]:
    mapping = st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), plausible, max_size=len(keys) + 1)
    return mapping | json_values


configs = st.fixed_dictionaries(
    {},
    optional={
        **{k: _section(v) for k, v in SUB_KEYS.items()},
        "state_dir": plausible,
        "devices": st.lists(_section(RULE_KEYS), max_size=3) | json_values,
        "endpoints": st.lists(_section(EP_KEYS), max_size=3) | json_values,
    },
).flatmap(lambda d: st.dictionaries(st.text(max_size=6), json_values, max_size=2).map(lambda extra: {**extra, **d}))


def _check_problems(e: ConfigError, heads: tuple[str, ...] | None) -> None:
    """Every problem is one `key.path: message` line; with `heads`, the path starts with one of them."""
    assert e.problems, "a ConfigError without problems"
    for p in e.problems:
        assert isinstance(p, str) and "Traceback" not in p
        m = PROBLEM.match(p)
        assert m is not None, p
        path = m.group("path")
        if heads is not None:
            ok = path == "config" or any(path == h or path.startswith((h + ".", h + "[", h + ":")) for h in heads)
            assert ok, p


def _keys(data: Any) -> tuple[str, ...]:
    """The top-level keys as problems show them (unknown ones are reported under their own name)."""
    return tuple(_key("", k) for k in data) if isinstance(data, dict) else ()


def _config_fuzz_parse(tmp_path_factory: pytest.TempPathFactory, data: Any) -> None:
    base = tmp_path_factory.getbasetemp()
    try:
        parse_config(data, base, env={"HOME": "/root"})
    except ConfigError as e:
        # Unknown keys at the top level are reported under their own (random) name.
        _check_problems(e, (*TOP_KEYS, *_keys(data)))


fuzz("config_fuzz_parse", _config_fuzz_parse, data=configs | json_values)


ADVERSARIAL = {
    "recursive list": "endpoints: &a [*a]\n",
    "recursive mapping": "listen: &a {x: *a}\n",
    "recursive devices": "&a {state_dir: x, devices: [*a]}\n",
    "billion laughs": "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
        for p, c in zip(["", *"abcdefgh"], "abcdefghi", strict=True)
    ),
    "laughs in endpoints": "x: &x [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
    "y: &y [*x, *x, *x, *x, *x, *x, *x, *x, *x, *x]\nz: &z [*y, *y, *y, *y, *y, *y, *y, *y, *y, *y]\n"
    "endpoints: [*z, *z, *z, *z, *z, *z, *z, *z, *z, *z, *z, *z, *z, *z, *z, *z, *z, *z, *z, *z, *z, *z]\n",
    "deep list": "endpoints: " + "[" * 5000 + "]" * 5000 + "\n",
    "deep mapping": "listen: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
    "deep but parseable": "devices: " + "[" * 80 + "]" * 80 + "\n",
    "python tag": "state_dir: !!python/object/apply:os.system ['echo pwned']\n",
    "python name": "state_dir: !!python/name:os.system\n",
    "unhashable key": "? [a, b]\n: 1\n",
    "merge key": "base: &b {url: 'http://127.0.0.1:9/', events: [all]}\nendpoints: [{<<: *b, name: m}]\n",
    "nan/inf": "delivery: {timeout: .nan, retry_schedule: [.inf, -1, 1e999]}\n",
    "huge ints": "delivery: {concurrency: 99999999999999999999999999999999, disable_after: -5}\n",
    "NUL": 'state_dir: "a\\0b"\n',
    "binary": "state_dir: !!binary aGVsbG8=\n",
    "odd keys": "1: x\n~: y\ntrue: z\n1.5: w\n",
    "timestamp": "state_dir: 2001-12-14t21:59:43.10-05:00\n",
    "set": "endpoints: !!set {a, b}\n",
    "duplicate keys": "listen: {http: ':1'}\nlisten: {http: ':2'}\n",
    "tabs": "listen:\n\thttp: x\n",
    "multi doc": "listen: {}\n---\nlisten: {}\n",
    "top-level list": "- a\n- b\n",
    "top-level scalar": "hello\n",
    "empty": "",
    "only comment": "# nothing\n",
    "BOM": "\ufefflisten: {http: '127.0.0.1:1'}\n",
    "control chars": "state_dir: \x07\x1b[31m\n",
    "unterminated": "listen: {http: '127.0.0.1:1'\n",
    "anchors everywhere": "a: &a 1\nlisten: {http: *a, udp: *a, tokens: *a, max_body: *a}\n",
    "tagged int, empty": "listen: {max_body: !!int ''}\n",
    "tagged float": "delivery: {timeout: !!float x}\n",
    "tagged bool": "presence: {notify_online_after_utilizing: !!bool maybe}\n",
    "tagged timestamp": "state_dir: !!timestamp x\n",
    "tagged set of a list": "devices: !!set [1]\n",
    "tagged map of a scalar": "!!map x\n",
    "newline in a key": '"a\\nb": 1\nlisten: {"x\\ty": 2, "": 3}\n',
    "env in keys": "${HOME}: 1\nlisten: {${X}: 2}\n",
    "huge string": "state_dir: " + "x" * 2_000_000 + "\n",
    "many endpoints": "endpoints:\n"
    + "".join(f"  - {{name: e{i}, url: 'http://127.0.0.1:9/', events: [all]}}\n" for i in range(3000)),
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_yaml(tmp_path: Path, name: str) -> None:
    path = tmp_path / "webhookd.yaml"
    path.write_text(ADVERSARIAL[name])
    # CPU time, not wall time: on a box shared with other tests the wall clock also counts their turns.
    started = time.process_time()
    error: ConfigError | None = None
    try:
        load_config(path, env={"HOME": "/root"})
    except ConfigError as e:
        error = e
    elapsed = time.process_time() - started
    if error is not None:
        try:  # libyaml when present: pure PyYAML takes seconds on "deep list" (load_config refuses it at once)
            data = yaml.load(ADVERSARIAL[name], Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except Exception:  # what load_config turned into a ConfigError
            data = None
        _check_problems(error, (*TOP_KEYS, str(path), *_keys(data)))
    assert elapsed < 5, f"{name}: took {elapsed:.1f}s"


@st.composite
def yaml_texts(draw: st.DrawFn) -> str:
    """Text that is YAML-ish: real keys, indentation, flow collections, anchors, aliases, tags, quotes."""
    tokens = st.sampled_from(
        [
            *[k + ":" for k in TOP_KEYS],
            *[k + ":" for ks in SUB_KEYS.values() for k in ks],
            *[k + ":" for k in EP_KEYS],
            "- ",
            "  ",
            "\n",
            "\n  ",
            "\n    - ",
            "[",
            "]",
            "{",
            "}",
            ", ",
            "&a ",
            "*a",
            "&b ",
            "*b",
            "<<: ",
            "!!str ",
            "!!int ",
            "!!binary ",
            "!!python/tuple ",
            "? ",
            "'",
            '"',
            "|",
            ">",
            "#",
            "%YAML 1.1\n",
            "---\n",
            "...\n",
            "~",
            "null",
            "true",
            "30s",
            "0x1F",
            "1e400",
            ".nan",
            "${X}",
            "\\x00",
            "\t",
            "é",
            "\U0001f600",
        ]
    )
    return "".join(draw(st.lists(tokens | st.text(max_size=5), max_size=40)))


def _config_fuzz_yaml_text(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    d = tmp_path_factory.mktemp("yaml", numbered=True)
    path = d / "webhookd.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(path, env={"X": "1"})
    except ConfigError as e:
        _check_problems(e, None)


fuzz("config_fuzz_yaml_text", _config_fuzz_yaml_text, text=yaml_texts())
