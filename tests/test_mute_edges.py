"""Mute end to end, the cases test_mute_forget.py leaves out (issue 12, item 1): a timed mute made through the admin
API keeps its end across a restart, deliveries made before it still go out, its log lines hold no secret; a
debounced offline that ends while muted; UDP and MQTT devices muted like HTTP ones."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from tests.conftest import BrokerFactory, DaemonFactory, ReceiverFactory
from tests.harness import SECRET, Daemon, Receiver, endpoint, eventually
from tests.test_metrics import get, scrape
from tests.test_udp import free_udp_port

TOKEN = "tok_9f1c2e7d4b8a6f30"  # a test token: it must never reach a log line


def seen(r: Receiver) -> list[tuple[str, str]]:
    return [(e["type"], e["device"]["id"]) for e in r.events()]


def logged(d: Daemon, name: str) -> list[dict[str, Any]]:
    return [line for line in d.logs() if line.get("event") == name]


async def beat(d: Daemon, device: str, state: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"device": device, **({"state": state} if state else {})}
    status, answer = await d.request("POST", "/v1/heartbeat", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, answer
    result: dict[str, Any] = answer
    return result


async def test_a_timed_admin_api_mute_keeps_its_end_across_a_restart_and_earlier_deliveries_go_out(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    failing = [True]
    r = await receiver(status=lambda _r: 503 if failing[0] else 200)
    d = await daemon(
        [endpoint("sink", r)],
        listen={"tokens": [TOKEN]},
        delivery={"retry_schedule": ["200ms"] * 50},
    )
    await beat(d, "lab-1")  # its online is pending: the receiver fails
    await eventually(lambda: r.attempts >= 1)

    status, rule = await d.admin("POST", "/v1/devices/mute", {"match": "lab-1", "for": "1h", "reason": "swap"})
    assert status == 200, rule
    assert (rule["match"], rule["reason"], rule["devices"]) == ("lab-1", "swap", ["lab-1"])
    until = rule["until"]
    assert until is not None and rule["created_by"]
    assert (await beat(d, "lab-1", "shutdown"))["changed"] is True  # recorded, no delivery

    failing[0] = False  # the delivery made before the mute still goes out; the muted offline does not
    await r.wait_for(1)
    await asyncio.sleep(0.5)
    assert seen(r) == [("device.online", "lab-1")]
    _, rows = await d.admin("GET", "/v1/deliveries?limit=100")
    assert [(row["type"], row["status"]) for row in rows] == [("device.online", "delivered")]
    assert get(await scrape(d), "webhookd_events_suppressed_total", reason="muted") == 1

    # The mute's end survives a restart to the millisecond, and it still holds.
    assert await d.stop() == 0
    await d.start()
    _, dev = await d.admin("GET", "/v1/devices/lab-1")
    assert (dev["muted"], dev["muted_until"]) == (True, until)
    p = await d.cli("devices", "--json")
    assert json.loads(p.stdout)[0]["muted_until"] == until
    await beat(d, "lab-1")
    await asyncio.sleep(0.5)
    assert seen(r) == [("device.online", "lab-1")]

    # Who, what, until in the log line; the token and the endpoint's secret nowhere in the log.
    [line] = logged(d, "device_muted")
    assert (line["match"], line["until"], line["reason"], line["devices"]) == ("lab-1", until, "swap", 1)
    assert line["by"] == rule["created_by"]
    text = d.logs_text()
    assert TOKEN not in text and SECRET not in text and SECRET.removeprefix("whsec_") not in text


async def test_a_debounced_offline_that_ends_while_muted_is_recorded_and_not_sent(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    r = await receiver()
    d = await daemon([endpoint("sink", r)], presence={"debounce": "1s"})
    await d.heartbeat("ap-1")
    await r.wait_for(1)
    await d.heartbeat("ap-1", "reboot")  # held by the debounce
    assert (await d.cli("devices", "mute", "ap-*", "--reason", "firmware")).returncode == 0
    await eventually(lambda: logged(d, "device_offline"), timeout=5)
    [offline] = logged(d, "device_offline")
    assert offline["deliveries"] == 0 and offline["muted_by"] == "ap-*" and offline["reason"] == "reboot"
    assert get(await scrape(d), "webhookd_events_suppressed_total", reason="muted") == 1
    assert (await d.cli("devices", "unmute", "ap-*")).returncode == 0
    await asyncio.sleep(0.5)
    assert seen(r) == [("device.online", "ap-1")]  # nothing retroactive at the unmute
    await d.heartbeat("ap-1")
    await r.wait_for(2)
    assert r.events()[1]["type"] == "device.online" and r.events()[1]["device"]["previous_state"] == "offline"


async def test_udp_and_mqtt_devices_are_muted_like_http_ones(
    daemon: DaemonFactory, receiver: ReceiverFactory, broker: BrokerFactory
) -> None:
    b = await broker()
    r = await receiver()
    port = free_udp_port()
    d = await daemon(
        [endpoint("sink", r)],
        listen={"udp": f"127.0.0.1:{port}"},
        mqtt={"url": b.url, "settle": "200ms", "sources": [{"preset": "tasmota"}]},
    )
    assert (await d.cli("devices", "mute", "lab-*", "--for", "1h")).returncode == 0
    assert (await d.cli("devices", "mute", "plug")).returncode == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
        out.sendto(b"lab-udp", ("127.0.0.1", port))
        await b.pub("tele/plug/LWT", "Online", retain=True)
        out.sendto(b"free-udp", ("127.0.0.1", port))  # not muted: the control
        await r.wait_for(1)
        await eventually(lambda: len(logged(d, "device_online")) == 3, timeout=10)
        out.sendto(b"lab-udp shutdown", ("127.0.0.1", port))
        await b.pub("tele/plug/LWT", "Offline", retain=True)
        await eventually(lambda: len(logged(d, "device_offline")) == 2, timeout=10)
    await asyncio.sleep(0.3)
    assert seen(r) == [("device.online", "free-udp")]
    lines = {x["device"]: x for x in logged(d, "device_online") + logged(d, "device_offline")}
    assert lines["lab-udp"]["muted_by"] == "lab-*" and lines["plug"]["muted_by"] == "plug"
    _, devs = await d.admin("GET", "/v1/devices")
    muted = {dev["id"]: (dev["source"], dev["muted"]) for dev in devs}
    assert muted == {"lab-udp": ("udp", True), "plug": ("mqtt", True), "free-udp": ("udp", False)}
    assert get(await scrape(d), "webhookd_events_suppressed_total", reason="muted") == 4
