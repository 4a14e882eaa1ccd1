"""Logging (CONTRACT §9): structlog, plus the standard library for other packages' records.

One JSON object per line (``timestamp``, ``level``, ``event`` first) under systemd, structlog's console renderer
on a terminal (``event``, ``device``, ``endpoint`` first; ``retry_in_s=359.5`` read as ``retry_in=5m 59s``). On the
journal (``JOURNAL_STREAM``) each JSON line starts with its syslog priority (``<6>{...}``), which journald strips
and files the line under: ``journalctl -p warning -u webhookd`` works. Both paths end in the same renderer chain
(``_renderer``). structlog calls render in their processor chain and ``_LineLogger`` writes the line with one
``write()`` under a lock; stdlib records (aiohttp, asyncio, warnings) go through one ``ProcessorFormatter`` on
one handler on the root logger. A filtered-out ``log.debug(...)`` costs one comparison; a reload swaps handler,
level and renderer in place. Before the first ``configure_logging``, warnings and above go to stderr as JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from webhookd import logwrite
from webhookd.logwrite import write_line as _write_line

__all__ = ["SCRUBBED", "configure_logging", "get_logger", "lean_records", "scrub_secrets"]

SCRUBBED = "***"

# Level name -> (stdlib level, syslog priority: the journal's "<N>" prefix); a name not listed counts as info.
LEVELS: dict[str, tuple[int, int]] = {
    "debug": (logging.DEBUG, 7),
    "info": (logging.INFO, 6),
    "notice": (logging.INFO + 5, 5),
    "warning": (logging.WARNING, 4),
    "warn": (logging.WARNING, 4),
    "error": (logging.ERROR, 3),
    "exception": (logging.ERROR, 3),
    "critical": (logging.CRITICAL, 2),
    "fatal": (logging.CRITICAL, 2),
}
_INFO = LEVELS["info"]

_SECRET_KEY = re.compile(
    r"secret|token|authori[sz]ation|passw(or)?d|api[_-]?key|credential|cookie|private[_-]?key", re.IGNORECASE
)
# user:password@ in URLs that end up in messages or values
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]*:[^/@\s]*@")
_NOT_SCRUBBED = frozenset(("exc_info", "stack_info", "_record", "_from_structlog"))
_PLAIN = frozenset((bool, int, float))  # nothing to scrub inside these

# THE processor list: cached bound loggers keep a reference and capture_logs edits it in place: never replaced.
_processors: list[Processor] = []
_level = logging.WARNING  # the stdlib root logger's default, until configure_logging
_stream: TextIO | None = None  # None: sys.stderr, looked up per line (like the stdlib's last resort)
_structlog_configured = False
_handler: logging.Handler | None = None


class FilteringBoundLogger(structlog.stdlib.BoundLogger):
    """``BoundLogger`` returning before any processor when the call's level is below ``_level`` (a module
    global: it follows reloads, also for loggers cached at import, unlike ``make_filtering_bound_logger``'s
    level fixed in its class). ``isEnabledFor``/``getEffectiveLevel`` work, ``setLevel``... do not. Under
    ``capture_logs`` every call is captured, as with structlog's ``filter_by_level``."""

    # debug and info are the hot ones: checked here, one call shorter than through _proxy_to_logger below.
    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if _level > logging.DEBUG and not _capturing(self._processors):
            return None
        return super()._proxy_to_logger("debug", event, *args, **kw)

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if _level > logging.INFO and not _capturing(self._processors):
            return None
        return super()._proxy_to_logger("info", event, *args, **kw)

    def _proxy_to_logger(self, method_name: str, event: str | None = None, *event_args: str, **event_kw: Any) -> Any:
        if LEVELS.get(method_name, _INFO)[0] < _level and not _capturing(self._processors):
            return None
        return super()._proxy_to_logger(method_name, event, *event_args, **event_kw)

    def isEnabledFor(self, level: int) -> bool:
        return level >= _level

    def getEffectiveLevel(self) -> int:
        return _level


def _capturing(processors: Any) -> bool:
    try:
        return bool(processors) and isinstance(processors[-1], structlog.testing.LogCapture)
    except (TypeError, IndexError, KeyError):
        return False


_secret_keys: dict[str, bool] = {}  # key name -> looks like a secret (the set of key names in use is small)


def _is_secret_key(key: str) -> bool:
    verdict = _secret_keys.get(key)
    if verdict is None:
        verdict = _SECRET_KEY.search(key) is not None
        if len(_secret_keys) < 4096:
            _secret_keys[key] = verdict
    return verdict


def _scrub_value(key: str, value: Any, depth: int = 0) -> Any:
    if value is None or value.__class__ in _PLAIN:
        return SCRUBBED if value is not None and _is_secret_key(key) else value
    if _is_secret_key(key):
        return SCRUBBED
    if depth > 4:
        return value
    if isinstance(value, str):
        return _URL_CREDENTIALS.sub(r"\g<scheme>***@", value) if "@" in value else value
    if isinstance(value, Mapping):
        return {k: _scrub_value(str(k), v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_value("", v, depth + 1) for v in value]
    return value


def scrub_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Replace the values of keys named like secret/token/authorization/password with ``***`` (also inside
    nested dicts such as ``headers``), and ``user:password@`` in URLs."""
    # Runs for every line: _scrub_value's common cases (a plain str, number or None) inlined.
    for key, value in event_dict.items():
        if key == "event":
            if isinstance(value, str) and "@" in value:
                event_dict[key] = _URL_CREDENTIALS.sub(r"\g<scheme>***@", value)
            continue
        if key in _NOT_SCRUBBED:
            continue
        secret = _secret_keys.get(key)
        if secret is None:
            secret = _is_secret_key(key)
        if value is None:
            continue
        if secret:
            event_dict[key] = SCRUBBED
        elif value.__class__ is str:
            if "@" in value:
                event_dict[key] = _URL_CREDENTIALS.sub(r"\g<scheme>***@", value)
        elif value.__class__ not in _PLAIN:
            event_dict[key] = _scrub_value(key, value)
    return event_dict


def _order_keys(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """``timestamp``, ``level``, ``event`` first, the context after them (for humans reading JSON lines)."""
    ordered: EventDict = {k: event_dict.pop(k) for k in ("timestamp", "level", "event") if k in event_dict}
    ordered.update(event_dict)
    return ordered


_stamp_second: tuple[int, str] = (-1, "")  # (unix second, its "YYYY-MM-DDTHH:MM:SS" in UTC)


def _add_timestamp(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """``timestamp``: ``2025-01-31T12:00:00.123456Z``, as ``TimeStamper(fmt="iso", utc=True)`` but always with
    the microseconds, and formatting the date and time once a second rather than per line."""
    global _stamp_second
    second, ns = divmod(time.time_ns(), 1_000_000_000)
    cached, prefix = _stamp_second
    if second != cached:
        prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _stamp_second = (second, prefix)
    event_dict["timestamp"] = f"{prefix}.{ns // 1000:06d}Z"
    return event_dict


# Run for structlog calls and for foreign stdlib records (in ProcessorFormatter).
_SHARED: tuple[Processor, ...] = (
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    _add_timestamp,
)


class _LineLogger:
    """Wrapped by the bound loggers: writes each rendered line to ``_stream``; ``name`` is for ``add_logger_name``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def msg(self, line: str) -> None:
        try:  # noqa: SIM105 (contextlib.suppress costs more, per line)
            _write_line(_stream if _stream is not None else sys.stderr, line)
        except (OSError, ValueError):  # a closed or broken stream must not take the caller down
            pass

    debug = info = warning = warn = error = exception = critical = fatal = log = msg


class _LineHandler(logging.StreamHandler[TextIO]):
    """The root logger's handler for stdlib records: ``ProcessorFormatter`` renders, ``_write_line`` writes."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write_line(self.stream, self.format(record))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _chain(renderer: list[Processor]) -> list[Processor]:
    """The processors of a structlog call: the shared ones, then the renderer chain."""
    return [
        *_SHARED,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.StackInfoRenderer(additional_ignores=[__name__]),
        scrub_secrets,
        *renderer,
    ]


def _configure_structlog() -> None:
    global _structlog_configured
    if _structlog_configured:
        return
    _processors[:] = _chain(_json_renderer(journal=False))
    structlog.configure(
        processors=_processors,
        # get_logger names every logger; "root" only for a bare structlog.get_logger() (nothing here makes one)
        logger_factory=lambda *args: _LineLogger(args[0] if args and isinstance(args[0], str) else "root"),
        wrapper_class=FilteringBoundLogger,
        context_class=dict,
        # For structlog.get_logger() callers (get_logger below binds at once): otherwise every call builds a
        # fresh bound logger (3 us, even for a filtered-out debug line). Cached loggers hold _processors.
        cache_logger_on_first_use=True,
    )
    _structlog_configured = True


def is_journal(stream: TextIO) -> bool:
    """True when ``$JOURNAL_STREAM`` (``DEV:INODE`` of what journald connected to stdout/stderr) matches the
    fd of ``stream`` (systemd.exec(5)): not when output was redirected, or for a child inheriting the variable."""
    dev, sep, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation (StringIO) is both
        return False


_encoder = msgspec.json.Encoder(enc_hook=repr)  # anything JSON has no type for is written as its repr
_SCALARS = (str, int, float, bool, type(None))


def _dumps(obj: Any, **_kw: Any) -> str:
    """JSONRenderer's serializer, for every line: msgspec (keys in insertion order) at a fraction of json's cost."""
    try:
        return _encoder.encode(obj).decode()
    except (TypeError, ValueError, OverflowError, RecursionError):  # a lone surrogate, a cycle: json, else repr()
        try:
            return json.dumps(obj, default=repr)
        except Exception:  # keys json refuses, cycles, a repr() that raises: a line, never an exception
            return json.dumps({str(k): v if isinstance(v, _SCALARS) else _safe_repr(v) for k, v in obj.items()})


def _safe_repr(v: Any) -> str:
    try:
        return repr(v)
    except Exception:
        return f"<unrepresentable {type(v).__name__}>"


def _journal_dumps(obj: Any, **_kw: Any) -> str:
    """``_dumps`` after the record's syslog priority (``<3>{...}`` for an error)."""
    return f"<{LEVELS.get(str(obj.get('level', 'info')).lower(), _INFO)[1]}>" + _dumps(obj)


def lean_records() -> None:
    """Stop the stdlib collecting what no renderer here prints (caller's file and line: a stack walk per record;
    thread and process names). Process-wide: called by the daemon, not configure_logging (tests run in pytest)."""
    logging._srcfile = None  # the logging HOWTO's "Optimization" section documents this switch
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def _drop_formatted(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Drop ``message``/``asctime`` left on a stdlib record by another handler's ``Formatter`` (not extras)."""
    event_dict.pop("message", None)
    event_dict.pop("asctime", None)
    return event_dict


def _json_renderer(journal: bool) -> list[Processor]:
    return [
        structlog.processors.format_exc_info,  # exception -> one string field, escaped into one line
        _order_keys,
        structlog.processors.JSONRenderer(serializer=_journal_dumps if journal else _dumps),
    ]


class _Seconds(float):
    """A duration on the console, unquoted: ``0.25s``, ``42s``, ``5m 59s``, ``2h 5m``, ``3d 4h``."""

    def __repr__(self) -> str:
        if abs(self) < 60:
            return f"{self:.3g}s" if abs(self) < 10 else f"{self:.0f}s"
        n = round(self)
        if n >= 86400:
            return f"{n // 86400}d {n % 86400 // 3600}h"
        return f"{n // 3600}h {n % 3600 // 60}m" if n >= 3600 else f"{n // 60}m {n % 60}s"

    __str__ = __repr__


def _console_fields(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Console only: ``event``, ``device``, ``endpoint`` first; ``retry_in_s=359.5`` as ``retry_in=5m 59s``."""
    out: EventDict = {k: event_dict.pop(k) for k in ("event", "device", "endpoint") if k in event_dict}
    for k, v in event_dict.items():
        seconds = k.endswith("_s") and v.__class__ in (int, float) and k[:-2] not in event_dict
        out[k[:-2] if seconds else k] = _Seconds(v) if seconds else v
    return out


def _renderer(fmt: str, stream: TextIO) -> list[Processor]:
    """The end of both paths: event dict -> the line to write (without its newline)."""
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"unknown log format {fmt!r} (auto, json or console)")
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError, OSError):
        tty = False
    if fmt == "json" or (fmt == "auto" and not tty):
        return _json_renderer(is_journal(stream))
    return [_console_fields, structlog.dev.ConsoleRenderer(colors=tty, sort_keys=False)]


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Send every record at ``level`` or above to ``stream`` (stdout): JSON lines (``<N>``-prefixed on the journal),
    console text, or ``"auto"`` (console on a terminal). A reload replaces handler, level and renderer in place,
    also for loggers obtained before; other handlers on the root logger (pytest's) are left alone."""
    global _handler, _level, _stream
    if level.lower() not in LEVELS:
        raise ValueError(f"unknown log level {level!r} (debug, info, warning or error)")
    lvl = LEVELS[level.lower()][0]
    out: TextIO = stream if stream is not None else sys.stdout
    renderer = _renderer(fmt, out)
    _configure_structlog()
    # structlog calls: same list object, new contents (see _processors)
    _processors[:] = _chain(renderer)
    structlog.configure(processors=_processors)
    _stream = out
    _level = lvl
    logwrite.retarget(out)

    # stdlib records
    handler = _LineHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_SHARED, structlog.stdlib.ExtraAdder(), _drop_formatted, scrub_secrets],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    root.setLevel(lvl)
    # aiohttp's access log is noisy at info; keep it at debug unless asked for
    logging.getLogger("aiohttp.access").setLevel(logging.DEBUG if lvl <= logging.DEBUG else logging.WARNING)
    logging.captureWarnings(True)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    """A structlog logger named ``name`` (the caller's module when ``None``); see ``FilteringBoundLogger``."""
    _configure_structlog()
    name = name if name is not None else str(sys._getframe(1).f_globals.get("__name__", ""))
    # Bound now, not on first use: a module-level logger is then the bound logger itself, not structlog's lazy
    # proxy (an attribute lookup and a call more per log call, filtered or not). It holds _processors.
    logger: FilteringBoundLogger = structlog.get_logger(name).bind()
    return logger


def batch_logs(loop: asyncio.AbstractEventLoop | None) -> None:
    """Write what the loop's thread logs once per turn of `loop` (None: each line at once again)."""
    logwrite.batch(loop, _stream if _stream is not None else sys.stderr)


flush_logs = logwrite.flush
