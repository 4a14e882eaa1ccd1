"""Debounce and reminders end to end (issue 12, items 2 and 3): the real daemon, a real receiver, short timers."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

from tests.conftest import BrokerFactory, DaemonFactory, ReceiverFactory
from tests.harness import SECRET, Receiver, endpoint

PEOPLE = ("slack", "ntfy")


def seen(r: Receiver) -> list[tuple[str, str, str]]:
    return [(e["type"], e["device"]["id"], e["reason"]) for e in r.events()]


def when(e: dict[str, object]) -> float:
    return datetime.fromisoformat(str(e["time"]).replace("Z", "+00:00")).timestamp()


async def test_a_reboot_back_within_the_debounce_makes_no_event(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    r = await receiver()
    d = await daemon([endpoint("sink", r)], presence={"debounce": "2s"})
    await d.heartbeat("ap-1")
    await r.wait_for(1)
    answer = await d.heartbeat("ap-1", "reboot")
    assert answer["state"] == "offline"
    await asyncio.sleep(0.5)
    await d.heartbeat("ap-1")
    await asyncio.sleep(2.5)  # past the debounce
    assert seen(r) == [("device.online", "ap-1", "heartbeat")]
    _, dev = await d.admin("GET", "/v1/devices/ap-1")
    assert dev["state"] == "online"


async def test_an_offline_past_the_debounce_is_sent_once_with_the_time_it_went_offline(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    r = await receiver()
    d = await daemon(
        [endpoint("sink", r)], presence={"debounce": "1s"}, devices=[{"match": "slow-*", "debounce": "3s"}]
    )
    await d.heartbeat("ap-1")
    await d.heartbeat("slow-1")
    await r.wait_for(2)
    t0 = time.time()
    await d.heartbeat("ap-1", "shutdown")
    await d.heartbeat("slow-1", "shutdown")
    [off] = [r.got[i] for i in range(len(await r.wait_for(3, timeout=5))) if i >= 2]
    assert off.json["type"] == "device.offline" and off.json["device"]["id"] == "ap-1"
    assert off.json["reason"] == "shutdown" and abs(when(off.json) - t0) < 0.5  # the offline's own time
    await r.wait_for(4, timeout=5)  # the per-device rule: 3 s
    assert seen(r)[3] == ("device.offline", "slow-1", "shutdown")
    await asyncio.sleep(1.0)
    assert len(r.got) == 4


async def test_a_restart_during_the_debounce_neither_loses_nor_duplicates_the_offline(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    r = await receiver()
    d = await daemon([endpoint("sink", r)], presence={"debounce": "2s"})
    await d.heartbeat("ap-1")
    await r.wait_for(1)
    t0 = time.time()
    await d.heartbeat("ap-1", "shutdown")
    assert await d.stop() == 0
    await d.start()
    await r.wait_for(2, timeout=6)
    assert seen(r)[1] == ("device.offline", "ap-1", "shutdown") and abs(when(r.events()[1]) - t0) < 0.5
    await asyncio.sleep(2.5)
    assert len(r.got) == 2


async def test_reminders_while_offline_subscribable_and_no_burst_after_a_restart(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    everything, reminders = await receiver(), await receiver()
    d = await daemon(
        [endpoint("all", everything), endpoint("nag", reminders, events=["still_offline"])],
        presence={"silence_timeout": "1s", "remind_every": "1s"},
    )
    await d.heartbeat("pump")
    await reminders.wait_for(2, timeout=8)  # offline after 1 s, then reminders 1 and 2
    got = reminders.events()[:2]
    assert [(e["type"], e["reminder"], e["reason"]) for e in got] == [
        ("device.still_offline", 1, "timeout"),
        ("device.still_offline", 2, "timeout"),
    ]
    assert 0.9 <= got[0]["offline_for"] <= 1.6 and 1.9 <= got[1]["offline_for"] <= 2.6
    assert [e["type"] for e in everything.events()[:2]] == ["device.online", "device.offline"]
    assert await d.stop() == 0
    n = len(reminders.got)
    last = reminders.events()[-1]["reminder"]
    await asyncio.sleep(2.2)  # down for two intervals
    await d.start()
    await reminders.wait_for(n + 1, timeout=5)
    await asyncio.sleep(0.3)
    after = [e["reminder"] for e in reminders.events()[n:]]
    assert after[0] >= last + 2 and len(after) <= 2, after  # one, numbered for the time: no burst
    await d.heartbeat("pump")  # back: reminders stop
    await asyncio.sleep(0.3)
    k = len(reminders.got)
    await asyncio.sleep(1.5)
    assert len(reminders.got) == k


async def test_an_mqtt_device_back_within_the_debounce_makes_no_event(
    daemon: DaemonFactory, receiver: ReceiverFactory, broker: BrokerFactory
) -> None:
    b = await broker()
    r = await receiver()
    d = await daemon(
        [endpoint("sink", r)],
        presence={"debounce": "2s"},
        mqtt={"url": b.url, "settle": "200ms", "sources": [{"preset": "tasmota"}]},
    )
    await b.pub("tele/plug/LWT", "Online", retain=True)
    await r.wait_for(1, timeout=10)
    await b.pub("tele/plug/LWT", "Offline", retain=True)  # a Wi-Fi blip: its will
    await asyncio.sleep(0.5)
    await b.pub("tele/plug/LWT", "Online", retain=True)
    await asyncio.sleep(2.5)
    assert seen(r) == [("device.online", "plug", "connected")]
    await b.pub("tele/plug/LWT", "Offline", retain=True)  # gone for good: one offline, after the debounce
    await r.wait_for(2, timeout=6)
    assert seen(r)[1] == ("device.offline", "plug", "disconnected")
    _, dev = await d.admin("GET", "/v1/devices/plug")
    assert dev["source"] == "mqtt"


async def test_a_kill_during_the_debounce_loses_nothing_and_invents_nothing(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    r = await receiver()
    d = await daemon([endpoint("sink", r)], presence={"debounce": "4s"})
    await d.heartbeat("back-1")
    await d.heartbeat("gone-1")
    await r.wait_for(2)
    t0 = time.time()
    assert (await d.heartbeat("back-1", "reboot"))["changed"] is False  # held: no event yet
    assert (await d.heartbeat("gone-1", "shutdown"))["changed"] is False
    await d.kill()  # no goodbye: what is held must already be durable
    await d.start()
    assert time.time() - t0 < 3.5, "the restart took longer than the debounce: the test proves nothing"
    assert (await d.heartbeat("back-1"))["changed"] is False  # back within the debounce: no event at all
    await r.wait_for(3, timeout=8)
    await asyncio.sleep(1.5)
    assert seen(r) == [
        ("device.online", "back-1", "heartbeat"),
        ("device.online", "gone-1", "heartbeat"),
        ("device.offline", "gone-1", "shutdown"),
    ]
    off = r.events()[2]
    assert abs(when(off) - t0) < 0.5 and off["device"]["previous_state"] == "online"
    _, dev = await d.admin("GET", "/v1/devices/back-1")
    assert dev["state"] == "online"


async def test_reminders_reach_people_and_remoteit_kobiton_receivers_as_offline(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    rs = {name: await receiver() for name in ("remoteit", "kobiton", "slack", "ntfy")}
    d = await daemon(
        [
            endpoint(name, r, format=name, events=["still_offline"], secret=None if name in PEOPLE else SECRET)
            for name, r in rs.items()
        ],
        presence={"silence_timeout": "1s", "remind_every": "1s"},
    )
    await d.heartbeat("pump", name="Pumpe")
    got = {name: (await r.wait_for(1, timeout=8))[0] for name, r in rs.items()}
    assert {k: got["remoteit"].json[k] for k in ("Device", "Name", "State", "Type")} == {
        "Device": "pump",
        "Name": "Pumpe",
        "State": "offline",
        "Type": "device_state",
    }
    kob = got["kobiton"].json
    assert (kob["eventActivity"], kob["eventDescription"], kob["deviceUdid"]) == (
        "device.status.offline",
        "Offline",
        "pump",
    )
    assert got["slack"].json["text"].startswith("pump (Pumpe) is still offline after 1s (reminder 1); no heartbeat")
    n = got["ntfy"]
    assert n.body.decode() == got["slack"].json["text"]
    assert (n.headers["Title"], n.headers["Priority"], n.headers["Tags"]) == (
        "pump (Pumpe) is still offline",
        "high",
        "hourglass,still_offline",
    )
    # Only reminders are subscribed: the first webhook of each is the same event (the offline went to none).
    assert len({x.headers["Webhook-Id"] for x in got.values()}) == 1
    assert all("still offline" in x.json["text"] for x in rs["slack"].got)


async def test_back_within_the_debounce_at_a_new_address_is_an_address_change(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    r = await receiver()
    d = await daemon([endpoint("sink", r)], presence={"debounce": "2s"})
    await d.heartbeat("ap-1", address="10.0.0.1")
    await r.wait_for(1)
    await d.heartbeat("ap-1", "reboot")
    answer = await d.heartbeat("ap-1", address="10.0.0.2")  # DHCP gave it another lease while it rebooted
    assert answer == {"device": "ap-1", "state": "online", "changed": True}
    await r.wait_for(2)
    await asyncio.sleep(2.5)
    assert seen(r) == [("device.online", "ap-1", "heartbeat"), ("device.address_changed", "ap-1", "heartbeat")]
    moved = r.events()[1]["device"]
    assert (moved["address"], moved["state"], moved["previous_state"]) == ("10.0.0.2", "online", "online")
