"""Value types of the config file: durations, sizes, host:port, paths, and the markers the schema uses.

The schema (`schema.py`) declares each field with its resolved type (``float`` seconds, ``int`` bytes,
`HostPort`, an absolute `Path`) and annotates how the file spells it::

    Duration = Annotated[float, Read(<what the file may hold>, <how it becomes seconds>), Meta(gt=0)]

`load.py` reads every key through these annotations: first the file's form (type problems name it by its
title), then the `Read` function, then msgspec's `Meta` constraints on the result, then any `Check`.
A `Read`/`Check` function raises ValueError with the problem's message; `At` gives it what it may need.
"""

import ipaddress
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final
from urllib.parse import urlsplit, urlunsplit

import msgspec
from msgspec import Meta

# ----------------------------------------------------------------------------------------------------
# Annotations the schema uses
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class At:
    """Where a value is read: relative paths resolve against `base_dir`; a value taken from the environment
    (`from_env`) is never shown in a message."""

    base_dir: Path
    from_env: bool

    def shown(self, value: object) -> str:
        """`` 'value'`` for a message, or nothing when the value came from the environment."""
        if self.from_env or not isinstance(value, str | int | float):
            return ""
        text = repr(value)
        return " " + (text if len(text) <= 60 else text[:57] + "...")


@dataclass(frozen=True, slots=True)
class Read:
    """The file holds a `file_type` value (checked first, named by its Meta title); `fn` turns it into the
    field's type, or raises ValueError with the problem."""

    file_type: Any
    fn: Callable[[Any, At], Any]


@dataclass(frozen=True, slots=True)
class Check:
    """Runs on the typed value after msgspec's constraints; returns it (possibly changed) or raises ValueError."""

    fn: Callable[[Any, At], Any]


@dataclass(frozen=True, slots=True)
class Many:
    """A collection; with `one`, the file may also give a single string (problems then name the key, not
    ``key[0]``), else a string is a type problem naming the key. `title`: what the file may hold, for type
    problems. `empty`: the problem for an empty list (None: allowed). `item`: the items' file form, when it
    differs from the collection's item type."""

    title: str
    empty: str | None = None
    item: Any = None
    one: bool = True


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: ``key: null`` in the file means the key's default.
OR_NULL: Final = _Marker("OR_NULL")
#: A field the loader sets itself: not a key of the file.
NOT_IN_FILE: Final = _Marker("NOT_IN_FILE")


@dataclass(frozen=True, slots=True)
class FileDefault:
    """What an absent key means, read like a value from the file (for defaults that depend on the file's
    directory)."""

    value: object


# ----------------------------------------------------------------------------------------------------
# Durations
# ----------------------------------------------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)", re.IGNORECASE)
_DURATION_FULL = re.compile(r"(?:(?:\d+(?:\.\d+)?|\.\d+)\s*(?:ms|s|m|h|d)\s*)+", re.IGNORECASE)
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d+)?|\.\d+)")
DURATION_EXAMPLES = "e.g. 500ms, 30s, 15m, 2h, 1d"


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


def _read_duration(v: str | int | float, at: At) -> float:
    try:
        return parse_duration(v)
    except ValueError:
        if not isinstance(v, str) and v < 0:
            return float(v)  # refused by the field's Meta: "must be greater than 0"
        raise ValueError(f"invalid duration{at.shown(v)} (use {DURATION_EXAMPLES})") from None


# ----------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------

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


def _read_size(v: str | int, at: At) -> int:
    try:
        return parse_size(v)
    except ValueError:
        raise ValueError(f"invalid size{at.shown(v)} (use e.g. 64KiB, 1MiB or a number of bytes)") from None


# ----------------------------------------------------------------------------------------------------
# host:port
# ----------------------------------------------------------------------------------------------------


class HostPort(msgspec.Struct, frozen=True, kw_only=True):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


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


def _read_hostport(v: str, at: At) -> HostPort:
    try:
        return parse_hostport(v)
    except ValueError as e:
        shown = at.shown(v)
        raise ValueError(f"{e}" + (f" (got{shown})" if shown else "")) from None


# ----------------------------------------------------------------------------------------------------
# Paths and URLs
# ----------------------------------------------------------------------------------------------------


def _read_path(v: str, at: At) -> Path:
    if not v.strip():
        raise ValueError("must not be empty")
    if "\0" in v:
        raise ValueError("must not contain NUL")
    p = Path(v).expanduser()
    return Path(os.path.normpath(p if p.is_absolute() else at.base_dir / p))


def is_link_local(addr: str) -> bool:
    """Is `addr` (an IP literal, maybe with ``%zone``) link-local (169.254/16, fe80::/10, also IPv4-mapped)?

    The rule delivery applies (`webhookd.dispatch.sender.is_link_local` must agree; a test checks it): kept
    here so that the config package checks URLs without importing aiohttp."""
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_link_local


def url_is_link_local(url: str) -> bool:
    """Does `url` name a link-local IP literal as its host (a DNS name is checked at delivery)?"""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return False
    return is_link_local(host.strip("[]"))


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
# The field types
# ----------------------------------------------------------------------------------------------------

_DURATION_FILE = Annotated[str | int | float, Meta(title=f"a duration ({DURATION_EXAMPLES})")]
_SIZE_FILE = Annotated[str | int, Meta(title="a size (e.g. 64KiB, 1MiB or bytes)")]
_HOSTPORT_FILE = Annotated[str, Meta(title="host:port (or null)")]

#: Seconds, > 0: ``500ms``, ``30s``, ``15m``, ``2h``, ``1d``, ``1h30m`` or a number.
Duration = Annotated[float, Read(_DURATION_FILE, _read_duration), Meta(gt=0)]


def _read_timeout(v: str | int | float, at: At) -> float:
    if isinstance(v, str) and v.strip().lower() == "never":
        return math.inf
    return _read_duration(v, at)


_TIMEOUT_FILE = Annotated[str | int | float, Meta(title=f"a duration ({DURATION_EXAMPLES}) or never")]
#: A silence timeout: a `Duration`, or ``never`` (infinity: offline only when the device or its will says so).
Timeout = Annotated[float, Read(_TIMEOUT_FILE, _read_timeout), Meta(gt=0)]
#: Seconds, >= 0 (``0s`` turns the feature off).
Duration0 = Annotated[float, Read(_DURATION_FILE, _read_duration), Meta(ge=0)]
#: Bytes, > 0: ``64KiB``, ``1MiB`` (binary), ``100KB`` (decimal), ``512B`` or an integer.
Size = Annotated[int, Read(_SIZE_FILE, _read_size), Meta(gt=0)]
#: ``host:port`` (``[v6]:port``, ``:port`` for 0.0.0.0).
Address = Annotated[HostPort, Read(_HOSTPORT_FILE, _read_hostport)]
#: A path, resolved against the config file's directory.
FilePath = Annotated[Path, Read(str, _read_path)]
