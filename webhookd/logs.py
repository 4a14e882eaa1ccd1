"""Logging (CONTRACT §9): structlog, plus the standard library for other packages' records.

Everything renders the same way: one JSON object per line (keys ``timestamp``, ``level``, ``event`` first)
under systemd, or structlog's console renderer on a terminal. When stdout is connected to the journal
(systemd's ``JOURNAL_STREAM``), each JSON line starts with its syslog priority (``<6>{...}``): journald strips
it and files the line under that priority, so ``journalctl -p warning -u webhookd`` works.

Two paths lead to the stream, ending in the same renderer chain (``_renderer``):

* structlog calls (ours, on the hot path: a ``delivery_succeeded`` line per delivery) render directly: the
  processor chain ends in the renderer and ``_LineLogger`` writes the line with one ``write()`` under a lock.
  Going through ``logging`` instead (a ``LogRecord``, the handler, ``ProcessorFormatter`` copying the record
  again) cost several times the rendering itself.
* stdlib records (aiohttp, asyncio, warnings) go through one ``structlog.stdlib.ProcessorFormatter`` on one
  handler on the root logger, which runs the shared processors and then the same renderer chain.

Levels: ``configure_logging`` sets the root logger's level (for stdlib records) and a module-level level
that the bound loggers check before running any processor, so a filtered-out ``log.debug(...)`` costs one
comparison. Calling ``configure_logging`` again (reload) swaps the handler, the level and the renderer in
place, for loggers created before the reload as well. Before the first ``configure_logging``, warnings and
above go to stderr as JSON lines (where the stdlib's last-resort handler would have put them).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import FrameType
from typing import Any, TextIO

import msgspec
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["SCRUBBED", "configure_logging", "get_logger", "lean_records", "scrub_secrets"]

SCRUBBED = "***"

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# structlog method name -> stdlib level, for the early level check.
_METHOD_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "exception": logging.ERROR,
    "critical": logging.CRITICAL,
    "fatal": logging.CRITICAL,
}

_SECRET_KEY = re.compile(
    r"secret|token|authori[sz]ation|passw(or)?d|api[_-]?key|credential|cookie|private[_-]?key", re.IGNORECASE
)
# user:password@ in URLs that end up in messages or values
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]*:[^/@\s]*@")


class FilteringBoundLogger(structlog.stdlib.BoundLogger):
    """``structlog.stdlib.BoundLogger`` that returns before running any processor when the call's level is
    below the level set by ``configure_logging`` (a module global, so it follows reloads, also for loggers
    created before them). It wraps a ``_LineLogger``, not a ``logging.Logger``: the stdlib-only methods
    (``setLevel``, ``handlers``...) are not available, ``isEnabledFor`` and ``getEffectiveLevel`` are.

    While ``structlog.testing.capture_logs`` is active every call is captured, as with structlog's own
    ``filter_by_level`` (which capture_logs disables along with the other processors).
    """

    # debug and info are the hot ones (a delivery_succeeded line per delivery, debug lines filtered out):
    # checked here, one call shorter than through _proxy_to_logger below (which checks the other methods).
    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if _level > logging.DEBUG and not _capturing(self._processors):
            return None
        return super()._proxy_to_logger("debug", event, *args, **kw)

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if _level > logging.INFO and not _capturing(self._processors):
            return None
        return super()._proxy_to_logger("info", event, *args, **kw)

    def _proxy_to_logger(
        self,
        method_name: str,
        event: str | None = None,
        *event_args: str,
        **event_kw: Any,
    ) -> Any:
        if _METHOD_LEVELS.get(method_name, logging.INFO) < _level and not _capturing(self._processors):
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


_NOT_SCRUBBED = frozenset(("exc_info", "stack_info", "_record", "_from_structlog"))


_PLAIN = frozenset((bool, int, float))  # nothing to scrub inside these

_FIRST_KEYS = ("timestamp", "level", "event")


def _order_keys(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """``timestamp``, ``level``, ``event`` first, the context after them (for humans reading JSON lines)."""
    ordered: EventDict = {k: event_dict.pop(k) for k in _FIRST_KEYS if k in event_dict}
    ordered.update(event_dict)
    return ordered


def _shared_processors() -> list[Processor]:
    """Run for structlog calls and for foreign stdlib records (in ``ProcessorFormatter``)."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _add_timestamp,
    ]


_stamp_second: tuple[int, str] = (-1, "")  # (unix second, its "YYYY-MM-DDTHH:MM:SS" in UTC)


def _add_timestamp(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """``timestamp``: ISO 8601 in UTC with microseconds, ``2025-01-31T12:00:00.123456Z`` (what structlog's
    ``TimeStamper(fmt="iso", utc=True)`` writes, always with the microseconds), formatting the date and time
    once a second rather than per line."""
    global _stamp_second
    second, ns = divmod(time.time_ns(), 1_000_000_000)
    cached, prefix = _stamp_second
    if second != cached:
        prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _stamp_second = (second, prefix)
    event_dict["timestamp"] = f"{prefix}.{ns // 1000:06d}Z"
    return event_dict


class _LineLogger:
    """What structlog's bound loggers wrap: writes each rendered line to the stream ``configure_logging``
    chose (stderr before that), with ``name`` for ``add_logger_name``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def msg(self, line: str) -> None:
        try:  # noqa: SIM105 (contextlib.suppress costs more, per line)
            _write_line(_stream if _stream is not None else sys.stderr, line)
        except (OSError, ValueError):  # a closed or broken stream must not take the caller down
            pass

    debug = info = warning = warn = error = exception = critical = fatal = log = msg


# One line at a time on the stream, from either path. Reentrant: a finalizer that logs (asyncio's "Task
# exception was never retrieved", run by a collection) may fire while this thread holds it.
_write_lock = threading.RLock()


def _write_line(stream: TextIO, line: str) -> None:
    with _write_lock:
        stream.write(line + "\n")
        stream.flush()


class _LineHandler(logging.StreamHandler[TextIO]):
    """The root logger's handler for stdlib records: ``ProcessorFormatter`` renders, ``_write_line`` writes."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write_line(self.stream, self.format(record))
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _caller_module() -> str:
    """The module name of the first frame outside structlog and this module (as structlog's stdlib
    ``LoggerFactory`` does for ``get_logger()`` without a name)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        name = str(frame.f_globals.get("__name__", ""))
        if name != __name__ and name.split(".", 1)[0] != "structlog":
            return name
        frame = frame.f_back
    return "root"


def _logger_factory(*args: Any) -> _LineLogger:
    return _LineLogger(args[0] if args and isinstance(args[0], str) else _caller_module())


def _chain(renderer: list[Processor]) -> list[Processor]:
    """The processors of a structlog call: the shared ones, then the renderer chain."""
    return [
        *_shared_processors(),
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.StackInfoRenderer(additional_ignores=[__name__]),
        scrub_secrets,
        *renderer,
    ]


# THE processor list: bound loggers are cached on first use and keep a reference to it, and
# structlog.testing.capture_logs edits it in place; configure_logging replaces its contents, never the object.
_processors: list[Processor] = []
_level = logging.WARNING  # the stdlib root logger's default, until configure_logging
_stream: TextIO | None = None  # None: sys.stderr, looked up per line (like the stdlib's last resort)
_structlog_configured = False
_handler: logging.Handler | None = None


def _configure_structlog() -> None:
    global _structlog_configured
    _processors[:] = _chain(_json_renderer(journal=False))
    structlog.configure(
        processors=_processors,
        logger_factory=_logger_factory,
        wrapper_class=FilteringBoundLogger,
        context_class=dict,
        # For structlog.get_logger() callers (get_logger below binds at once): otherwise every call builds a
        # fresh bound logger (3 us, even for a filtered-out debug line). Cached loggers hold _processors.
        cache_logger_on_first_use=True,
    )
    _structlog_configured = True


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


# syslog priorities (sd-daemon(3) "<N>" line prefixes) by structlog level name
SYSLOG_PRIORITIES: dict[str, int] = {
    "debug": 7,
    "info": 6,
    "notice": 5,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
    "fatal": 2,
}


def is_journal(stream: TextIO) -> bool:
    """True when ``stream`` is systemd's journal stream: ``$JOURNAL_STREAM`` is ``DEV:INODE`` of the stream
    that journald connected to stdout/stderr, and it must match the stream's fd (systemd.exec(5)); a service
    whose output was redirected elsewhere, or a child that inherited the variable, does not match."""
    value = os.environ.get("JOURNAL_STREAM")
    if not value:
        return False
    dev, sep, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return bool(sep) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, ValueError, OSError):  # io.UnsupportedOperation (StringIO) is both
        return False


class _SyslogPrefixed:
    """Wrap a renderer: its output, prefixed with the record's syslog priority (``<3>`` for an error)."""

    def __init__(self, renderer: Callable[[WrappedLogger, str, EventDict], str | bytes]) -> None:
        self._renderer = renderer

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> str:
        priority = SYSLOG_PRIORITIES.get(str(event_dict.get("level", "info")).lower(), 6)
        line = self._renderer(logger, name, event_dict)
        return f"<{priority}>" + (line.decode() if isinstance(line, bytes) else line)


_encoder = msgspec.json.Encoder(enc_hook=repr)  # anything JSON has no type for is written as its repr


def _dumps(obj: Any, **_kw: Any) -> str:
    """structlog's JSONRenderer serializer: msgspec (keys in insertion order, like json.dumps) at a fraction
    of json.dumps's cost; this runs for every line, delivery_succeeded included."""
    try:
        return _encoder.encode(obj).decode()
    except (TypeError, ValueError, OverflowError):  # e.g. non-str keys, ints beyond 64 bits
        pass
    try:
        return json.dumps(obj, default=repr)
    except (TypeError, ValueError, RecursionError):  # keys json refuses, cycles: a line, never an exception
        return json.dumps(
            {str(k): v if isinstance(v, str | int | float | bool | None) else repr(v) for k, v in obj.items()}
        )


def lean_records() -> None:
    """Stop the stdlib from collecting what no renderer here prints on its records (structlog calls make
    none): the caller's file and line (a stack walk per record), thread, process and multiprocessing names.
    Process-wide, hence called by the daemon rather than by configure_logging (tests configure logging
    inside pytest)."""
    logging._srcfile = None  # the logging HOWTO's "Optimization" section documents this switch
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def _drop_formatted(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Drop what another handler's ``logging.Formatter`` left on a stdlib record (``message``, the text
    already in ``event``, and ``asctime``), which ``ExtraAdder`` would take for extras: the stdlib forbids
    those names in ``extra``, so they are never the caller's."""
    event_dict.pop("message", None)
    event_dict.pop("asctime", None)
    return event_dict


def _json_renderer(journal: bool) -> list[Processor]:
    json_renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    return [
        structlog.processors.format_exc_info,  # exception -> one string field, escaped into one line
        _order_keys,
        _SyslogPrefixed(json_renderer) if journal else json_renderer,
    ]


def _renderer(fmt: str, stream: TextIO) -> list[Processor]:
    """The end of both paths: event dict -> the line to write (without its newline)."""
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"unknown log format {fmt!r} (auto, json or console)")
    tty = _is_tty(stream)
    if fmt == "json" or (fmt == "auto" and not tty):
        return _json_renderer(is_journal(stream))
    return [structlog.dev.ConsoleRenderer(colors=tty)]


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Send every log record (structlog and stdlib) to ``stream`` (default stdout) as JSON lines
    (``fmt == "json"``, or ``"auto"`` and ``stream`` is not a terminal) or console text (``"console"``, or
    ``"auto"`` on a terminal), dropping records below ``level``. JSON lines to the journal carry a ``<N>``
    syslog priority prefix.

    Idempotent: a second call (config reload) replaces the handler, the level and the renderer, also for
    loggers obtained before it; other handlers on the root logger (pytest's, for instance) are left alone.
    """
    global _handler, _level, _stream
    lvl = LEVELS.get(level.lower())
    if lvl is None:
        raise ValueError(f"unknown log level {level!r} (debug, info, warning or error)")
    out: TextIO = stream if stream is not None else sys.stdout
    renderer = _renderer(fmt, out)
    if not _structlog_configured:
        _configure_structlog()

    # structlog calls: same list object, new contents (see _processors)
    _processors[:] = _chain(renderer)
    structlog.configure(processors=_processors)
    _stream = out
    _level = lvl

    # stdlib records
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(), structlog.stdlib.ExtraAdder(), _drop_formatted, scrub_secrets],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
    )
    handler = _LineHandler(out)
    handler.setFormatter(formatter)

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
    if not _structlog_configured:
        _configure_structlog()
    # Bound now rather than on first use: a module-level logger is then the bound logger itself, not
    # structlog's lazy proxy (which costs an attribute lookup and a call per log call, filtered or not). It
    # holds the one processor list, so it follows configure_logging and capture_logs.
    logger: FilteringBoundLogger = structlog.get_logger(name if name is not None else _caller_module()).bind()
    return logger
