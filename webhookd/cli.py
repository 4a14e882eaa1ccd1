"""The ``webhookd`` command line (CONTRACT §2).

``run`` runs the daemon; ``check-config``, ``gen-secret`` and ``sink`` work locally; every other command is
a thin client of the daemon's admin API (HTTP over the unix socket ``admin.socket``, CONTRACT §8).

Exit codes: 0 ok; 1 failure (bad config, API error, failed test delivery); 2 usage error or unexpected error;
3 the daemon is not running; 130 interrupted. Never a traceback (``WEBHOOKD_DEBUG=1`` shows one for
unexpected errors).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import http
import http.client
import importlib
import json
import os
import re
import shutil
import socket
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

__all__ = [
    "AdminClient",
    "AdminError",
    "CLIError",
    "DaemonNotRunning",
    "build_parser",
    "cut",
    "format_duration",
    "format_time",
    "main",
    "render_table",
]

DEFAULT_CONFIG = "/etc/webhookd/config.yaml"
DEFAULT_SOCKET = "./var/admin.sock"
TABLE_WIDTH = 100
ELLIPSIS = "…"

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_ERROR = 2
EXIT_NOT_RUNNING = 3
EXIT_INTERRUPTED = 130

DEVICE_STATES = ("online", "utilizing", "unplugged", "offline")
DELIVERY_STATUSES = ("pending", "held", "delivered", "dead")


# --------------------------------------------------------------------------------------------------- errors


class CLIError(Exception):
    """A failure with a message for the operator (printed to stderr as is) and an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class DaemonNotRunning(CLIError):
    def __init__(self, socket_path: Path | str) -> None:
        super().__init__(f"webhookd is not running (no admin socket at {socket_path})", EXIT_NOT_RUNNING)
        self.socket_path = socket_path


class AdminError(CLIError):
    """The admin API answered 4xx/5xx."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message, EXIT_FAILURE)
        self.status = status


class ConfigProblems(CLIError):
    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems) or ["invalid configuration"]
        super().__init__("\n".join(f"config error: {p}" for p in self.problems), EXIT_FAILURE)


# --------------------------------------------------------------------------------------------- admin client


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over a unix stream socket."""

    def __init__(self, socket_path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


_NOT_RUNNING_ERRNOS = frozenset({errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK, errno.ENOTDIR})


class AdminClient:
    """JSON client of the admin API on ``socket_path``."""

    def __init__(self, socket_path: Path | str, timeout: float = 30.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        """The decoded JSON answer; raises ``DaemonNotRunning``, ``AdminError`` (4xx/5xx) or ``CLIError``."""
        wait = self.timeout if timeout is None else timeout
        conn = UnixHTTPConnection(str(self.socket_path), timeout=wait)
        headers = {"Accept": "application/json", "Host": "webhookd"}
        payload: bytes | None = None
        if body is not None:
            payload = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=payload, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            status, reason = resp.status, resp.reason
        except TimeoutError as e:
            raise CLIError(f"the daemon did not answer within {wait:g} s (admin socket {self.socket_path})") from e
        except OSError as e:
            if e.errno in _NOT_RUNNING_ERRNOS:
                raise DaemonNotRunning(self.socket_path) from e
            if e.errno in (errno.EACCES, errno.EPERM):
                raise CLIError(f"permission denied on the admin socket {self.socket_path}") from e
            detail = e.strerror or str(e)
            raise CLIError(f"cannot talk to the daemon on {self.socket_path}: {detail}") from e
        except http.client.HTTPException as e:
            raise CLIError(f"bad answer from the daemon on {self.socket_path}: {e!r}") from e
        finally:
            conn.close()

        data: Any = None
        if raw:
            try:
                data = json.loads(raw)
            except ValueError:
                data = None
        if status >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            if not isinstance(message, str) or not message:
                text = raw.decode("utf-8", "replace").strip()
                message = text[:200] if text and data is None else f"{status} {reason}"
            raise AdminError(status, message)
        if data is None and raw:
            raise CLIError(f"bad answer from the daemon on {self.socket_path}: not JSON")
        return data

    def get(self, path: str, query: Mapping[str, object] | None = None) -> Any:
        params = {k: str(v) for k, v in (query or {}).items() if v is not None}
        return self.request("GET", path + ("?" + urlencode(params) if params else ""))

    def post(self, path: str, body: Any = None, timeout: float | None = None) -> Any:
        return self.request("POST", path, body if body is not None else {}, timeout=timeout)


# ----------------------------------------------------------------------------------------- config / socket


def config_path(args: argparse.Namespace) -> str:
    path = getattr(args, "config", None)
    if path:
        return str(path)
    return os.environ.get("WEBHOOKD_CONFIG") or DEFAULT_CONFIG


def _problems(e: BaseException) -> list[str]:
    problems = getattr(e, "problems", None)
    if isinstance(problems, list | tuple) and problems:
        return [str(p) for p in problems]
    return [str(e) or type(e).__name__]


def _load_config(path: str) -> Any:
    from webhookd import config as config_mod

    try:
        return config_mod.load_config(path)
    except config_mod.ConfigError as e:
        raise ConfigProblems(_problems(e)) from e
    except OSError as e:
        raise ConfigProblems([f"{path}: {e.strerror or e}"]) from e


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _socket_from_yaml(path: str) -> Path | None:
    """``admin.socket`` read straight from the YAML, for when the whole config does not validate (a secret's
    ``${VAR}`` only set in the service's environment, or a bad edit that the running daemon refused on reload:
    the operator still needs to reach the daemon). ``None`` when even that is not possible."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return None
    admin = data.get("admin")
    if admin is None:
        admin = {}
    if not isinstance(admin, dict):
        return None
    value = admin.get("socket", DEFAULT_SOCKET)
    if not isinstance(value, str) or not value:
        return None
    missing = [name for name in _ENV_REF.findall(value.replace("$${", "")) if name not in os.environ]
    if missing:
        return None
    value = _ENV_REF.sub(lambda m: os.environ[m.group(1)], value.replace("$${", "\0")).replace("\0", "${")
    sock = Path(value).expanduser()
    if not sock.is_absolute():
        sock = Path(os.path.abspath(path)).parent / sock
    return Path(os.path.normpath(sock))


def admin_socket(path: str) -> Path:
    """The admin socket named by the config at ``path``."""
    try:
        cfg = _load_config(path)
    except ConfigProblems:
        fallback = _socket_from_yaml(path)
        if fallback is None:
            raise
        return fallback
    return Path(cfg.admin.socket)


def admin_client(args: argparse.Namespace) -> AdminClient:
    return AdminClient(admin_socket(config_path(args)))


# ----------------------------------------------------------------------------------------------- rendering


def cut(value: str, width: int) -> str:
    """``value`` on one line, at most ``width`` characters; cut ones end with ``…``."""
    text = " ".join(value.split()) if any(c in value for c in "\n\r\t") else value
    if len(text) <= width:
        return text
    if width <= 0:
        return ""
    return text[: width - 1] + ELLIPSIS


def table_width() -> int:
    """100 columns (CONTRACT §2), or less on a narrower terminal (an 80-column one stays readable)."""
    if not sys.stdout.isatty():
        return TABLE_WIDTH
    return max(40, min(TABLE_WIDTH, shutil.get_terminal_size((TABLE_WIDTH, 24)).columns))


def render_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    width: int | None = None,
    gap: int = 2,
    flexible: Sequence[int] = (),
) -> str:
    """Left-aligned columns separated by ``gap`` spaces, no line longer than ``width``: when the natural
    widths do not fit, the ``flexible`` columns (indexes, in order) give way first, then the widest ones
    (down to their header's width, then further); cut cells end with ``…``."""
    if width is None:
        width = table_width()
    ncol = len(headers)
    cells = [[cut(str(c), 10_000) for c in row] for row in rows]
    widths = [max([len(headers[i]), *(len(r[i]) for r in cells)]) for i in range(ncol)]
    budget = width - gap * (ncol - 1)
    for i in flexible:
        excess = sum(widths) - budget
        if excess <= 0:
            break
        floor_i = min(widths[i], max(len(headers[i]), 12))
        widths[i] = max(floor_i, widths[i] - excess)
    for floor in ([min(w, max(len(h), 4)) for w, h in zip(widths, headers, strict=True)], [1] * ncol):
        excess = sum(widths) - budget
        while excess > 0:
            candidates = [i for i in range(ncol) if widths[i] > floor[i]]
            if not candidates:
                break
            widest = max(candidates, key=lambda i: widths[i])
            others = [widths[i] for i in candidates if i != widest]
            # shrink the widest column to the next widest (or as far as needed), in one step
            target = max(floor[widest], max(others, default=0), widths[widest] - excess)
            if target >= widths[widest]:
                target = widths[widest] - 1
            excess -= widths[widest] - target
            widths[widest] = target
    lines = []
    for row in [list(headers), *cells]:
        parts = [cut(c, w).ljust(w) for c, w in zip(row, widths, strict=True)]
        lines.append((" " * gap).join(parts).rstrip())
    return "\n".join(lines)


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def format_duration(seconds: float) -> str:
    """``45s``, ``12m``, ``3h 5m``, ``2d 4h``."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h {m}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d {h}h" if h else f"{d}d"


def format_time(value: object, now: datetime | None = None) -> str:
    """An RFC 3339 time as ``5m ago`` / ``in 30s`` within a week of now, else ``2026-11-22 05:04Z``."""
    if value is None:
        return "-"
    t = parse_time(value)
    if t is None:
        return str(value)
    ref = now or datetime.now(UTC)
    delta = (ref - t).total_seconds()
    if abs(delta) < 1:
        return "now"
    if abs(delta) >= 7 * 86400:
        return t.astimezone(UTC).strftime("%Y-%m-%d %H:%MZ")
    return f"{format_duration(delta)} ago" if delta > 0 else f"in {format_duration(-delta)}"


def _s(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


def _as_list(data: Any) -> list[dict[str, Any]]:
    if not isinstance(data, list):
        raise CLIError("bad answer from the daemon: expected a JSON array")
    return [d if isinstance(d, dict) else {} for d in data]


def _as_dict(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise CLIError("bad answer from the daemon: expected a JSON object")
    return data


# ------------------------------------------------------------------------------------------------ commands


def cmd_run(args: argparse.Namespace) -> int:
    # imported by name: the daemon module pulls in everything else, and the CLI must import without it
    daemon = importlib.import_module("webhookd.daemon")
    return int(daemon.run(config_path(args)))


def cmd_check_config(args: argparse.Namespace) -> int:
    from webhookd import config as config_mod

    cfg = _load_config(config_path(args))
    print(config_mod.summary(cfg))
    return EXIT_OK


def cmd_gen_secret(args: argparse.Namespace) -> int:
    from webhookd import signing

    print(signing.gen_secret())
    return EXIT_OK


def cmd_sink(args: argparse.Namespace) -> int:
    from webhookd import sink

    return sink.run_sink(args.host, args.port, list(args.secret or []))


def _count(section: object, key: str) -> int:
    if isinstance(section, dict):
        v = section.get(key)
        if isinstance(v, int):
            return v
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    data = _as_dict(admin_client(args).get("/v1/status"))
    if getattr(args, "json", False):
        print_json(data)
        return EXIT_OK
    head = f"webhookd {data.get('version', '?')}"
    if data.get("pid") is not None:
        head += f", pid {data['pid']}"
    uptime = data.get("uptime_s")
    if isinstance(uptime, int | float):
        head += f", up {format_duration(uptime)}"
    started = parse_time(data.get("started_at"))
    if started is not None:
        head += f" (since {started.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%SZ')})"
    devices = data.get("devices") or {}
    endpoints = data.get("endpoints") or {}
    deliveries = data.get("deliveries") or {}
    states = ", ".join(f"{_count(devices, s)} {s}" for s in DEVICE_STATES)
    total = _count(devices, "total") or sum(_count(devices, s) for s in DEVICE_STATES)
    lines = [
        head,
        f"devices:    {total} ({states})",
        f"endpoints:  {_count(endpoints, 'enabled')} enabled, {_count(endpoints, 'disabled')} disabled",
        "deliveries: " + ", ".join(f"{_count(deliveries, s)} {s}" for s in DELIVERY_STATUSES),
    ]
    store = data.get("store")
    if isinstance(store, dict) and store.get("healthy") is False:
        lines.append("store:      UNAVAILABLE (cannot write; state changes are refused with 503)")
    print("\n".join(lines))
    return EXIT_OK


def cmd_devices(args: argparse.Namespace) -> int:
    state = getattr(args, "state", None)
    data = admin_client(args).get("/v1/devices", {"state": state})
    if getattr(args, "json", False):
        print_json(data)
        return EXIT_OK
    devices = _as_list(data)
    if not devices:
        print(f"no devices{f' in state {state}' if state else ''}")
        return EXIT_OK
    now = datetime.now(UTC)
    rows = [
        [
            _s(d.get("id")),
            _s(d.get("name")),
            _s(d.get("state")),
            format_time(d.get("last_seen"), now),
            _s(d.get("address")),
        ]
        for d in devices
    ]
    print(render_table(["ID", "NAME", "STATE", "LAST SEEN", "ADDRESS"], rows, flexible=(1, 0)))
    return EXIT_OK


def _endpoint_status(e: Mapping[str, Any]) -> str:
    if e.get("enabled", True):
        return "enabled"
    reason = e.get("disabled_reason")
    return f"disabled ({reason})" if reason else "disabled"


def cmd_endpoints(args: argparse.Namespace) -> int:
    action = getattr(args, "action", None)
    if action in ("enable", "disable", "test"):
        return _endpoint_action(args, action)
    data = admin_client(args).get("/v1/endpoints")
    if getattr(args, "json", False):
        print_json(data)
        return EXIT_OK
    endpoints = _as_list(data)
    if not endpoints:
        print("no endpoints configured")
        return EXIT_OK
    rows = [
        [
            _s(e.get("name")),
            _endpoint_status(e),
            _s(e.get("consecutive_failures")),
            _s(e.get("pending")),
            _s(e.get("held")),
            _s(e.get("delivered")),
            _s(e.get("dead")),
            _s(e.get("last_error")),
        ]
        for e in endpoints
    ]
    headers = ["NAME", "STATUS", "FAILS", "PENDING", "HELD", "DELIVERED", "DEAD", "LAST ERROR"]
    print(render_table(headers, rows, flexible=(7,)))
    return EXIT_OK


def _endpoint_action(args: argparse.Namespace, action: str) -> int:
    name: str = args.name
    client = admin_client(args)
    path = f"/v1/endpoints/{quote(name, safe='')}/{action}"
    try:
        # a test waits for one delivery attempt (the endpoint's timeout); leave it room
        data = client.post(path, timeout=120.0 if action == "test" else None)
    except AdminError as e:
        if e.status == 404:
            raise AdminError(404, f"unknown endpoint {name!r}") from e
        raise
    if action == "test":
        return _print_test(name, _as_dict(data), bool(getattr(args, "json", False)))
    if getattr(args, "json", False):
        print_json(data)
        return EXIT_OK
    info = data if isinstance(data, dict) else {}
    if action == "enable":
        pending = info.get("pending")
        extra = f" ({pending} pending)" if isinstance(pending, int) and pending else ""
        print(f"endpoint {name!r} enabled{extra}")
    else:
        held = info.get("held")
        extra = f" ({held} {'delivery' if held == 1 else 'deliveries'} held)" if isinstance(held, int) and held else ""
        print(f"endpoint {name!r} disabled{extra}")
    return EXIT_OK


def _print_test(name: str, result: Mapping[str, Any], as_json: bool) -> int:
    status = result.get("status")
    ok = bool(result.get("ok")) if "ok" in result else isinstance(status, int) and 200 <= status < 300
    if as_json:
        print_json(dict(result))
        return EXIT_OK if ok else EXIT_FAILURE
    latency = result.get("latency_ms")
    took = f" in {latency:.1f} ms" if isinstance(latency, int | float) else ""
    error = result.get("error")
    if isinstance(status, int):
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = f"{name}: {status}{' ' + phrase if phrase else ''}{took}"
        if error and not ok:
            line += f" ({error})"
    else:
        line = f"{name}: failed{took}: {error or 'no answer'}"
    print(line, file=sys.stdout if ok else sys.stderr)
    return EXIT_OK if ok else EXIT_FAILURE


def _last_result(d: Mapping[str, Any]) -> str:
    status, error = d.get("last_status"), d.get("last_error")
    if status is not None and error:
        return f"{status} {error}"
    if status is not None:
        return str(status)
    return _s(error)


def cmd_deliveries(args: argparse.Namespace) -> int:
    if getattr(args, "action", None) == "replay":
        return _replay(args)
    query = {
        "status": getattr(args, "status", None),
        "endpoint": getattr(args, "endpoint", None),
        "limit": getattr(args, "limit", None),
    }
    data = admin_client(args).get("/v1/deliveries", query)
    if getattr(args, "json", False):
        print_json(data)
        return EXIT_OK
    deliveries = _as_list(data)
    if not deliveries:
        print("no deliveries")
        return EXIT_OK
    now = datetime.now(UTC)
    rows = [
        [
            _s(d.get("id")),
            _s(d.get("endpoint")),
            _s(d.get("device")),
            _s(d.get("type")).removeprefix("device."),
            _s(d.get("status")),
            _s(d.get("attempts")),
            format_time(d.get("next_attempt_at"), now) if d.get("status") == "pending" else "-",
            _last_result(d),
            format_time(d.get("created_at"), now),
        ]
        for d in deliveries
    ]
    headers = ["ID", "ENDPOINT", "DEVICE", "TYPE", "STATUS", "TRIES", "NEXT", "LAST RESULT", "CREATED"]
    print(render_table(headers, rows, flexible=(7, 2)))
    return EXIT_OK


def _replay(args: argparse.Namespace) -> int:
    ids: list[int] = list(getattr(args, "ids", None) or [])
    endpoint = getattr(args, "endpoint", None)
    status = getattr(args, "status", None)
    body: dict[str, Any]
    if ids and (endpoint or status):
        raise CLIError("deliveries replay: give delivery IDs or --endpoint NAME --status dead, not both", EXIT_ERROR)
    if ids:
        body = {"ids": ids}
    elif endpoint:
        body = {"endpoint": endpoint, "status": status or "dead"}
    else:
        raise CLIError("deliveries replay: give delivery IDs or --endpoint NAME [--status dead]", EXIT_ERROR)
    try:
        data = admin_client(args).post("/v1/deliveries/replay", body)
    except AdminError as e:
        if e.status == 404 and endpoint:
            raise AdminError(404, f"unknown endpoint {endpoint!r}") from e
        raise
    if getattr(args, "json", False):
        print_json(data)
        return EXIT_OK
    n = data.get("replayed") if isinstance(data, dict) else None
    if isinstance(n, int):
        print(f"replayed {n} deliver{'y' if n == 1 else 'ies'}")
    else:
        print("replay queued")
    return EXIT_OK


# -------------------------------------------------------------------------------------------------- parser


def _positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value}")
    return n


def _delivery_id(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a delivery id: {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"not a delivery id: {value}")
    return n


def _port(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}") from None
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {value}")
    return n


def _common(json_flag: bool) -> argparse.ArgumentParser:
    """-c/--config (and --json) for a subcommand. SUPPRESS defaults, so that a value given before the
    subcommand is not reset by the subparser's default."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "-c",
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="config file (default: $WEBHOOKD_CONFIG, else /etc/webhookd/config.yaml)",
    )
    if json_flag:
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON document")
    return p


Handler = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    from webhookd import __version__

    plain, data = _common(False), _common(True)
    parser = argparse.ArgumentParser(
        prog="webhookd",
        description="Device presence daemon: heartbeats in, signed durable webhooks out.",
        parents=[plain],
    )
    parser.add_argument("--version", action="version", version=f"webhookd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, handler: Handler, help_: str, parent: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, parents=[parent])
        p.set_defaults(handler=handler)
        return p

    add("run", cmd_run, "run the daemon in the foreground", plain)
    add("check-config", cmd_check_config, "validate the config file", plain)
    add("status", cmd_status, "daemon summary", data)

    p = add("devices", cmd_devices, "list devices", data)
    p.add_argument("--state", choices=DEVICE_STATES, default=argparse.SUPPRESS, help="only devices in this state")

    p = add("endpoints", cmd_endpoints, "list endpoints, or enable / disable / test one", data)
    ep_sub = p.add_subparsers(dest="action", metavar="ACTION")
    for action, text in (
        ("enable", "enable an endpoint (resumes its held deliveries)"),
        ("disable", "disable an endpoint (holds its deliveries)"),
        ("test", "send a webhook.test event now; exit 0 on 2xx"),
    ):
        ap = ep_sub.add_parser(action, help=text, description=text, parents=[data])
        ap.add_argument("name", metavar="NAME")

    p = add("deliveries", cmd_deliveries, "list deliveries, or replay some", data)
    p.add_argument("--status", choices=DELIVERY_STATUSES, default=argparse.SUPPRESS)
    p.add_argument("--endpoint", metavar="NAME", default=argparse.SUPPRESS)
    p.add_argument("--limit", type=_positive_int, metavar="N", default=argparse.SUPPRESS)
    dl_sub = p.add_subparsers(dest="action", metavar="ACTION")
    rp = dl_sub.add_parser(
        "replay",
        help="queue deliveries again with a fresh attempt budget",
        description="Queue deliveries again (a fresh attempt budget): by ID, or every delivery of an "
        "endpoint in a status (`replay --endpoint NAME --status dead`).",
        parents=[data],
    )
    rp.add_argument("ids", nargs="*", type=_delivery_id, metavar="ID", help="delivery ids (see `webhookd deliveries`)")
    rp.add_argument("--endpoint", metavar="NAME", default=argparse.SUPPRESS)
    rp.add_argument("--status", choices=DELIVERY_STATUSES, default=argparse.SUPPRESS)

    add("gen-secret", cmd_gen_secret, "print a new signing secret (whsec_...)", plain)

    p = add("sink", cmd_sink, "a local webhook receiver that prints what it gets", plain)
    p.add_argument("--port", type=_port, default=8479, help="port to listen on (default 8479; 0 = any)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument(
        "--secret",
        action="append",
        metavar="S",
        help="verify signatures with this secret (repeatable)",
    )
    return parser


# ---------------------------------------------------------------------------------------------------- main


def _exit_code(code: object) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_FAILURE


def _tolerant_output() -> None:
    """Unencodable characters (``…`` on a latin-1 terminal) become ``?`` rather than an error."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError, TypeError):
                reconfigure(errors="replace")


def _silence_stdout() -> None:
    """After EPIPE (``webhookd devices | head``): point stdout at /dev/null so the exit flush is quiet."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``webhookd`` and ``python -m webhookd``; returns the exit code."""
    try:
        _tolerant_output()
        parser = build_parser()
        args = parser.parse_args(argv)
        handler: Handler | None = getattr(args, "handler", None)
        if handler is None:
            parser.print_help(sys.stderr)
            return EXIT_ERROR
        return handler(args)
    except SystemExit as e:
        return _exit_code(e.code)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_FAILURE
    except CLIError as e:
        print(e.message, file=sys.stderr)
        return e.code
    except Exception as e:
        if os.environ.get("WEBHOOKD_DEBUG"):
            traceback.print_exc()
        problems = getattr(e, "problems", None)
        if isinstance(problems, list) and problems:  # a ConfigError escaping from `run`
            for p in problems:
                print(f"config error: {p}", file=sys.stderr)
            return EXIT_FAILURE
        detail = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        print(f"error: {detail}", file=sys.stderr)
        return EXIT_ERROR
