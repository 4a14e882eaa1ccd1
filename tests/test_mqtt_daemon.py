"""MQTT presence end to end: the real daemon, a real Mosquitto, real MQTT devices with real wills (issue 11)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from tests.conftest import BrokerFactory, DaemonFactory, DevicesFactory, ReceiverFactory
from tests.harness import Daemon, Receiver, endpoint
from tests.mqtt_broker import Broker, Seen, Watcher
from tests.test_metrics import scrape


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
        await asyncio.sleep(0.05)
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
        wills = [await w.wait_for(offline_will(f"dev-{i}"), 20) for i in (1, 2, 3)]
    await r.wait_for(6, timeout=5)
    offline = {e.json["device"]["id"]: e.at for e in r.got[3:]}
    assert sorted(kinds(r)[3:]) == [("device.offline", f"dev-{i}", "disconnected") for i in (1, 2, 3)]
    for i, will in zip((1, 2, 3), wills, strict=True):
        lag = offline[f"dev-{i}"] - will.at
        assert lag < 1.0, f"dev-{i}: webhook {lag:.3f} s after the will"
    # no silence timer for availability devices: nothing more, however long
    assert len(r.got) == 6
    forgot = await d.cli("devices", "forget", "dev-3")
    assert forgot.returncode == 0, forgot.stderr
    assert (await connected(d))["sources"] == {"tasmota": 2}  # a forgotten device leaves the source's count


def offline_will(device: str) -> Callable[[Seen], bool]:
    return lambda m: m.topic == f"tele/{device}/LWT" and m.text == "Offline"


async def publish(b: Broker, topic: str, payload: bytes, *, retain: bool = False, will: Any = None) -> None:
    import aiomqtt

    async with aiomqtt.Client(b.host, b.port) as c:
        await c.publish(topic, payload, qos=1, retain=retain)


async def test_zigbee2mqtt_bridge_loss_takes_its_devices_offline_and_ids_with_slashes(
    daemon: DaemonFactory, receiver: ReceiverFactory, broker: BrokerFactory, devices: DevicesFactory
) -> None:
    b = await broker()
    r = await receiver()
    bridge = await devices(b, ["living/lamp", "hall sensor"], preset="zigbee2mqtt", keepalive=2)
    d = await daemon([endpoint("sink", r)], mqtt=mqtt_cfg(b, {"preset": "zigbee2mqtt"}))
    await r.wait_for(3, timeout=15)
    assert sorted(kinds(r)) == [
        ("device.online", "hall sensor", "connected"),
        ("device.online", "living/lamp", "connected"),
        ("device.online", "zigbee2mqtt", "connected"),
    ]
    status, one = await d.admin("GET", "/v1/devices/living%2Flamp")
    assert status == 200 and (one["id"], one["source"]) == ("living/lamp", "mqtt")
    await bridge.kill()  # the bridge's socket closes: its will {"state":"offline"} at once
    await r.wait_for(6, timeout=10)
    assert sorted(kinds(r)[3:]) == [
        ("device.offline", "hall sensor", "disconnected"),
        ("device.offline", "living/lamp", "disconnected"),
        ("device.offline", "zigbee2mqtt", "disconnected"),
    ]
    out = await d.cli("status")
    assert out.returncode == 0 and f"mqtt:       {b.url}, connected since" in out.stdout
    assert "devices by source: zigbee2mqtt 3" in out.stdout
    out = await d.cli("status", "--json")
    mqtt = json.loads(out.stdout)["mqtt"]
    assert mqtt["connected"] is True and mqtt["broker"] == b.url and mqtt["sources"] == {"zigbee2mqtt": 3}
    since = datetime.fromisoformat(mqtt["since"].replace("Z", "+00:00"))  # RFC 3339: the connection's wall clock
    assert abs(since.timestamp() - time.time()) < 60


def sparkplug_birth(bd_seq: int) -> bytes:
    from webhookd.mqtt import sparkplug

    p = sparkplug.Payload(timestamp=1_733_230_000_000, seq=0)
    p.metrics.add(name="bdSeq", datatype=4, long_value=bd_seq)
    return bytes(p.SerializeToString())


async def test_sparkplug_ndeath_counts_only_with_the_births_bdseq(
    daemon: DaemonFactory, receiver: ReceiverFactory, broker: BrokerFactory
) -> None:
    b = await broker()
    r = await receiver()
    d = await daemon([endpoint("sink", r)], mqtt=mqtt_cfg(b, {"preset": "sparkplug"}))
    await connected(d)
    await publish(b, "spBv1.0/plant/NBIRTH/edge1", sparkplug_birth(4))
    await publish(b, "spBv1.0/plant/DBIRTH/edge1/pump", sparkplug_birth(4))
    await r.wait_for(2, timeout=10)
    await publish(b, "spBv1.0/plant/NDEATH/edge1", sparkplug_birth(3))  # a stale session's death: ignored
    await asyncio.sleep(0.8)
    assert len(r.got) == 2
    await publish(b, "spBv1.0/plant/NDEATH/edge1", sparkplug_birth(4))
    await r.wait_for(4, timeout=10)
    assert sorted(kinds(r)[2:]) == [
        ("device.offline", "plant/edge1", "disconnected"),
        ("device.offline", "plant/edge1/pump", "disconnected"),
    ]
    m = await scrape(d)
    assert m[("webhookd_mqtt_ignored_total", (("source", "sparkplug"),))] == 1
    assert m[("webhookd_mqtt_messages_total", (("source", "sparkplug"),))] == 4
    assert m[("webhookd_mqtt_connected", ())] == 1


async def test_sighup_adds_a_source_and_reconnects_without_losing_anything(
    daemon: DaemonFactory, receiver: ReceiverFactory, broker: BrokerFactory, devices: DevicesFactory
) -> None:
    b = await broker(persistence=True)
    r = await receiver()
    await devices(b, 2, preset="tasmota", keepalive=5)
    await devices(b, 2, preset="esphome", keepalive=5, prefix="cam-")
    d = await daemon([endpoint("sink", r)], mqtt=mqtt_cfg(b, {"preset": "tasmota"}))
    await r.wait_for(2, timeout=15)
    d.cfg["mqtt"]["sources"].append({"preset": "esphome"})
    d.write_config()
    d.signal(signal.SIGHUP)
    await r.wait_for(4, timeout=15)
    assert sorted(e for e in kinds(r)) == [
        ("device.online", "cam-1", "connected"),
        ("device.online", "cam-2", "connected"),
        ("device.online", "dev-1", "connected"),
        ("device.online", "dev-2", "connected"),
    ]
    reloaded = [x for x in d.logs() if x.get("event") == "config_reloaded"]
    assert reloaded and "mqtt.sources" in json.dumps(reloaded[-1])
    status = await connected(d)
    assert status["sources"] == {"tasmota": 2, "esphome": 2}
    await asyncio.sleep(0.5)
    assert len(r.got) == 4  # the tasmota devices' retained Online, replayed on the new subscription: no event


async def test_our_own_status_topic_online_while_up_offline_after_a_stop_and_our_will_after_a_kill(
    daemon: DaemonFactory, receiver: ReceiverFactory, broker: BrokerFactory
) -> None:
    b = await broker()
    r = await receiver()
    d = await daemon([endpoint("sink", r)], mqtt=mqtt_cfg(b, {"preset": "esphome"}, keepalive="2s"))
    await connected(d)
    async with Watcher(b, ["webhookd/status"]) as w:
        await w.wait_for(lambda m: m.retain and m.text == "online", 5)
        assert await d.stop() == 0
        await w.wait_for(lambda m: m.text == "offline", 5)  # published by us before the clean disconnect
        await d.start()
        await w.wait_for(lambda m: m.text == "online" and not m.retain, 10)
        before = len(w.messages)
        await d.kill()  # no goodbye: the broker publishes our will
        await w.wait_for(lambda m: m.text == "offline" and w.messages.index(m) >= before, 15)
    async with Watcher(b, ["webhookd/status"]) as w2:  # and it stays retained
        assert (await w2.wait_for(lambda m: m.retain, 5)).text == "offline"
    assert r.got == []
