"""Long MQTT fault run (make test-long): many broker restarts with 200 devices, a random few staying down each
time. Every cycle must make exactly one offline event per device that stayed down, none for the rest. Figures go
to stdout (-s)."""

from __future__ import annotations

import random
import time

import pytest

from tests.conftest import BrokerFactory, DaemonFactory, DevicesFactory, ReceiverFactory
from tests.faults.test_mqtt import settled
from tests.harness import endpoint, eventually
from tests.test_mqtt_daemon import mqtt_cfg

CYCLES = 10
DEVICES = 200


@pytest.mark.long
async def test_many_broker_restarts_make_exactly_the_real_offline_events(
    daemon: DaemonFactory, receiver: ReceiverFactory, broker: BrokerFactory, devices: DevicesFactory
) -> None:
    rng = random.Random(11)
    b = await broker(persistence=True)
    r = await receiver()
    fleet = await devices(b, DEVICES, preset="tasmota", keepalive=10, retry=0.5)
    d = await daemon([endpoint("sink", r)], mqtt=mqtt_cfg(b, {"preset": "tasmota"}, settle="4s"))
    await r.wait_for(DEVICES, timeout=30)
    await settled(d)
    expected = DEVICES
    for cycle in range(1, CYCLES + 1):
        # a few devices of this cycle that will not come back after the restart
        down = sorted(f"c{cycle}-{j}" for j in range(rng.randint(1, 8)))
        await devices(b, down, preset="tasmota", keepalive=10, no_reconnect=down)
        expected += len(down)
        await r.wait_for(expected, timeout=15)
        t = time.monotonic()
        await b.restart()  # SIGTERM: every client's will, retained Offline, persisted; the same port
        await fleet.wait_connected(fleet.ids, 30, since=t)
        await settled(d, cycle + 1, timeout=30)
        expected += len(down)
        await r.wait_for(expected, timeout=10)
        gone = r.events()[expected - len(down) : expected]
        assert sorted(e["device"]["id"] for e in gone) == down, f"cycle {cycle}"
        assert all(e["type"] == "device.offline" and e["reason"] == "disconnected" for e in gone)
        print(
            f"cycle {cycle}: {DEVICES} back, {len(down)} stayed down -> {len(down)} offline events; "
            f"restart to settled {time.monotonic() - t:.1f} s"
        )
    await eventually(lambda: len(r.got) == expected, 5)
    assert len(r.got) == expected
