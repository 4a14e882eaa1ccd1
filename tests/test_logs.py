"""webhookd.logs: JSON lines / console rendering, levels, stdlib records, secret scrubbing."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import structlog
from structlog.testing import capture_logs

from webhookd import logs
from webhookd.logs import configure_logging, get_logger


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    saved = (logs._level, logs._stream, list(logs._processors))
    yield
    logs._level, logs._stream, processors = saved
    logs._processors[:] = processors
    if logs._handler is not None:
        root.removeHandler(logs._handler)
        logs._handler = None
    root.setLevel(level)
    structlog.contextvars.clear_contextvars()
    logging.captureWarnings(False)


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


class TTYStream(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_json_line_keys_and_order() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", buf)
    get_logger("webhookd.test").info("device_online", device="d1", reason="heartbeat")
    out = buf.getvalue()
    assert out.count("\n") == 1
    (rec,) = lines(buf)
    assert list(rec)[:3] == ["timestamp", "level", "event"]
    assert rec["level"] == "info"
    assert rec["event"] == "device_online"
    assert rec["device"] == "d1" and rec["reason"] == "heartbeat"
    assert rec["timestamp"].endswith("Z")
    ts = datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00"))
    assert ts.utcoffset() is not None and ts.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_auto_is_json_when_not_a_tty_and_console_on_a_tty() -> None:
    buf = io.StringIO()
    configure_logging("auto", "info", buf)
    get_logger("t").info("config_reloaded", endpoints=2)
    assert lines(buf)[0]["event"] == "config_reloaded"

    tty = TTYStream()
    configure_logging("auto", "info", tty)
    get_logger("t").info("config_reloaded", endpoints=2)
    text = tty.getvalue()
    assert "config_reloaded" in text
    assert not text.lstrip().startswith("{")


def test_console_format_on_a_pipe_has_no_colour_codes() -> None:
    buf = io.StringIO()
    configure_logging("console", "info", buf)
    get_logger("t").warning("endpoint_disabled", endpoint="ops", reason="410")
    text = buf.getvalue()
    assert "endpoint_disabled" in text and "endpoint=ops" in text
    assert "\x1b[" not in text


def test_console_reads_durations_and_puts_event_device_endpoint_first() -> None:
    buf = io.StringIO()
    configure_logging("console", "info", buf)
    fields: dict[str, Any] = {"attempt": 3, "retry_in_s": 359.478, "endpoint": "sink2", "duration_ms": 12.3}
    get_logger("t").info("delivery_failed", **fields, device="dev-1", grace_s=0.25, uptime_s=200_000, ok_s=True)
    text = buf.getvalue()
    after = text.split("delivery_failed", 1)[1]
    assert after.split("] ", 1)[1].startswith("device=dev-1 endpoint=sink2 attempt=3 ")  # after the logger name
    assert "retry_in=5m 59s " in text and "retry_in_s" not in text
    assert "duration_ms=12.3" in text and "grace=0.25s" in text and "uptime=2d 7h" in text
    assert "ok_s=True" in text  # not a number of seconds

    buf = io.StringIO()
    configure_logging("json", "info", buf)  # JSON keeps the seconds, under their own names
    get_logger("t").info("delivery_failed", **fields, device="dev-1")
    rec = lines(buf)[0]
    assert rec["retry_in_s"] == 359.478 and rec["duration_ms"] == 12.3 and "retry_in" not in rec
    assert list(rec)[:5] == ["timestamp", "level", "event", "attempt", "retry_in_s"]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.004, "0.004s"),
        (9.5, "9.5s"),
        (42.4, "42s"),
        (60, "1m 0s"),
        (359.478, "5m 59s"),
        (360, "6m 0s"),
        (7500, "2h 5m"),
        (90000, "1d 1h"),
    ],
)
def test_console_durations(seconds: float, text: str) -> None:
    buf = io.StringIO()
    configure_logging("console", "info", buf)
    get_logger("t").info("retry_scheduled", retry_in_s=seconds)
    assert f"retry_in={text}\n" in buf.getvalue()


def test_level_filtering_and_reconfigure() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", buf)
    log = get_logger("webhookd.test")
    log.debug("hidden")
    log.info("shown")
    assert [r["event"] for r in lines(buf)] == ["shown"]

    buf2 = io.StringIO()
    configure_logging("json", "debug", buf2)  # reload: new level, new stream, the same logger object
    log.debug("now_visible")
    assert [r["event"] for r in lines(buf2)] == ["now_visible"]
    assert [r["event"] for r in lines(buf)] == ["shown"]  # the old handler is gone

    configure_logging("json", "warning", buf2)
    log.info("dropped")
    log.warning("kept")
    assert [r["event"] for r in lines(buf2)] == ["now_visible", "kept"]
    ours = [h for h in logging.getLogger().handlers if h is logs._handler]
    assert len(ours) == 1


def test_filtered_calls_skip_the_processor_chain() -> None:
    configure_logging("json", "info", io.StringIO())
    log = get_logger("webhookd.test")
    with mock.patch.object(structlog.stdlib.BoundLogger, "_proxy_to_logger") as proxied:
        log.debug("expensive", payload=object())
        assert proxied.call_count == 0
        log.info("cheap")
        assert proxied.call_count == 1


def test_stdlib_records_render_the_same_way() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", buf)
    logging.getLogger("aiohttp.server").error("Error handling request from %s", "10.0.0.7")
    logging.getLogger("asyncio").warning("Executing %r took %.3f seconds", "<Task>", 0.25)
    recs = lines(buf)
    assert [r["level"] for r in recs] == ["error", "warning"]
    assert recs[0]["event"] == "Error handling request from 10.0.0.7"
    assert recs[0]["logger"] == "aiohttp.server"
    assert recs[1]["event"] == "Executing '<Task>' took 0.250 seconds"
    for r in recs:
        assert list(r)[:3] == ["timestamp", "level", "event"]


def test_stdlib_level_follows_configuration() -> None:
    buf = io.StringIO()
    configure_logging("json", "warning", buf)
    logging.getLogger("aiohttp.server").info("not shown")
    assert buf.getvalue() == ""


def test_exception_is_one_string_field_on_one_line() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", buf)
    log = get_logger("t")
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        log.exception("delivery_crashed", delivery_id=7)
    try:
        raise ValueError("stdlib side")
    except ValueError:
        logging.getLogger("asyncio").exception("Task exception was never retrieved")
    out = buf.getvalue()
    assert out.count("\n") == 2
    first, second = lines(buf)
    assert first["level"] == "error" and first["delivery_id"] == 7
    assert isinstance(first["exception"], str)
    assert "ZeroDivisionError: boom" in first["exception"]
    assert "ValueError: stdlib side" in second["exception"]


def test_secrets_are_scrubbed() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", buf)
    get_logger("t").info(
        "endpoint_configured",
        endpoint="ops",
        secret="whsec_abc",
        secrets=["a", "b"],
        token="t0k",
        password="hunter2",
        headers={"Authorization": "Bearer xyz", "X-Other": "fine"},
        url="https://user:pa55@hooks.example.com/x",
        previous=None,
    )
    logging.getLogger("aiohttp.client").warning("sent", extra={"api_key": "k"})
    rec, stdlib = lines(buf)
    assert rec["secret"] == "***" and rec["secrets"] == "***"
    assert rec["token"] == "***" and rec["password"] == "***"
    assert rec["headers"] == {"Authorization": "***", "X-Other": "fine"}
    assert rec["url"] == "https://***@hooks.example.com/x"
    assert rec["endpoint"] == "ops" and rec["previous"] is None
    assert stdlib["api_key"] == "***"
    text = buf.getvalue()
    for leaked in ("whsec_abc", "t0k", "hunter2", "xyz", "pa55"):
        assert leaked not in text


def test_scrub_secrets_processor_directly() -> None:
    ed = logs.scrub_secrets(None, "info", {"event": "x", "Authorization": "Bearer a", "n": 1})
    assert ed == {"event": "x", "Authorization": "***", "n": 1}


def test_contextvars_are_merged() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", buf)
    structlog.contextvars.bind_contextvars(endpoint="ops", device="d9")
    get_logger("t").info("delivery_succeeded", status=200, duration_ms=12.5)
    (rec,) = lines(buf)
    assert rec["endpoint"] == "ops" and rec["device"] == "d9" and rec["status"] == 200


def test_capture_logs_sees_all_levels() -> None:
    configure_logging("json", "warning", io.StringIO())
    log = get_logger("webhookd.test")
    with capture_logs() as cap:
        log.info("device_online", device="d1")
        log.debug("tick")
    assert cap == [
        {"event": "device_online", "log_level": "info", "device": "d1"},
        {"event": "tick", "log_level": "debug"},
    ]


def test_capture_logs_without_configure_logging() -> None:
    with capture_logs() as cap:
        get_logger("webhookd.other").info("device_offline", reason="timeout")
    assert cap == [{"event": "device_offline", "log_level": "info", "reason": "timeout"}]


def test_get_logger_type_and_name() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", buf)
    get_logger().info("no_name")
    (rec,) = lines(buf)
    assert rec["logger"] == __name__


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="level"):
        configure_logging("json", "loud", io.StringIO())
    with pytest.raises(ValueError, match="format"):
        configure_logging("xml", "info", io.StringIO())


def test_default_stream_is_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json", "info")
    get_logger("t").info("to_stdout")
    out = capsys.readouterr().out
    assert [json.loads(line)["event"] for line in out.splitlines()] == ["to_stdout"]


def _journal(monkeypatch: pytest.MonkeyPatch, f: Any) -> None:
    st = os.fstat(f.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")


def test_journal_stream_lines_carry_syslog_priorities(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with (tmp_path / "journal").open("w+") as f:
        _journal(monkeypatch, f)
        assert logs.is_journal(f)
        configure_logging("auto", "debug", f)  # what systemd runs: auto, stdout is the journal socket
        log = get_logger("webhookd.test")
        log.debug("tick")
        log.info("device_online", device="d1")
        log.warning("endpoint_disabled", endpoint="ops")
        log.error("delivery_failed", delivery_id=3)
        log.critical("daemon_crashed")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("delivery_crashed")
        logging.getLogger("aiohttp.server").warning("stdlib %s", "too")
        f.flush()
        f.seek(0)
        text = f.read()
    got = []
    for line in text.splitlines():
        m = re.fullmatch(r"<(\d)>(\{.*\})", line)
        assert m, line
        rec = json.loads(m.group(2))
        got.append((int(m.group(1)), rec["level"], rec["event"]))
    assert got == [
        (7, "debug", "tick"),
        (6, "info", "device_online"),
        (4, "warning", "endpoint_disabled"),
        (3, "error", "delivery_failed"),
        (2, "critical", "daemon_crashed"),
        (3, "error", "delivery_crashed"),
        (4, "warning", "stdlib too"),
    ]


def test_plain_json_when_stdout_is_not_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with (tmp_path / "elsewhere").open("w+") as other, (tmp_path / "out").open("w+") as f:
        _journal(monkeypatch, other)  # inherited JOURNAL_STREAM, but stdout was redirected to a file
        assert not logs.is_journal(f)
        configure_logging("json", "info", f)
        get_logger("t").warning("endpoint_disabled")
        f.flush()
        f.seek(0)
        assert json.loads(f.read())["event"] == "endpoint_disabled"
    for value in ("", "garbage", "1:x", "12"):
        monkeypatch.setenv("JOURNAL_STREAM", value)
        assert not logs.is_journal(sys.stdout)
    monkeypatch.delenv("JOURNAL_STREAM")
    assert not logs.is_journal(io.StringIO())  # no fd at all
    buf = io.StringIO()
    configure_logging("json", "info", buf)
    get_logger("t").error("delivery_failed")
    assert buf.getvalue().startswith("{")


def test_console_format_on_the_journal_has_no_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with (tmp_path / "journal").open("w+") as f:
        _journal(monkeypatch, f)
        configure_logging("console", "info", f)
        get_logger("t").warning("endpoint_disabled", endpoint="ops")
        f.flush()
        f.seek(0)
        text = f.read()
    assert "endpoint_disabled" in text and not text.startswith("<")


def test_json_lines_render_odd_values_and_scrub_plain_secret_values() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", buf)
    log = get_logger("webhookd.test")
    log.info("odd", big=2**70, obj=Path("/x"), by_int={1: "a"}, ratio=0.5, flag=True, token=12345, api_key=True)
    line = json.loads(buf.getvalue().splitlines()[-1])
    assert line["big"] == 2**70 and line["obj"] == repr(Path("/x")) and line["by_int"] == {"1": "a"}
    assert line["ratio"] == 0.5 and line["flag"] is True
    assert line["token"] == logs.SCRUBBED and line["api_key"] == logs.SCRUBBED


class WriteRecorder(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def test_each_line_is_one_write() -> None:
    out = WriteRecorder()
    configure_logging("json", "info", out)
    get_logger("t").info("device_online", device="d1")
    logging.getLogger("aiohttp.server").warning("stdlib %s", "too")
    assert len(out.writes) == 2
    assert all(w.endswith("\n") and w.count("\n") == 1 for w in out.writes)
    assert [json.loads(w)["event"] for w in out.writes] == ["device_online", "stdlib too"]


def test_reload_applies_to_loggers_obtained_before_it() -> None:
    early = get_logger("webhookd.early")  # like a module-level logger, created before any configure_logging
    buf = io.StringIO()
    configure_logging("json", "warning", buf)
    early.info("hidden")
    early.warning("kept")
    configure_logging("json", "debug", buf)  # reload lowers the level
    early.debug("tick")
    configure_logging("json", "error", buf)  # and raises it again
    early.warning("dropped")
    early.error("failed")
    assert [r["event"] for r in lines(buf)] == ["kept", "tick", "failed"]
    assert structlog.get_config()["processors"] is logs._processors  # one list object, contents replaced

    tty = TTYStream()
    configure_logging("auto", "info", tty)  # reload changes the renderer too
    early.info("on_the_console", device="d1")
    text = tty.getvalue()
    assert "on_the_console" in text and "device" in text and not text.lstrip().startswith("{")


def test_structlog_and_stdlib_lines_have_the_same_shape() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", buf)
    get_logger("aiohttp.server").warning("Error handling request")
    logging.getLogger("aiohttp.server").warning("Error handling request")
    ours, theirs = lines(buf)
    assert list(ours) == list(theirs) == ["timestamp", "level", "event", "logger"]
    assert {**ours, "timestamp": ""} == {**theirs, "timestamp": ""}
    stamp = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
    assert stamp.fullmatch(ours["timestamp"]) and stamp.fullmatch(theirs["timestamp"])

    get_logger("t").info("device_online", device="d1", reason="heartbeat")
    logging.getLogger("t").info("device_online", extra={"device": "d1", "reason": "heartbeat"})
    ours, theirs = lines(buf)[2:]
    assert list(ours)[:3] == list(theirs)[:3] == ["timestamp", "level", "event"]
    assert {**ours, "timestamp": ""} == {**theirs, "timestamp": ""}


def test_exception_renders_one_line() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", buf)
    log = get_logger("webhookd.dispatch")
    try:
        try:
            raise KeyError("inner")
        except KeyError as e:
            raise RuntimeError("outer\nwith a newline") from e
    except RuntimeError:
        log.exception("delivery_crashed", delivery_id=7)
    out = buf.getvalue()
    assert out.count("\n") == 1
    (rec,) = lines(buf)
    assert list(rec)[:3] == ["timestamp", "level", "event"]
    assert rec["level"] == "error" and rec["event"] == "delivery_crashed" and rec["delivery_id"] == 7
    assert "exc_info" not in rec
    assert isinstance(rec["exception"], str) and rec["exception"].startswith("Traceback")
    assert "KeyError: 'inner'" in rec["exception"] and "RuntimeError: outer\nwith a newline" in rec["exception"]


def test_before_configure_logging_warnings_go_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    logs._stream = None
    logs._level = logging.WARNING
    logs._processors[:] = logs._chain(logs._json_renderer(journal=False))
    log = get_logger("t")
    log.info("hidden")
    log.warning("shown", endpoint="ops")
    captured = capsys.readouterr()
    assert captured.out == ""
    (rec,) = [json.loads(line) for line in captured.err.splitlines()]
    assert list(rec) == ["timestamp", "level", "event", "endpoint", "logger"]
    assert rec["event"] == "shown"


def test_a_closed_stream_does_not_raise() -> None:
    buf = io.StringIO()
    configure_logging("json", "info", buf)
    buf.close()
    get_logger("t").info("into_the_void")  # dropped, not raised into the caller
