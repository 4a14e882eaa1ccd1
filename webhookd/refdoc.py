"""The generated parts of docs/reference.md: commands (the argparse tree), config keys with their defaults
(the msgspec schema) and metrics (the Prometheus registry).

``python -m webhookd.refdoc`` rewrites each generated section of the file in place (between its
``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->`` markers); ``--check`` only reports
whether the file is up to date (exit 1 if not). tests/test_reference.py runs the same comparison.
"""

from __future__ import annotations

import argparse
import re
import sys
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from webhookd.config import schema
from webhookd.config.units import NOT_IN_FILE, OR_NULL, FileDefault, HostPort, Read

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference.md"

# What each config key means: the schema says the type and the default, this says why one would set it.
# Every key of the schema must be here (and nothing else): `config_section` raises otherwise.
KEY_DOCS: dict[str, str] = {
    "state_dir": "directory of the SQLite database (`webhookd.db`); relative to the config file's directory",
    "store": "`null`: the SQLite database in `state_dir`; or a PostgreSQL database, "
    "`postgresql://user:password@host:5432/dbname` (its password best from `${VAR}`; libpq options such as "
    "`?sslmode=verify-full` in the query); a database of its own, created and migrated at startup; "
    "restart to change it",
    "listen": "where heartbeats arrive",
    "listen.http": "heartbeat HTTP API address (`null`: no HTTP listener)",
    "listen.udp": "UDP heartbeat address (`null`: no UDP listener)",
    "listen.tokens": "bearer tokens accepted by the heartbeat API (empty: no token needed)",
    "listen.max_body": "largest heartbeat request body (`256KiB`, `1MiB`, ...); larger ones get 413",
    "admin": "the admin API the CLI talks to",
    "admin.socket": "unix socket of the admin API; relative to the config file's directory",
    "presence": "how devices go online and offline",
    "presence.silence_timeout": "a device with no heartbeat for this long goes offline",
    "presence.notify_online_after_utilizing": "send `device.online` when a device leaves `utilizing`",
    "presence.debounce": "an offline that is not a timeout (shutdown, reboot, reported, disconnected) is held this"
    " long: a device online again by then makes neither event; else the offline is sent then, with the time it"
    " went offline (`0s`: off)",
    "presence.remind_every": "while a device stays offline, one `device.still_offline` event this often, counted"
    " from the offline (`0s`: off)",
    "devices": "per-device rules; the first whose `match` fits a device id applies",
    "devices[].match": "glob on the device id (`lab-*`, case-sensitive)",
    "devices[].silence_timeout": "silence timeout for these devices (`null`: `presence.silence_timeout`)",
    "devices[].debounce": "debounce for these devices (`null`: `presence.debounce`)",
    "devices[].name": "name carried in the devices' events",
    "devices[].owner": "owner carried in the devices' events",
    "delivery": "how webhooks are delivered",
    "delivery.retry_schedule": "waits between attempts; after the last one a delivery is `dead`",
    "delivery.concurrency": "deliveries in flight at once, over all endpoints",
    "delivery.timeout": "default time limit of one attempt",
    "delivery.disable_after": "disable an endpoint after this many failed attempts in a row (0: never)",
    "delivery.retention": "delivered and dead deliveries are pruned after this long",
    "endpoints": "webhook receivers",
    "endpoints[].name": "unique name, used by the CLI and in metrics",
    "endpoints[].url": "where to POST (http or https)",
    "endpoints[].description": "free text shown by `webhookd endpoints`",
    "endpoints[].events": "event kinds to send (`online`, `offline`, `utilizing`, `unplugged`, "
    "`address_changed`, `still_offline`; on a hub `gateway_online`, `gateway_offline`; or `all`)",
    "endpoints[].devices": "globs of the device ids to send events for",
    "endpoints[].format": "payload format: `webhookd`, `remoteit`, `kobiton`, or a message for people: `slack`, "
    "`discord`, `teams`, `ntfy`, `template` (see Webhooks)",
    "endpoints[].template": "`format: template`: the body as a Jinja2 template (with `event`, `text`, `endpoint`);"
    " `check-config` renders it for every event type",
    "endpoints[].template_file": "`format: template`: a file holding the template (instead of `template`)",
    "endpoints[].content_type": "`format: template`: the body's `Content-Type`; a JSON type (`application/json`,"
    " `*+json`) must render valid JSON",
    "endpoints[].secret": "signing secret, or a list of them (rotation: all are used to sign)",
    "endpoints[].secret_file": "file with one secret per non-empty line (instead of `secret`)",
    "endpoints[].signature": "how requests are signed (see Webhooks)",
    "endpoints[].signature_header": "header carrying an `hmac-sha256` signature",
    "endpoints[].secret_field": "also put the first secret in the body under this field (for receivers that "
    "cannot verify signatures)",
    "endpoints[].headers": "extra request headers (not the ones webhookd sets)",
    "endpoints[].timeout": "time limit of one attempt",
    "endpoints[].concurrency": "deliveries in flight at once to this endpoint",
    "endpoints[].tls_verify": "verify the receiver's TLS certificate",
    "endpoints[].ca_file": "CA bundle to verify the receiver's certificate with",
    "endpoints[].allow_link_local": "allow a link-local address (169.254.0.0/16, fe80::/10) in `url`",
    "logging": "the daemon's log lines",
    "logging.format": "`json`, `console`, or `auto` (console on a terminal, else json)",
    "logging.level": "`debug`, `info`, `warning` or `error`",
    "mqtt": "MQTT presence: availability messages from a broker (off without this section)",
    "mqtt.url": "the broker: `mqtt://host[:port]` (1883) or `mqtts://host[:port]` (TLS, 8883)",
    "mqtt.username": "login name (`null`: anonymous)",
    "mqtt.password": "login password (needs `username`; `${VAR}` keeps it out of the file)",
    "mqtt.password_file": "file whose first line is the password (instead of `password`)",
    "mqtt.client_id": "fixed client id with a persistent session (`null`: `webhookd-<hostname>`)",
    "mqtt.keepalive": "MQTT keep-alive of our connection (1s-65535s, whole seconds)",
    "mqtt.settle": "after a (re)connect, messages within this long are reconciled: no event for a device "
    "back online by its end, one `offline` for each one still offline",
    "mqtt.status_topic": "our own availability: retained `online`, will `offline` (`null`: none)",
    "mqtt.tls_verify": "verify the broker's TLS certificate (`mqtts://`)",
    "mqtt.ca_file": "CA bundle to verify the broker's certificate with (`mqtts://`)",
    "mqtt.sources": "where availability comes from (at least one): a preset or a generic topic filter",
    "mqtt.sources[].preset": "a known system's topics and payloads (`null`: a generic source, `topic`)",
    "mqtt.sources[].base": "the preset's root topic when not its default (`tele`, `shellies`, `zigbee2mqtt`, ...)",
    "mqtt.sources[].devices": "globs on the resulting device id (case-sensitive)",
    "mqtt.sources[].id_prefix": "prepended to the device id (keeps MQTT ids apart from HTTP ones)",
    "mqtt.sources[].topic": "generic source: a topic filter with at least one `+` level",
    "mqtt.sources[].device": "which `+` level of `topic` (from 1) is the device id",
    "mqtt.sources[].field": "JSON payloads: read the state from this key (`null`: the payload as text)",
    "mqtt.sources[].online": "payloads (exact, after trimming whitespace) meaning `online`",
    "mqtt.sources[].offline": "payloads meaning `offline`",
    "mqtt.sources[].utilizing": "payloads meaning `utilizing`",
    "mqtt.sources[].unplugged": "payloads meaning `unplugged`",
    "mqtt.sources[].heartbeat": "any other message on the topic is a heartbeat of the device",
    "upstream": "relay to a hub (a gateway): every event to the endpoint `upstream`, plus a heartbeat "
    "(off without this section)",
    "upstream.url": "the hub's heartbeat API base URL, `http://` or `https://` (no query); "
    "webhookd adds `/v1/relay` and `/v1/gateways/<gateway>/heartbeat`",
    "upstream.gateway": "this gateway's name at the hub: 1-50 characters of `A-Za-z0-9._:@-`, "
    "starting with a letter or digit",
    "upstream.secret": "the secret shared with the hub (`hmac-sha256`; `${VAR}` keeps it out of the file)",
    "upstream.secret_file": "file holding the shared secret on its one non-empty line (instead of `secret`)",
    "upstream.heartbeat": "how often the gateway's signed heartbeat goes to the hub",
    "upstream.timeout": "timeout of each relay and heartbeat request",
    "upstream.concurrency": "relay requests in flight at once (order per device is kept)",
    "upstream.tls_verify": "verify the hub's TLS certificate",
    "upstream.ca_file": "CA bundle to verify the hub's certificate with",
    "hub": "this process is a hub: it takes the events its gateways relay (`POST /v1/relay`) and serves no "
    "device heartbeats (off without this section)",
    "hub.gateways": "the gateways allowed to relay to this hub (at least one)",
    "hub.gateways[].name": "the gateway's name, as its `upstream.gateway` says it: 1-50 characters of "
    "`A-Za-z0-9._:@-`; its devices are `<name>:<device id>` at the hub",
    "hub.gateways[].secret": "the secret shared with that gateway (`${VAR}` keeps it out of the file)",
    "hub.gateways[].secret_file": "file holding the shared secret on its one non-empty line (instead of `secret`)",
    "hub.gateways[].silence_timeout": "the gateway counts as silent after this long without a relay or heartbeat",
}

# Defaults the loader (config/load.py) sets from other keys, where the schema's own default never applies
# (tests/test_reference.py checks them).
LOADER_DEFAULTS: dict[str, str] = {
    "endpoints[].timeout": "`delivery.timeout`",
    "endpoints[].signature": "`hmac-sha256` with a secret, else `none`",
}
# Keys the schema lets be absent but the loader's rules across keys require (config/fleet.py).
LOADER_REQUIRED: dict[str, str] = {
    "hub.gateways": "required (at least one)",
    "upstream.secret": "required: `secret` or `secret_file`",
    "hub.gateways[].secret": "required: `secret` or `secret_file`",
}

# What the schema's value types look like in the file.
_READ_TYPES = {
    "_read_duration": "duration",
    "_read_timeout": "duration or `never`",
    "_read_size": "size",
    "_read_hostport": "host:port",
    "_read_path": "path",
}


# ------------------------------------------------------------------------------------------------ commands


def _subparsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _option(action: argparse.Action) -> str:
    if not action.option_strings:
        name = action.metavar if isinstance(action.metavar, str) else action.dest
        return name + ("..." if action.nargs in ("*", "+") else "")
    if action.nargs == 0:
        return ", ".join(action.option_strings)
    if action.choices is not None:
        value = "{" + ",".join(str(c) for c in action.choices) + "}"
    else:
        value = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return ", ".join(f"{o} {value}" for o in action.option_strings)


def _command(lines: list[str], words: list[str], parser: argparse.ArgumentParser, help_: str) -> None:
    subs = list(_subparsers(parser))
    lines.append(f"### `{' '.join(words)}`")
    lines.append("")
    if help_:
        lines.append(help_.rstrip(".") + ".")
        lines.append("")
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        text = action.help if isinstance(action.help, str) else ""
        text = text.replace("|", "\\|")
        option = _option(action).replace("|", "\\|")  # a table cell, also inside backticks (ID|GLOB)
        rows.append(f"| `{option}` | {text} |")
    if subs:
        metavar = next(a.metavar for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        shown = ", ".join(f"`{n}`" for n, _ in subs)
        rows.append(f"| `{metavar if isinstance(metavar, str) else 'COMMAND'}` | one of {shown} (below) |")
    if rows:
        lines += ["| argument | meaning |", "|---|---|", *rows, ""]
    for name, sub in subs:
        _command(lines, [*words, name], sub, sub.description or "")


def commands_section() -> str:
    from webhookd.cli import build_parser

    parser = build_parser()
    lines: list[str] = []
    _command(lines, ["webhookd"], parser, "")
    return "\n".join(lines).rstrip("\n") + "\n"


# -------------------------------------------------------------------------------------------------- config


def _strip(tp: Any) -> tuple[Any, list[Any]]:
    """The type under ``Annotated`` (and ``X | None``) and all the metadata met on the way."""
    meta: list[Any] = []
    while True:
        if typing.get_origin(tp) is typing.Annotated:
            meta += tp.__metadata__
            tp = tp.__origin__
            continue
        args = typing.get_args(tp)
        if type(None) in args and len(args) == 2:
            tp = next(a for a in args if a is not type(None))
            continue
        return tp, meta


def _struct_of(tp: Any) -> type[msgspec.Struct] | None:
    """The Struct of a field holding one (or a list of them), else None."""
    tp, _ = _strip(tp)
    if typing.get_origin(tp) is tuple:
        tp, _ = _strip(typing.get_args(tp)[0])
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct) and tp is not HostPort:
        return tp
    return None


def _type_name(tp: Any) -> str:
    base, meta = _strip(tp)
    for m in meta:
        if isinstance(m, Read) and m.fn.__name__ in _READ_TYPES:
            return _READ_TYPES[m.fn.__name__]
    origin = typing.get_origin(base)
    if origin is typing.Literal:
        return " or ".join(f"`{a}`" for a in typing.get_args(base))
    if origin in (tuple, frozenset):
        item_type = _strip(typing.get_args(base)[0])[0]
        if typing.get_origin(item_type) is typing.Literal:
            return "list of " + ", ".join(f"`{a}`" for a in typing.get_args(item_type))
        item = _type_name(typing.get_args(base)[0])
        return {"string": "list of strings", "duration": "list of durations"}.get(item, f"list of {item}")
    if origin is dict:
        return "map of strings"
    names = {str: "string", bool: "boolean", int: "integer", float: "number"}
    return names.get(base, getattr(base, "__name__", str(base)))


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _size(n: int) -> str:
    for unit, size in (("MiB", 1024**2), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _value(v: Any, kind: str) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, HostPort):
        return f"{v.host}:{v.port}"
    if isinstance(v, frozenset) and v == frozenset(schema.EVENT_KINDS):
        return "all"
    if isinstance(v, tuple | frozenset | list):
        item = kind.removeprefix("list of ").removesuffix("s")
        return "[" + ", ".join(_value(x, item) for x in v) + "]"
    if isinstance(v, dict):
        return "{}" if not v else str(v)
    if kind.startswith("duration") and isinstance(v, int | float):
        return "never" if v == float("inf") else _duration(float(v))
    if kind == "size" and isinstance(v, int):
        return _size(v)
    if isinstance(v, str):
        return f'"{v}"' if v == "" else v
    return str(v)


def _default(field: msgspec.structs.FieldInfo, kind: str, meta: list[Any]) -> str:
    for m in meta:
        if isinstance(m, FileDefault):
            return _value(m.value, kind)
    if field.default is not msgspec.NODEFAULT:
        return _value(field.default, kind)
    if field.default_factory is not msgspec.NODEFAULT:
        value = field.default_factory()
        return "" if isinstance(value, msgspec.Struct) and not isinstance(value, HostPort) else _value(value, kind)
    return "required"


def config_keys() -> list[tuple[str, str, str]]:
    """(key, type, default) of every key of the config file, in schema order."""
    rows: list[tuple[str, str, str]] = []

    def walk(struct: type[msgspec.Struct], prefix: str) -> None:
        for field in msgspec.structs.fields(struct):
            _, meta = _strip(field.type)
            if any(m is NOT_IN_FILE for m in meta):
                continue
            key = prefix + field.encode_name
            inner = _struct_of(field.type)
            if inner is not None:
                many = typing.get_origin(_strip(field.type)[0]) is tuple
                default = ("required" if field.required else "[]") if many else ""
                rows.append((key, "list" if many else "section", default))
                walk(inner, key + ("[]." if many else "."))
                continue
            kind = _type_name(field.type)
            default = _default(field, kind, meta)
            if any(m is OR_NULL for m in meta) and default != "required":
                default += " (also `null`)"
            rows.append((key, kind, default))

    walk(schema.Config, "")
    return rows


def config_section() -> str:
    rows = config_keys()
    keys = [k for k, _, _ in rows]
    missing = [k for k in keys if k not in KEY_DOCS]
    extra = [k for k in KEY_DOCS if k not in keys]
    if missing or extra:
        raise ValueError(f"KEY_DOCS out of date: missing {missing}, not in the schema {extra}")
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, kind, default in rows:
        if key in LOADER_DEFAULTS or key in LOADER_REQUIRED:
            shown_default = LOADER_DEFAULTS.get(key) or LOADER_REQUIRED[key]
            lines.append(f"| `{key}` | {kind} | {shown_default} | {KEY_DOCS[key]} |")
            continue
        shown = f"`{default}`" if default and default != "required" and " (also" not in default else default
        if " (also" in default:
            value, rest = default.split(" (also", 1)
            shown = f"`{value}` (also{rest}"
        lines.append(f"| `{key}` | {kind} | {shown} | {KEY_DOCS[key]} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- metrics


class _Stub:
    """Just enough of the engine, store and dispatcher for a scrape."""

    healthy = True
    endpoints: ClassVar[dict[str, Any]] = {}
    hub = None  # set in metric_families: the hub's gauges show too

    def now(self) -> float:
        return 0.0

    def counts(self) -> dict[str, int]:
        return {}


def _mqtt_stub(tracker: Any) -> Any:
    """An MQTT side that never connects, so that its metrics show (one source, counters at 0)."""
    from webhookd.config.mqtt import MqttConfig, MqttSourceConfig
    from webhookd.mqtt.client import MqttPresence

    return MqttPresence(MqttConfig(sources=(MqttSourceConfig(preset="tasmota"),)), tracker)


def metric_families() -> list[tuple[str, str, str, list[str]]]:
    """(name, type, help, labels) of every metric family in the daemon's registry (without process_*)."""
    from webhookd.leases import Holdings
    from webhookd.metrics import Metrics
    from webhookd.udp import UDPListener

    stub: Any = _Stub()
    stub.hub, stub.holdings = stub, Holdings()  # a hub process holding no partition
    m = Metrics(stub, stub, stub, 0.0, clock=lambda: 0.0, process=False)
    udp = UDPListener(stub, 1024)  # never started: its counters at 0
    m.udp = lambda: udp
    mqtt = _mqtt_stub(stub)
    m.mqtt = lambda: mqtt
    m._state.delivery_counts = {}
    # One child of each labelled family, so that a scrape shows its labels.
    m.on_rejected(400)
    m.on_event("device.online")
    m.on_result("ep", typing.cast(Any, type("R", (), {"latency": 0.1})()))
    m.on_outcome("ep", "delivered")
    families = []
    for fam in m.registry.collect():
        labels: list[str] = list(getattr(fam, "_labelnames", ()))
        for sample in fam.samples:
            labels += [k for k in sample.labels if k not in labels and k not in ("le", "quantile")]
        families.append((fam.name, fam.type, fam.documentation, labels))
    return sorted(families)


_EXPOSED = {
    "counter": "{0}_total",
    "histogram": "{0}_bucket, {0}_sum, {0}_count",
    "info": "{0}_info",
    "gauge": "{0}",
}


def metrics_section() -> str:
    lines = ["| metric | type | labels | meaning |", "|---|---|---|---|"]
    for name, kind, help_, labels in metric_families():
        exposed = ", ".join(f"`{n}`" for n in _EXPOSED.get(kind, "{0}").format(name).split(", "))
        shown = ", ".join(f"`{x}`" for x in labels) or "-"
        lines.append(f"| {exposed} | {kind} | {shown} | {help_} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------- file


def sections() -> dict[str, str]:
    return {"commands": commands_section(), "config": config_section(), "metrics": metrics_section()}


def _marker(name: str) -> re.Pattern[str]:
    return re.compile(
        rf"(<!-- generated: {name} [^\n]*-->\n)(.*?)(<!-- end generated: {name} -->)",
        re.DOTALL,
    )


def update(text: str, generated: dict[str, str] | None = None) -> str:
    """`text` with each generated section replaced by what the code says now."""
    for name, body in (generated or sections()).items():
        match = _marker(name).search(text)
        if match is None:
            raise ValueError(f"no '<!-- generated: {name} ... -->' section in the reference")
        text = text[: match.start(2)] + "\n" + body + "\n" + text[match.end(2) :]
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m webhookd.refdoc", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date, change nothing")
    parser.add_argument("path", nargs="?", type=Path, default=REFERENCE, help="the reference (docs/reference.md)")
    args = parser.parse_args(argv)
    path: Path = args.path
    old = path.read_text(encoding="utf-8")
    new = update(old)
    if new == old:
        return 0
    if args.check:
        print(f"{path} is out of date: run python -m webhookd.refdoc", file=sys.stderr)
        return 1
    path.write_text(new, encoding="utf-8")
    print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
