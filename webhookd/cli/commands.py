"""One function per command (CONTRACT §2): ``args`` in, the exit code out; failures raise ``CLIError``.

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
    DEFAULT_LIMIT,
    EXIT_ERROR,
    EXIT_FAILURE,
    EXIT_OK,
    AdminError,
    CLIError,
    ConfigProblems,
    admin_client,
    config_path,
    load_config,
)
from webhookd.cli.render import aware, dash, format_duration, format_time, print_json, render_table
from webhookd.states import DELIVERY_STATUSES, DEVICE_STATES

if TYPE_CHECKING:
    from webhookd.api_types import DeliveryInfo, EndpointInfo, EndpointTestResult, Replayed


def _json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


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
    if _json(args):
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
    if _json(args):
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
    if _json(args):
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
    if _json(args):
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
    if _json(args):
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
    if _json(args):
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
        return _print_test(name, result, client.decode(raw, object) if _json(args) else None)
    if _json(args):
        print_json(client.decode(raw, object))
        return EXIT_OK
    info = client.decode(raw, EndpointInfo)
    if action == "enable":
        extra = f" ({_deliveries(info.pending)} pending)" if info.pending else ""
        print(f"endpoint {name!r} enabled{extra}")
    else:
        extra = f" ({_deliveries(info.held)} held)" if info.held else ""
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


# --------------------------------------------------------------------------------------------- deliveries


def _last_result(d: DeliveryInfo) -> str:
    """``HTTP 503``, ``redirect 302 not followed``, ``connection refused (10.0.0.9:443)``, ``200``. The daemon's
    error names an HTTP status itself, so the status goes in front only of an error without it (an older daemon
    stored the reason phrase: ``503 Service Unavailable``)."""
    if d.last_status is not None and d.last_error:
        if str(d.last_status) in d.last_error.split():
            return d.last_error
        return f"{d.last_status} {d.last_error}"
    if d.last_status is not None:
        return str(d.last_status)
    return dash(d.last_error)


def cmd_deliveries(args: argparse.Namespace) -> int:
    from webhookd.api_types import DeliveryInfo

    if getattr(args, "action", None) == "replay":
        return _replay(args)
    query = {
        "status": getattr(args, "status", None),
        "endpoint": getattr(args, "endpoint", None),
        "limit": getattr(args, "limit", None),
    }
    client = admin_client(args)
    if _json(args):
        print_json(client.get("/v1/deliveries", object, query))
        return EXIT_OK
    answer_headers: dict[str, str] = {}
    deliveries = client.get("/v1/deliveries", list[DeliveryInfo], query, headers_out=answer_headers)
    if not deliveries:
        print("no deliveries")
        return EXIT_OK
    now = datetime.now(UTC)
    rows = [
        [
            str(d.id),
            dash(d.endpoint),
            dash(d.device),
            dash(d.type).removeprefix("device."),
            d.status,
            str(d.attempts),
            format_time(d.next_attempt_at, now) if d.status == "pending" else "-",
            _last_result(d),
            format_time(d.created_at, now),
        ]
        for d in deliveries
    ]
    headers = ["ID", "ENDPOINT", "DEVICE", "TYPE", "STATUS", "TRIES", "NEXT", "LAST RESULT", "CREATED"]
    print(render_table(headers, rows, flexible=(7, 2)))
    limit: int = getattr(args, "limit", None) or DEFAULT_LIMIT
    total = _total(answer_headers)
    if len(deliveries) >= limit and (total is None or total > len(deliveries)):
        # stderr, so that a table piped on stays a table
        print(_cut_line(len(deliveries), limit, total), file=sys.stderr)
    return EXIT_OK


def _total(headers: dict[str, str]) -> int | None:
    """How many deliveries matched, from the answer's header (None from a daemon that does not send it)."""
    from webhookd.api_types import TOTAL_HEADER

    value = next((v for k, v in headers.items() if k.lower() == TOTAL_HEADER.lower()), None)
    return int(value) if value is not None and value.isdigit() else None


def _cut_line(shown: int, limit: int, total: int | None = None) -> str:
    """Below a listing that was cut: ``100 of 1,035 shown (--limit N for more)``; without a total from the
    daemon, ``100 shown (limit 100; --limit N for more)``."""
    if total is not None:
        return f"{shown:,} of {total:,} shown (--limit N for more)"
    return f"{shown:,} shown (limit {limit:,}; --limit N for more)"


def _replay(args: argparse.Namespace) -> int:
    from webhookd.api_types import Replayed, ReplayRequest

    ids: list[int] = list(getattr(args, "ids", None) or [])
    endpoint = getattr(args, "endpoint", None)
    status = getattr(args, "status", None)
    if ids and (endpoint or status):
        raise CLIError("deliveries replay: give delivery IDs or --endpoint NAME --status dead, not both", EXIT_ERROR)
    if ids:
        body = ReplayRequest(ids=ids)
    elif endpoint:
        body = ReplayRequest(endpoint=endpoint, status=status or "dead")
    else:
        raise CLIError("deliveries replay: give delivery IDs or --endpoint NAME [--status dead]", EXIT_ERROR)
    client = admin_client(args)
    try:
        raw = client.request("POST", "/v1/deliveries/replay", body)
    except AdminError as e:
        if e.status == 404 and endpoint:
            raise AdminError(404, f"unknown endpoint {endpoint!r}") from e
        raise
    done = client.decode(raw, Replayed)
    if _json(args):
        print_json(client.decode(raw, object))
    elif done.replayed or not done.missing:
        print(_replayed_line(done))
    if done.missing:
        if not _json(args):
            print(_missing_line(done.missing), file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _replayed_line(done: Replayed) -> str:
    """``replayed 3 deliveries``, and what the held ones wait for: ``, 1 held until 'webhookd endpoints enable
    sink2'`` (all of them held: ``, held until ...``)."""
    line = f"replayed {_deliveries(done.replayed)}"
    if not done.held:
        return line
    waits = [
        f"'webhookd endpoints enable {name}'" if why == "disabled" else f"endpoint {name!r} is configured again"
        for name, why in sorted(done.held_endpoints.items())
    ]
    until = " and ".join(waits) or "their endpoints are enabled (see 'webhookd endpoints')"
    return f"{line}, {'' if done.held == done.replayed else f'{done.held} '}held until {until}"


def _missing_line(ids: list[int], show: int = 10) -> str:
    """``no delivery 99999``, ``no deliveries 7, 8`` (past ``show`` of them: ``..., 16 and 5 more``)."""
    named = ", ".join(str(i) for i in ids[:show])
    more = f" and {len(ids) - show} more" if len(ids) > show else ""
    return f"no deliver{'y' if len(ids) == 1 else 'ies'} {named}{more}"


def _deliveries(n: int) -> str:
    """``1 delivery``, ``2 deliveries``, ``1,035 deliveries``."""
    return f"{n:,} deliver{'y' if n == 1 else 'ies'}"
