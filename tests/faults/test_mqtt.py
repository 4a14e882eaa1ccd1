"""MQTT faults against a real Mosquitto (issue 11, item 5): broker restarts, a broker down for long, our own
SIGKILL with retained availabilities, refused logins and ACLs, TLS. No storms, no false offline, no missed one."""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.conftest import BrokerFactory, DaemonFactory, DevicesFactory, ReceiverFactory
from tests.faults.test_storage import StateDir, _fill, _injecting, state_dir  # noqa: F401 (a fixture)
from tests.harness import Daemon, Receiver, endpoint, eventually
from tests.mqtt_broker import Broker
from tests.test_metrics import Samples, scrape_until
from tests.test_mqtt_daemon import connected, kinds, mqtt_cfg


def events_of(r: Receiver, kind: str) -> list[str]:
    return sorted(e["device"]["id"] for e in r.events() if e["type"] == f"device.{kind}")


async def settled(d: Daemon, n: int = 1, timeout: float = 30.0) -> None:
    """Until the daemon logged its n-th `mqtt_settled`."""
    await eventually(lambda: sum(1 for x in d.logs() if x.get("event") == "mqtt_settled") >= n, timeout)


async def test_a_broker_restart_makes_offline_events_only_for_devices_still_down(
    daemon: DaemonFactory, receiver: ReceiverFactory, broker: BrokerFactory, devices: DevicesFactory
) -> None:
    b = await broker(persistence=True)
    r = await receiver()
    fleet = await devices(b, 50, preset="tasmota", keepalive=5, stay_down=3, retry=0.5)
    d = await daemon([endpoint("sink", r)], mqtt=mqtt_cfg(b, {"preset": "tasmota"}, settle="3s"))
    await r.wait_for(50, timeout=20)
    assert len(events_of(r, "online")) == 50
    await settled(d)
    t = time.monotonic()
    await b.restart()  # SIGTERM (every client's will), the same port and persistence directory
    await fleet.wait_connected([f"dev-{i}" for i in range(1, 48)], 15, since=t)
    await settled(d, 2)
    await asyncio.sleep(0.5)  # deliveries of the settle's end
    assert events_of(r, "offline") == ["dev-48", "dev-49", "dev-50"]
    assert len(r.got) == 53, kinds(r)[50:]
    warnings = [x for x in d.logs() if x.get("event") == "mqtt_disconnected"]
    assert len(warnings) == 1


async def test_a_broker_down_longer_than_the_silence_timeout_makes_no_event(
    daemon: DaemonFactory, receiver: ReceiverFactory, broker: BrokerFactory, devices: DevicesFactory
) -> None:
    b = await broker(persistence=True)
    r = await receiver()
    # generic source with heartbeat: true keeps the silence timer; the broker's absence must not fire it
    fleet = await devices(b, 3, preset="tasmota", keepalive=5, retry=0.5)
    source = {"topic": "tele/+/LWT", "device": 1, "online": ["Online"], "offline": ["Offline"], "heartbeat": True}
    d = await daemon(
        [endpoint("sink", r)], presence={"silence_timeout": "1500ms"}, mqtt=mqtt_cfg(b, source, settle="1500ms")
    )
    await r.wait_for(3, timeout=15)
    await settled(d)
    await b.pub("tele/dev-1/LWT", "ping")  # a heartbeat: dev-1 now has a silence timer too
    await asyncio.sleep(0.3)
    await b.stop()
    await asyncio.sleep(3.2)  # twice the silence timeout with the broker away
    t = time.monotonic()
    await b.start()
    await fleet.wait_connected(["dev-1", "dev-2", "dev-3"], 15, since=t)
    await settled(d, 2)
    await asyncio.sleep(0.5)
    assert len(r.got) == 3, kinds(r)
    _, body = await d.admin("GET", "/v1/status")
    assert body["mqtt"]["connected"] is True


async def test_webhookd_sigkilled_and_restarted_over_1000_retained_availabilities_makes_no_event(
    daemon: DaemonFactory, receiver: ReceiverFactory, broker: BrokerFactory, devices: DevicesFactory
) -> None:
    b = await broker()
    r = await receiver()
    await devices(b, 1000, preset="esphome", keepalive=30)
    d = await daemon([endpoint("sink", r)], mqtt=mqtt_cfg(b, {"preset": "esphome"}, settle="1s"))
    await r.wait_for(1000, timeout=30)
    await settled(d)
    await d.kill()
    await d.start()
    await settled(d, 2)
    await asyncio.sleep(0.5)
    assert len(r.got) == 1000
    status = await connected(d)
    assert status["sources"] == {"esphome": 1000}
    [line] = [x for x in d.logs() if x.get("event") == "mqtt_settled"][-1:]
    assert line["devices"] == 1000 and line["events"] == 0


async def test_a_refused_login_is_logged_and_the_http_side_goes_on(
    daemon: DaemonFactory, receiver: ReceiverFactory, broker: BrokerFactory
) -> None:
    b = await broker(passwords={"webhookd": "right"})
    r = await receiver()
    cfg = mqtt_cfg(b, {"preset": "tasmota"}, username="webhookd", password="wrong")
    d = await daemon([endpoint("sink", r)], mqtt=cfg, allow_errors=True)
    await eventually(lambda: any(x.get("event") == "mqtt_auth_failed" for x in d.logs()), 10)
    assert "wrong" not in d.logs_text()
    await d.heartbeat("http-1")
    await r.wait_for(1)
    _, body = await d.admin("GET", "/v1/status")
    assert body["mqtt"]["connected"] is False
    # the right password by SIGHUP: it reconnects at once, no restart
    d.cfg["mqtt"]["password"] = "right"
    d.write_config()
    d.signal(signal.SIGHUP)
    await connected(d)


def _at(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()


async def test_an_unreachable_broker_is_retried_with_a_growing_backoff_and_the_http_side_goes_on(
    daemon: DaemonFactory, receiver: ReceiverFactory, broker: BrokerFactory, devices: DevicesFactory
) -> None:
    b = await broker(start=False)  # its port is reserved, nothing listens on it yet
    r = await receiver()
    d = await daemon([endpoint("sink", r)], mqtt=mqtt_cfg(b, {"preset": "tasmota"}))

    def unreachable() -> list[dict[str, Any]]:
        return [x for x in d.logs() if x.get("event") == "mqtt_unreachable"]

    await eventually(lambda: len(unreachable()) >= 4, 20)
    lines = unreachable()
    assert all(x["level"] == "warning" and x["broker"] == b.url and x["error"] for x in lines)
    # 1 s doubling, each wait jittered to 0.5-1.0 of it: gaps of 0.5-1, 1-2, 2-4 s (+ slack for a busy box)
    gaps = [_at(y) - _at(x) for x, y in itertools.pairwise(lines[:4])]
    for k, gap in enumerate(gaps):
        assert 0.5 * 2**k - 0.05 <= gap <= 2**k + 1.0, gaps
    # the daemon and its HTTP side are unaffected meanwhile
    assert not [x for x in d.logs() if x.get("event") == "daemon_crashed"]
    await d.heartbeat("http-1")
    await r.wait_for(1)
    _, body = await d.admin("GET", "/v1/status")
    assert body["mqtt"]["connected"] is False and body["mqtt"]["broker"] == b.url
    # the broker comes up: the next attempt (at most 30 s of backoff away, 8 s here) connects by itself
    await devices_online(b, devices)
    await connected(d)
    await r.wait_for(2, timeout=15)
    assert kinds(r)[1] == ("device.online", "dev-1", "connected")


async def devices_online(b: Broker, devices: DevicesFactory) -> None:
    await b.start()
    await devices(b, 1, preset="tasmota", keepalive=5)


async def test_a_password_broker_with_an_acl(
    daemon: DaemonFactory, receiver: ReceiverFactory, broker: BrokerFactory
) -> None:
    acl = "user webhookd\ntopic read tele/#\ntopic readwrite webhookd/#\n"
    b = await broker(passwords={"webhookd": "pw", "dev": "pw"}, acl=acl + "user dev\ntopic readwrite #\n")
    r = await receiver()
    cfg = mqtt_cfg(b, {"preset": "tasmota"}, {"preset": "esphome"}, username="webhookd", password="pw")
    await b.pub("tele/plug/LWT", "Online", retain=True, username="dev", password="pw")
    await b.pub("cam/status", "online", retain=True, username="dev", password="pw")  # denied to webhookd
    d = await daemon([endpoint("sink", r)], mqtt=cfg)
    await connected(d)
    await r.wait_for(1, timeout=10)
    await settled(d)
    await asyncio.sleep(0.5)
    assert kinds(r) == [("device.online", "plug", "connected")]
    # the ACL's silent drop of esphome's subscription is named once the first window is over
    [silent] = [x for x in d.logs() if x.get("event") == "mqtt_sources_silent"]
    assert silent["sources"] == ["esphome"] and "ACL" in silent["detail"]


async def test_tls_with_a_throwaway_ca(
    daemon: DaemonFactory, receiver: ReceiverFactory, broker: BrokerFactory, devices: DevicesFactory
) -> None:
    b = await broker(tls=True)
    assert b.url.startswith("mqtts://") and b.ca_file is not None
    r = await receiver()
    await devices(b, 2, preset="shelly", keepalive=5)
    d = await daemon([endpoint("sink", r)], mqtt=mqtt_cfg(b, {"preset": "shelly"}, ca_file=str(b.ca_file)))
    await r.wait_for(2, timeout=15)
    assert {e["device"]["id"] for e in r.events()} == {"dev-1", "dev-2"}
    assert (await connected(d))["broker"] == b.url


async def test_a_broker_restarted_without_persistence_still_reports_the_device_that_stayed_down(
    daemon: DaemonFactory, receiver: ReceiverFactory, broker: BrokerFactory, devices: DevicesFactory
) -> None:
    """Without persistence the restart forgets every retained message and the wills we may have missed while it
    stopped: the broker says so (CONNACK without a session), and a device silent for the whole window is offline."""
    b = await broker()  # persistence false
    r = await receiver()
    fleet = await devices(b, 4, preset="esphome", keepalive=5, retry=0.5, stay_down=1)
    d = await daemon([endpoint("sink", r)], mqtt=mqtt_cfg(b, {"preset": "esphome"}, settle="3s"))
    await r.wait_for(4, timeout=15)
    await settled(d)
    t = time.monotonic()
    await b.restart()
    await fleet.wait_connected(["dev-1", "dev-2", "dev-3"], 15, since=t)
    await settled(d, 2)
    await asyncio.sleep(0.5)
    assert events_of(r, "offline") == ["dev-4"] and len(r.got) == 5, kinds(r)


async def test_a_full_disk_holds_mqtt_readings_until_the_store_is_back_and_loses_none(
    tmp_path: Path,
    state_dir: StateDir,  # noqa: F811 (the fixture imported above)
    daemon: DaemonFactory,
    receiver: ReceiverFactory,
    broker: BrokerFactory,
    devices: DevicesFactory,
) -> None:
    b = await broker()
    r = await receiver()
    await devices(b, 3, preset="esphome", keepalive=5)
    # a real full tmpfs when it can be mounted (root), else the injected "disk is full" of test_storage.py
    flag, env = (None, {}) if state_dir.mounted else _injecting(tmp_path)
    d = await daemon([endpoint("sink", r)], mqtt=mqtt_cfg(b, {"preset": "esphome"}), env=env, allow_errors=True)
    await r.wait_for(3, timeout=15)
    await settled(d)
    ballast = await asyncio.to_thread(_fill, state_dir.path) if flag is None else None
    if flag is not None:
        flag.write_text("database or disk is full")
    await b.pub("dev-1/status", "offline", retain=True)  # each device says so itself: no grace to wait out
    await b.pub("dev-2/status", "offline", retain=True)
    await eventually(lambda: [x for x in d.logs() if x.get("event") == "mqtt_not_recorded"], 10)
    await asyncio.sleep(1.0)
    assert len(r.got) == 3  # nothing delivered for what is not durable
    _, body = await d.admin("GET", "/v1/status")
    assert body["mqtt"]["connected"] is True  # the connection is not what failed
    if ballast is not None:
        ballast.unlink()
    if flag is not None:
        flag.unlink()
    await r.wait_for(5, timeout=10)  # the held batch applied again once the store is back: nothing lost
    assert sorted(kinds(r)[3:]) == [
        ("device.offline", "dev-1", "disconnected"),
        ("device.offline", "dev-2", "disconnected"),
    ]
    await asyncio.sleep(0.5)
    assert len(r.got) == 5


async def test_the_incoming_queue_is_bounded_while_the_store_holds_a_batch(
    tmp_path: Path,
    state_dir: StateDir,  # noqa: F811 (the fixture imported above)
    daemon: DaemonFactory,
    receiver: ReceiverFactory,
    broker: BrokerFactory,
) -> None:
    """A stuck store stops the routing, not the reading: past INBOX_MAX (100,000) messages are counted as
    dropped and warned about (the first, then every 10,000th), the daemon stays connected, and what the queue
    held is routed once the store is back."""
    from webhookd.mqtt.client import INBOX_MAX

    b = await broker(extra="max_queued_messages 0")  # the broker itself queues all of them for us, drops none
    r = await receiver()
    flag, env = (None, {}) if state_dir.mounted else _injecting(tmp_path)
    d = await daemon([endpoint("sink", r)], mqtt=mqtt_cfg(b, {"preset": "esphome"}), env=env, allow_errors=True)
    await connected(d)
    await settled(d)
    ballast = await asyncio.to_thread(_fill, state_dir.path) if flag is None else None
    if flag is not None:
        flag.write_text("database or disk is full")
    await b.pub("dev-0/status", "online")  # a new device: its event cannot be recorded, the routing waits
    await eventually(lambda: [x for x in d.logs() if x.get("event") == "mqtt_not_recorded"], 10)
    n = INBOX_MAX + 20_000
    pub = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.mqtt", "pub", "--port", str(b.port), "--template", "{id}/status",
        "--devices", "1000", "--n", str(n), "--online-only", stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(pub.communicate(), 120)
    assert pub.returncode == 0 and b'"acked": %d' % n in out, out[-500:]
    m = await scrape_until(d, lambda m: m.get(("webhookd_mqtt_dropped_total", ()), 0) > 0, 60)
    full = [x for x in d.logs() if x.get("event") == "mqtt_queue_full"]
    assert full[0]["dropped"] == 1 and all(x["level"] == "warning" and x["limit"] == INBOX_MAX for x in full)
    assert [x["dropped"] for x in full[1:]] == [10_000 * k for k in range(1, len(full))]  # not one line each
    assert (await connected(d))["broker"] == b.url
    if ballast is not None:
        ballast.unlink()
    if flag is not None:
        flag.unlink()
    # everything that was queued is routed once the batch is recorded; the dropped ones are the rest
    routed = ("webhookd_mqtt_messages_total", (("source", "esphome"),))

    def all_accounted(m: Samples) -> bool:
        return m.get(routed, 0) + m.get(("webhookd_mqtt_dropped_total", ()), 0) >= n + 1

    m = await scrape_until(d, all_accounted, 60)
    assert INBOX_MAX <= m[routed] < n + 1
    await r.wait_for(1000, timeout=30)  # dev-0 .. dev-999, each online once: none lost that was queued
    assert {e["device"]["id"] for e in r.events()} == {f"dev-{i}" for i in range(1000)}


async def test_tls_without_our_ca_is_refused_clearly_and_tls_verify_false_connects(
    daemon: DaemonFactory, receiver: ReceiverFactory, broker: BrokerFactory
) -> None:
    b = await broker(tls=True)
    r = await receiver()
    d = await daemon([endpoint("sink", r)], mqtt=mqtt_cfg(b, {"preset": "shelly"}))  # the system's CAs only
    await eventually(lambda: [x for x in d.logs() if x.get("event") == "mqtt_unreachable"], 15)
    line = next(x for x in d.logs() if x.get("event") == "mqtt_unreachable")
    assert "CERTIFICATE_VERIFY_FAILED" in line["error"] or "certificate verify failed" in line["error"], line
    _, body = await d.admin("GET", "/v1/status")
    assert body["mqtt"]["connected"] is False
    d.cfg["mqtt"]["tls_verify"] = False  # a test broker's self-made certificate, taken as it is
    d.write_config()
    d.signal(signal.SIGHUP)
    assert (await connected(d))["broker"] == b.url
