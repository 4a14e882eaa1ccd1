"""Logging (CONTRACT §9): structlog on top of the standard library.

Every record, structlog's and the stdlib's (aiohttp, asyncio, warnings), goes through one
``structlog.stdlib.ProcessorFormatter`` on one ``StreamHandler`` on the root logger, so everything renders the
same way: one JSON object per line (keys ``timestamp``, ``level``, ``event`` first) under systemd, or
structlog's console renderer on a terminal. When stdout is connected to the journal (systemd's
``JOURNAL_STREAM``), each JSON line starts with its syslog priority (``<6>{...}``): journald strips it and files
the line under that priority, so ``journalctl -p warning -u webhookd`` works.

Levels are the stdlib's: ``configure_logging`` sets the root logger's level and the bound loggers check
``isEnabledFor`` before running any processor, so a filtered-out ``log.debug(...)`` costs one level check.
Calling ``configure_logging`` again (reload) swaps the handler and the level in place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
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
    """``structlog.stdlib.BoundLogger`` that returns before running any processor when the stdlib logger is
    not enabled for the call's level (the root level set by ``configure_logging``; it follows reloads).

    While ``structlog.testing.capture_logs`` is active every call is captured, as with structlog's own
    ``filter_by_level`` (which capture_logs disables along with the other processors).
    """

    def _proxy_to_logger(
        self,
        method_name: str,
        event: str | None = None,
        *event_args: str,
        **event_kw: Any,
    ) -> Any:
        level = _METHOD_LEVELS.get(method_name, logging.INFO)
        if not self._logger.isEnabledFor(level) and not _capturing(self._processors):
            return None
        return super()._proxy_to_logger(method_name, event, *event_args, **event_kw)


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
    for key, value in event_dict.items():
        if key == "event":
            if isinstance(value, str) and "@" in value:
                event_dict[key] = _URL_CREDENTIALS.sub(r"\g<scheme>***@", value)
            continue
        if key in ("exc_info", "stack_info", "_record", "_from_structlog"):
            continue
        event_dict[key] = _scrub_value(key, value)
    return event_dict


_PLAIN = frozenset((bool, int, float))  # nothing to scrub inside these

_FIRST_KEYS = ("timestamp", "level", "event")


def _order_keys(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """``timestamp``, ``level``, ``event`` first, the context after them (for humans reading JSON lines)."""
    ordered: EventDict = {k: event_dict.pop(k) for k in _FIRST_KEYS if k in event_dict}
    ordered.update(event_dict)
    return ordered


def _shared_processors() -> list[Processor]:
    """Run for structlog calls (before ``wrap_for_formatter``) and for foreign stdlib records."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
    ]


_structlog_configured = False
_handler: logging.Handler | None = None


def _configure_structlog() -> None:
    global _structlog_configured
    structlog.configure(
        processors=[
            *_shared_processors(),
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            scrub_secrets,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(ignore_frame_names=[__name__]),
        wrapper_class=FilteringBoundLogger,
        context_class=dict,
        # Cached: otherwise every call builds a fresh bound logger (3 us, even for a filtered-out debug line).
        # structlog.testing.capture_logs edits the processor list in place, so cached loggers still see it;
        # configure_logging never reconfigures structlog, it swaps the stdlib handler and level.
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
        return json.dumps(obj, default=repr)


def lean_records() -> None:
    """Stop the stdlib from collecting what no renderer here prints: the caller's file and line (a stack
    walk per record), thread, process and multiprocessing names. Process-wide, hence called by the daemon
    rather than by configure_logging (tests configure logging inside pytest)."""
    logging._srcfile = None  # the logging HOWTO's "Optimization" section documents this switch
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def _renderer(fmt: str, stream: TextIO) -> list[Processor]:
    if fmt not in ("auto", "json", "console"):
        raise ValueError(f"unknown log format {fmt!r} (auto, json or console)")
    tty = _is_tty(stream)
    if fmt == "json" or (fmt == "auto" and not tty):
        json_renderer = structlog.processors.JSONRenderer(serializer=_dumps)
        return [
            structlog.processors.format_exc_info,  # exception -> one string field, escaped into one line
            _order_keys,
            _SyslogPrefixed(json_renderer) if is_journal(stream) else json_renderer,
        ]
    return [structlog.dev.ConsoleRenderer(colors=tty)]


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Send every log record (structlog and stdlib) to ``stream`` (default stdout) as JSON lines
    (``fmt == "json"``, or ``"auto"`` and ``stream`` is not a terminal) or console text (``"console"``, or
    ``"auto"`` on a terminal), dropping records below ``level``. JSON lines to the journal carry a ``<N>``
    syslog priority prefix.

    Idempotent: a second call (config reload) replaces the handler and the level; other handlers on the root
    logger (pytest's, for instance) are left alone.
    """
    global _handler
    lvl = LEVELS.get(level.lower())
    if lvl is None:
        raise ValueError(f"unknown log level {level!r} (debug, info, warning or error)")
    out: TextIO = stream if stream is not None else sys.stdout
    if not _structlog_configured:
        _configure_structlog()

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(), structlog.stdlib.ExtraAdder(), scrub_secrets],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *_renderer(fmt, out)],
    )
    handler = logging.StreamHandler(out)
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
    """A structlog logger backed by the stdlib logger ``name`` (the caller's module when ``None``)."""
    if not _structlog_configured:
        _configure_structlog()
    if name is None:
        return structlog.stdlib.get_logger()
    return structlog.stdlib.get_logger(name)
