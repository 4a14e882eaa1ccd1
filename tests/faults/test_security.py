"""Security (issue 4, item 5): tokens, the admin socket, secrets in logs and outputs, link-local blocking, body
bounds, and no shell/eval/pickle in the package.

Constant-time tokens: timing cannot be measured reliably in a test, so the test checks the mechanism instead:
`listener._authorize` runs `hmac.compare_digest` once against EVERY configured token, whichever matches (or
none), and a wrong token of equal length (differing in its first or last byte) is refused.

DNS names that resolve to link-local addresses: the daemon resolves through `dispatch.GuardedResolver`. Its unit
test replaces the inner resolver with a stub returning 169.254.x / fe80:: answers. The end-to-end test gives the
daemon (only the daemon's process) its own /etc/hosts: it runs in a private mount namespace (`unshare --mount`)
where a temp file is bind-mounted over /etc/hosts; the machine's /etc/hosts is never touched. Where unshare or
mount is not allowed (not root), that test skips and the stub test still runs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import grp
import inspect
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.faults.servers import ScriptedReceiver
from tests.harness import Daemon, Receiver, free_port
from webhookd import dispatch, listener
from webhookd.dispatch import GuardedResolver
from webhookd.listener import HeartbeatAPI

PACKAGE = Path(listener.__file__).parent


def ep(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": url, "events": ["all"], **extra}


# ------------------------------------------------------------------------------------------------ tokens

TOKENS = ["tok-alpha-0123456789abcdef", "tok-bravo-fedcba9876543210"]  # equal length


async def test_bearer_tokens_on_the_running_daemon(daemon: DaemonFactory) -> None:
    d = await daemon([], listen={"tokens": TOKENS})
    body = {"device": "tok-dev"}

    async def post(headers: dict[str, str], path: str = "/v1/heartbeat") -> tuple[int, Any]:
        return await d.request("POST", path, json=body, headers=headers)

    for t in TOKENS:
        assert (await post({"Authorization": f"Bearer {t}"}))[0] == 200
    assert (await post({"Authorization": f"bearer {TOKENS[0]}"}))[0] == 200  # the scheme is case-insensitive
    wrong = [
        "",
        "x",
        TOKENS[0][:-1],  # a prefix
        TOKENS[0] + "0",  # a longer one
        "X" + TOKENS[0][1:],  # equal length, first byte differs
        TOKENS[0][:-1] + "X",  # equal length, last byte differs
        TOKENS[1][:-1] + "X",
        TOKENS[0].upper(),
        f"{TOKENS[0]},{TOKENS[1]}",
    ]
    for w in wrong:
        assert len(w) != len(TOKENS[0]) or w not in TOKENS
        status, answer = await post({"Authorization": f"Bearer {w}"})
        assert (status, answer) == (401, {"error": "missing or invalid token"}), w
    assert (await post({}))[0] == 401
    assert (await post({"Authorization": f"Basic {TOKENS[0]}"}))[0] == 401
    assert (await post({"Authorization": TOKENS[0]}))[0] == 401
    # ?token= is for GET only (a one-line wget on a device); never on POST.
    assert (await d.request("GET", f"/v1/heartbeat/tok-dev?token={TOKENS[1]}"))[0] == 200
    assert (await d.request("GET", f"/v1/heartbeat/tok-dev?token={TOKENS[1][:-1]}X"))[0] == 401
    assert (await post({}, f"/v1/heartbeat?token={TOKENS[0]}"))[0] == 401
    assert (await d.request("POST", f"/v1/heartbeats?token={TOKENS[0]}", json=[body]))[0] == 401
    # /healthz stays open (a load balancer's probe has no token).
    assert (await d.request("GET", "/healthz"))[0] == 200
    assert await d.stop() == 0
    for t in TOKENS:
        assert t not in d.logs_text()


@pytest.mark.parametrize("given", [TOKENS[0], TOKENS[1], "X" + TOKENS[0][1:], TOKENS[0][:-1] + "X", "", "short"])
def test_authorize_compares_with_every_token(monkeypatch: pytest.MonkeyPatch, given: str) -> None:
    tokens = [*TOKENS, "tok-charlie-00000000000000"]
    api = HeartbeatAPI(tracker=None, tokens=tokens, max_body=1024, healthy=lambda: True)  # type: ignore[arg-type]
    calls: list[tuple[bytes, bytes]] = []
    real = listener.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(listener.hmac, "compare_digest", counting)
    request = make_mocked_request("POST", "/v1/heartbeat", headers={"Authorization": f"Bearer {given}"})
    if given in tokens:
        api._authorize(request)
    else:
        with pytest.raises(listener.BadInput) as e:
            api._authorize(request)
        assert e.value.status == 401
    # Every token is compared, in constant time, whichever matched: no early exit, no `==`, no `in`.
    assert [b for _, b in calls] == [t.encode() for t in tokens]
    assert all(a == given.encode() for a, _ in calls)
    source = inspect.getsource(HeartbeatAPI._authorize)
    assert "compare_digest" in source
    assert not re.search(r"given\s*(==|!=)|(==|!=)\s*given|given\s+(not\s+)?in\b", source), source


# ------------------------------------------------------------------------------------------ admin socket


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A short directory others may traverse (0755), so that only the socket's own mode decides access."""
    d = Path(tempfile.mkdtemp(prefix="whsec", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _connect_as(path: Path, uid: int, gid: int) -> str:
    """Try to connect to the unix socket as another user; 'ok' or the error's name."""
    code = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "try:\n"
        f"    s.connect({str(path)!r}); print('ok')\n"
        "except OSError as e:\n"
        "    print(type(e).__name__)\n"
    )
    # A system interpreter: the venv's may live under a directory the other user cannot enter.
    python = shutil.which("python3", path="/usr/bin:/bin:/usr/local/bin") or sys.executable
    r = subprocess.run(
        [python, "-I", "-c", code],
        user=uid,
        group=gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    return (r.stdout.strip() or r.stderr.strip()).splitlines()[-1]


async def test_admin_socket_is_0660_and_refuses_other_users(open_dir: Path, daemon: DaemonFactory) -> None:
    d = await daemon([], tmp=open_dir)
    sock = open_dir / "admin.sock"
    st = sock.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
    assert st.st_uid == os.geteuid()
    if os.geteuid() != 0:
        pytest.skip("not root: cannot try the socket as another user (the mode was checked)")
    nobody = 65534
    other_gid = next(g for g in (65534, 65533, 12345) if g != st.st_gid)
    # Another user, not in the socket's group: refused by the kernel.
    assert _connect_as(sock, nobody, other_gid) == "PermissionError"
    # The same user in the socket's group (e.g. a `webhookd` group for operators): allowed.
    assert _connect_as(sock, nobody, st.st_gid) == "ok"
    # Control: were the socket 0666, the other user would get in (so the check above tests the mode).
    sock.chmod(0o666)
    try:
        assert _connect_as(sock, nobody, other_gid) == "ok"
    finally:
        sock.chmod(0o660)
    print(f"admin socket {oct(stat.S_IMODE(st.st_mode))} owner {st.st_uid}:{grp.getgrgid(st.st_gid).gr_name}")
    assert await d.stop() == 0


# --------------------------------------------------------------------------------- secrets never leak


def _rand(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _whsec() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


async def test_no_secret_or_token_in_any_log_line_or_cli_output(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    good = await receiver()
    echo_state = {"n": 0}

    def echoing(hit: Any) -> web.StreamResponse:
        # A hostile or buggy receiver that answers with everything it was sent: headers (Authorization,
        # signatures) and the body (secret_field) in its response body and headers.
        echo_state["n"] += 1
        text = json.dumps({"headers": dict(hit.headers), "body": hit.body.decode()})
        status = 500 if echo_state["n"] % 2 else 401
        auth = hit.headers.get("Authorization", "")
        return web.Response(status=status, text=text, headers={"X-Echo": auth, "Retry-After": "1"})

    echo = await receiver(ScriptedReceiver(respond=echoing))

    s_single = _whsec()
    s_list = [_rand("list-one"), _rand("list-two")]
    s_field = _rand("field")
    s_env = _rand("env")
    s_file = _rand("file")
    hdr_token = _rand("hdr")
    api_key = _rand("apikey")
    url_password = _rand("urlpw")
    tokens = [_rand("listen-a"), _rand("listen-b")]
    s_reload = _rand("reloaded")
    s_broken = _rand("broken")
    (tmp_path / "secret.txt").write_text(s_file + "\n")
    secrets_all = [s_single, *s_list, s_field, s_env, s_file, hdr_token, api_key, url_password, *tokens]

    def endpoints(extra: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        eps = [
            ep("std", good.url, format="remoteit", signature="standard-webhooks", secret=s_single),
            ep("list", echo.url("/list"), secret=s_list),
            ep("field", echo.url("/field"), format="remoteit", secret=s_field, secret_field="SecretKey"),
            ep("hdr", echo.url("/hdr"), signature="none", headers={"Authorization": f"Bearer {hdr_token}"}),
            ep("apikey", good.url, secret="${OPS_SECRET}", headers={"X-Api-Key": api_key}),
            ep("file", good.url, secret_file=str(tmp_path / "secret.txt")),
            ep("creds", f"http://ops:{url_password}@127.0.0.1:{echo.port}/creds", secret=s_list[0]),
        ]
        return eps + (extra or [])

    d = await daemon(
        endpoints(),
        start=False,
        allow_errors=True,  # the broken reload below logs config_reload_failed at error level, on purpose
        listen={"tokens": tokens},
        delivery={"retry_schedule": ["100ms", "100ms"], "disable_after": 0},
        logging={"format": "json", "level": "debug"},  # the chattiest level
    )
    env = {"OPS_SECRET": s_env}
    outputs: list[str] = []

    async def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        r = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "webhookd", *args, "-c", str(d.config_path)],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, **env},
            check=False,
        )
        outputs.append(f"$ webhookd {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
        if ok:
            assert r.returncode == 0, outputs[-1]
        return r

    await d.start(env=env)
    auth = {"Authorization": f"Bearer {tokens[0]}"}
    events = 0
    for i, state in enumerate(["online", "utilizing", "unplugged", "shutdown"]):
        status, answer = await d.request(
            "POST", "/v1/heartbeat", json={"device": f"sec-{i % 2}", "state": state}, headers=auth
        )
        assert status == 200, answer
        events += answer["changed"]
    # Wrong tokens (equal length) are refused and not logged either.
    wrong = tokens[1][:-1] + ("0" if tokens[1][-1] != "0" else "1")
    assert (await d.request("POST", "/v1/heartbeat", json={"device": "x"}, headers={"Authorization": wrong}))[0] == 401
    assert (await d.request("GET", f"/v1/heartbeat/x?token={wrong}"))[0] == 401
    await good.wait_for(events * 3, timeout=10)  # std, apikey and file endpoints get every event
    # The echoing endpoints fail every attempt (logged with their errors) until each of their deliveries is dead.
    deadline = time.monotonic() + 10
    while True:
        _, eps = await d.admin("GET", "/v1/endpoints")
        echoing_eps = [e for e in eps if e["name"] in ("list", "field", "hdr", "creds")]
        if len(echoing_eps) == 4 and all(e["dead"] == events and e["pending"] == 0 for e in echoing_eps):
            break
        assert time.monotonic() < deadline, eps
        await asyncio.sleep(0.05)

    # Good reload: a new endpoint with a new secret; the list rotated.
    s_list.reverse()
    d.cfg["endpoints"] = endpoints([ep("new", good.url, secret=s_reload)])
    secrets_all.append(s_reload)
    d.write_config()
    d.signal(signal.SIGHUP)
    await _wait_log(d, "config_reloaded")
    # Broken reloads: the problems must name the key, never the value.
    broken_eps = [
        ep("b1", good.url, secret=s_broken * 10),  # too long
        ep("b2", good.url, signature="standard-webhooks", secret=s_broken),  # not whsec_
        ep("b3", f"ftp://ops:{s_broken}@example.com/x", secret=s_broken),  # bad scheme, credentials
        ep("b4", good.url, secret=[s_broken, 7]),  # a non-string in the list
        ep("b5", good.url, headers={"Authorization": f"Bearer {s_broken}\n"}),  # control character
        ep("b6", good.url, secret_file=str(tmp_path / "nope"), secret=s_broken),  # both
        {**ep("b7", good.url, secret=s_broken), "secrett": s_broken},  # unknown key holding a secret
        ep("b8", good.url, headers={"X-Bad\x01": s_broken}),  # (key paths name keys; values are secret)
    ]
    secrets_all.append(s_broken)
    d.cfg["endpoints"] = endpoints(broken_eps)
    d.cfg["listen"] = {**d.cfg["listen"], "tokens": [*tokens, s_broken + "\x00"]}
    d.write_config()
    d.signal(signal.SIGHUP)
    await _wait_log(d, "config_reload_failed")
    r = await cli("check-config", ok=False)
    assert r.returncode == 1 and "endpoints[7]" in r.stdout + r.stderr, outputs[-1]
    # Back to the good config for the CLI session.
    d.cfg["endpoints"] = endpoints([ep("new", good.url, secret=s_reload)])
    d.cfg["listen"] = {**d.cfg["listen"], "tokens": tokens}
    d.write_config()
    await cli("check-config")

    # The CLI calls run concurrently (each is a Python start-up); none of them changes state.
    calls = [
        cli("endpoints", "test", name, *fmt, ok=False)
        for name in ("std", "list", "field", "hdr", "apikey", "file", "creds")
        for fmt in ((), ("--json",))
    ]
    for args in (
        ("status",),
        ("devices",),
        ("endpoints",),
        ("deliveries",),
        ("deliveries", "--status", "dead"),
        ("deliveries", "--status", "pending"),
    ):
        calls += [cli(*args), cli(*args, "--json")]
    for r in await asyncio.gather(*calls):
        if "--json" in r.args:
            json.loads(r.stdout)
    r = await cli("endpoints", "--json")
    urls = {e["name"]: e["url"] for e in json.loads(r.stdout)}
    assert "ops" not in urls["creds"] and "@" not in urls["creds"], urls["creds"]  # url without credentials
    await cli("endpoints", "disable", "list")
    await cli("endpoints", "enable", "list")
    await cli("deliveries", "replay", "--endpoint", "hdr", "--status", "dead")
    status, metrics = await d.admin("GET", "/v1/status")
    outputs.append(json.dumps(metrics))
    conn = aiohttp.UnixConnector(path=str(tmp_path / "admin.sock"))
    async with aiohttp.ClientSession(connector=conn) as s, s.get("http://webhookd/metrics") as resp:
        outputs.append(await resp.text())
    await asyncio.sleep(0.5)
    code = await d.stop()
    assert code == 0

    # The echoing receiver really did get the secrets (so a leak had every chance to happen).
    seen = " ".join(json.dumps(dict(h.headers)) + h.body.decode() for h in echo.hits)
    assert hdr_token in seen and s_field in seen

    logs = d.logs_text()
    lines = logs.splitlines()
    assert len(lines) > 50 and any('"delivery_failed"' in x for x in lines)
    assert "config_reload_failed" in logs and "config_reloaded" in logs
    corpus = {"log": lines, "cli": outputs}
    leaks = [
        f"{where}: {secret[:12]}... in {text[:300]!r}"
        for secret in secrets_all
        for where, texts in corpus.items()
        for text in texts
        for needle in _needles(secret)
        if needle in text
    ]
    assert not leaks, "\n".join(leaks[:10])
    print(
        f"\nsecrets checked: {len(secrets_all)} secrets/tokens against {len(lines)} log lines and "
        f"{len(outputs)} CLI/--json/admin outputs: no leak"
    )


def _needles(secret: str) -> list[str]:
    """The secret, and its random part alone (a partial redaction would still leak that)."""
    core = secret.removeprefix("whsec_").split("-")[-1]
    return [secret, core[:16]]


async def _wait_log(d: Daemon, event: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(r.get("event") == event for r in d.logs()):
        assert time.monotonic() < deadline, f"no {event} in the log:\n{d.logs_text()[-2000:]}"
        await asyncio.sleep(0.05)


# ----------------------------------------------------------------------------------- link-local blocking


class StubResolver:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        self.asked.append(host)
        out = []
        for addr in self.answers[host.lower()]:
            fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
            out.append({"hostname": host, "host": addr, "port": port, "family": fam, "proto": 0, "flags": 0})
        return out

    async def close(self) -> None:
        pass


ANSWERS = {
    "metadata.example": ["169.254.169.254"],
    "v6.example": ["fe80::1%eth0"],
    "v6plain.example": ["fe80::abcd"],
    "mapped.example": ["::ffff:169.254.1.1"],
    "edge.example": ["169.254.255.255", "169.254.0.0"],
    "mixed.example": ["169.254.169.254", "10.0.0.5", "fe80::1", "fd00::5"],
    "lan.example": ["127.0.0.1", "10.1.2.3", "192.168.1.20", "172.16.0.9", "::1", "fd12::1", "192.0.2.2"],
    "optin.example": ["169.254.169.254"],
}


async def test_guarded_resolver_drops_link_local_answers() -> None:
    r = GuardedResolver()
    await r.close()
    stub = StubResolver(ANSWERS)
    r._inner = stub  # type: ignore[assignment]
    for host in ("metadata.example", "v6.example", "v6plain.example", "mapped.example", "edge.example"):
        with pytest.raises(OSError, match="link-local"):
            await r.resolve(host, 80)
    kept = await r.resolve("mixed.example", 80)
    assert [x["host"] for x in kept] == ["10.0.0.5", "fd00::5"]
    lan = await r.resolve("lan.example", 80)
    assert [x["host"] for x in lan] == ANSWERS["lan.example"]  # loopback and private LAN are allowed
    r.allowed_hosts = {"optin.example"}  # an endpoint with allow_link_local: true
    assert [x["host"] for x in await r.resolve("OPTIN.example", 80)] == ["169.254.169.254"]
    with pytest.raises(OSError):
        await r.resolve("metadata.example", 80)  # the opt-in is per host
    for addr in ("169.254.169.254", "fe80::1", "fe80::1%lo", "::ffff:169.254.0.1", "FE80::1"):
        assert dispatch.is_link_local(addr), addr
    for addr in ("127.0.0.1", "10.0.0.1", "192.168.0.1", "::1", "fd00::1", "8.8.8.8", "example.com", ""):
        assert not dispatch.is_link_local(addr), addr


async def _wait_dead(d: Daemon, names: list[str], timeout: float = 15.0) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        status, rows = await d.admin("GET", "/v1/deliveries")
        assert status == 200, rows
        by = {r["endpoint"]: r for r in rows}
        if all(by.get(n, {}).get("status") in ("dead", "delivered") for n in names):
            return by
        assert time.monotonic() < deadline, rows
        await asyncio.sleep(0.05)


async def test_link_local_literals_are_refused_by_check_config_and_at_startup(daemon: DaemonFactory) -> None:
    """Link-local URLs written as literals never get as far as an attempt: check-config names them by key path
    and the daemon refuses to start on them (the delivery-time block, for names that resolve there, is tested in
    tests/test_sender_errors.py and below). No packet goes to 169.254/16: tests talk to loopback only."""
    d = await daemon(
        [
            ep("meta", "http://169.254.169.254/latest/meta-data/"),
            ep("v6", "http://[fe80::1]/hook"),
            ep("mapped", "http://[::ffff:169.254.169.254]/hook"),
            ep("optin", "http://169.254.0.1:9/hook", allow_link_local=True),
        ],
        start=False,
        check=False,
    )
    res = await d.cli("check-config")
    assert res.returncode != 0, res
    text = res.stdout + res.stderr
    for i in range(3):
        assert f"endpoints[{i}].url: link-local address" in text, text
    assert "endpoints[3]" not in text, text  # allow_link_local: true is the opt-in
    assert "Traceback" not in text
    await d.start(wait=False)
    assert await d.wait_exit() == 1
    invalid = [r for r in d.logs() if r.get("event") == "config_invalid"]
    assert invalid and any("endpoints[0].url" in p for p in invalid[0]["problems"]), d.logs_text()[-2000:]
    assert "Traceback" not in d.logs_text()


def _private_addresses() -> list[str]:
    """This machine's own non-loopback, non-link-local addresses (a LAN receiver would live on one)."""
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5, check=False).stdout
    except OSError:
        return []
    found = []
    for a in out.split():
        ip = ipaddress.ip_address(a.split("%")[0])
        if not ip.is_loopback and not ip.is_link_local and ip.is_private:
            found.append(str(ip))
    return found


class NamespacedDaemon(Daemon):
    """The daemon in its own mount namespace, with `hosts` bind-mounted over /etc/hosts for it alone."""

    hosts: Path

    def command(self) -> list[str]:
        # The daemon alone sees our /etc/hosts, in its own mount namespace; the machine's file is untouched.
        script = 'mount --bind "$1" /etc/hosts && shift && exec "$@"'
        prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(self.hosts)]
        return [*prefix, *super().command()]


def _can_unshare() -> str | None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare"
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount --bind /etc/hostname /etc/hosts"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    return None if r.returncode == 0 else f"unshare/mount refused: {r.stderr.strip()}"


@pytest.fixture
async def lan_receivers() -> AsyncIterator[list[tuple[str, Receiver]]]:
    started: list[tuple[str, Receiver]] = []
    for addr in _private_addresses()[:2]:
        r = Receiver()

        async def start_on(r: Receiver = r, addr: str = addr) -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", r._handle)
            r._runner = web.AppRunner(app, handle_signals=False, access_log=None)
            await r._runner.setup()
            await web.TCPSite(r._runner, addr, r.port).start()

        try:
            await start_on()
        except OSError:
            continue
        started.append((addr, r))
    yield started
    for _, r in started:
        await r.stop()


async def test_dns_names_resolving_to_link_local_are_blocked_lan_allowed(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path, lan_receivers: list[tuple[str, Receiver]]
) -> None:
    why = _can_unshare()
    if why is not None:
        pytest.skip(why)
    local = await receiver()
    hosts = tmp_path / "hosts"
    hosts.write_text(
        "127.0.0.1 localhost\n"
        "169.254.169.254 metadata.webhookd.test\n"
        "fe80::1 v6meta.webhookd.test\n"
        "127.0.0.1 receiver.webhookd.test\n"
        "169.254.0.1 optin.webhookd.test\n"
    )
    lan_eps = []
    for i, (addr, r) in enumerate(lan_receivers):
        host = f"[{addr}]" if ":" in addr else addr
        lan_eps.append(ep(f"lan{i}", f"http://{host}:{r.port}/hook"))
    d = await daemon(
        [
            ep("dns-meta", f"http://metadata.webhookd.test:{free_port()}/hook"),
            ep("dns-v6", f"http://v6meta.webhookd.test:{free_port()}/hook"),
            ep("dns-local", f"http://receiver.webhookd.test:{local.port}/hook"),
            ep("dns-optin", "http://optin.webhookd.test:9/hook", allow_link_local=True, timeout="300ms"),
            *lan_eps,
        ],
        cls=NamespacedDaemon,
        start=False,
        delivery={"retry_schedule": ["50ms"], "disable_after": 0},
        logging={"format": "json", "level": "info"},
    )
    d.hosts = hosts
    await d.start()
    await d.heartbeat("dns-dev")
    names = ["dns-meta", "dns-v6", "dns-local", "dns-optin", *(e["name"] for e in lan_eps)]
    by = await _wait_dead(d, names)
    assert await d.stop() == 0
    assert Path("/etc/hosts").read_text() != hosts.read_text()  # the machine's file was never touched
    for name, host in (("dns-meta", "metadata.webhookd.test"), ("dns-v6", "v6meta.webhookd.test")):
        assert by[name]["status"] == "dead", by[name]
        assert by[name]["last_error"] == f"blocked: link-local address ({host})", by[name]
    assert by["dns-local"]["status"] == "delivered", by["dns-local"]  # the private hosts file is in effect
    assert len(local.got) == 1
    assert "link-local" not in (by["dns-optin"]["last_error"] or ""), by["dns-optin"]
    for e in lan_eps:
        assert by[e["name"]]["status"] == "delivered", by[e["name"]]
    print(f"\nDNS: blocked dns-meta, dns-v6; delivered dns-local and LAN receivers {[a for a, _ in lan_receivers]}")


# ---------------------------------------------------------------------------------------- body bounds


async def test_request_bodies_are_bounded(daemon: DaemonFactory) -> None:
    udp_port = free_port()
    d = await daemon([], listen={"max_body": "1KiB", "udp": f"127.0.0.1:{udp_port}"})
    too_big = {"error": "request body larger than 1KiB (listen.max_body)"}
    big_name = {"device": "b", "name": "n" * 2000}
    assert await d.request("POST", "/v1/heartbeat", json=big_name) == (413, too_big)
    assert await d.request("POST", "/v1/heartbeats", json=[{"device": f"d{i}"} for i in range(100)]) == (
        413,
        too_big,
    )
    assert await d.request("POST", "/v1/heartbeat/b", json=big_name) == (413, too_big)

    async def chunked(path: str, payload: bytes) -> tuple[int, Any]:
        async def gen() -> AsyncIterator[bytes]:
            for i in range(0, len(payload), 100):
                yield payload[i : i + 100]

        return await d.request("POST", path, data=gen(), headers={"Content-Type": "application/json"}, chunked=True)

    # Chunked: no Content-Length to check up front; the read itself is bounded.
    assert await chunked("/v1/heartbeat", json.dumps(big_name).encode()) == (413, too_big)
    batch = json.dumps([{"device": f"d{i}"} for i in range(100)]).encode()
    assert await chunked("/v1/heartbeats", batch) == (413, too_big)
    status, answer = await chunked("/v1/heartbeat", b'{"device": "small-chunked"}')
    assert status == 200 and answer["changed"] is True
    # A Content-Length that lies (says small, sends more) cannot smuggle a bigger body either.
    reader, writer = await asyncio.open_connection("127.0.0.1", d.port)
    body = json.dumps(big_name).encode()
    writer.write(
        b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
    assert b" 413 " in head, head
    writer.close()
    # UDP: a datagram over max_body is dropped (and nothing recorded).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(json.dumps({"device": "udp-big", "name": "n" * 2000}).encode(), ("127.0.0.1", udp_port))
        s.sendto(b"udp-small", ("127.0.0.1", udp_port))
    for _ in range(100):
        _, devices = await d.admin("GET", "/v1/devices")
        if any(x["id"] == "udp-small" for x in devices):
            break
        await asyncio.sleep(0.05)
    assert {x["id"] for x in devices} == {"small-chunked", "udp-small"}
    assert await d.stop() == 0


async def test_a_dribbled_body_times_out_with_408() -> None:
    """listener.BODY_TIMEOUT bounds how long a request body may take (aiohttp bounds only its size)."""

    class Tracker:
        async def heartbeats(self, hbs: list[Any]) -> list[tuple[str, str, bool]]:
            return [(hb.device, "online", True) for hb in hbs]

        def heartbeat_nowait(self, hb: Any) -> tuple[str, str, bool]:
            return (hb.device, "online", True)

    api = HeartbeatAPI(Tracker(), [], max_body=1024, healthy=lambda: True)  # type: ignore[arg-type]
    assert api.body_timeout == listener.BODY_TIMEOUT == 30.0
    api.body_timeout = 0.5
    runner = web.ServerRunner(api.server(access_log=None), handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /v1/heartbeat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 30\r\n\r\n{"
        )
        started = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer and time.monotonic() - started < 5:
            writer.write(b" ")  # one byte every 100 ms: never complete
            with contextlib.suppress(TimeoutError):
                answer += await asyncio.wait_for(reader.read(4096), 0.1)
        took = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert 0.4 < took < 2.0, took
        writer.close()
        # A body that arrives in time is fine.
        async with (
            aiohttp.ClientSession() as s,
            s.post(f"http://127.0.0.1:{port}/v1/heartbeat", json={"device": "ok"}) as r,
        ):
            assert r.status == 200
    finally:
        await runner.cleanup()


# ------------------------------------------------------------------------------------ no shell / eval


FORBIDDEN = {
    "eval(": r"(?<![\w.])eval\(",
    "exec(": r"(?<![\w.])exec\(",
    "pickle": r"\bc?[Pp]ickle\b",
    "shell=True": r"shell\s*=\s*True",
    "os.system": r"\bos\.system\b",
    "os.popen": r"\bos\.popen\b",
    "subprocess": r"\bsubprocess\b",
    "marshal": r"\bmarshal\b",
    "yaml.load(": r"\byaml\.(load|load_all|unsafe_load|full_load)\(",
    "yaml.Loader": r"\byaml\.(Unsafe|Full)?Loader\b",
    "__import__": r"__import__\(",
}


def test_no_shell_eval_or_pickle_in_the_package() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) >= 10
    hits = []
    for f in files:
        for n, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]  # comments may mention them (e.g. "systemd.exec(5)")
            for what, pattern in FORBIDDEN.items():
                if re.search(pattern, code):
                    hits.append(f"{f.relative_to(PACKAGE.parent)}:{n}: {what}: {line.strip()}")
    assert not hits, "\n".join(hits)
    # The pattern would find one (the check is not vacuous).
    assert re.search(FORBIDDEN["eval("], "x = eval(s)") and re.search(FORBIDDEN["shell=True"], "shell = True")
