"""The config file's schema, declared once: frozen msgspec Structs that are both what the file may contain and
the resolved, immutable `Config` the daemon uses (CONTRACT §3).

Each field has its resolved type; its annotations say how the file spells it (`units`): msgspec `Meta`
constraints (``ge``, ``gt``, ``min_length``, ``max_length``, ``pattern``; a pattern's problem is its
``extra["message"]``), ``Literal`` types for enumerations (case-insensitive in the file), `Read` for values
the file spells differently (durations, sizes, host:port, paths), `Check` for rules msgspec cannot state,
`Many` for lists (some may be a single string), `OR_NULL` where ``key: null`` means the default. Rules that
span fields (secrets and signatures, headers) are in `load.py`.
"""

import fnmatch
import ipaddress
import re
import typing
from pathlib import Path
from typing import Annotated, Final, Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec
from msgspec import Meta

from .mqtt import MqttConfig
from .units import (
    NOT_IN_FILE,
    OR_NULL,
    Address,
    At,
    Check,
    Duration,
    Duration0,
    FileDefault,
    FilePath,
    HostPort,
    Many,
    Read,
    Size,
    Timeout,
    redact_url,
)

EventKind = Literal[
    "online",
    "offline",
    "utilizing",
    "unplugged",
    "address_changed",
    "still_offline",
    "gateway_online",
    "gateway_offline",
]
Format = Literal["webhookd", "remoteit", "kobiton", "slack", "discord", "teams", "ntfy", "template"]
Signature = Literal["hmac-sha256", "standard-webhooks", "none"]
LogFormat = Literal["auto", "json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]

EVENT_KINDS: Final[tuple[EventKind, ...]] = typing.get_args(EventKind)
FORMATS: Final[tuple[Format, ...]] = typing.get_args(Format)
SIGNATURES: Final[tuple[Signature, ...]] = typing.get_args(Signature)
LOG_FORMATS: Final[tuple[LogFormat, ...]] = typing.get_args(LogFormat)
LOG_LEVELS: Final[tuple[LogLevel, ...]] = typing.get_args(LogLevel)

DEFAULT_MAX_BODY = 256 * 1024
DEFAULT_RETRY_SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
DEFAULT_SIGNATURE_HEADER = "Webhookd-Signature"

MAX_NAME = 50
MAX_URL = 512
MAX_DESCRIPTION = 512
MAX_SECRET = 128

# Headers webhookd sets itself; an endpoint's `headers` may not override them.
RESERVED_HEADERS = frozenset(
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
HEADER_NAME = r"\A[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z"  # an HTTP token

# ----------------------------------------------------------------------------------------------------
# Rules for single values (a `Check` or `Read` function: the value, or ValueError with the problem)
# ----------------------------------------------------------------------------------------------------


def _has_control(text: str) -> bool:
    return any(ord(ch) < 32 or ord(ch) == 127 for ch in text)


def _not_blank(message: str) -> Check:
    def check(v: str, at: At) -> str:
        if not v.strip():
            raise ValueError(message)
        return v

    return Check(check)


def _no_edge_space(v: str, at: At) -> str:
    if v != v.strip():
        raise ValueError("must not start or end with whitespace")
    return v


def _check_url(url: str, at: At) -> str:
    # Never echo the URL: it may carry credentials or values from the environment.
    if not url:
        raise ValueError("must not be empty")
    if len(url) > MAX_URL:
        raise ValueError(f"must be at most {MAX_URL} characters (got {len(url)})")
    if any(ch.isspace() for ch in url) or _has_control(url):
        raise ValueError("must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise ValueError("invalid URL (bad port)" if "port" in str(e).lower() else "invalid URL") from None
    if parts.scheme.lower() not in ("http", "https"):
        if _missing_scheme(url, parts.scheme):
            raise ValueError(_scheme_hint(url, at))
        raise ValueError("must be http or https")
    if not parts.hostname:
        raise ValueError("must have a host")
    return url


def _missing_scheme(url: str, scheme: str) -> bool:
    """``hooks.example.com/x``, ``localhost:8479/x``, ``//host/x``: a URL without ``http(s)://``."""
    if "://" in url:
        return False
    if not scheme or "." in scheme:  # urlsplit reads `hooks.example.com:443/x` as the scheme `hooks.example.com`
        return True
    return url[len(scheme) + 1 :].split("/", 1)[0].isdigit()  # `localhost:8479/x`


def _scheme_hint(url: str, at: At) -> str:
    """The problem for a URL without a scheme, with the URL it likely means (never credentials, a query or a
    value from the environment)."""
    fixed = ("https:" if url.startswith("//") else "https://") + url
    try:
        parts = urlsplit(fixed)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        host = None
    if at.from_env or not host:
        return "missing scheme: start with https:// (or http://)"
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
        local = ip.is_loopback or ip.is_private
    except ValueError:
        local = host.lower() == "localhost"
    if local:  # a receiver on this machine or the LAN: plain http is the likely intent
        fixed = "http" + fixed[5:]
        parts = urlsplit(fixed)
    shown = urlunsplit(parts._replace(query="...", fragment="") if parts.query else parts._replace(fragment=""))
    return f"missing scheme: did you mean {redact_url(shown)}?"


def check_secret(s: str, at: At) -> str:
    """A secret (from `secret` or a line of `secret_file`)."""
    if not s:
        raise ValueError("must not be empty")
    if len(s) > MAX_SECRET:
        raise ValueError(f"must be at most {MAX_SECRET} characters (got {len(s)})")
    if _has_control(s):
        raise ValueError("must not contain control characters")
    return s


def _token(v: str, at: At) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    if any(ch.isspace() for ch in v) or _has_control(v):
        raise ValueError("must not contain whitespace or control characters")
    return v


def _not_reserved(name: str, at: At) -> str:
    if name.lower() in RESERVED_HEADERS:
        raise ValueError("reserved header (set by webhookd)")
    return name


def _existing_file(p: Path, at: At) -> Path:
    try:
        found = p.is_file()
    except OSError as e:  # e.g. a name too long
        raise ValueError(f"cannot read {p}: {e.strerror or e.__class__.__name__}") from None
    if not found:
        raise ValueError(f"file not found: {p}")
    return p


_MEDIA_TYPE = re.compile(r"\A[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+(\s*;[^\x00-\x1f\x7f]*)?\Z")


def _media_type(v: str, at: At) -> str:
    if _MEDIA_TYPE.fullmatch(v.strip()) is None:
        raise ValueError("must be a media type such as application/json or text/plain; charset=utf-8")
    return v.strip()


def _lower(aliases: dict[str, str] | None = None) -> Read:
    """A case-insensitive name: a Literal field's file form."""

    def read(v: str, at: At) -> str:
        lv = v.strip().lower()
        return (aliases or {}).get(lv, lv)

    return Read(str, read)


def _read_event(v: str, at: At) -> str:
    ev = v.strip().lower()
    if ev != "all" and ev not in EVENT_KINDS:
        raise ValueError(f"unknown event{at.shown(v)} (expected {', '.join(EVENT_KINDS)} or all)")
    return ev


def _expand_all(events: frozenset[str], at: At) -> frozenset[str]:
    return frozenset(EVENT_KINDS) if "all" in events else events


# ----------------------------------------------------------------------------------------------------
# Field types
# ----------------------------------------------------------------------------------------------------

_CONTROLS = "\\x00-\\x08\\x0a-\\x1f\\x7f"  # control characters except tab
Text = Annotated[str, Meta(pattern=rf"\A[^{_CONTROLS}]*\Z", extra={"message": "must not contain control characters"})]
Name = Annotated[
    str,
    Meta(min_length=1, max_length=MAX_NAME),
    Meta(pattern=r"\A[^/\x00-\x1f\x7f]*\Z", extra={"message": "must not contain '/' or control characters"}),
    Check(_no_edge_space),
]
Url = Annotated[str, Check(_check_url)]


def _check_store_url(url: str, at: At) -> str:
    # Never echo the URL: it carries the database password (often from the environment).
    if any(ch.isspace() for ch in url) or _has_control(url):
        raise ValueError("must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise ValueError("invalid URL (bad port)" if "port" in str(e).lower() else "invalid URL") from None
    if parts.scheme.lower() not in ("postgresql", "postgres") or "://" not in url:
        raise ValueError("must be null (SQLite in state_dir) or a postgresql:// URL")
    return url


StoreUrl = Annotated[str, Check(_check_store_url)]
Secret = Annotated[str, Check(check_secret)]
Token = Annotated[str, Check(_token)]
HeaderName = Annotated[str, Meta(pattern=HEADER_NAME, extra={"message": "invalid header name"}), Check(_not_reserved)]
_STRINGS = "a string or a list of strings"
_LIST = "a list of strings"

# ----------------------------------------------------------------------------------------------------
# The schema
# ----------------------------------------------------------------------------------------------------


def _default_http() -> HostPort | None:
    return HostPort(host="127.0.0.1", port=8470)


class ListenConfig(msgspec.Struct, frozen=True, kw_only=True):
    http: Address | None = msgspec.field(default_factory=_default_http)
    udp: Address | None = None
    tokens: Annotated[tuple[Token, ...], Many(_LIST, one=False), OR_NULL] = ()
    max_body: Size = DEFAULT_MAX_BODY


class AdminConfig(msgspec.Struct, frozen=True, kw_only=True):
    socket: Annotated[FilePath, FileDefault("./var/admin.sock")]  # absolute (resolved against the file's dir)


class PresenceConfig(msgspec.Struct, frozen=True, kw_only=True):
    silence_timeout: Timeout = 900.0  # seconds; math.inf for "never"
    notify_online_after_utilizing: bool = False
    # An offline that is not a timeout waits this long: a device back by then makes neither event (0: off).
    debounce: Duration0 = 0.0
    # While a device stays offline, a device.still_offline event this often (0: off).
    remind_every: Duration0 = 0.0


class DeviceRule(msgspec.Struct, frozen=True, kw_only=True):
    match: Annotated[str, _not_blank("must not be empty")]  # fnmatch glob on the device id (case-sensitive)
    silence_timeout: Timeout | None = None
    debounce: Duration0 | None = None
    name: Annotated[Text, Meta(max_length=256)] | None = None
    owner: Annotated[Text, Meta(max_length=256)] | None = None


class DeliveryConfig(msgspec.Struct, frozen=True, kw_only=True):
    retry_schedule: Annotated[tuple[Duration, ...], Meta(min_length=1)] = DEFAULT_RETRY_SCHEDULE
    concurrency: Annotated[int, Meta(ge=1)] = 64
    timeout: Duration = 5.0
    disable_after: Annotated[int, Meta(ge=0)] = 20
    retention: Duration = 7 * 86400.0


class EndpointConfig(msgspec.Struct, frozen=True, kw_only=True):
    name: Name
    url: Url
    description: Annotated[Text, Meta(max_length=MAX_DESCRIPTION), OR_NULL] = ""
    events: Annotated[
        frozenset[EventKind],
        Many(
            "a list of events (online, offline, ... or all)",
            empty="must list at least one event (online, offline, ... or all)",
            item=Annotated[str, Read(str, _read_event)],
        ),
        Check(_expand_all),
    ] = frozenset(EVENT_KINDS)
    devices: Annotated[
        tuple[Annotated[str, _not_blank("empty pattern")], ...],
        Many(_LIST, empty='must list at least one pattern (use ["*"] for every device)', one=False),
        OR_NULL,
    ] = ("*",)
    format: Annotated[Format, _lower()] = "webhookd"
    # format: template: the Jinja2 source (from `template`, or read from `template_file` by load.py).
    template: Annotated[str, _not_blank("must not be empty")] | None = None
    template_file: FilePath | None = None
    content_type: Annotated[str, Check(_media_type)] = "application/json"
    # From `secret` (a string or a list, for rotation) or `secret_file` (one per non-empty line).
    secrets: Annotated[tuple[Secret, ...], Many(_STRINGS, empty="must list at least one secret"), OR_NULL] = (
        msgspec.field(default=(), name="secret")
    )
    secret_file: FilePath | None = None
    signature: Annotated[Signature, _lower(), OR_NULL] = "none"  # without it: hmac-sha256 if there is a secret
    signature_header: HeaderName = DEFAULT_SIGNATURE_HEADER
    secret_field: Annotated[str, _not_blank("must not be empty (use null for none)")] | None = None
    headers: Annotated[dict[str, str], OR_NULL] = msgspec.field(default_factory=dict)  # checked by load.py
    timeout: Annotated[Duration, OR_NULL] = 5.0  # without it: delivery.timeout
    concurrency: Annotated[int, Meta(ge=1)] = 8
    tls_verify: bool = True
    ca_file: Annotated[FilePath, Check(_existing_file)] | None = None
    allow_link_local: bool = False
    # The relay to `upstream:` (CONTRACT §14), made by load.py: retried forever, never disabled nor dead.
    relay: Annotated[bool, NOT_IN_FILE] = False


UPSTREAM_ENDPOINT = "upstream"  # the reserved name of the relay endpoint
GATEWAY_NAME = r"\A[A-Za-z0-9][A-Za-z0-9._:@-]{0,49}\Z"  # the heartbeat API's device-id alphabet, 1-50 chars
GatewayName = Annotated[
    str,
    Meta(
        pattern=GATEWAY_NAME,
        extra={"message": "must be 1-50 characters of A-Z a-z 0-9 . _ : @ - (starting with a letter or digit)"},
    ),
]


def _base_url(url: str, at: At) -> str:
    parts = urlsplit(url)
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError("must be a base URL (no query or fragment): webhookd adds /v1/relay and /v1/gateways/...")
    return url.rstrip("/")


class UpstreamConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A gateway's hub (CONTRACT §14): its events relayed to `url`/v1/relay, its heartbeat every `heartbeat`."""

    url: Annotated[str, Check(_check_url), Check(_base_url)]
    gateway: GatewayName
    secret: Secret | None = None  # from `secret` or `secret_file` (its one non-empty line), set by load.py
    secret_file: FilePath | None = None
    heartbeat: Duration = 30.0
    timeout: Duration = 10.0
    concurrency: Annotated[int, Meta(ge=1)] = 8
    tls_verify: bool = True
    ca_file: Annotated[FilePath, Check(_existing_file)] | None = None


class HubGateway(msgspec.Struct, frozen=True, kw_only=True):
    """One gateway a hub takes relays and heartbeats from (CONTRACT §14)."""

    name: GatewayName
    secret: Secret | None = None  # from `secret` or `secret_file` (its one non-empty line), set by load.py
    secret_file: FilePath | None = None
    silence_timeout: Duration = 120.0


class HubConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A hub (CONTRACT §14): it takes events relayed by `gateways` and serves no device heartbeats."""

    gateways: tuple[HubGateway, ...] = ()  # checked by load.py

    def gateway(self, name: str) -> HubGateway | None:
        for gw in self.gateways:
            if gw.name == name:
                return gw
        return None


class LoggingConfig(msgspec.Struct, frozen=True, kw_only=True):
    format: Annotated[LogFormat, _lower()] = "auto"
    level: Annotated[LogLevel, _lower({"warn": "warning"})] = "info"


class Config(msgspec.Struct, frozen=True, kw_only=True):
    path: Annotated[Path | None, NOT_IN_FILE] = None
    state_dir: Annotated[FilePath, FileDefault("./var")]
    store: StoreUrl | None = None  # None: SQLite in state_dir; else a PostgreSQL URL (CONTRACT §14)
    listen: ListenConfig = msgspec.field(default_factory=ListenConfig)
    admin: AdminConfig
    presence: PresenceConfig = msgspec.field(default_factory=PresenceConfig)
    devices: Annotated[tuple[DeviceRule, ...], OR_NULL] = ()
    delivery: DeliveryConfig = msgspec.field(default_factory=DeliveryConfig)
    endpoints: Annotated[tuple[EndpointConfig, ...], OR_NULL] = ()  # checked by load.py
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    mqtt: MqttConfig | None = None  # checked by load.py (mqtt.resolve)
    upstream: UpstreamConfig | None = None  # a gateway's hub; load.py adds its `upstream` endpoint
    hub: HubConfig | None = None  # a hub: relays from these gateways (checked by load.py)

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
