"""``webhookd deliveries``: the listing (cut ones say how many matched) and ``replay`` (what waits, what is
unknown). The rest of the commands are in ``commands.py``."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from webhookd.cli.client import DEFAULT_LIMIT, EXIT_ERROR, EXIT_FAILURE, EXIT_OK, AdminError, CLIError, admin_client
from webhookd.cli.render import dash, format_time, n_deliveries, print_json, render_table, wants_json

if TYPE_CHECKING:
    from webhookd.api_types import DeliveryInfo, Replayed


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
    if wants_json(args):
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
    if wants_json(args):
        print_json(client.decode(raw, object))
    elif done.replayed or not done.missing:
        print(_replayed_line(done))
    if done.missing:
        if not wants_json(args):
            print(_missing_line(done.missing), file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _replayed_line(done: Replayed) -> str:
    """``replayed 3 deliveries``, and what the held ones wait for: ``, 1 held until 'webhookd endpoints enable
    sink2'`` (all of them held: ``, held until ...``)."""
    line = f"replayed {n_deliveries(done.replayed)}"
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
