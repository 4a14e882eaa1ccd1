"""Mute and forget end to end (issue 12, items 1 and 4): the real daemon, its CLI, a real receiver."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import signal
import time
from datetime import datetime
from typing import Any

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import Daemon, Receiver, endpoint, eventually
from tests.test_metrics import get, scrape

ME = pwd.getpwuid(os.getuid()).pw_name


def seen(r: Receiver) -> list[tuple[str, str]]:
    return [(e["type"], e["device"]["id"]) for e in r.events()]


def logged(d: Daemon, name: str) -> list[dict[str, Any]]:
    return [line for line in d.logs() if line.get("event") == name]


async def devices(d: Daemon) -> dict[str, dict[str, Any]]:
    p = await d.cli("devices", "--json")
    assert p.returncode == 0, p.stderr
    return {dev["id"]: dev for dev in json.loads(p.stdout)}


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


async def test_a_timed_glob_mute_records_events_delivers_none_and_ends_by_itself(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    r = await receiver()
    d = await daemon([endpoint("sink", r)])
    await d.heartbeat("printer-1")
    await d.heartbeat("scanner-1")
    await r.wait_for(2)

    p = await d.cli("devices", "mute", "printer-*", "--for", "1h", "--reason", "toner swap")
    assert p.returncode == 0, p.stderr
    assert "muted 'printer-*' until" in p.stdout and "(toner swap)" in p.stdout and "1 device (printer-1)" in p.stdout
    muted_at = time.time()

    # Events are still made and recorded; no deliveries for them. A device first seen now is covered too.
    assert (await d.heartbeat("printer-1", "shutdown"))["changed"] is True
    assert (await d.heartbeat("printer-2"))["changed"] is True
    await d.heartbeat("scanner-1", "shutdown")  # not muted: delivered
    await r.wait_for(3)
    _, rows = await d.admin("GET", "/v1/deliveries?limit=100")
    assert sorted((row["device"], row["type"]) for row in rows) == [
        ("printer-1", "device.online"),
        ("scanner-1", "device.offline"),
        ("scanner-1", "device.online"),
    ]
    lines = {line["device"]: line for line in logged(d, "device_offline") + logged(d, "device_online")}
    assert lines["printer-2"]["deliveries"] == 0 and lines["printer-2"]["muted_by"] == "printer-*"
    assert lines["scanner-1"]["deliveries"] == 1 and "muted_by" not in lines["scanner-1"]

    m = await scrape(d)
    assert get(m, "webhookd_events_suppressed_total", reason="muted") == 2
    assert get(m, "webhookd_events_total", type="device.offline") == 2  # the muted one is recorded

    devs, table = await asyncio.gather(devices(d), d.cli("devices"))  # two Python start-ups at once
    assert devs["printer-1"]["muted"] is True and devs["printer-2"]["muted"] is True
    assert abs(ts(devs["printer-1"]["muted_until"]) - (muted_at + 3600)) < 2.0
    assert devs["scanner-1"]["muted"] is False and devs["scanner-1"]["muted_until"] is None
    assert table.returncode == 0 and "MUTED" in table.stdout
    row = next(line for line in table.stdout.splitlines() if line.startswith("printer-1"))
    assert "until " in row and row.rstrip().endswith("http")
    assert max(len(line) for line in table.stdout.splitlines()) <= 100

    [line] = logged(d, "device_muted")
    assert (
        line["match"] == "printer-*"
        and line["devices"] == 1
        and line["replaced"] is False
        and line["reason"] == "toner swap"
    )
    assert line["by"] == ME and line["until"] == devs["printer-1"]["muted_until"]

    # Muting the glob again replaces its mute, now for 1s. Expiry needs no action: deliveries resume for new
    # events, nothing is sent for what happened meanwhile.
    p = await d.cli("devices", "mute", "printer-*", "--for", "1s", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["devices"] == ["printer-1", "printer-2"]
    assert logged(d, "device_muted")[-1]["replaced"] is True
    until = ts(json.loads(p.stdout)["until"])
    await eventually(lambda: time.time() > until + 0.1, timeout=5)
    devs = await devices(d)
    assert not devs["printer-1"]["muted"] and devs["printer-1"]["muted_until"] is None
    await d.heartbeat("printer-1")
    await r.wait_for(4)
    await asyncio.sleep(0.5)
    assert seen(r) == [
        ("device.online", "printer-1"),
        ("device.online", "scanner-1"),
        ("device.offline", "scanner-1"),
        ("device.online", "printer-1"),
    ]
    assert r.events()[3]["device"]["previous_state"] == "offline"


async def test_a_mute_survives_a_restart_and_a_reload_until_unmuted(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    r = await receiver()
    d = await daemon([endpoint("sink", r)])
    p = await d.cli("devices", "mute", "lab-*", "--json")
    assert p.returncode == 0, p.stderr
    rule = json.loads(p.stdout)
    assert rule["match"] == "lab-*" and rule["until"] is None and rule["devices"] == [] and rule["created_by"] == ME

    await d.stop()
    await d.start()
    await d.heartbeat("lab-1")
    d.signal(signal.SIGHUP)
    await eventually(lambda: logged(d, "config_reloaded"))
    await d.heartbeat("lab-2")
    devs, table = await asyncio.gather(devices(d), d.cli("devices"))
    assert devs["lab-1"]["muted"] is True and devs["lab-1"]["muted_until"] is None and devs["lab-2"]["muted"]
    assert next(x for x in table.stdout.splitlines() if x.startswith("lab-1")).split()[2:4] == ["online", "yes"]

    p = await d.cli("devices", "unmute", "lab-*")
    assert p.returncode == 0, p.stderr
    assert "unmuted 'lab-*'" in p.stdout and "2 devices (lab-1, lab-2)" in p.stdout
    [line] = logged(d, "device_unmuted")
    assert line["match"] == "lab-*" and line["devices"] == 2 and line["by"] == ME
    await d.heartbeat("lab-1", "shutdown")
    await r.wait_for(1)
    await asyncio.sleep(0.3)
    assert seen(r) == [("device.offline", "lab-1")]  # nothing retroactive: no online of lab-1 or lab-2

    await d.stop()
    await d.start()
    assert not (await devices(d))["lab-2"]["muted"]


async def test_unmute_names_the_glob_that_mutes_a_device_and_bad_input_changes_nothing(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    r = await receiver()
    d = await daemon([endpoint("sink", r)])
    await d.heartbeat("printer-1")
    assert (await d.cli("devices", "mute", "printer-*")).returncode == 0

    status, body = await d.admin("POST", "/v1/devices/unmute", {"match": "printer-1"})
    assert status == 409 and body == {"error": "printer-1 is muted by 'printer-*': unmute that"}
    # Refused commands, none changes anything: they run concurrently (each is a Python start-up).
    p, p2, p3 = await asyncio.gather(
        d.cli("devices", "unmute", "printer-1"),
        d.cli("devices", "unmute", "scanner-*"),
        d.cli("devices", "mute", "x", "--for", "soon"),
    )
    assert p.returncode == 1 and p.stderr.strip() == "printer-1 is muted by 'printer-*': unmute that"
    p = p2
    assert p.returncode == 1 and "no mute for 'scanner-*'" in p.stderr
    status, _ = await d.admin("POST", "/v1/devices/unmute", {"match": "nothing"})
    assert status == 404

    for bad in (
        {},
        {"match": ""},
        {"match": 5},
        {"match": "x", "for": "soon"},
        {"match": "x", "for": "0s"},
        {"match": "x", "for": "-1h"},
        {"match": "x", "reason": 7},
        {"match": "x", "reason": "two\nlines"},
        {"match": "x", "reason": "\x1b[31mred"},
        {"match": "x", "until": "tomorrow"},
        [1],
    ):
        status, body = await d.admin("POST", "/v1/devices/mute", bad)
        assert status == 400 and isinstance(body["error"], str), (bad, status, body)
    status, body = await d.admin("POST", "/v1/devices/mute", {"match": "x", "for": "soon"})
    assert "invalid duration 'soon'" in body["error"]
    p = p3
    assert p.returncode == 1 and "invalid duration 'soon'" in p.stderr and "Traceback" not in p.stderr
    assert len(logged(d, "device_muted")) == 1  # nothing else was muted

    # Muting the same match again replaces the rule (now timed); unmuting the glob unmutes the device.
    p = await d.cli("devices", "mute", "printer-*", "--for", "1h", "--json")
    assert json.loads(p.stdout)["devices"] == ["printer-1"] and json.loads(p.stdout)["until"] is not None
    assert (await d.cli("devices", "unmute", "printer-*")).returncode == 0
    assert not (await devices(d))["printer-1"]["muted"]
    p = await d.cli("devices", "unmute", "printer-*")
    assert p.returncode == 1


async def test_no_reminders_for_a_muted_device_and_the_count_goes_on(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    r = await receiver()
    d = await daemon([endpoint("sink", r)], presence={"remind_every": "1s"})
    await d.heartbeat("ap-1")
    await r.wait_for(1)
    assert (await d.cli("devices", "mute", "ap-1")).returncode == 0
    await d.heartbeat("ap-1", "shutdown")  # recorded, not delivered
    await asyncio.sleep(2.6)
    assert seen(r) == [("device.online", "ap-1")]
    assert not logged(d, "device_still_offline")  # not made at all
    [offline] = logged(d, "device_offline")
    assert offline["deliveries"] == 0 and offline["muted_by"] == "ap-1"
    _, rows = await d.admin("GET", "/v1/deliveries?limit=100")
    assert len(rows) == 1
    assert (await d.cli("devices", "unmute", "ap-1")).returncode == 0
    await r.wait_for(2, timeout=3)
    reminder = r.events()[1]
    assert reminder["type"] == "device.still_offline" and reminder["reminder"] >= 3  # counted while muted
    await asyncio.sleep(0.3)
    assert [t for t, _ in seen(r)].count("device.offline") == 0  # nothing retroactive


async def test_forget_drops_the_device_and_its_mute_and_its_pending_deliveries_continue(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    failing = [True]
    r = await receiver(status=lambda _r: 503 if failing[0] else 200)
    d = await daemon(
        [endpoint("sink", r)],
        delivery={"retry_schedule": ["250ms"] * 40},  # ~10 s before a delivery is dead
    )
    await d.heartbeat("old-1")
    await d.heartbeat("cam@site:2")
    assert (await d.cli("devices", "mute", "old-1")).returncode == 0
    await eventually(lambda: r.attempts >= 2)

    p = await d.cli("devices", "forget", "old-1")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "forgot device 'old-1' (was online) and its mute; its pending deliveries continue"
    p = await d.cli("devices", "forget", "cam@site:2", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["id"] == "cam@site:2"
    assert (await d.admin("GET", "/v1/devices/old-1"))[0] == 404
    assert set(await devices(d)) == set()
    [line] = logged(d, "device_forgotten")[:1]
    assert line["device"] == "old-1" and line["mute_removed"] is True and line["by"] == ME

    p = await d.cli("devices", "forget", "old-1")
    assert p.returncode == 1 and "unknown device 'old-1'" in p.stderr
    status, body = await d.admin("DELETE", "/v1/devices/nope")
    assert status == 404 and body == {"error": "unknown device 'nope'"}

    failing[0] = False  # the deliveries of its past events still go out
    await r.wait_for(2)
    assert sorted(seen(r)) == [("device.online", "cam@site:2"), ("device.online", "old-1")]

    # A later heartbeat makes it a new device (and its mute is gone: delivered).
    answer = await d.heartbeat("old-1")
    assert answer["changed"] is True
    await r.wait_for(3)
    assert r.events()[2]["device"]["previous_state"] == "unknown"

    # Forgotten for good: not back after a restart.
    await d.stop()
    await d.start()
    after_restart = await devices(d)
    assert set(after_restart) == {"old-1"}
    assert not after_restart["old-1"]["muted"]


async def test_forget_stops_the_device_s_silence_timer_held_offline_and_reminders(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    r = await receiver()
    d = await daemon(
        [endpoint("sink", r)],
        presence={"debounce": "1s", "remind_every": "1s"},
        devices=[{"match": "timed-*", "silence_timeout": "1s"}],
    )
    for dev in ("timed-1", "held-1", "nag-1"):
        await d.heartbeat(dev)
    await r.wait_for(3)
    assert (await d.admin("DELETE", "/v1/devices/timed-1"))[0] == 200  # before its 1 s silence timeout
    await d.heartbeat("held-1", "reboot")  # held by the 1 s debounce
    assert (await d.admin("DELETE", "/v1/devices/held-1"))[0] == 200
    await d.heartbeat("nag-1", "shutdown")
    await r.wait_for(5, timeout=6)  # its offline after the debounce, then reminder 1
    assert seen(r)[3:] == [("device.offline", "nag-1"), ("device.still_offline", "nag-1")]
    assert (await d.admin("DELETE", "/v1/devices/nag-1"))[0] == 200
    n = len(r.got)
    await asyncio.sleep(2.5)  # past every timer the three had
    assert len(r.got) == n and n <= 6  # a reminder 2 at most, if it was due while the DELETE was on its way
    assert {x["device"] for x in logged(d, "device_offline")} == {"nag-1"}
    assert await devices(d) == {}
    await d.stop()
    await d.start()
    await asyncio.sleep(1.5)  # nothing comes back from the store either
    assert len(r.got) == n and await devices(d) == {}
