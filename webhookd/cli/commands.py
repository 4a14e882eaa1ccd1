"""One function per command (CONTRACT §2, ``deliveries.py`` has the deliveries'): ``args`` in, the exit code
out; failures raise ``CLIError``.

``--json`` prints the API's document as the daemon sent it; the tables decode it into ``webhookd.api_types``
first, so a wrong answer is a clear error. Each command imports what only it needs, when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import quote

from webhookd.cli.client import (
    EXIT_FAILURE,
    EXIT_OK,
    AdminError,
    CLIError,
    ConfigProblems,
    admin_client,
    config_path,
    load_config,
)
from webhookd.cli.render import (
    aware,
    dash,
    format_duration,
    format_time,
    n_deliveries,
    print_json,
    render_table,
    wants_json,
)
from webhookd.states import DELIVERY_STATUSES, DEVICE_STATES

if TYPE_CHECKING:
    from webhookd.api_types import EndpointInfo, EndpointTestResult


# ------------------------------------------------------------------------------------------- local commands


def cmd_run(args: argparse.Namespace) -> int:
    # imported by name: the daemon module pulls in everything else, and the CLI must import without it
    daemon = importlib.import_module("webhookd.daemon")
    from webhookd import config as config_mod

    try:
        return int(daemon.run(config_path(args)))
    except config_mod.ConfigError as e:  # run reports a bad config itself; in case one escapes
        raise ConfigProblems(e.problems) from e


def cmd_check_config(args: argparse.Namespace) -> int:
    from webhookd import config as config_mod

    cfg = load_config(config_path(args))
    print(config_mod.summary(cfg))
    return EXIT_OK


def cmd_gen_secret(args: argparse.Namespace) -> int:
    from webhookd import signing

    print(signing.gen_secret())
    return EXIT_OK


def cmd_sink(args: argparse.Namespace) -> int:
    from webhookd import sink

    return sink.run_sink(args.host, args.port, list(args.secret or []))


# ------------------------------------------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace) -> int:
    from webhookd.api_types import Status

    client = admin_client(args)
    if wants_json(args):
        print_json(client.get("/v1/status", dict[str, object]))
        return EXIT_OK
    s = client.get("/v1/status", Status)
    since = aware(s.started_at).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    states = ", ".join(f"{getattr(s.devices, state)} {state}" for state in DEVICE_STATES)
    lines = [
        f"webhookd {s.version}, pid {s.pid}, up {format_duration(s.uptime_s)} (since {since})",
        f"devices:    {s.devices.total} ({states})",
        f"endpoints:  {s.endpoints.enabled} enabled, {s.endpoints.disabled} disabled",
        "deliveries: " + ", ".join(f"{getattr(s.deliveries, status)} {status}" for status in DELIVERY_STATUSES),
    ]
    if not s.store.healthy:
        lines.append("store:      UNAVAILABLE (cannot write; state changes are refused with 503)")
    if s.mqtt is not None:
        m = s.mqtt
        when = format_time(m.since) if m.since is not None else "-"
        link = f"connected since {when}" if m.connected else f"DISCONNECTED (since {when}; reconnecting)"
        per = ", ".join(f"{name} {n:,}" for name, n in m.sources.items()) or "no sources"
        lines.append(f"mqtt:       {m.broker}, {link}")
        lines.append(f"            devices by source: {per}")
    print("\n".join(lines))
    return EXIT_OK


# ------------------------------------------------------------------------------------------------ devices


def _muted_cell(muted: bool, until: datetime | None, now: datetime) -> str:
    """The MUTED column: ``-``, ``yes`` (until unmute), ``until 16:00Z`` (today's or tomorrow's),
    ``until 12-24 16:00Z`` (later)."""
    if not muted:
        return "-"
    if until is None:
        return "yes"
    t = aware(until).astimezone(UTC)
    if (t - now).total_seconds() < 86400:
        return f"until {t:%H:%M}Z"
    return f"until {t:%m-%d %H:%M}Z"


def _until_words(until: datetime | None, now: datetime) -> str:
    if until is None:
        return "until unmuted"
    t = aware(until).astimezone(UTC)
    return f"until {t:%Y-%m-%d %H:%M:%S}Z ({format_time(t, now)})"


def _named(ids: list[str], show: int = 10) -> str:
    """``printer-1, printer-2`` (past ``show`` of them: ``..., and 5 more``)."""
    more = f" and {len(ids) - show} more" if len(ids) > show else ""
    return ", ".join(ids[:show]) + more


def _mute(args: argparse.Namespace, action: str) -> int:
    from webhookd.api_types import MuteInfo, MuteRequest, UnmuteRequest
    from webhookd.mutes import is_glob

    match: str = args.match
    client = admin_client(args)
    body: MuteRequest | UnmuteRequest
    if action == "mute":
        body = MuteRequest(match, getattr(args, "for_", None), getattr(args, "reason", None))
    else:
        body = UnmuteRequest(match)
    raw = client.request("POST", f"/v1/devices/{action}", body)
    if wants_json(args):
        print_json(client.decode(raw, object))
        return EXIT_OK
    rule = client.decode(raw, MuteInfo)
    now = datetime.now(UTC)
    n = len(rule.devices)
    covered = f"{n} device{'' if n == 1 else 's'}" + (f" ({_named(rule.devices)})" if n else "")
    if action == "unmute":
        print(f"unmuted {match!r}: deliveries resume for the next events of {covered} (nothing is sent for the past)")
        return EXIT_OK
    why = f" ({rule.reason})" if rule.reason else ""
    print(f"muted {match!r} {_until_words(rule.until, now)}{why}: {covered} now")
    if is_glob(rule.match):
        print("devices that first appear while it lasts are muted too; their events are recorded, not delivered")
    return EXIT_OK


def _forget(args: argparse.Namespace) -> int:
    from webhookd.api_types import DeviceInfo

    dev_id: str = args.id
    client = admin_client(args)
    raw = client.request("DELETE", "/v1/devices/" + quote(dev_id, safe=""))
    if wants_json(args):
        print_json(client.decode(raw, object))
        return EXIT_OK
    dev = client.decode(raw, DeviceInfo)
    mute = " and its mute" if dev.muted else ""
    print(f"forgot device {dev.id!r} (was {dev.state}){mute}; its pending deliveries continue")
    return EXIT_OK


def cmd_devices(args: argparse.Namespace) -> int:
    from webhookd.api_types import DeviceInfo

    action = getattr(args, "action", None)
    if action in ("mute", "unmute"):
        return _mute(args, action)
    if action == "forget":
        return _forget(args)
    state = getattr(args, "state", None)
    client = admin_client(args)
    if wants_json(args):
        print_json(client.get("/v1/devices", object, {"state": state}))
        return EXIT_OK
    devices = client.get("/v1/devices", list[DeviceInfo], {"state": state})
    if not devices:
        print(f"no devices{f' in state {state}' if state else ''}")
        return EXIT_OK
    now = datetime.now(UTC)
    rows = [
        [
            dash(d.id),
            dash(d.name),
            f"{d.state} (stale)" if d.stale else d.state,
            _muted_cell(d.muted, d.muted_until, now),
            format_time(d.last_seen, now),
            dash(d.address),
            d.source,
        ]
        for d in devices
    ]
    headers = ["ID", "NAME", "STATE", "MUTED", "LAST SEEN", "ADDRESS", "SOURCE"]
    print(render_table(headers, rows, flexible=(1, 0)))
    return EXIT_OK


# ----------------------------------------------------------------------------------------------- gateways


def cmd_gateways(args: argparse.Namespace) -> int:
    from webhookd.api_types import NOT_A_HUB, GatewayInfo

    client = admin_client(args)
    try:
        raw = client.request("GET", "/v1/gateways")
    except AdminError as e:
        if e.status == 404:  # a daemon without hub: (or one older than the gateway list)
            raise CLIError(NOT_A_HUB if e.message == NOT_A_HUB else f"no gateway list here: {e.message}") from e
        raise
    if wants_json(args):
        print_json(client.decode(raw, object))
        return EXIT_OK
    now = datetime.now(UTC)
    rows = [
        [
            dash(g.name),
            g.state,
            format_time(g.last_seen, now),
            dash(g.devices),
            str(g.relayed),
            dash(g.last_error),
        ]
        for g in client.decode(raw, list[GatewayInfo])
    ]
    headers = ["NAME", "STATE", "LAST SEEN", "DEVICES", "RELAYED", "LAST ERROR"]
    print(render_table(headers, rows, flexible=(5, 0)))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- endpoints


def _endpoint_status(e: EndpointInfo) -> str:
    if e.enabled:
        return "enabled"
    return f"disabled ({e.disabled_reason})" if e.disabled_reason else "disabled"


def cmd_endpoints(args: argparse.Namespace) -> int:
    from webhookd.api_types import EndpointInfo

    action = getattr(args, "action", None)
    if action in ("enable", "disable", "test"):
        return _endpoint_action(args, action)
    client = admin_client(args)
    if wants_json(args):
        print_json(client.get("/v1/endpoints", object))
        return EXIT_OK
    endpoints = client.get("/v1/endpoints", list[EndpointInfo])
    if not endpoints:
        print("no endpoints configured")
        return EXIT_OK
    rows = [
        [
            dash(e.name),
            _endpoint_status(e),
            str(e.consecutive_failures),
            str(e.pending),
            str(e.held),
            str(e.delivered),
            str(e.dead),
            dash(e.last_error),
        ]
        for e in endpoints
    ]
    headers = ["NAME", "STATUS", "FAILS", "PENDING", "HELD", "DELIVERED", "DEAD", "LAST ERROR"]
    print(render_table(headers, rows, flexible=(7,)))
    return EXIT_OK


def _endpoint_action(args: argparse.Namespace, action: str) -> int:
    from webhookd.api_types import EndpointInfo, EndpointTestResult

    name: str = args.name
    client = admin_client(args)
    path = f"/v1/endpoints/{quote(name, safe='')}/{action}"
    try:
        # a test waits for one delivery attempt (the endpoint's timeout); leave it room
        raw = client.request("POST", path, {}, timeout=120.0 if action == "test" else None)
    except AdminError as e:
        if e.status == 404:
            raise AdminError(404, f"unknown endpoint {name!r}") from e
        raise
    if action == "test":
        result = client.decode(raw, EndpointTestResult)
        return _print_test(name, result, client.decode(raw, object) if wants_json(args) else None)
    if wants_json(args):
        print_json(client.decode(raw, object))
        return EXIT_OK
    info = client.decode(raw, EndpointInfo)
    if action == "enable":
        extra = f" ({n_deliveries(info.pending)} pending)" if info.pending else ""
        print(f"endpoint {name!r} enabled{extra}")
    else:
        extra = f" ({n_deliveries(info.held)} held)" if info.held else ""
        print(f"endpoint {name!r} disabled{extra}")
    return EXIT_OK


def _print_test(name: str, result: EndpointTestResult, document: object | None) -> int:
    """The outcome of ``endpoints test``; ``document``: the answer for ``--json``."""
    code = EXIT_OK if result.ok else EXIT_FAILURE
    if document is not None:
        print_json(document)
        return code
    took = f" in {result.latency_ms:.1f} ms"
    if result.status is not None:
        import http

        try:
            phrase = http.HTTPStatus(result.status).phrase
        except ValueError:
            phrase = ""
        line = f"{name}: {result.status}{' ' + phrase if phrase else ''}{took}"
        # `HTTP 500` says nothing the status line does not; `redirect 302 not followed` does
        if result.error and not result.ok and result.error != f"HTTP {result.status}":
            line += f" ({result.error})"
    else:
        line = f"{name}: failed{took}: {result.error or 'no answer'}"
    print(line, file=sys.stdout if result.ok else sys.stderr)
    return code
