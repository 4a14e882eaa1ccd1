"""The `mqtt:` section (CONTRACT §11): the broker connection and the sources whose messages are availability.

Declared like `schema.py` (each field's type and how the file spells it); the rules across keys (presets
against generic keys, `password` against `password_file`, `device` against the filter's ``+`` levels,
overlapping state payloads) are in `resolve`, which `load.py` calls for the section. Messages never show a
password (nor a URL: it may carry one).
"""

import socket
import typing
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

import msgspec
from msgspec import Meta

from .convert import Converter
from .units import _DURATION_FILE, OR_NULL, At, Check, FilePath, Many, Read, _read_duration

Preset = Literal["tasmota", "esphome", "shelly", "shelly-gen2", "zigbee2mqtt", "sparkplug"]
PRESETS: Final[tuple[Preset, ...]] = typing.get_args(Preset)
STATES: Final = ("online", "offline", "utilizing", "unplugged")
GENERIC_KEYS: Final = ("topic", "device", "field", *STATES, "heartbeat")
MAX_TOPIC_BYTES = 65535  # MQTT 3.1.1 §1.5.3: a UTF-8 string with a 16-bit length
DEFAULT_PORTS: Final = {"mqtt": 1883, "mqtts": 8883}
DEFAULT_URL: Final = "mqtt://127.0.0.1:1883"
DEFAULT_PAYLOADS: Final[dict[str, tuple[str, ...]]] = {
    "online": ("online",),
    "offline": ("offline",),
    "utilizing": (),
    "unplugged": (),
}

# ----------------------------------------------------------------------------------------------------
# Topics (MQTT 3.1.1 §4.7); `webhookd.mqtt.sources` matches with the same rules
# ----------------------------------------------------------------------------------------------------


def filter_problem(f: str) -> str | None:
    """Why `f` is not a valid topic filter, or None."""
    if not f:
        return "must not be empty"
    if "\0" in f:
        return "must not contain NUL"
    if len(f.encode("utf-8")) > MAX_TOPIC_BYTES:
        return f"must be at most {MAX_TOPIC_BYTES} bytes"
    levels = f.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level, the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def topic_problem(t: str) -> str | None:
    """Why `t` is not a topic one may publish to (no wildcards), or None."""
    if "+" in t or "#" in t:
        return "must not contain wildcards ('+', '#')"
    return filter_problem(t)


def _check_filter(f: str, at: At) -> str:
    if (problem := filter_problem(f)) is not None:
        raise ValueError(f"invalid topic filter: {problem}")
    return f


def _check_topic(t: str, at: At) -> str:
    if (problem := topic_problem(t)) is not None:
        raise ValueError(problem)
    if t.startswith("$"):
        raise ValueError("topics starting with '$' are the broker's")
    return t


def _check_base(t: str, at: At) -> str:
    _check_topic(t, at)
    if t.endswith("/"):
        raise ValueError("must not end with '/' (the preset adds its own levels)")
    return t


def _check_payload(p: str, at: At) -> str:
    if not p.strip():
        raise ValueError("must not be empty (an empty payload is a deleted retained topic, never a state)")
    if p != p.strip():
        raise ValueError("must not start or end with whitespace (payloads are compared trimmed)")
    return p


def _check_url(url: str, at: At) -> str:
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise ValueError("must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError("invalid URL (expected mqtt://host[:port] or mqtts://host[:port])") from None
    if parts.scheme.lower() not in DEFAULT_PORTS:
        raise ValueError("must be mqtt:// or mqtts:// (TLS)")
    if not parts.hostname:
        raise ValueError("must have a host (mqtt://host[:port])")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be mqtt://host[:port] without a path, query or fragment")
    return url


def _keepalive(v: float, at: At) -> float:
    if not 1 <= v <= 65535:
        raise ValueError("must be 1s-65535s (MQTT's 16-bit keep-alive)")
    if not v.is_integer():
        raise ValueError("must be a whole number of seconds (MQTT keep-alives are)")
    return v


def _existing_file(p: Path, at: At) -> Path:
    try:
        found = p.is_file()
    except OSError as e:
        raise ValueError(f"cannot read {p}: {e.strerror or e.__class__.__name__}") from None
    if not found:
        raise ValueError(f"file not found: {p}")
    return p


def _not_empty(v: str, at: At) -> str:
    if not v:
        raise ValueError("must not be empty (use null for none)")
    return v


def _pattern(p: str, at: At) -> str:
    if not p.strip():
        raise ValueError("empty pattern")
    return p


def _lower(v: str, at: At) -> str:
    return v.strip().lower()


_NO_CONTROL = Meta(pattern=r"\A[^\x00-\x1f\x7f]*\Z", extra={"message": "must not contain control characters"})
Text = Annotated[str, _NO_CONTROL]
NonEmpty = Annotated[str, _NO_CONTROL, Check(_not_empty)]
Filter = Annotated[str, Check(_check_filter)]
Topic = Annotated[str, Check(_check_topic)]
Base = Annotated[str, Check(_check_base)]
Payloads = Annotated[tuple[Annotated[str, Check(_check_payload)], ...], Many("a list of strings"), OR_NULL]
Pattern = Annotated[str, Check(_pattern)]
#: Seconds, >= 0 (a `Duration` that may be 0).
Duration0 = Annotated[float, Read(_DURATION_FILE, _read_duration), Meta(ge=0)]

# ----------------------------------------------------------------------------------------------------
# The schema
# ----------------------------------------------------------------------------------------------------


class MqttSourceConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A preset (`preset`, maybe `base`) or a generic source (`topic` and the keys after it)."""

    preset: Annotated[Preset, Read(str, _lower)] | None = None
    base: Base | None = None  # the preset's root topic when not its default
    devices: Annotated[
        tuple[Pattern, ...],
        Many("a list of strings", empty='must list at least one pattern (use ["*"] for every device)', one=False),
        OR_NULL,
    ] = ("*",)
    id_prefix: Annotated[Text, Meta(max_length=100), OR_NULL] = ""
    topic: Filter | None = None
    device: Annotated[int, Meta(ge=1)] = 1  # which `+` level of `topic` is the device id
    field: NonEmpty | None = None
    online: Payloads = DEFAULT_PAYLOADS["online"]
    offline: Payloads = DEFAULT_PAYLOADS["offline"]
    utilizing: Payloads = DEFAULT_PAYLOADS["utilizing"]
    unplugged: Payloads = DEFAULT_PAYLOADS["unplugged"]
    heartbeat: bool = False

    def states(self) -> dict[str, str]:
        """Payload -> state, of a generic source."""
        return {p: state for state in STATES for p in getattr(self, state)}


class MqttConfig(msgspec.Struct, frozen=True, kw_only=True):
    url: Annotated[str, Check(_check_url)] = DEFAULT_URL
    username: NonEmpty | None = None
    password: NonEmpty | None = None  # or the first line of `password_file`
    password_file: FilePath | None = None
    client_id: Annotated[Text, Meta(min_length=1, max_length=256)] | None = None
    keepalive: Annotated[float, Read(_DURATION_FILE, _read_duration), Check(_keepalive)] = 30.0
    settle: Duration0 = 30.0
    status_topic: Topic | None = "webhookd/status"
    tls_verify: bool = True
    ca_file: Annotated[FilePath, Check(_existing_file)] | None = None
    sources: Annotated[tuple[MqttSourceConfig, ...], Meta(min_length=1)]  # checked by `resolve`

    def __repr__(self) -> str:  # never the password (a config may end up in a log line or a traceback)
        return f"MqttConfig(broker={self.broker!r}, client_id={self.effective_client_id!r}, ...)"

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme.lower() == "mqtts"

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or DEFAULT_PORTS["mqtts" if self.tls else "mqtt"]

    @property
    def broker(self) -> str:
        """The URL without credentials (for logs and `status`), with its port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return urlunsplit(("mqtts" if self.tls else "mqtt", f"{host}:{self.port}", "", "", ""))

    @property
    def effective_client_id(self) -> str:
        return self.client_id or f"webhookd-{socket.gethostname()}"


# ----------------------------------------------------------------------------------------------------
# Rules across keys (load.py converts the section with `resolve`)
# ----------------------------------------------------------------------------------------------------


def resolve(c: Converter, value: object, path: str) -> MqttConfig | None:
    """The `mqtt:` section (None for ``mqtt: null``), every problem reported under `path`."""
    if value is None:
        return None
    n_before = len(c.problems)
    custom = {"sources": lambda v, p, _: _sources(c, v, p)}
    values = c.fields(value, MqttConfig, path, custom=custom)
    if values is None or not isinstance(value, dict):
        return None
    if value.get("sources", None) is None and "sources" not in value:
        c.add(f"{path}.sources", "missing required key (at least one source)")
    _credentials(c, value, values, path)
    url = values.get("url", None if c.bad(f"{path}.url") else DEFAULT_URL)
    if url is not None and urlsplit(url).scheme.lower() != "mqtts":
        for key in ("ca_file", "tls_verify"):
            if value.get(key) not in (None, True):
                c.add(f"{path}.{key}", "needs an mqtts:// url (TLS)")
    if len(c.problems) != n_before:
        return None
    try:
        return MqttConfig(**values)
    except TypeError:  # `sources` missing (reported)
        return None


def _credentials(c: Converter, raw: dict[Any, Any], values: dict[str, Any], path: str) -> None:
    """`password` or `password_file` (its first line, stripped), or credentials in `url`; a password needs a
    username (MQTT 3.1.1 §3.1.2.9)."""
    if raw.get("password") is not None and raw.get("password_file") is not None:
        c.add(f"{path}.password_file", "use either password or password_file, not both")
        return
    if values.get("password_file") is not None:
        fpath, p = f"{path}.password_file", values["password_file"]
        text = c.read_text(fpath, p)
        if text is None:
            return
        lines = text.splitlines()
        password = lines[0].strip() if lines else ""
        if not password:
            c.add(fpath, f"no password on the first line of {p}")
        elif any(ord(ch) < 32 or ord(ch) == 127 for ch in password):
            c.add(fpath, f"the password in {p} must not contain control characters")
        else:
            values["password"] = password
    if "url" in values and "@" in (netloc := urlsplit(values["url"]).netloc):
        user, _, secret = netloc.rsplit("@", 1)[0].partition(":")
        if raw.get("username") is not None or values.get("password") is not None:
            c.add(f"{path}.url", "credentials in url and username/password: keep one of the two")
            return
        values["username"], values["password"] = unquote(user) or None, unquote(secret) or None
    given = raw.get("password") is not None or raw.get("password_file") is not None
    reported = any(c.bad(f"{path}.{k}") for k in ("username", "password", "password_file"))
    if (given or values.get("password") is not None) and values.get("username") is None and not reported:
        key = "password_file" if raw.get("password_file") is not None else "password"
        c.add(f"{path}.{key}", "needs a username (MQTT sends no password without one)")


def _sources(c: Converter, value: object, path: str) -> tuple[MqttSourceConfig, ...]:
    ok, items = c.value(value, list[Any], path)
    if not ok:
        return ()
    if not items:
        c.add(path, "must list at least one source")
        return ()
    out = []
    for i, item in enumerate(items):
        src = _source(c, item, f"{path}[{i}]")
        if src is not None:
            out.append(src)
    return tuple(out)


def _source(c: Converter, raw: object, path: str) -> MqttSourceConfig | None:
    n_before = len(c.problems)
    values = c.fields(raw, MqttSourceConfig, path)
    if values is None or not isinstance(raw, dict):
        return None
    given = [k for k in GENERIC_KEYS if raw.get(k) is not None]
    if raw.get("preset") is not None:
        for k in given:
            c.add(f"{path}.{k}", "is for a generic source: not with preset (a preset knows its topics and payloads)")
    elif raw.get("topic") is None:
        c.add(path, f"needs preset ({', '.join(PRESETS)}) or topic (a generic source)")
    else:
        if raw.get("base") is not None:
            c.add(f"{path}.base", "is for a preset (a generic source's topic is the whole filter)")
        if "topic" in values:
            pluses = values["topic"].split("/").count("+")
            if pluses == 0:
                c.add(f"{path}.topic", "needs a '+' level for the device id (e.g. lab/+/presence)")
            elif values.get("device", 1) > pluses and not c.bad(f"{path}.device"):
                c.add(f"{path}.device", f"must be 1-{pluses}: the filter has {pluses} '+' level(s)")
        seen: dict[str, str] = {}
        for state in STATES:
            for j, p in enumerate(values.get(state, DEFAULT_PAYLOADS[state])):
                if p in seen and seen[p] != state:
                    c.add(f"{path}.{state}[{j}]", f"payload {p!r} is also in {seen[p]}")
                seen.setdefault(p, state)
    if len(c.problems) != n_before:
        return None
    return MqttSourceConfig(**values)


__all__ = [
    "PRESETS",
    "STATES",
    "MqttConfig",
    "MqttSourceConfig",
    "Preset",
    "filter_problem",
    "resolve",
    "topic_problem",
]
