"""MQTT presence end to end: the real daemon, a real Mosquitto, real MQTT devices with real wills (issue 11)."""

from __future__ import annotations

import json
import time
from typing import Any

from tests.conftest import BrokerFactory, DaemonFactory, DevicesFactory, ReceiverFactory
from tests.harness import Daemon, Receiver, endpoint
from tests.mqtt_broker import Broker, Watcher


def mqtt_cfg(b: Broker, *sources: dict[str, Any], **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"url": b.url, "settle": "500ms", "keepalive": "5s", "sources": list(sources)}
    cfg.update(extra)
    return cfg


def kinds(r: Receiver) -> list[tuple[str, str, str]]:
    return [(e["type"], e["device"]["id"], e["reason"]) for e in r.events()]


async def connected(d: Daemon) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        status, body = await d.admin("GET", "/v1/status")
        return body["mqtt"] if status == 200 and body["mqtt"] and body["mqtt"]["connected"] else None

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        got = await check()
        if got:
            return got
        await __import__("asyncio").sleep(0.05)
    raise AssertionError("the daemon did not connect to the broker")


async def test_tasmota_devices_online_then_a_power_loss_within_a_second_of_the_will(
    daemon: DaemonFactory, receiver: ReceiverFactory, broker: BrokerFactory, devices: DevicesFactory
) -> None:
    b = await broker()
    r = await receiver()
    fleet = await devices(b, 3, preset="tasmota", keepalive=2)
    d = await daemon([endpoint("sink", r)], mqtt=mqtt_cfg(b, {"preset": "tasmota"}))
    await r.wait_for(3, timeout=15)  # the retained Online of each, reconciled at the end of the settle window
    assert sorted(kinds(r)) == [("device.online", f"dev-{i}", "connected") for i in (1, 2, 3)]
    status = await connected(d)
    assert status["broker"] == b.url and status["sources"] == {"tasmota": 3}
    out = await d.cli("devices", "--json")
    assert {(x["id"], x["source"], x["state"]) for x in json.loads(out.stdout)} == {
        (f"dev-{i}", "mqtt", "online") for i in (1, 2, 3)
    }

    async with Watcher(b, ["tele/+/LWT"]) as w:
        fleet.freeze()  # power loss: no FIN; the broker publishes the wills after 1.5 x keep-alive
        wills = [
            await w.wait_for(lambda m, i=i: m.topic == f"tele/dev-{i}/LWT" and m.text == "Offline", 20)
            for i in (1, 2, 3)
        ]
    await r.wait_for(6, timeout=5)
    offline = {e.json["device"]["id"]: e.at for e in r.got[3:]}
    assert sorted(kinds(r)[3:]) == [("device.offline", f"dev-{i}", "disconnected") for i in (1, 2, 3)]
    for i, will in zip((1, 2, 3), wills, strict=True):
        lag = offline[f"dev-{i}"] - will.at
        assert lag < 1.0, f"dev-{i}: webhook {lag:.3f} s after the will"
    # no silence timer for availability devices: nothing more, however long
    assert len(r.got) == 6
