"""Configuration: YAML file -> validated, resolved, immutable `Config` (CONTRACT §3).

Validation never stops at the first problem: every section, every endpoint and every device rule is checked on
its own and every problem is collected as ``key.path: message`` (``endpoints[1].url: must be http or https``).
`ConfigError.problems` carries the list. Messages never contain secrets, tokens or values taken from the
environment.

The schema of the file is a set of raw msgspec Structs (``forbid_unknown_fields=True``); each present key is
converted with `msgspec.convert` against its field's type on its own, so that one bad key does not hide the
next one. The raw values are then checked and resolved into the public frozen Structs below.
"""

import base64
import binascii
import difflib
import fnmatch
import ipaddress
import math
import os
import re
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import msgspec
import yaml

__all__ = [
    "EVENT_KINDS",
    "FORMATS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "SIGNATURES",
    "AdminConfig",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "DeviceRule",
    "EndpointConfig",
    "HostPort",
    "ListenConfig",
    "LoggingConfig",
    "PresenceConfig",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_hostport",
    "parse_size",
    "redact_url",
    "summary",
]

EVENT_KINDS = ("online", "offline", "utilizing", "unplugged", "address_changed")
FORMATS = ("webhookd", "remoteit", "kobiton")
SIGNATURES = ("hmac-sha256", "standard-webhooks", "none")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")

DEFAULT_HTTP = "127.0.0.1:8470"
DEFAULT_MAX_BODY = 256 * 1024
DEFAULT_RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
DEFAULT_SIGNATURE_HEADER = "Webhookd-Signature"

MAX_NAME = 50
MAX_URL = 512
MAX_DESCRIPTION = 512
MAX_SECRET = 128

# Headers webhookd sets itself; an endpoint's `headers` may not override them.
_RESERVED_HEADERS = frozenset(
    {
        "content-length",
        "content-type",
        "transfer-encoding",
        "host",
        "connection",
        "webhook-id",
        "webhook-attempt",
        "webhook-timestamp",
        "webhook-signature",
    }
)


# ----------------------------------------------------------------------------------------------------
# Public, resolved types
# ----------------------------------------------------------------------------------------------------


class HostPort(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _default_http() -> HostPort | None:
    return HostPort(host="127.0.0.1", port=8470)


class ListenConfig(msgspec.Struct, frozen=True, kw_only=True):
    http: HostPort | None = msgspec.field(default_factory=_default_http)
    udp: HostPort | None = None
    tokens: tuple[str, ...] = ()
    max_body: int = DEFAULT_MAX_BODY


class AdminConfig(msgspec.Struct, frozen=True, kw_only=True):
    socket: Path  # absolute (resolved against the config file's directory)


class PresenceConfig(msgspec.Struct, frozen=True, kw_only=True):
    silence_timeout: float = 900.0  # seconds
    notify_online_after_utilizing: bool = False


class DeviceRule(msgspec.Struct, frozen=True, kw_only=True):
    match: str  # fnmatch glob on the device id (case-sensitive)
    silence_timeout: float | None = None
    name: str | None = None
    owner: str | None = None


class DeliveryConfig(msgspec.Struct, frozen=True, kw_only=True):
    concurrency: int = 64
    timeout: float = 5.0
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    disable_after: int = 20
    retention: float = 7 * 86400.0


class EndpointConfig(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    url: str
    description: str = ""
    events: frozenset[str] = frozenset(EVENT_KINDS)  # 'all' expanded to the five kinds
    devices: tuple[str, ...] = ("*",)
    format: str = "webhookd"  # webhookd | remoteit | kobiton
    secrets: tuple[str, ...] = ()  # from 'secret' (str or list) or 'secret_file' (one per non-empty line)
    signature: str = "none"  # hmac-sha256 | standard-webhooks | none
    signature_header: str = DEFAULT_SIGNATURE_HEADER
    secret_field: str | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    timeout: float = 5.0
    concurrency: int = 8
    tls_verify: bool = True
    ca_file: Path | None = None
    allow_link_local: bool = False


class LoggingConfig(msgspec.Struct, frozen=True, kw_only=True):
    format: str = "auto"  # auto | json | console
    level: str = "info"  # debug | info | warning | error (always lower case)


class Config(msgspec.Struct, frozen=True, kw_only=True):
    path: Path | None
    state_dir: Path
    listen: ListenConfig
    admin: AdminConfig
    presence: PresenceConfig
    devices: tuple[DeviceRule, ...]
    delivery: DeliveryConfig
    endpoints: tuple[EndpointConfig, ...]
    logging: LoggingConfig

    def endpoint(self, name: str) -> EndpointConfig | None:
        for ep in self.endpoints:
            if ep.name == name:
                return ep
        return None

    def device_rule(self, device_id: str) -> DeviceRule | None:
        """The first rule whose `match` glob matches `device_id` (case-sensitive), or None."""
        for rule in self.devices:
            if fnmatch.fnmatchcase(device_id, rule.match):
                return rule
        return None

    def silence_timeout_for(self, device_id: str) -> float:
        return self.silence_timeout_under(self.device_rule(device_id))

    def silence_timeout_under(self, rule: DeviceRule | None) -> float:
        """The silence timeout of a device that `rule` (from `device_rule`) matched."""
        if rule is not None and rule.silence_timeout is not None:
            return rule.silence_timeout
        return self.presence.silence_timeout

    @property
    def db_path(self) -> Path:
        """The SQLite database: ``<state_dir>/webhookd.db``."""
        return self.state_dir / "webhookd.db"


class ConfigError(Exception):
    """The config is invalid; `problems` lists every problem as ``key.path: message``."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


# ----------------------------------------------------------------------------------------------------
# Scalar parsers
# ----------------------------------------------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)", re.IGNORECASE)
_DURATION_FULL = re.compile(r"(?:(?:\d+(?:\.\d+)?|\.\d+)\s*(?:ms|s|m|h|d)\s*)+", re.IGNORECASE)
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)")


def parse_duration(v: object) -> float:
    """Seconds from ``500ms``, ``30s``, ``15m``, ``2h``, ``1d`` (also ``1h30m``) or a number of seconds.

    Raises ValueError for anything else, and for negative or non-finite values.
    """
    if isinstance(v, bool):
        raise ValueError("expected a duration, got a boolean")
    if isinstance(v, int | float):
        seconds = float(v)
    elif isinstance(v, str):
        s = v.strip()
        if _NUMBER.fullmatch(s):
            seconds = float(s)
        elif s and _DURATION_FULL.fullmatch(s):
            seconds = sum(float(n) * _DURATION_UNITS[u.lower()] for n, u in _DURATION_PART.findall(s))
        else:
            raise ValueError(f"invalid duration {v!r}")
    else:
        raise ValueError(f"expected a duration, got {type(v).__name__}")
    if not math.isfinite(seconds):
        raise ValueError("duration must be finite")
    if seconds < 0:
        raise ValueError("duration must not be negative")
    return seconds


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]*)")


def parse_size(v: object) -> int:
    """Bytes from ``64KiB``, ``1MiB``, ``1GiB`` (binary), ``100KB``, ``1MB`` (decimal), ``512B`` or an int."""
    if isinstance(v, bool):
        raise ValueError("expected a size, got a boolean")
    if isinstance(v, int):
        n = float(v)
    elif isinstance(v, float):
        if not v.is_integer():
            raise ValueError("a size in bytes must be a whole number")
        n = v
    elif isinstance(v, str):
        m = _SIZE.fullmatch(v.strip())
        if m is None or m.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"invalid size {v!r}")
        n = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    else:
        raise ValueError(f"expected a size, got {type(v).__name__}")
    if not math.isfinite(n):
        raise ValueError("size must be finite")
    if n < 0:
        raise ValueError("size must not be negative")
    return round(n)


_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")


def parse_hostport(v: str) -> HostPort:
    """``127.0.0.1:8470``, ``[::1]:8470``, ``localhost:8470``; ``:8470`` means all IPv4 interfaces (0.0.0.0).

    Port 0 (any free port) is allowed. Raises ValueError.
    """
    s = v.strip()
    if s.startswith("["):
        m = re.fullmatch(r"\[([^\]]+)\]:(\d{1,5})", s)
        if m is None:
            raise ValueError("expected host:port")
        host, port_s = m.group(1), m.group(2)
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise ValueError("invalid IPv6 address in [...]") from None
    else:
        host, sep, port_s = s.rpartition(":")
        if not sep or not port_s.isdigit() or not port_s.isascii():
            raise ValueError("expected host:port")
        if ":" in host:
            raise ValueError("expected host:port; write IPv6 addresses as [addr]:port")
        if host == "":
            host = "0.0.0.0"
        elif _HOSTNAME.fullmatch(host) is None:
            raise ValueError("expected host:port; invalid host")
    port = int(port_s)
    if port > 65535:
        raise ValueError("port must be 0-65535")
    return HostPort(host=host, port=port)


def redact_url(url: str) -> str:
    """The URL without ``user:password@``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"(?<=//)[^/@]*@", "", url, count=1)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


# ----------------------------------------------------------------------------------------------------
# Raw schema (what the YAML file may contain)
# ----------------------------------------------------------------------------------------------------

Duration = Annotated[str | int | float, msgspec.Meta(title="a duration (e.g. 500ms, 30s, 15m, 2h, 1d)")]
Size = Annotated[str | int, msgspec.Meta(title="a size (e.g. 64KiB, 1MiB or bytes)")]
Section = Annotated[dict[Any, Any] | None, msgspec.Meta(title="a mapping")]
StrList = Annotated[list[str] | str | None, msgspec.Meta(title="a string or a list of strings")]
EventList = Annotated[list[str] | str, msgspec.Meta(title="a list of events (online, offline, ... or all)")]
HostPortStr = Annotated[str | None, msgspec.Meta(title="host:port (or null)")]
ItemList = Annotated[list[Any] | None, msgspec.Meta(title="a list")]


class _Raw(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class _RawConfig(_Raw):
    state_dir: str = "./var"
    listen: Section = None
    admin: Section = None
    presence: Section = None
    devices: ItemList = None
    delivery: Section = None
    endpoints: ItemList = None
    logging: Section = None


class _RawListen(_Raw):
    http: HostPortStr = DEFAULT_HTTP
    udp: HostPortStr = None
    tokens: StrList = None
    max_body: Size = DEFAULT_MAX_BODY


class _RawAdmin(_Raw):
    socket: str = "./var/admin.sock"


class _RawPresence(_Raw):
    silence_timeout: Duration = "15m"
    notify_online_after_utilizing: bool = False


class _RawDeviceRule(_Raw):
    match: str
    silence_timeout: Duration | None = None
    name: str | None = None
    owner: str | None = None


class _RawDelivery(_Raw):
    concurrency: int = 64
    timeout: Duration = "5s"
    retry_schedule: list[Duration] = msgspec.field(default_factory=lambda: list(DEFAULT_RETRY_SCHEDULE))
    disable_after: int = 20
    retention: Duration = "7d"


class _RawEndpoint(_Raw):
    name: str
    url: str
    description: str | None = None
    events: EventList = msgspec.field(default_factory=lambda: ["all"])
    devices: StrList = None
    format: str = "webhookd"
    secret: StrList = None
    secret_file: str | None = None
    signature: str | None = None
    signature_header: str = DEFAULT_SIGNATURE_HEADER
    secret_field: str | None = None
    headers: dict[Any, Any] | None = None
    timeout: Duration | None = None
    concurrency: int = 8
    tls_verify: bool = True
    ca_file: str | None = None
    allow_link_local: bool = False


class _RawLogging(_Raw):
    format: str = "auto"
    level: str = "info"


R = TypeVar("R", bound=_Raw)

# ----------------------------------------------------------------------------------------------------
# Validation machinery
# ----------------------------------------------------------------------------------------------------

_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_MSGSPEC_ERR = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "array": "a list",
    "object": "a mapping",
    "null": "null",
}


def _type_word(name: str) -> str:
    return " or ".join(_TYPE_WORDS.get(p.strip(), p.strip()) for p in name.split("|"))


def _kind(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__


def _key(path: str, key: object) -> str:
    text = str(key)
    if not text or len(text) > 100 or any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        # A key path is one line of a problem list: a key with a newline (or an empty or huge one) is quoted.
        text = repr(text) if len(text) <= 100 else repr(text[:97]) + "..."
    return f"{path}.{text}" if path else text


def _title_of(tp: object) -> str | None:
    if typing.get_origin(tp) is Annotated:
        for meta in getattr(tp, "__metadata__", ()):
            if isinstance(meta, msgspec.Meta) and meta.title:
                return meta.title
    return None


def _list_element(tp: object) -> object | None:
    """X for a field typed ``list[X]`` (possibly Annotated, possibly in a union), else None."""
    if typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    for arg in (tp, *typing.get_args(tp)):
        if typing.get_origin(arg) is list:
            (elem,) = typing.get_args(arg)
            return elem  # type: ignore[no-any-return]
    return None


def _element_title(tp: object) -> str | None:
    """The title of a list's (Annotated) element type."""
    elem = _list_element(tp)
    return None if elem is None else _title_of(elem)


class _Checker:
    def __init__(self, base_dir: Path, env: Mapping[str, str]) -> None:
        self.base_dir = base_dir
        self.env = env
        self.problems: list[str] = []
        self.from_env: set[str] = set()  # key paths whose string had a ${VAR} substituted
        self.failed: set[str] = set()  # key paths already reported: no follow-up problems below them

    # -- problems -------------------------------------------------------------------------------------------

    def add(self, path: str, message: str) -> None:
        if self.bad(path):
            return
        self.problems.append(f"{path or 'config'}: {message}")
        self.failed.add(path)

    def bad(self, path: str) -> bool:
        """Was a problem already reported at `path` (or above it)?"""
        return any(path == f or path.startswith((f + ".", f + "[")) for f in self.failed)

    def shown(self, path: str, value: object) -> str:
        """`` 'value'`` for a message, or nothing when the value came from the environment."""
        if path in self.from_env or not isinstance(value, str | int | float):
            return ""
        text = repr(value)
        return " " + (text if len(text) <= 60 else text[:57] + "...")

    # -- ${VAR} ---------------------------------------------------------------------------------------------

    def substitute(self, node: object, path: str) -> object:
        if isinstance(node, str):
            return self._subst_str(node, path)
        if isinstance(node, list):
            return [self.substitute(v, f"{path}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, dict):
            return {k: self.substitute(v, _key(path, k)) for k, v in node.items()}
        return node

    def _subst_str(self, s: str, path: str) -> str:
        if "${" not in s:
            return s
        missing: list[str] = []
        bad = False

        def repl(m: re.Match[str]) -> str:
            nonlocal bad
            text = m.group(0)
            if text == "$${":
                return "${"
            name = m.group(1)
            if name is None:
                bad = True
                return ""
            if name not in self.env:
                missing.append(name)
                return ""
            return self.env[name]

        out = _ENV_REF.sub(repl, s)
        self.from_env.add(path)
        if bad:
            self.add(path, "invalid ${...} reference (use ${NAME}; write $${ for a literal ${)")
        elif missing:
            names = ", ".join(dict.fromkeys(missing))
            plural = "s" if len(set(missing)) > 1 else ""
            self.add(path, f"environment variable{plural} {names} not set")
        return out

    # -- schema ---------------------------------------------------------------------------------------------

    def section(self, value: object, cls: type[R], path: str, *, none_ok: bool = True) -> R | None:
        """Convert one mapping into the raw struct `cls`, key by key, reporting every problem.

        A key whose value is invalid is reported and replaced by its default (or "" when required), so the
        remaining checks still run; follow-up problems under a reported key path are suppressed.
        """
        if value is None and none_ok:
            value = {}
        if not isinstance(value, dict):
            self.add(path, f"expected a mapping, got {_kind(value)}")
            return None
        fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
        hints = typing.get_type_hints(cls, include_extras=True)
        for k in value:
            if not isinstance(k, str) or k not in fields:
                hint = ""
                if isinstance(k, str):
                    close = difflib.get_close_matches(k, list(fields), n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                self.add(_key(path, k), f"unknown key{hint}")
        values: dict[str, Any] = {}
        for key, fi in fields.items():
            kpath = _key(path, key)
            if key not in value:
                if fi.required:
                    self.add(kpath, "missing required key")
                    values[fi.name] = ""
                continue
            tp = hints[fi.name]
            elem = _list_element(tp)
            if elem is not None and isinstance(value[key], list):
                # Item by item, so that every bad item is reported; the good ones are kept for later checks.
                items: list[Any] = []
                for i, item in enumerate(value[key]):
                    ipath = f"{kpath}[{i}]"
                    try:
                        items.append(msgspec.convert(item, elem, strict=ipath not in self.from_env))
                    except msgspec.ValidationError as e:
                        self._schema_problem(ipath, str(e), elem)
                        items.append(item)  # keeps the indexes; later checks skip it (`self.bad(ipath)`)
                values[fi.name] = items
                continue
            try:
                values[fi.name] = msgspec.convert(value[key], tp, strict=kpath not in self.from_env)
            except msgspec.ValidationError as e:
                self._schema_problem(kpath, str(e), tp)
                if fi.required:
                    values[fi.name] = ""
        try:
            return cls(**values)
        except TypeError:  # pragma: no cover - every required field is filled above
            return None

    def _schema_problem(self, path: str, err: str, tp: object) -> None:
        """Translate a msgspec ValidationError (``... - at `$[1]```) into ``path[1]: message``."""
        m = _MSGSPEC_ERR.match(err)
        msg, sub = (m.group("msg"), m.group("path") or "") if m else (err, "")
        if sub.startswith("[...]"):  # a mapping key/value: msgspec does not name it
            sub = ""
        got = re.search(r"got `([^`]+)`", msg)
        got_word = "a boolean" if got and got.group(1) == "bool" else _type_word(got.group(1)) if got else ""
        title = _title_of(tp) if not sub else _element_title(tp)
        if msg.startswith("Expected") and got:
            expected = re.match(r"Expected `([^`]+)`", msg)
            want = title or (_type_word(expected.group(1)) if expected else "another type")
            self.add(path + sub, f"expected {want}, got {got_word}")
        else:
            self.add(path + sub, msg.replace("`", "'").rstrip(".").lower() if msg else "invalid value")

    # -- value checks ---------------------------------------------------------------------------------------

    def duration(self, path: str, v: object, *, positive: bool = True) -> float | None:
        try:
            seconds = parse_duration(v)
        except ValueError:
            if isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
                self.add(path, "must be greater than 0")
            elif not isinstance(v, str | int | float) or isinstance(v, bool):
                self.add(path, f"expected a duration (e.g. 500ms, 30s, 15m, 2h, 1d), got {_kind(v)}")
            else:
                self.add(path, f"invalid duration{self.shown(path, v)} (use e.g. 500ms, 30s, 15m, 2h, 1d)")
            return None
        if positive and seconds <= 0:
            self.add(path, "must be greater than 0")
            return None
        return seconds

    def size(self, path: str, v: object) -> int | None:
        try:
            n = parse_size(v)
        except ValueError:
            self.add(path, f"invalid size{self.shown(path, v)} (use e.g. 64KiB, 1MiB or a number of bytes)")
            return None
        if n <= 0:
            self.add(path, "must be greater than 0")
            return None
        return n

    def hostport(self, path: str, v: str | None) -> HostPort | None:
        if v is None:
            return None
        try:
            return parse_hostport(v)
        except ValueError as e:
            shown = self.shown(path, v)
            self.add(path, f"{e}" + (f" (got{shown})" if shown else ""))
            return None

    def path(self, path: str, v: str) -> Path | None:
        if not v.strip():
            self.add(path, "must not be empty")
            return None
        if "\0" in v:
            self.add(path, "must not contain NUL")
            return None
        p = Path(v).expanduser()
        return Path(os.path.normpath(p if p.is_absolute() else self.base_dir / p))

    def min_int(self, path: str, v: int, minimum: int) -> int:
        if v < minimum:
            self.add(path, f"must be >= {minimum}")
        return max(v, minimum)

    def choice(self, path: str, v: str, choices: tuple[str, ...], aliases: Mapping[str, str] | None = None) -> str:
        lv = v.strip().lower()
        lv = (aliases or {}).get(lv, lv)
        if lv not in choices:
            shown = self.shown(path, v)
            self.add(path, f"must be one of {', '.join(choices)}" + (f" (got{shown})" if shown else ""))
            return choices[0]
        return lv

    def text(self, path: str, v: str, *, max_len: int, min_len: int = 0) -> None:
        if len(v) < min_len or len(v) > max_len:
            if min_len:
                self.add(path, f"must be {min_len}-{max_len} characters (got {len(v)})")
            else:
                self.add(path, f"must be at most {max_len} characters (got {len(v)})")
        elif any(ord(c) < 32 or ord(c) == 127 for c in v if c != "\t"):
            self.add(path, "must not contain control characters")


# ----------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------


def _listen(c: _Checker, value: object) -> ListenConfig:
    raw = c.section(value, _RawListen, "listen")
    if raw is None:
        return ListenConfig()
    tokens: list[str] = []
    items = [raw.tokens] if isinstance(raw.tokens, str) else list(raw.tokens or [])
    for i, tok in enumerate(items):
        tpath = "listen.tokens" if isinstance(raw.tokens, str) else f"listen.tokens[{i}]"
        if c.bad(tpath) or not isinstance(tok, str):
            continue
        if not tok.strip():
            c.add(tpath, "must not be empty")
        elif any(ch.isspace() or ord(ch) < 32 for ch in tok):
            c.add(tpath, "must not contain whitespace or control characters")
        else:
            tokens.append(tok)
    return ListenConfig(
        http=c.hostport("listen.http", raw.http),
        udp=c.hostport("listen.udp", raw.udp),
        tokens=tuple(tokens),
        max_body=c.size("listen.max_body", raw.max_body) or DEFAULT_MAX_BODY,
    )


def _presence(c: _Checker, value: object) -> PresenceConfig:
    raw = c.section(value, _RawPresence, "presence")
    if raw is None:
        return PresenceConfig()
    return PresenceConfig(
        silence_timeout=c.duration("presence.silence_timeout", raw.silence_timeout) or 900.0,
        notify_online_after_utilizing=raw.notify_online_after_utilizing,
    )


def _device_rules(c: _Checker, value: object) -> tuple[DeviceRule, ...]:
    rules: list[DeviceRule] = []
    for i, item in enumerate(value if isinstance(value, list) else []):
        path = f"devices[{i}]"
        raw = c.section(item, _RawDeviceRule, path, none_ok=False)
        if raw is None:
            continue
        if not raw.match.strip():
            c.add(f"{path}.match", "must not be empty")
        timeout = None
        if raw.silence_timeout is not None:
            timeout = c.duration(f"{path}.silence_timeout", raw.silence_timeout)
        for key in ("name", "owner"):
            v = getattr(raw, key)
            if v is not None:
                c.text(f"{path}.{key}", v, max_len=256)
        rules.append(DeviceRule(match=raw.match, silence_timeout=timeout, name=raw.name, owner=raw.owner))
    return tuple(rules)


def _delivery(c: _Checker, value: object) -> DeliveryConfig:
    raw = c.section(value, _RawDelivery, "delivery")
    if raw is None:
        return DeliveryConfig()
    schedule: list[float] = []
    if not raw.retry_schedule:
        c.add("delivery.retry_schedule", "must have at least 1 entry")
    for i, step in enumerate(raw.retry_schedule):
        s = c.duration(f"delivery.retry_schedule[{i}]", step)
        if s is not None:
            schedule.append(s)
    return DeliveryConfig(
        concurrency=c.min_int("delivery.concurrency", raw.concurrency, 1),
        timeout=c.duration("delivery.timeout", raw.timeout) or 5.0,
        retry_schedule=tuple(schedule) or DEFAULT_RETRY_SCHEDULE,
        disable_after=c.min_int("delivery.disable_after", raw.disable_after, 0),
        retention=c.duration("delivery.retention", raw.retention) or 7 * 86400.0,
    )


def _logging(c: _Checker, value: object) -> LoggingConfig:
    raw = c.section(value, _RawLogging, "logging")
    if raw is None:
        return LoggingConfig()
    return LoggingConfig(
        format=c.choice("logging.format", raw.format, LOG_FORMATS),
        level=c.choice("logging.level", raw.level, LOG_LEVELS, {"warn": "warning"}),
    )


def _url(c: _Checker, path: str, url: str) -> None:
    # Never echo the URL: it may carry credentials or values from the environment.
    if not url:
        c.add(path, "must not be empty")
        return
    if len(url) > MAX_URL:
        c.add(path, f"must be at most {MAX_URL} characters (got {len(url)})")
        return
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        c.add(path, "must not contain whitespace or control characters")
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        c.add(path, "invalid URL (bad port)" if "port" in str(e).lower() else "invalid URL")
        return
    if parts.scheme.lower() not in ("http", "https"):
        c.add(path, "must be http or https")
    elif not parts.hostname:
        c.add(path, "must have a host")


def _secret_items(c: _Checker, raw: _RawEndpoint, path: str) -> list[tuple[str, str]]:
    """(key path, secret) pairs from `secret` or `secret_file`; problems for the invalid ones."""
    pairs: list[tuple[str, str]] = []
    if raw.secret is not None and raw.secret_file is not None:
        c.add(f"{path}.secret_file", "use either secret or secret_file, not both")
        return pairs
    if raw.secret is not None:
        if isinstance(raw.secret, str):
            pairs.append((f"{path}.secret", raw.secret))
        elif not raw.secret:
            c.add(f"{path}.secret", "must list at least one secret")
        else:
            pairs.extend(
                (f"{path}.secret[{i}]", s)
                for i, s in enumerate(raw.secret)
                if isinstance(s, str) and not c.bad(f"{path}.secret[{i}]")
            )
    elif raw.secret_file is not None:
        fpath = f"{path}.secret_file"
        p = c.path(fpath, raw.secret_file)
        if p is None:
            return pairs
        try:
            content = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            c.add(fpath, f"file not found: {p}")
            return pairs
        except UnicodeDecodeError:
            c.add(fpath, f"not a UTF-8 text file: {p}")
            return pairs
        except OSError as e:
            c.add(fpath, f"cannot read {p}: {e.strerror or e.__class__.__name__}")
            return pairs
        lines = [(n, line.strip()) for n, line in enumerate(content.splitlines(), 1) if line.strip()]
        if not lines:
            c.add(fpath, f"no secret in {p}")
        pairs.extend((f"{fpath} (line {n})", s) for n, s in lines)
    good: list[tuple[str, str]] = []
    for spath, s in pairs:
        if not s:
            c.add(spath, "must not be empty")
        elif len(s) > MAX_SECRET:
            c.add(spath, f"must be at most {MAX_SECRET} characters (got {len(s)})")
        elif any(ord(ch) < 32 or ord(ch) == 127 for ch in s):
            c.add(spath, "must not contain control characters")
        else:
            good.append((spath, s))
    return good


def _is_whsec(secret: str) -> bool:
    if not secret.startswith("whsec_"):
        return False
    try:
        return len(base64.b64decode(secret[6:], validate=True)) > 0
    except (binascii.Error, ValueError):
        return False


def _headers(c: _Checker, raw: dict[Any, Any] | None, path: str, signature_header: str) -> dict[str, str]:
    out: dict[str, str] = {}
    seen: set[str] = set()
    reserved = _RESERVED_HEADERS | {signature_header.lower()}
    for name, value in (raw or {}).items():
        hpath = _key(path, name)
        if not isinstance(name, str) or _TOKEN.fullmatch(name) is None:
            c.add(hpath, "invalid header name")
            continue
        if name.lower() in reserved:
            c.add(hpath, "reserved header (set by webhookd)")
            continue
        if name.lower() in seen:
            c.add(hpath, "duplicate header (names are case-insensitive)")
            continue
        seen.add(name.lower())
        if isinstance(value, bool) or not isinstance(value, str | int):
            c.add(hpath, f"expected a string, got {_kind(value)}")
            continue
        text = str(value)
        if any(ch in "\r\n\0" for ch in text):
            c.add(hpath, "header value must not contain CR, LF or NUL")
            continue
        out[name] = text
    return out


AUTH_WITH_CREDENTIALS = "cannot be used with credentials in url (user:password@...); keep one of the two"


def _auth_once(c: _Checker, path: str, url: str, headers: Mapping[str, str]) -> None:
    """aiohttp refuses every request that has both (`Cannot combine AUTHORIZATION header with ...`)."""
    auth = [name for name in headers if name.lower() == "authorization"]
    if auth and not c.bad(f"{path}.url") and "@" in urlsplit(url).netloc:
        c.add(_key(f"{path}.headers", auth[0]), AUTH_WITH_CREDENTIALS)


def _endpoint(c: _Checker, item: object, i: int, delivery: DeliveryConfig) -> EndpointConfig | None:
    path = f"endpoints[{i}]"
    raw = c.section(item, _RawEndpoint, path, none_ok=False)
    if raw is None:
        return None
    n_before = len(c.problems)

    name_path = f"{path}.name"
    if not raw.name or len(raw.name) > MAX_NAME:
        c.add(name_path, f"must be 1-{MAX_NAME} characters (got {len(raw.name)})")
    elif any(ord(ch) < 32 or ord(ch) == 127 for ch in raw.name) or "/" in raw.name:
        c.add(name_path, "must not contain '/' or control characters")
    elif raw.name != raw.name.strip():
        c.add(name_path, "must not start or end with whitespace")

    _url(c, f"{path}.url", raw.url)

    description = raw.description or ""
    c.text(f"{path}.description", description, max_len=MAX_DESCRIPTION)

    events: set[str] = set()
    ev_items = [raw.events] if isinstance(raw.events, str) else raw.events
    if not ev_items:
        c.add(f"{path}.events", "must list at least one event (online, offline, ... or all)")
    for j, ev in enumerate(ev_items):
        epath = f"{path}.events" if isinstance(raw.events, str) else f"{path}.events[{j}]"
        if c.bad(epath) or not isinstance(ev, str):
            continue
        ev_l = ev.strip().lower()
        if ev_l == "all":
            events.update(EVENT_KINDS)
        elif ev_l in EVENT_KINDS:
            events.add(ev_l)
        else:
            c.add(epath, f"unknown event{c.shown(epath, ev)} (expected {', '.join(EVENT_KINDS)} or all)")

    if raw.devices is None:
        devices: tuple[str, ...] = ("*",)
    else:
        dev_items = [raw.devices] if isinstance(raw.devices, str) else raw.devices
        if not dev_items:
            c.add(f"{path}.devices", 'must list at least one pattern (use ["*"] for every device)')
        for j, pat in enumerate(dev_items):
            if isinstance(pat, str) and not pat.strip():
                c.add(
                    f"{path}.devices" if isinstance(raw.devices, str) else f"{path}.devices[{j}]",
                    "empty pattern",
                )
        devices = tuple(dev_items)

    fmt = c.choice(f"{path}.format", raw.format, FORMATS)

    secret_pairs = _secret_items(c, raw, path)
    secrets = tuple(s for _, s in secret_pairs)
    secret_given = raw.secret is not None or raw.secret_file is not None
    if raw.signature is None:
        signature = "hmac-sha256" if secret_given else "none"
    else:
        signature = c.choice(f"{path}.signature", raw.signature, SIGNATURES)
        if signature != "none" and not secret_given:
            c.add(f"{path}.signature", f"{signature} needs a secret (set secret or secret_file)")
    if signature == "standard-webhooks":
        for spath, s in secret_pairs:
            if not _is_whsec(s):
                c.add(spath, "standard-webhooks needs secrets of the form whsec_<base64>")

    sig_header = raw.signature_header
    if _TOKEN.fullmatch(sig_header) is None:
        c.add(f"{path}.signature_header", "invalid header name")
    elif sig_header.lower() in _RESERVED_HEADERS:
        c.add(f"{path}.signature_header", "reserved header (set by webhookd)")

    if raw.secret_field is not None:
        if not raw.secret_field.strip():
            c.add(f"{path}.secret_field", "must not be empty (use null for none)")
        elif not secret_given:
            c.add(f"{path}.secret_field", "needs a secret (set secret or secret_file)")

    headers = _headers(c, raw.headers, f"{path}.headers", sig_header)
    _auth_once(c, path, raw.url, headers)

    timeout = delivery.timeout
    if raw.timeout is not None:
        timeout = c.duration(f"{path}.timeout", raw.timeout) or delivery.timeout

    ca_file = None
    if raw.ca_file is not None:
        ca_file = c.path(f"{path}.ca_file", raw.ca_file)
        if ca_file is not None and not ca_file.is_file():
            c.add(f"{path}.ca_file", f"file not found: {ca_file}")

    concurrency = c.min_int(f"{path}.concurrency", raw.concurrency, 1)
    if len(c.problems) != n_before:
        return None
    return EndpointConfig(
        name=raw.name,
        url=raw.url,
        description=description,
        events=frozenset(events),
        devices=devices,
        format=fmt,
        secrets=secrets,
        signature=signature,
        signature_header=sig_header,
        secret_field=raw.secret_field,
        headers=headers,
        timeout=timeout,
        concurrency=concurrency,
        tls_verify=raw.tls_verify,
        ca_file=ca_file,
        allow_link_local=raw.allow_link_local,
    )


# ----------------------------------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------------------------------


MAX_VALUES = 200_000  # values in a config once YAML aliases are expanded (real ones have a few hundred)
MAX_DEPTH = 64


def _check_shape(data: object) -> None:
    """Refuse what YAML aliases can build but no config needs, before anything walks it recursively: a value
    that contains itself (`a: &x [*x]`), an alias bomb ("billion laughs": a few lines expanding to billions of
    values), or nesting deeper than MAX_DEPTH."""
    count = 0
    stack: list[tuple[object, str, tuple[int, ...]]] = [(data, "", ())]
    while stack:
        node, path, ancestors = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError([f"config: more than {MAX_VALUES} values (YAML aliases expanding too much?)"])
        if not isinstance(node, dict | list):
            continue
        if id(node) in ancestors:
            raise ConfigError([f"{path or 'config'}: contains itself (a recursive YAML alias)"])
        if len(ancestors) >= MAX_DEPTH:
            raise ConfigError([f"{path or 'config'}: nested more than {MAX_DEPTH} levels deep"])
        inner = (*ancestors, id(node))
        if isinstance(node, dict):
            stack.extend((v, _key(path, k), inner) for k, v in node.items())
        else:
            stack.extend((v, f"{path}[{i}]", inner) for i, v in enumerate(node))


def parse_config(
    data: object, base_dir: Path, env: Mapping[str, str] | None = None, path: Path | None = None
) -> Config:
    """Validate already-loaded YAML data; relative paths resolve against `base_dir`. Raises ConfigError."""
    c = _Checker(Path(os.path.abspath(base_dir)), os.environ if env is None else env)
    if data is None:
        raise ConfigError(["config: the file is empty (expected a mapping of settings)"])
    if not isinstance(data, dict):
        raise ConfigError([f"config: the top level must be a mapping, got {_kind(data)}"])
    _check_shape(data)
    data = c.substitute(data, "")
    top = c.section(data, _RawConfig, "")
    if top is None:  # pragma: no cover - data is a dict
        raise ConfigError(c.problems)

    state_dir = c.path("state_dir", top.state_dir) or c.base_dir / "var"
    listen = _listen(c, top.listen)
    admin_raw = c.section(top.admin, _RawAdmin, "admin")
    socket = c.path("admin.socket", admin_raw.socket) if admin_raw is not None else None
    presence = _presence(c, top.presence)
    devices = _device_rules(c, top.devices)
    delivery = _delivery(c, top.delivery)

    endpoints: list[EndpointConfig] = []
    names: dict[str, int] = {}
    for i, item in enumerate(top.endpoints or []):
        ep = _endpoint(c, item, i, delivery)
        name = getattr(ep, "name", None)
        if name is None and isinstance(item, dict) and isinstance(item.get("name"), str):
            name = item["name"]
        if name is not None:
            if name in names:
                c.add(
                    f"endpoints[{i}].name",
                    f"duplicate endpoint name {name!r} (also endpoints[{names[name]}])",
                )
                ep = None
            else:
                names[name] = i
        if ep is not None:
            endpoints.append(ep)
    logging = _logging(c, top.logging)

    if c.problems:
        raise ConfigError(c.problems)
    return Config(
        path=path,
        state_dir=state_dir,
        listen=listen,
        admin=AdminConfig(socket=socket or state_dir / "admin.sock"),
        presence=presence,
        devices=devices,
        delivery=delivery,
        endpoints=tuple(endpoints),
        logging=logging,
    )


YAML_MAX_NESTING = 2 * MAX_DEPTH  # collections inside each other in the text (`_check_shape` allows MAX_DEPTH)


class _TooDeep(Exception):
    def __init__(self, mark: yaml.Mark) -> None:
        self.mark = mark


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that also records duplicate mapping keys (PyYAML silently keeps the last one) and
    refuses nesting deeper than YAML_MAX_NESTING while scanning.

    The depth limit is checked where the scanner opens a collection, before PyYAML pays for it: its scanner
    does work proportional to the flow depth for every token (10 KB of ``[`` took seconds), and its composer
    recurses once per level."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, int, str]] = []

    def _nest(self) -> None:
        if self.flow_level + len(self.indents) >= YAML_MAX_NESTING:
            raise _TooDeep(self.get_mark())

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        self._nest()  # '[' or '{'
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column: int) -> bool:
        if self.indent < column:
            self._nest()  # a block mapping or sequence (called outside flow collections only)
        return super().add_indent(column)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:  # unhashable key; construct_mapping reports it
                continue
            if dup:
                m = key_node.start_mark
                where = f"line {m.line + 1}, column {m.column + 1}"
                self.duplicates.append((m.line, m.column, f"{where}: duplicate key {key!r}"))
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, shown: str) -> object:
    try:
        loader = _StrictLoader(text)  # checks every character first (control characters are refused)
    except yaml.reader.ReaderError as e:
        raise ConfigError(
            [f"{shown}: invalid YAML at character {e.position}: {e.reason} (#x{e.character:04x})"]
        ) from None
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = e.problem or e.context or "syntax error"
        raise ConfigError([f"{shown}: invalid YAML{where}: {what}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{shown}: invalid YAML: {e}"]) from None
    except _TooDeep as e:
        where = f"line {e.mark.line + 1}, column {e.mark.column + 1}"
        raise ConfigError([f"{shown}: {where}: nested more than {YAML_MAX_NESTING} levels deep"]) from None
    except RecursionError:
        raise ConfigError([f"{shown}: invalid YAML: nested too deeply"]) from None
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError) as e:
        # PyYAML's constructors raise these for tagged scalars they cannot convert (`!!int ""`, `!!float x`).
        raise ConfigError([f"{shown}: invalid YAML: a value cannot be converted ({type(e).__name__})"]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError([f"{shown}: {d}" for _, _, d in sorted(loader.duplicates)])
    return data


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate the YAML config at `path`. Raises ConfigError listing every problem."""
    p = Path(path)
    shown = str(p)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{shown}: file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{shown}: is a directory, not a config file"]) from None
    except OSError as e:
        raise ConfigError([f"{shown}: cannot read: {e.strerror or e.__class__.__name__}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{shown}: not UTF-8 text (byte {e.start})"]) from None
    data = _load_yaml(text, shown)
    absolute = Path(os.path.abspath(p))
    return parse_config(data, absolute.parent, env, absolute)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary(cfg: Config) -> str:
    """One line for ``check-config``; never includes secrets, tokens or header values."""
    parts = []
    names = [ep.name for ep in cfg.endpoints]
    shown = ", ".join(names[:10]) + (f", +{len(names) - 10} more" if len(names) > 10 else "")
    parts.append(_plural(len(names), "endpoint") + (f" ({shown})" if names else ""))
    parts.append(_plural(len(cfg.devices), "device rule"))
    parts.append(f"http {cfg.listen.http}" if cfg.listen.http is not None else "http off")
    if cfg.listen.udp is not None:
        parts.append(f"udp {cfg.listen.udp}")
    if cfg.listen.tokens:
        parts.append(_plural(len(cfg.listen.tokens), "token"))
    parts.append(f"state_dir {cfg.state_dir}")
    return "config OK: " + ", ".join(parts)
