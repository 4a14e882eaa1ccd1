"""The README's copy-paste configs for issue 12 (receivers, debounce and reminders, maintenance windows), used as
written: the real `webhookd check-config`, the cron line and the systemd timer's command run against a real daemon,
and systemd's own checker on the timer units."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import Daemon, endpoint
from tests.test_systemd import NO_ANALYZE, VENV_WEBHOOKD

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
RECEIVER_ENV = {
    "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T1/B1/x",
    "DISCORD_WEBHOOK_URL": "https://discord.com/api/webhooks/1/x",
    "TEAMS_WORKFLOW_URL": "https://prod-1.westeurope.logic.azure.com/workflows/1/triggers/manual/paths/invoke?sig=x",
    "NTFY_TOKEN": "tk_x",
    "GOTIFY_TOKEN": "g",
}


def section(title: str) -> str:
    start = README.index(f"\n## {title}")
    return README[start : README.index("\n## ", start + 1)]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def check_config(path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in RECEIVER_ENV and k != "WEBHOOKD_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "webhookd", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**clean, **env},
    )


def test_readme_receiver_configs_pass_the_real_check_config(tmp_path: Path) -> None:
    endpoints = [b for b in blocks(section("Notifications people read"), "yaml") if not b.startswith("- alias")]
    assert len(endpoints) == 6
    cfg = tmp_path / "config.yaml"
    cfg.write_text("admin:\n  socket: ./admin.sock\nendpoints:\n" + "".join(endpoints))
    out = check_config(cfg, RECEIVER_ENV)
    assert out.returncode == 0, out.stderr
    assert "6 endpoints (slack, discord, teams, ntfy, home-assistant, gotify)" in out.stdout
    # The same file on a box where the environment file was not loaded: each variable named by its key path, exit
    # 1, no traceback (a ${VAR} in a url once crashed the loader with a TypeError, exit 2).
    out = check_config(cfg, {})
    assert out.returncode == 1, out.stderr
    assert [line.split(" (line")[0] for line in out.stderr.splitlines()] == [
        "config error: endpoints[0].url: environment variable SLACK_WEBHOOK_URL not set",
        "config error: endpoints[1].url: environment variable DISCORD_WEBHOOK_URL not set",
        "config error: endpoints[2].url: environment variable TEAMS_WORKFLOW_URL not set",
        "config error: endpoints[3].headers.Authorization: environment variable NTFY_TOKEN not set",
        "config error: endpoints[5].url: environment variable GOTIFY_TOKEN not set",
    ], out.stderr


def test_readme_debounce_and_reminder_config_passes_check_config(tmp_path: Path) -> None:
    (block,) = blocks(section("Flapping Wi-Fi and devices that stay down"), "yaml")
    cfg = tmp_path / "config.yaml"
    cfg.write_text("admin:\n  socket: ./admin.sock\n" + block)
    out = check_config(cfg, {})
    assert out.returncode == 0, out.stderr
    assert "1 device rule" in out.stdout


def maintenance() -> tuple[str, str, str]:
    """The cron line's command, the service unit and the timer unit of the README's maintenance window."""
    text = section("Maintenance windows")
    (cron,) = [line.strip() for line in text.splitlines() if line.strip().startswith("0 6 1 * * root ")]
    service, timer = blocks(text, "ini")
    assert "[Service]" in service and "[Timer]" in timer
    return cron.removeprefix("0 6 1 * * root "), service, timer


def exec_start(service: str) -> str:
    (line,) = [x for x in service.splitlines() if x.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=")


def run_as_written(command: str, d: Daemon) -> subprocess.CompletedProcess[str]:
    """`command` through /bin/sh as cron runs it, the installed (or PATH's) binary swapped for this checkout's,
    the config from WEBHOOKD_CONFIG as /etc/webhookd/config.yaml would be found."""
    binary = next(b for b in ("/usr/local/bin/webhookd ", "webhookd ") if command.startswith(b))
    here = f"{shlex.quote(sys.executable)} -m webhookd "
    return subprocess.run(
        ["/bin/sh", "-c", here + command.removeprefix(binary)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "WEBHOOKD_CONFIG": str(d.config_path)},
    )


def until_of(doc: dict[str, object]) -> float:
    return datetime.fromisoformat(str(doc["muted_until"]).replace("Z", "+00:00")).timestamp()


async def test_readme_maintenance_commands_mute_a_real_daemon(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    cron, service, _timer = maintenance()
    assert shlex.split(exec_start(service)) == shlex.split(cron)  # the timer runs what the cron line runs
    r = await receiver()
    d = await daemon([endpoint("sink", r)])
    await d.heartbeat("printer-1")
    await d.heartbeat("scanner-1")
    await r.wait_for(2)

    out = await asyncio.to_thread(run_as_written, cron, d)
    assert out.returncode == 0, out.stderr
    muted_at = time.time()
    _, devs = await d.admin("GET", "/v1/devices")
    by_id = {dev["id"]: dev for dev in devs}
    assert by_id["printer-1"]["muted"] is True and not by_id["scanner-1"]["muted"]
    assert abs(until_of(by_id["printer-1"]) - (muted_at + 7200)) < 5
    [line] = [x for x in d.logs() if x.get("event") == "device_muted"]
    assert (line["match"], line["reason"], line["devices"]) == ("printer-*", "monthly service", 1)

    await d.heartbeat("printer-1", "shutdown")  # in the window: recorded, not sent
    await d.heartbeat("scanner-1", "shutdown")
    await r.wait_for(3)
    await asyncio.sleep(0.3)
    assert [(e["type"], e["device"]["id"]) for e in r.events()][2:] == [("device.offline", "scanner-1")]

    # The README's early end of the window.
    unmute = next(x.strip() for x in section("Maintenance windows").splitlines() if "devices unmute" in x)
    out = await asyncio.to_thread(run_as_written, unmute.split("#")[0].strip(), d)
    assert out.returncode == 0, out.stderr
    _, dev = await d.admin("GET", "/v1/devices/printer-1")
    assert dev["muted"] is False

    # A window that starts while the daemon is down: cron gets exit 3 and a message to mail, no traceback.
    assert await d.stop() == 0
    out = await asyncio.to_thread(run_as_written, cron, d)
    assert out.returncode == 3 and out.stderr.strip() and "Traceback" not in out.stderr


def test_readme_maintenance_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip(NO_ANALYZE)
    _cron, service, timer = maintenance()
    svc = tmp_path / "webhookd-maintenance.service"
    svc.write_text(service.replace("ExecStart=/usr/local/bin/webhookd ", f"ExecStart={VENV_WEBHOOKD} "))
    tmr = tmp_path / "webhookd-maintenance.timer"
    tmr.write_text(timer)
    out = subprocess.run([exe, "verify", "--man=no", str(svc), str(tmr)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [x for x in (out.stdout + out.stderr).splitlines() if "maintenance" in x] == []
    # verify is not blind to a mistake in them
    tmr.write_text(timer.replace("OnCalendar=", "OnCalender="))
    out = subprocess.run([exe, "verify", "--man=no", str(svc), str(tmr)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "OnCalender" in out.stdout + out.stderr
    calendar = re.search(r"OnCalendar=(.*)", timer)
    assert calendar is not None
    out = subprocess.run([exe, "calendar", calendar.group(1)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "Normalized form: *-*-01 06:00:00" in out.stdout, out.stdout + out.stderr
