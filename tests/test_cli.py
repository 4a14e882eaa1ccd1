"""webhookd.cli (argument parsing, check-config, admin client, tables) and webhookd.sink."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from webhookd import api_types, cli, sink
from webhookd.cli import main, render_table

GOOD_CONFIG = """\
admin:
  socket: {socket}
endpoints:
  - name: ops
    url: http://127.0.0.1:9/hook
    events: [all]
    secret: s3cret
"""

BAD_CONFIG = """\
admin:
  socket: ./admin.sock
  sockett: x
endpoints:
  - name: ops
    url: ftp://example.com/hook
    events: [online, sideways]
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory (unix socket paths are limited to ~107 bytes; pytest's tmp_path can be longer)."""
    d = Path(tempfile.mkdtemp(prefix="whd", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def write_config(d: Path, socket_path: Path | str, name: str = "config.yaml") -> Path:
    p = d / name
    p.write_text(GOOD_CONFIG.format(socket=socket_path))
    return p


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------------------ gen-secret


def test_gen_secret_format(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(["gen-secret"], capsys)
    assert rc == 0 and err == ""
    secret = out.strip()
    assert out == secret + "\n"
    assert re.fullmatch(r"whsec_[A-Za-z0-9+/]{43}=", secret)
    assert len(base64.b64decode(secret.removeprefix("whsec_"))) == 32
    _, out2, _ = run(["gen-secret"], capsys)
    assert out2.strip() != secret


# ---------------------------------------------------------------------------------------------- check-config


def test_check_config_good(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, "./admin.sock")
    rc, out, err = run(["check-config", "-c", str(cfg)], capsys)
    assert rc == 0, err
    assert err == ""
    assert out.count("\n") == 1 and "ops" in out


def test_check_config_from_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(tmp_path, "./admin.sock")
    monkeypatch.setenv("WEBHOOKD_CONFIG", str(cfg))
    rc, _out, err = run(["check-config"], capsys)
    assert rc == 0, err


def test_check_config_bad_lists_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(BAD_CONFIG)
    rc, out, err = run(["check-config", "--config", str(cfg)], capsys)
    assert rc == 1
    assert out == ""
    problems = err.splitlines()
    assert len(problems) >= 3
    assert all(line.startswith("config error: ") for line in problems)
    assert any("admin.sockett" in line for line in problems)
    assert any("endpoints[0].url" in line for line in problems)
    assert any("endpoints[0].events" in line for line in problems)
    assert "Traceback" not in err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _out, err = run(["-c", str(tmp_path / "nope.yaml"), "check-config"], capsys)
    assert rc == 1
    assert err.startswith("config error: ") and "nope.yaml" in err


# ------------------------------------------------------------------------------------------ daemon not running


@pytest.mark.parametrize(
    "argv",
    [
        ["status"],
        ["devices"],
        ["devices", "--state", "online", "--json"],
        ["endpoints"],
        ["endpoints", "enable", "ops"],
        ["endpoints", "test", "ops"],
        ["deliveries", "--status", "dead"],
        ["deliveries", "replay", "1", "2"],
    ],
)
def test_not_running_exits_3(argv: list[str], short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = short_dir / "missing" / "admin.sock"
    cfg = write_config(short_dir, sock)
    rc, out, err = run([*argv, "-c", str(cfg)], capsys)
    assert rc == 3
    assert out == ""
    assert err == f"webhookd is not running (no admin socket at {sock})\n"


def test_stale_socket_file_is_not_running(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sock = short_dir / "admin.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock))  # bound, never listening: ECONNREFUSED, like a socket left behind by a killed daemon
    s.close()
    cfg = write_config(short_dir, sock)
    rc, _, err = run(["-c", str(cfg), "status"], capsys)
    assert rc == 3
    assert "webhookd is not running" in err


def test_relative_socket_resolves_against_config_dir(
    short_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(short_dir, "./run/admin.sock")
    monkeypatch.chdir("/")
    rc, _, err = run(["status", "-c", str(cfg)], capsys)
    assert rc == 3
    assert str(short_dir / "run" / "admin.sock") in err


def test_invalid_config_still_finds_the_socket(
    short_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config the daemon cannot load as a whole (a secret only set in the service's environment, or a
    refused reload) must not lock the operator out of the running daemon."""
    monkeypatch.delenv("WEBHOOKD_TEST_ONLY_IN_SERVICE", raising=False)
    cfg = short_dir / "config.yaml"
    cfg.write_text(
        f"admin:\n  socket: {short_dir}/admin.sock\nendpoints:\n  - name: ops\n"
        "    url: http://127.0.0.1:9/\n    events: [all]\n    secret: ${WEBHOOKD_TEST_ONLY_IN_SERVICE}\n"
    )
    rc, _, err = run(["status", "-c", str(cfg)], capsys)
    assert rc == 3
    assert f"no admin socket at {short_dir}/admin.sock" in err


def test_unreadable_config_for_admin_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _out, err = run(["status", "-c", str(tmp_path / "absent.yaml")], capsys)
    assert rc == 1
    assert err.startswith("config error: ")
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("admin: [1\n")
    rc, _out, err = run(["status", "-c", str(cfg)], capsys)
    assert rc == 1 and "config error: " in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------- argument parsing


def parse(argv: list[str]) -> Any:
    return cli.build_parser().parse_args(argv)


def test_config_option_before_or_after_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEBHOOKD_CONFIG", raising=False)
    assert cli.config_path(parse(["-c", "/a.yaml", "status"])) == "/a.yaml"
    assert cli.config_path(parse(["status", "-c", "/b.yaml"])) == "/b.yaml"
    assert cli.config_path(parse(["endpoints", "enable", "ops", "--config", "/c.yaml"])) == "/c.yaml"
    assert cli.config_path(parse(["-c", "/a.yaml", "deliveries", "replay", "1"])) == "/a.yaml"
    assert cli.config_path(parse(["status"])) == "/etc/webhookd/config.yaml"
    monkeypatch.setenv("WEBHOOKD_CONFIG", "/env.yaml")
    assert cli.config_path(parse(["status"])) == "/env.yaml"
    assert cli.config_path(parse(["-c", "/x.yaml", "status"])) == "/x.yaml"


def test_subcommand_arguments() -> None:
    a = parse(["devices", "--state", "offline", "--json"])
    assert a.state == "offline" and a.json is True and a.handler is cli.cmd_devices
    a = parse(["endpoints", "--json", "test", "ops"])
    assert a.action == "test" and a.name == "ops" and a.json is True
    a = parse(["endpoints", "disable", "ops", "--json"])
    assert a.action == "disable" and a.json is True
    a = parse(["deliveries", "--status", "pending", "--endpoint", "ops", "--limit", "5"])
    assert (a.status, a.endpoint, a.limit) == ("pending", "ops", 5)
    a = parse(["deliveries", "replay", "3", "4"])
    assert a.action == "replay" and a.ids == [3, 4]
    a = parse(["deliveries", "replay", "--endpoint", "ops", "--status", "dead"])
    assert a.ids == [] and a.endpoint == "ops" and a.status == "dead"
    a = parse(["sink"])
    assert (a.port, a.host, a.secret) == (8479, "127.0.0.1", None)
    a = parse(["sink", "--port", "9000", "--host", "0.0.0.0", "--secret", "a", "--secret", "b"])
    assert (a.port, a.host, a.secret) == (9000, "0.0.0.0", ["a", "b"])
    assert parse(["run"]).handler is cli.cmd_run


def test_json_before_or_after_the_command() -> None:
    for argv in (["--json", "status"], ["status", "--json"], ["--json", "endpoints", "disable", "ops"]):
        assert parse(argv).json is True, argv
    a = parse(["--json", "-c", "/a.yaml", "deliveries", "replay", "1"])
    assert a.json is True and a.config == "/a.yaml" and a.ids == [1]
    assert not hasattr(parse(["status"]), "json")


def _all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield from _all_parsers(child)


def test_every_option_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parsers = list(_all_parsers(cli.build_parser()))
    assert len(parsers) >= 13
    for p in parsers:
        for action in p._actions:
            assert action.help and action.help is not argparse.SUPPRESS, (p.prog, action.option_strings or action.dest)
    rc, out, _ = run(["deliveries", "--help"], capsys)
    assert rc == 0 and "only this status" in out and "default 100" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-c", "/a.yaml", "gen-secret"], "gen-secret reads no config"),
        (["--config", "/a.yaml", "sink"], "sink reads no config"),
        # after the command, the same words as before it (not argparse's "unrecognized arguments")
        (["gen-secret", "-c", "/a.yaml"], "gen-secret reads no config"),
        (["gen-secret", "--config=/a.yaml"], "gen-secret reads no config"),
        (["sink", "--port", "0", "-c", "/a.yaml"], "sink reads no config"),
        (["sink", "-c/a.yaml"], "sink reads no config"),
        (["--json", "gen-secret"], "gen-secret has no JSON output"),
        (["--json", "run"], "run has no JSON output"),
        (["check-config", "--json"], "check-config has no JSON output"),
        (["sink", "--json"], "sink has no JSON output"),
        # anything else left over is still argparse's error
        (["gen-secret", "--bogus"], "unrecognized arguments: --bogus"),
        (["status", "extra"], "unrecognized arguments: extra"),
    ],
)
def test_gen_secret_and_sink_refuse_config(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(argv, capsys)
    assert (rc, out) == (2, "") and message in err
    assert err.startswith("usage: webhookd") and err.count("webhookd: error:") == 1, err


def test_help_says_gen_secret_and_sink_refuse_config(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("gen-secret", "sink"):
        rc, out, _ = run([command, "--help"], capsys)
        assert rc == 0 and "-c is refused" in " ".join(out.split()) and "--config" not in out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["devices", "--state", "sideways"],
        ["endpoints", "test"],
        ["deliveries", "--limit", "0"],
        ["deliveries", "--status", "lost"],
        ["sink", "--port", "70000"],
        ["gen-secret", "--json"],
        ["deliveries", "replay", "evt_123"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, _out, err = run(argv, capsys)
    assert rc == 2
    assert "Traceback" not in err


def test_replay_needs_ids_or_endpoint(short_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(short_dir, short_dir / "admin.sock")
    rc, _, err = run(["deliveries", "replay", "-c", str(cfg)], capsys)
    assert rc == 2 and "replay" in err
    rc, _, err = run(["deliveries", "replay", "1", "--endpoint", "ops", "-c", str(cfg)], capsys)
    assert rc == 2 and "not both" in err


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(["--version"], capsys)
    assert rc == 0 and out.startswith("webhookd ")
    rc, out, _ = run(["--help"], capsys)
    assert rc == 0
    for command in ("run", "check-config", "status", "devices", "endpoints", "deliveries", "gen-secret", "sink"):
        assert command in out


def test_unexpected_error_and_interrupt(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(args: Any) -> int:
        raise RuntimeError("kaput")

    monkeypatch.setattr(cli, "cmd_gen_secret", boom)
    rc, out, err = run(["gen-secret"], capsys)
    assert rc == 2
    assert err == "error: RuntimeError: kaput\n"

    def interrupted(args: Any) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_gen_secret", interrupted)
    rc, out, err = run(["gen-secret"], capsys)
    assert rc == 130 and out == "" and err == ""


def test_run_calls_the_daemon(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    seen: list[str] = []
    fake = types.ModuleType("webhookd.daemon")

    def fake_run(config_path: str) -> int:
        seen.append(config_path)
        return 0

    fake.run = fake_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "webhookd.daemon", fake)
    rc, _, _ = run(["run", "-c", "/x/config.yaml"], capsys)
    assert rc == 0 and seen == ["/x/config.yaml"]


# ------------------------------------------------------------------------------------------------------ tables


def test_table_fits_100_columns_and_cuts_with_ellipsis() -> None:
    rows = [
        [
            "printer-" + "x" * 120,
            "Front desk printer with a very long display name indeed",
            "online",
            "2m ago",
            "10.0.0.1",
        ],
        ["d2", "n", "offline", "3h ago", "fe80::1234:5678:9abc:def0:1234:5678:9abc:def0:1234"],
    ]
    text = render_table(["ID", "NAME", "STATE", "LAST SEEN", "ADDRESS"], rows)
    out = text.splitlines()
    assert len(out) == 3
    assert all(len(line) <= 100 for line in out)
    assert "…" in out[1]
    assert out[0].startswith("ID")
    # columns stay aligned: STATE starts at the same place on every line
    col = out[0].index("STATE")
    assert out[1][col:].startswith("online") and out[2][col:].startswith("offline")


def test_flexible_columns_give_way_first() -> None:
    rows = [["keep-this-whole-" + "k" * 30, "cut " * 40, "x" * 30]]
    out = render_table(["A", "B", "C"], rows, flexible=(1,)).splitlines()
    assert all(len(line) <= 100 for line in out)
    assert "keep-this-whole-" + "k" * 30 in out[1] and "x" * 30 in out[1]
    assert "…" in out[1]


def test_short_table_is_not_cut() -> None:
    text = render_table(["A", "BB"], [["1", "two"], ["three", "4"]])
    assert text.splitlines() == ["A      BB", "1      two", "three  4"]
    assert "…" not in text


def test_table_with_many_wide_columns_still_fits() -> None:
    headers = [f"H{i}" for i in range(12)]
    rows = [["v" * 40 for _ in headers]]
    assert all(len(line) <= 100 for line in render_table(headers, rows).splitlines())


def test_cut_and_times() -> None:
    assert cli.cut("hello", 5) == "hello"
    assert cli.cut("hello world", 6) == "hello…"
    assert cli.cut("line\nbreak", 20) == "line break"
    now = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)
    assert cli.format_time(None, now) == "-"
    assert cli.format_time("2026-11-22T11:58:00.000Z", now) == "2m 0s ago"
    assert cli.format_time("2026-11-22T12:05:59.478Z", now) == "in 5m 59s"
    assert cli.format_time("2026-11-22T12:00:30Z", now) == "in 30s"
    assert cli.format_time("2026-11-22T09:30:00Z", now) == "2h 30m ago"
    assert cli.format_time("2026-10-01T08:15:00Z", now) == "2026-10-01 08:15Z"
    assert cli.format_duration(3 * 86400 + 4 * 3600 + 5) == "3d 4h"
    # as people read them (issue 10, item 9), the way the console log writes them
    durations = {0.4: "0s", 42: "42s", 359.478: "5m 59s", 360: "6m 0s", 3599: "59m 59s", 3600: "1h", 7500: "2h 5m"}
    assert {s: cli.format_duration(s) for s in durations} == durations


# -------------------------------------------------------------------------------- admin client (fake daemon)

NOW = datetime.now(UTC)


def iso(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


STATUS: dict[str, Any] = {
    "version": "0.1.0",
    "pid": 4242,
    "started_at": iso(NOW - timedelta(hours=3, minutes=12)),
    "uptime_s": 11520.5,
    "devices": {"online": 10, "offline": 1, "utilizing": 1, "unplugged": 0, "total": 12},
    "endpoints": {"enabled": 2, "disabled": 1},
    "deliveries": {"pending": 3, "held": 4, "delivered": 1520, "dead": 1},
    "store": {"healthy": True},
    "mqtt": None,
}
DEVICES: list[dict[str, Any]] = [
    {
        "id": "printer-17",
        "name": "Front desk",
        "state": "online",
        "address": "10.0.0.17",
        "owner": "ops@example.com",
        "last_seen": iso(NOW - timedelta(seconds=42)),
        "muted": True,
        "muted_until": iso(NOW + timedelta(hours=1)),
        "source": "http",
        "stale": None,  # a hub's answer says true or false: its gateway is offline (or not)
    },
    {
        "id": "sensor-" + "9" * 90,
        "name": None,
        "state": "offline",
        "address": None,
        "owner": None,
        "last_seen": iso(NOW - timedelta(days=30)),
        "muted": False,
        "muted_until": None,
        "source": "mqtt",
        "stale": None,
    },
]
ENDPOINT_OPS: dict[str, Any] = {
    "name": "ops",
    "url": "https://hooks.example.com/devices",
    "enabled": True,
    "disabled_reason": None,
    "consecutive_failures": 0,
    "pending": 2,
    "held": 0,
    "delivered": 1500,
    "dead": 1,
    "last_error": None,
}
ENDPOINTS: list[dict[str, Any]] = [
    ENDPOINT_OPS,
    {
        **ENDPOINT_OPS,
        "name": "legacy",
        "enabled": False,
        "disabled_reason": "gone (HTTP 410)",
        "consecutive_failures": 20,
        "held": 4,
        "last_error": "HTTP 410 Gone: " + "the endpoint has been removed " * 8,
    },
]
DELIVERIES: list[dict[str, Any]] = [
    {
        "id": 101,
        "event_id": "evt_" + "a" * 32,
        "endpoint": "ops",
        "device": "printer-17",
        "type": "device.online",
        "status": "pending",
        "attempts": 2,
        "next_attempt_at": iso(NOW + timedelta(minutes=5, seconds=30)),
        "last_status": 503,
        "last_error": "HTTP 503",  # as the daemon words it (webhookd/dispatch/sender.py)
        "created_at": iso(NOW - timedelta(minutes=6)),
    },
    {
        "id": 102,
        "event_id": "evt_" + "b" * 32,
        "endpoint": "legacy",
        "device": "sensor-1",
        "type": "device.address_changed",
        "status": "dead",
        "attempts": 8,
        "next_attempt_at": None,
        "last_status": None,
        "last_error": "connection refused " * 10,
        "created_at": iso(NOW - timedelta(days=2)),
    },
]

REPLAYED: dict[str, Any] = {"replayed": 5, "held": 0, "held_endpoints": {}, "missing": []}
REPLAYED_HELD: dict[str, Any] = {"replayed": 4, "held": 4, "held_endpoints": {"legacy": "disabled"}, "missing": []}
UNKNOWN_ID = 99999  # FakeAdmin has no delivery with this id or above


def replayed_answer(body: dict[str, Any]) -> dict[str, Any]:
    """FakeAdmin's POST /v1/deliveries/replay: delivery 102 and endpoint legacy are held (legacy is disabled)."""
    if "ids" not in body:
        return REPLAYED_HELD if body.get("endpoint") == "legacy" else REPLAYED
    found = [i for i in body["ids"] if i < UNKNOWN_ID]
    held = found.count(102)
    return {
        "replayed": len(found),
        "held": held,
        "held_endpoints": {"legacy": "disabled"} if held else {},
        "missing": [i for i in body["ids"] if i >= UNKNOWN_ID],
    }


class FakeAdmin:
    """A canned admin API on a unix socket, served from a thread (the CLI under test is blocking)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[tuple[str, str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None
        self.wrong: dict[str, bytes] = {}  # path -> a 200 answer that replaces the canned one

    async def handle(self, request: web.Request) -> web.Response:
        body: Any = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path_qs, body))
        path, m = request.path, request.method
        if path in self.wrong:
            return web.Response(body=self.wrong[path], content_type="application/json")
        if m == "GET" and path == "/v1/status":
            return web.json_response(STATUS)
        if m == "GET" and path == "/v1/devices":
            state = request.query.get("state")
            return web.json_response([d for d in DEVICES if state in (None, d["state"])])
        if m == "GET" and path == "/v1/endpoints":
            return web.json_response(ENDPOINTS)
        if m == "GET" and path == "/v1/deliveries":  # like admin.py: the rows only, at most ?limit= (100)
            return web.json_response(DELIVERIES[: int(request.query.get("limit", "100"))])
        if m == "POST" and path == "/v1/deliveries/replay":
            if body.get("endpoint") == "nope":
                return web.json_response({"error": "unknown endpoint 'nope'"}, status=404)
            return web.json_response(replayed_answer(body))
        ep = re.fullmatch(r"/v1/endpoints/([^/]+)/(enable|disable|test)", path)
        if m == "POST" and ep:
            name, action = ep.group(1), ep.group(2)
            if name not in ("ops", "one", "bad", "down"):
                return web.json_response({"error": "unknown endpoint"}, status=404)
            if action == "test":
                if name == "bad":
                    return web.json_response(
                        {"endpoint": name, "ok": False, "status": 500, "latency_ms": 8.25, "error": "HTTP 500"}
                    )
                if name == "down":
                    return web.json_response(
                        {
                            "endpoint": name,
                            "ok": False,
                            "status": None,
                            "latency_ms": 1.0,
                            "error": "connection refused",
                        }
                    )
                return web.json_response(
                    {"endpoint": name, "ok": True, "status": 200, "latency_ms": 12.34, "error": None}
                )
            n = 1 if name == "one" else 2  # endpoint "one" has one delivery pending (enable) or held (disable)
            enabled = action == "enable"
            return web.json_response(
                {
                    **ENDPOINT_OPS,
                    "name": name,
                    "enabled": enabled,
                    "pending": n if enabled else 0,
                    "held": 0 if enabled else n,
                }
            )
        if path == "/v1/explode":
            return web.Response(status=500, text="Internal Server Error")
        return web.json_response({"error": f"no route {path}"}, status=404)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.UnixSite(self.runner, str(self.path)).start()

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def fake_admin(short_dir: Path) -> Iterator[tuple[FakeAdmin, Path]]:
    server = FakeAdmin(short_dir / "admin.sock")
    server.start()
    cfg = write_config(short_dir, server.path)
    try:
        yield server, cfg
    finally:
        server.stop()


def test_status(fake_admin: tuple[FakeAdmin, Path], capsys: pytest.CaptureFixture[str]) -> None:
    server, cfg = fake_admin
    rc, out, err = run(["status", "-c", str(cfg)], capsys)
    assert rc == 0, err
    assert out.startswith("webhookd 0.1.0, pid 4242, up 3h 12m")
    assert "12 (10 online, 1 utilizing, 0 unplugged, 1 offline)" in out
    assert "2 enabled, 1 disabled" in out
    assert "3 pending, 4 held, 1520 delivered, 1 dead" in out
    assert server.requests == [("GET", "/v1/status", None)]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["status"], STATUS),
        (["devices"], DEVICES),
        (["endpoints"], ENDPOINTS),
        (["deliveries"], DELIVERIES),
    ],
)
def test_json_is_the_api_document(
    argv: list[str], expected: Any, fake_admin: tuple[FakeAdmin, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, cfg = fake_admin
    rc, out, err = run([*argv, "--json", "-c", str(cfg)], capsys)
    assert rc == 0, err
    assert json.loads(out) == expected


def test_devices_table(fake_admin: tuple[FakeAdmin, Path], capsys: pytest.CaptureFixture[str]) -> None:
    server, cfg = fake_admin
    rc, out, _ = run(["devices", "-c", str(cfg)], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "NAME", "STATE", "MUTED", "LAST", "SEEN", "ADDRESS", "SOURCE"]
    until = (NOW + timedelta(hours=1)).astimezone(UTC).strftime("%H:%M")
    assert lines[1].split()[4:6] == ["until", f"{until}Z"]
    assert lines[2].split()[2:4] == ["offline", "-"]
    assert all(len(line) <= 100 for line in lines)
    # NOW is fixed at import: a slow suite makes "42s ago" older, never newer.
    assert "printer-17" in lines[1] and re.search(r"\d+[sm] ago", lines[1]) and "10.0.0.17" in lines[1]
    assert "…" in lines[2] and lines[2].endswith("mqtt")  # the long id is cut
    rc, out, _ = run(["devices", "--state", "online", "-c", str(cfg)], capsys)
    assert server.requests[-1][1] == "/v1/devices?state=online"
    assert len(out.splitlines()) == 2


def test_endpoints_table(fake_admin: tuple[FakeAdmin, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, cfg = fake_admin
    rc, out, _ = run(["endpoints", "-c", str(cfg)], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert len(lines) == 3
    assert all(len(line) <= 100 for line in lines)
    assert "enabled" in lines[1]
    assert "disabled (gone (HTTP 410))" in lines[2]
    assert lines[2].endswith("…")
    assert lines[0].index("LAST ERROR") == lines[2].index("HTTP 410 Gone")


def test_deliveries_table_and_query(fake_admin: tuple[FakeAdmin, Path], capsys: pytest.CaptureFixture[str]) -> None:
    server, cfg = fake_admin
    rc, out, _ = run(
        ["deliveries", "--status", "dead", "--endpoint", "legacy", "--limit", "20", "-c", str(cfg)], capsys
    )
    assert rc == 0
    assert server.requests[-1][1] == "/v1/deliveries?status=dead&endpoint=legacy&limit=20"
    lines = out.splitlines()
    assert all(len(line) <= 100 for line in lines)
    assert "101" in lines[1] and re.search(r"in [1-5]m", lines[1]) and "503" in lines[1]
    assert " HTTP 503 " in lines[1] and "503 HTTP 503" not in lines[1]  # the status is said once


def test_last_result_says_the_status_once() -> None:
    row = msgspec.convert(DELIVERIES[0], api_types.DeliveryInfo)
    result = cli.deliveries._last_result
    assert result(msgspec.structs.replace(row, last_error="redirect 302 not followed", last_status=302)) == (
        "redirect 302 not followed"
    )
    assert result(row) == "HTTP 503"
    assert result(msgspec.structs.replace(row, last_error="Service Unavailable")) == "503 Service Unavailable"
    assert result(msgspec.structs.replace(row, last_error=None, last_status=200)) == "200"
    assert result(msgspec.structs.replace(row, last_error="timeout after 5s", last_status=None)) == "timeout after 5s"
    assert result(msgspec.structs.replace(row, last_error=None, last_status=None)) == "-"


def test_deliveries_cut_by_the_limit(fake_admin: tuple[FakeAdmin, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, cfg = fake_admin
    assert len(DELIVERIES) == 2
    rc, out, err = run(["deliveries", "--limit", "1", "-c", str(cfg)], capsys)
    assert rc == 0 and len(out.splitlines()) == 2
    assert err == "1 shown (limit 1; --limit N for more)\n"
    rc, out, err = run(["deliveries", "--limit", "3", "-c", str(cfg)], capsys)
    assert rc == 0 and len(out.splitlines()) == 3 and err == ""
    rc, out, err = run(["deliveries", "-c", str(cfg)], capsys)  # the daemon's default limit, 100
    assert rc == 0 and err == ""
    rc, out, err = run(["deliveries", "--limit", "1", "--json", "-c", str(cfg)], capsys)
    assert rc == 0 and json.loads(out) == DELIVERIES[:1] and err == ""
    assert cli.deliveries._cut_line(1035, 1035) == "1,035 shown (limit 1,035; --limit N for more)"


def test_plurals() -> None:
    assert [cli.render.n_deliveries(n) for n in (0, 1, 2, 1035)] == [
        "0 deliveries",
        "1 delivery",
        "2 deliveries",
        "1,035 deliveries",
    ]


def test_endpoint_enable_disable(fake_admin: tuple[FakeAdmin, Path], capsys: pytest.CaptureFixture[str]) -> None:
    server, cfg = fake_admin
    rc, out, _ = run(["endpoints", "enable", "ops", "-c", str(cfg)], capsys)
    assert rc == 0 and out == "endpoint 'ops' enabled (2 deliveries pending)\n"
    assert server.requests[-1][:2] == ("POST", "/v1/endpoints/ops/enable")
    rc, out, _ = run(["endpoints", "enable", "one", "-c", str(cfg)], capsys)
    assert rc == 0 and out == "endpoint 'one' enabled (1 delivery pending)\n"
    rc, out, _ = run(["endpoints", "disable", "one", "-c", str(cfg)], capsys)
    assert rc == 0 and out == "endpoint 'one' disabled (1 delivery held)\n"
    rc, out, _ = run(["endpoints", "disable", "ops", "-c", str(cfg)], capsys)
    assert rc == 0 and out == "endpoint 'ops' disabled (2 deliveries held)\n"
    rc, out, _ = run(["endpoints", "disable", "ops", "--json", "-c", str(cfg)], capsys)
    assert rc == 0 and json.loads(out)["enabled"] is False


def test_unknown_endpoint(fake_admin: tuple[FakeAdmin, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, cfg = fake_admin
    for action in ("enable", "disable", "test"):
        rc, out, err = run(["endpoints", action, "x", "-c", str(cfg)], capsys)
        assert rc == 1
        assert err == "unknown endpoint 'x'\n"
        assert out == ""


def test_endpoint_test(fake_admin: tuple[FakeAdmin, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, cfg = fake_admin
    rc, out, _ = run(["endpoints", "test", "ops", "-c", str(cfg)], capsys)
    assert rc == 0 and out == "ops: 200 OK in 12.3 ms\n"
    rc, _, err = run(["endpoints", "test", "bad", "-c", str(cfg)], capsys)
    assert (rc, err) == (1, "bad: 500 Internal Server Error in 8.2 ms\n")  # not again as "(HTTP 500)"
    rc, _, err = run(["endpoints", "test", "down", "-c", str(cfg)], capsys)
    assert rc == 1 and "connection refused" in err
    rc, out, _ = run(["endpoints", "test", "bad", "--json", "-c", str(cfg)], capsys)
    assert rc == 1 and json.loads(out)["status"] == 500
    moved = api_types.EndpointTestResult("ops", False, 302, 3.0, "redirect 302 not followed")
    assert cli.commands._print_test("ops", moved, None) == 1
    assert capsys.readouterr().err == "ops: 302 Found in 3.0 ms (redirect 302 not followed)\n"


def last_body(server: FakeAdmin) -> Any:
    return server.requests[-1][2]


def test_replay(fake_admin: tuple[FakeAdmin, Path], capsys: pytest.CaptureFixture[str]) -> None:
    server, cfg = fake_admin
    rc, out, _ = run(["deliveries", "replay", "101", "-c", str(cfg)], capsys)
    assert rc == 0 and out == "replayed 1 delivery\n"
    assert server.requests[-1] == ("POST", "/v1/deliveries/replay", {"ids": [101]})
    rc, out, _ = run(["deliveries", "replay", "--endpoint", "ops", "--status", "dead", "-c", str(cfg)], capsys)
    assert rc == 0 and out == "replayed 5 deliveries\n"
    assert last_body(server) == {"endpoint": "ops", "status": "dead"}
    rc, out, _ = run(["deliveries", "replay", "--endpoint", "ops", "--json", "-c", str(cfg)], capsys)
    assert rc == 0 and json.loads(out) == REPLAYED
    assert last_body(server) == {"endpoint": "ops", "status": "dead"}
    rc, _, err = run(["deliveries", "replay", "--endpoint", "nope", "-c", str(cfg)], capsys)
    assert rc == 1 and err == "unknown endpoint 'nope'\n"


def test_replay_says_what_is_held(fake_admin: tuple[FakeAdmin, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Rows of a disabled endpoint go to held, not to pending: the line says what releases them."""
    _server, cfg = fake_admin
    rc, out, err = run(["deliveries", "replay", "--endpoint", "legacy", "-c", str(cfg)], capsys)
    assert (rc, err) == (0, "")
    assert out == "replayed 4 deliveries, held until 'webhookd endpoints enable legacy'\n"
    rc, out, _ = run(["deliveries", "replay", "101", "102", "-c", str(cfg)], capsys)
    assert rc == 0 and out == "replayed 2 deliveries, 1 held until 'webhookd endpoints enable legacy'\n"
    rc, out, _ = run(["deliveries", "replay", "--endpoint", "legacy", "--json", "-c", str(cfg)], capsys)
    assert rc == 0 and json.loads(out) == REPLAYED_HELD


@pytest.mark.parametrize(
    ("answer", "line"),
    [
        (
            {"replayed": 1, "held": 1, "held_endpoints": {"old": "not configured"}, "missing": []},
            "replayed 1 delivery, held until endpoint 'old' is configured again",
        ),
        (
            {"replayed": 3, "held": 2, "held_endpoints": {}, "missing": []},
            "replayed 3 deliveries, 2 held until their endpoints are enabled (see 'webhookd endpoints')",
        ),
        (
            {"replayed": 2, "held": 2, "held_endpoints": {"b": "disabled", "a": "disabled"}, "missing": []},
            "replayed 2 deliveries, held until 'webhookd endpoints enable a' and 'webhookd endpoints enable b'",
        ),
        ({"replayed": 2}, "replayed 2 deliveries"),  # a daemon from before `held` and `missing`
    ],
)
def test_replay_held_wording(
    answer: dict[str, Any], line: str, fake_admin: tuple[FakeAdmin, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    server, cfg = fake_admin
    server.wrong["/v1/deliveries/replay"] = json.dumps(answer).encode()
    rc, out, err = run(["deliveries", "replay", "7", "8", "-c", str(cfg)], capsys)
    assert (rc, out, err) == (0, line + "\n", "")


def test_replay_names_unknown_ids(fake_admin: tuple[FakeAdmin, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """An id no delivery has is named on stderr, and the exit code is 1 (the rest is still replayed)."""
    _server, cfg = fake_admin
    rc, out, err = run(["deliveries", "replay", str(UNKNOWN_ID), "-c", str(cfg)], capsys)
    assert (rc, out, err) == (1, "", f"no delivery {UNKNOWN_ID}\n")
    rc, out, err = run(["deliveries", "replay", "101", "100000", str(UNKNOWN_ID), "-c", str(cfg)], capsys)
    assert (rc, out, err) == (1, "replayed 1 delivery\n", f"no deliveries 100000, {UNKNOWN_ID}\n")
    many = [str(UNKNOWN_ID + i) for i in range(15)]
    rc, out, err = run(["deliveries", "replay", *many, "-c", str(cfg)], capsys)
    assert rc == 1 and out == ""
    assert err == "no deliveries " + ", ".join(many[:10]) + " and 5 more\n"
    rc, out, err = run(["deliveries", "replay", "101", str(UNKNOWN_ID), "--json", "-c", str(cfg)], capsys)
    assert (rc, err) == (1, "")
    assert json.loads(out) == {"replayed": 1, "held": 0, "held_endpoints": {}, "missing": [UNKNOWN_ID]}


def test_client_errors(fake_admin: tuple[FakeAdmin, Path]) -> None:
    server, _ = fake_admin
    client = cli.AdminClient(server.path)
    with pytest.raises(cli.AdminError) as e404:
        client.get("/v1/nothing", object)
    assert e404.value.status == 404 and e404.value.message == "no route /v1/nothing"
    with pytest.raises(cli.AdminError) as e500:
        client.get("/v1/explode", object)
    assert e500.value.status == 500 and "Internal Server Error" in e500.value.message
    assert client.get("/v1/status", object) == STATUS
    assert client.get("/v1/status", api_types.Status).devices.total == 12


def test_a_device_answer_without_muted_decodes_as_not_muted() -> None:
    """A daemon older than mutes sends no muted / muted_until."""
    older = {k: v for k, v in DEVICES[0].items() if k not in ("muted", "muted_until")}
    info = msgspec.json.decode(msgspec.json.encode(older), type=api_types.DeviceInfo)
    assert info.muted is False and info.muted_until is None


def test_devices_mute_unmute_forget_parse_with_help() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["devices", "mute", "printer-*", "--for", "2h", "--reason", "monthly service"])
    assert (args.action, args.match, args.for_, args.reason) == ("mute", "printer-*", "2h", "monthly service")
    assert parser.parse_args(["devices", "unmute", "printer-*", "--json"]).json is True
    assert parser.parse_args(["devices", "forget", "old-1"]).id == "old-1"
    assert parser.parse_args(["devices", "--state", "offline"]).state == "offline"
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["devices"]
    actions = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("mute", "unmute", "forget"):
        for action in actions.choices[name]._actions:
            assert action.help, f"devices {name}: {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize(
    ("document", "shape"),
    [
        (STATUS, api_types.Status),
        *((d, api_types.DeviceInfo) for d in DEVICES),
        *((e, api_types.EndpointInfo) for e in ENDPOINTS),
        *((d, api_types.DeliveryInfo) for d in DELIVERIES),
        (REPLAYED, api_types.Replayed),
        (REPLAYED_HELD, api_types.Replayed),
        (replayed_answer({"ids": [101, 102, UNKNOWN_ID]}), api_types.Replayed),
    ],
)
def test_canned_answers_are_the_api_shapes(document: dict[str, Any], shape: type[msgspec.Struct]) -> None:
    """FakeAdmin answers what api_types describes (and admin.py sends): exactly these fields, these types."""
    assert set(document) == set(shape.__struct_fields__)
    msgspec.json.decode(msgspec.json.encode(document), type=shape)


@pytest.mark.parametrize(
    ("argv", "path", "answer", "expected"),
    [
        (["status"], "/v1/status", b"<html>oops</html>", "not JSON"),
        (["status"], "/v1/status", b"[]", "Expected `object`, got `array`"),
        (["devices"], "/v1/devices", b'{"devices": []}', "Expected `array`, got `object`"),
        (
            ["devices"],
            "/v1/devices",
            json.dumps([{**DEVICES[0], "name": 7}]).encode(),
            "Expected `str | null`, got `int` - at `$[0].name`",
        ),
        (
            ["devices"],
            "/v1/devices",
            json.dumps([{**DEVICES[0], "state": "sideways"}]).encode(),
            "at `$[0].state`",
        ),
        (
            ["status"],
            "/v1/status",
            json.dumps({k: v for k, v in STATUS.items() if k != "store"}).encode(),
            "Object missing required field `store`",
        ),
        (
            ["endpoints"],
            "/v1/endpoints",
            json.dumps([{**ENDPOINT_OPS, "pending": "2"}]).encode(),
            "Expected `int`, got `str` - at `$[0].pending`",
        ),
        (
            ["deliveries"],
            "/v1/deliveries",
            json.dumps([{**DELIVERIES[0], "created_at": "yesterday"}]).encode(),
            "Invalid RFC3339 encoded datetime - at `$[0].created_at`",
        ),
        (["endpoints", "test", "ops"], "/v1/endpoints/ops/test", b'{"endpoint": "ops"}', "missing required field"),
        (["deliveries", "replay", "1"], "/v1/deliveries/replay", b'{"replayed": -1}', "at `$.replayed`"),
        (
            ["deliveries", "replay", "1"],
            "/v1/deliveries/replay",
            b'{"replayed": 1, "missing": ["1"]}',
            "Expected `int`, got `str` - at `$.missing[0]`",
        ),
    ],
)
def test_wrong_answer_is_a_clear_error(
    argv: list[str],
    path: str,
    answer: bytes,
    expected: str,
    fake_admin: tuple[FakeAdmin, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    server, cfg = fake_admin
    server.wrong[path] = answer
    rc, out, err = run([*argv, "-c", str(cfg)], capsys)
    assert rc == 1 and out == ""
    assert err.startswith(f"bad answer from the daemon on {server.path}: ") and err.count("\n") == 1
    assert expected in err


def test_json_passes_unknown_fields_and_tables_ignore_them(
    fake_admin: tuple[FakeAdmin, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A newer daemon may add fields (CONTRACT §12's `muted`): --json shows them, the table still works."""
    server, cfg = fake_admin
    newer = [{**DEVICES[0], "muted": False, "source": "http"}]
    server.wrong["/v1/devices"] = json.dumps(newer).encode()
    rc, out, _ = run(["devices", "--json", "-c", str(cfg)], capsys)
    assert rc == 0 and json.loads(out) == newer
    rc, out, _ = run(["devices", "-c", str(cfg)], capsys)
    assert rc == 0 and "printer-17" in out


# ------------------------------------------------------------------------------------------------------- sink


def test_check_signature_unit() -> None:
    body = b'{"type": "device.online"}'
    ts = int(time.time())
    mac = hmac.new(b"s3cret", f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    headers = {"Biotz-IoT-Signature": f"t={ts},v1={mac}"}
    assert sink.check_signature(headers, body, ["s3cret"]) == "ok (hmac-sha256)"
    assert sink.check_signature(headers, body, ["other", "s3cret"]) == "ok (hmac-sha256)"
    assert sink.check_signature(headers, body, ["wrong"]).startswith("INVALID")
    assert sink.check_signature(headers, body + b" ", ["s3cret"]).startswith("INVALID")
    assert sink.check_signature(headers, body, []) == "not checked (no --secret)"
    assert sink.check_signature({"Content-Type": "application/json"}, body, ["s3cret"]) == "missing"
    old = sink.check_signature(headers, body, ["s3cret"], now=ts + 3600)
    assert old.startswith("INVALID") and "timestamp" in old

    secret = "whsec_" + base64.b64encode(b"k" * 32).decode()
    sig = base64.b64encode(hmac.new(b"k" * 32, f"evt_1.{ts}.".encode() + body, hashlib.sha256).digest()).decode()
    std = {"webhook-id": "evt_1", "webhook-timestamp": str(ts), "webhook-signature": f"v1,{sig}"}
    assert sink.check_signature(std, body, [secret]) == "ok (standard-webhooks)"
    assert sink.check_signature(std, body, ["whsec_" + base64.b64encode(b"z" * 32).decode()]).startswith("INVALID")
    assert sink.check_signature(std, body, ["not base64 !"]).startswith("INVALID")


def test_describe_event() -> None:
    assert sink.describe_event({"type": "device.offline"}) == "device.offline"
    assert sink.describe_event({"eventActivity": "device.status.online"}) == "device.status.online"
    assert sink.describe_event({"Type": "device_state", "State": "offline"}) == "device_state (offline)"
    assert sink.describe_event([1]) == "-"


class SinkProcess:
    def __init__(self, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "webhookd", "sink", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        first = self.next_line()
        m = re.match(r"webhookd sink listening on (http://127\.0\.0\.1:(\d+)/)", first)
        assert m, first
        self.url = m.group(1)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def next_line(self, timeout: float = 15.0) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError("sink printed nothing") from None

    def until(self, prefix: str) -> tuple[list[str], str]:
        seen = []
        while True:
            line = self.next_line()
            seen.append(line)
            if line.startswith(prefix):
                return seen, line

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path.lstrip("/"), data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def test_sink_subprocess_verifies_hmac() -> None:
    secret = "s3cret-for-the-sink"
    s = SinkProcess("--secret", "unrelated", "--secret", secret)
    try:
        body = json.dumps({"id": "evt_1", "type": "device.online", "device": {"id": "printer-17"}}).encode()
        ts = int(time.time())
        mac = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
        status, answer = s.post(
            "/hooks/devices",
            body,
            {
                "Content-Type": "application/json",
                "Webhook-Id": "evt_1",
                "Webhook-Attempt": "1",
                "Webhookd-Signature": f"t={ts},v1={mac}",
            },
        )
        assert (status, answer) == (200, {"ok": True})
        seen, sig = s.until("signature:")
        assert sig == "signature:       ok (hmac-sha256)"
        block = "\n".join(seen)
        assert "POST /hooks/devices" in block
        assert "Webhook-Id:      evt_1" in block and "Webhook-Attempt: 1" in block
        assert "event:           device.online" in block
        assert s.next_line() == "{"  # pretty JSON follows
        assert s.next_line() == '  "id": "evt_1",'

        s.post("/x", body, {"Webhookd-Signature": f"t={ts},v1={'0' * 64}"})
        _, sig = s.until("signature:")
        assert sig.startswith("signature:       INVALID")

        s.post("/x", b"not json", {})
        _, sig = s.until("signature:")
        assert sig == "signature:       missing"
        assert s.until("not json")[1] == "not json"
    finally:
        rc = s.stop()
    assert rc == 0


def test_sink_without_secret_does_not_check() -> None:
    s = SinkProcess()
    try:
        body = b'{"type": "webhook.test"}'
        status, _ = s.post("/", body, {"X-Sig": "t=1,v1=abc", "Content-Type": "application/json"})
        assert status == 200
        _, sig = s.until("signature:")
        assert sig == "signature:       not checked (no --secret)"
    finally:
        rc = s.stop()
    assert rc == 0
