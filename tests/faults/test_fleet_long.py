"""The long fleet run (CONTRACT §14, issue 13 item 5; `make test-long`): 2 gateway processes with 5,000 devices
each (~10,000, heartbeating in batches of 1000, silence waves and state changes) relay to 3 hub processes on one
PostgreSQL, and every fault of the issue happens to the same fleet in turn, under load:

  a. the hub unreachable from gw-a for a minute (its balancer cut): it buffers, then delivers in order;
  b. PostgreSQL restarted (pg_ctl stop -m fast, start): 503s meanwhile, then recovery by itself;
  c. one receiver failing until its endpoint is disabled (exactly one endpoint_disabled for the hub), then
     `webhookd endpoints enable` through another process: the held rows go out in order;
  d. SIGKILL of one hub process: its partitions taken over within 10 s;
  e. SIGSTOP of another for 5 s, past its leases: after SIGCONT no attempt on what it lost;
  f. gw-b SIGKILLed: exactly one gateway.offline for the whole hub, no per-device offline, then it comes back.

Then `Fleet.check()` (tests/faults/fleet_rig.py) over everything: every event the hub acknowledged reached every
subscribed endpoint, per-(endpoint, device) order is the gateway's, duplicates within 5 x concurrency per fault.
The figures go to stdout (`-s`) and to fleet.log in the test's tmp dir.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.conftest import DaemonFactory, PostgresFactory, ReceiverFactory
from tests.faults.fleet_rig import (
    ENDPOINTS,
    PER_FAULT,
    Fleet,
    delivered,
    fail_on_known_bugs,
    gateway_killed,
    hub_killed,
    hub_stopped,
    hub_unreachable,
    postgres_restart,
    print_figures,
    receiver_disabled,
    waited,
)

DEVICES = 5000  # per gateway
OUTAGE = float(os.environ.get("FLEET_OUTAGE_S", "60"))  # a: how long the hub is unreachable from gw-a


@pytest.mark.long
@pytest.mark.timeout(2400)
async def test_fleet_of_10000_devices_through_every_fault(
    postgres: PostgresFactory, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    cluster = await postgres()  # a cluster of this test's own: b stops and starts it
    endpoints = {**ENDPOINTS, "ep-flaky": (["all"], ["gw-a:*"])}
    fleet = await Fleet.start(
        daemon, receiver, tmp_path, cluster.create_db(), hubs=3, devices=DEVICES, seed=int(time.time()) % 1000,
        endpoints=endpoints, hub_delivery={"disable_after": 20},
        # > the upstream timeout (10 s): a heartbeat that hung on a frozen hub process is not a silent gateway
        gateway_silence="20s", device_silence="4s", tick=1.0, change=0.0002, wave_share=0.05, wave_s=5.0,
        hub_allow_errors=True,
    )  # fmt: skip
    figures: dict[str, object] = {"devices": 2 * DEVICES}
    try:
        fleet.start_load()
        first = await waited(fleet, "the first online events delivered", lambda: delivered(fleet) >= 2000, 600)
        figures["first_2000_s"] = round(first, 2)
        figures.update(await hub_unreachable(fleet, "gw-a", seconds=OUTAGE, backlog_at_least=200))
        figures.update(await postgres_restart(fleet, cluster, seconds=5.0))
        c, c_post = await receiver_disabled(fleet, "ep-flaky", cli_from=fleet.hubs[2])
        d, d_post = await hub_killed(fleet, 1)
        e, e_post = await hub_stopped(fleet, 2, seconds=5.0)
        f, f_post = await gateway_killed(fleet, "gw-b", hold=5.0)
        figures.update(c | d | e | f)
        await fleet.end_load()
        figures["drain_s"] = round(await fleet.wait_quiet(timeout=900, stall=120), 2)
        # b: receipts not committed when PostgreSQL went (each process); d: the killed one; e: the stopped one.
        figures.update(await fleet.check(duplicates_allowed=PER_FAULT * (3 + 1 + 1)))
        for post in (c_post, d_post, e_post, f_post):
            await post()
    finally:
        await fleet.close()
    print_figures("long", figures, fleet)
    fail_on_known_bugs(fleet)
