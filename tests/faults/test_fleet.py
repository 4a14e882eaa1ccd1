"""Fault tests of a fleet (CONTRACT §14, issue 13 item 5), small scale: 2 gateway processes with 60 devices each
relay to 3 hub processes sharing one PostgreSQL; the faults are real (a cut load balancer, pg_ctl stop, a failing
receiver, SIGKILL, SIGSTOP/SIGCONT of processes). The scenarios (tests/faults/fleet_rig.py) are chained on four
fleets; after the last one, `Fleet.check()`: every event the hub acknowledged reached
every subscribed endpoint, per-(endpoint, device) order is the gateway's, duplicates only within the faults'
bound. A run that meets a known product bug (named in fleet_rig.py) fails naming it. The long run
(~10,000 devices, every fault on one fleet) is test_fleet_long.py.

The four scenario tests (20-40 s each, five daemons and a load each) are marked `long`: they run in `make test-long`.
`make test` keeps test_quick_fleet_hub_unreachable_nothing_lost_in_order (the rig end to end: two hubs, a cut
balancer, Fleet.check) and each fault's small-scale test: a tests/test_upstream.py (hub down/503, then in order),
b tests/test_store_postgres.py (503 while PostgreSQL is down, recovery by itself), c, d, e tests/test_hub_partitions.py
(one endpoint_disabled then enable in order; takeover within 10 s of a SIGKILL; a SIGSTOPped process fenced off),
f tests/test_hub_gateways.py (two hub processes make one gateway.offline, no device offline).
"""

from __future__ import annotations

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
    until,
)

HUBS = 3  # hub processes
DEVICES = 60  # per gateway (a third of them timed): the hub takes some 30-80 relays a second on this box


@pytest.mark.timeout(120)
async def test_quick_fleet_hub_unreachable_nothing_lost_in_order(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    """The quick fleet run of `make test`: a (the hub unreachable from gw-a: buffered, then delivered in order) on a
    fleet of 2 hub processes and 2 gateways of 20 devices; then Fleet.check() with no duplicate allowed."""
    fleet = await Fleet.start(
        daemon, receiver, tmp_path, pg_url, hubs=2, devices=20, seed=17, change=0.06, wave_share=0.5
    )
    figures = {}
    try:
        fleet.start_load()
        await until("webhooks flow", lambda: delivered(fleet) >= 20, 60)
        figures.update(await hub_unreachable(fleet, "gw-a", seconds=1.0, backlog_at_least=5))
        await fleet.end_load()
        figures["drain_s"] = round(await fleet.wait_quiet(timeout=60), 2)
        figures.update(await fleet.check(duplicates_allowed=0))
    finally:
        await fleet.close()
    print_figures("quick a", figures, fleet)
    fail_on_known_bugs(fleet)


@pytest.mark.long
@pytest.mark.timeout(400)  # a loaded box (the whole suite on 2 cores) slows the hub down a lot
async def test_a_hub_unreachable_then_b_postgresql_restarted_nothing_lost_in_order(
    postgres: PostgresFactory, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    """a: the hub unreachable from gw-a (buffered, then delivered in order); b: PostgreSQL restarted under load
    (503s, then the hub recovers by itself)."""
    cluster = await postgres()  # a cluster of this test's own: it is stopped and started
    hubs = HUBS
    fleet = await Fleet.start(
        daemon, receiver, tmp_path, cluster.create_db(), hubs=hubs, devices=DEVICES, seed=11, hub_allow_errors=True
    )
    figures = {}
    try:
        fleet.start_load()
        await until("webhooks flow", lambda: delivered(fleet) >= 30, 120)
        figures.update(await hub_unreachable(fleet, "gw-a", seconds=1.5, backlog_at_least=15))
        figures.update(await postgres_restart(fleet, cluster, seconds=1.0))
        await fleet.end_load()
        figures["drain_s"] = round(await fleet.wait_quiet(), 2)
        # Deliveries whose receipt was not yet committed when PostgreSQL went away may go again.
        figures.update(await fleet.check(duplicates_allowed=PER_FAULT * hubs))
    finally:
        await fleet.close()
    print_figures("a+b", figures, fleet)
    fail_on_known_bugs(fleet)


@pytest.mark.long
@pytest.mark.timeout(400)  # a loaded box (the whole suite on 2 cores) slows the hub down a lot
async def test_c_receiver_disabled_once_then_enabled_d_sigkill_of_a_hub_process(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    """c: one receiver failing until its endpoint is disabled (exactly one endpoint_disabled for the hub), then
    enabled through another process (held rows in order); d: SIGKILL of hub-1 under load (taken over within
    10 s, nothing lost)."""
    endpoints = {**ENDPOINTS, "ep-flaky": (["all"], ["gw-a:*"])}
    fleet = await Fleet.start(
        daemon, receiver, tmp_path, pg_url, devices=DEVICES, seed=13, endpoints=endpoints,
        hub_delivery={"disable_after": 8},
    )  # fmt: skip
    figures = {}
    try:
        fleet.start_load()
        await until("webhooks flow", lambda: delivered(fleet) >= 30, 120)
        c, c_post = await receiver_disabled(fleet, "ep-flaky", cli_from=fleet.hubs[2])
        d, d_post = await hub_killed(fleet, 1)
        figures.update(c | d)
        await fleet.end_load()
        figures["drain_s"] = round(await fleet.wait_quiet(), 2)
        figures.update(await fleet.check(duplicates_allowed=PER_FAULT))
        for post in (c_post, d_post):
            await post()
    finally:
        await fleet.close()
    print_figures("c+d", figures, fleet)
    fail_on_known_bugs(fleet)


@pytest.mark.long
@pytest.mark.timeout(400)  # a loaded box (the whole suite on 2 cores) slows the hub down a lot
async def test_e_sigstop_of_a_hub_process_past_its_leases_then_sigcont(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    """e: SIGSTOP of hub-2 under load for 5 s and until the others hold its partitions (within 10 s); after
    SIGCONT it makes no attempt on what it lost; nothing lost, duplicates within the bound."""
    # The stopped process's database connection may be closed under it (its transaction held locks the others
    # wait for): after SIGCONT it logs store_unavailable (an error line) and then store_recovered.
    fleet = await Fleet.start(daemon, receiver, tmp_path, pg_url, devices=DEVICES, seed=15, hub_allow_errors=True)
    figures = {}
    try:
        fleet.start_load()
        await until("webhooks flow", lambda: delivered(fleet) >= 30, 120)
        e, e_post = await hub_stopped(fleet, 2, seconds=5.0)
        figures.update(e)
        await fleet.end_load()
        figures["drain_s"] = round(await fleet.wait_quiet(), 2)
        figures.update(await fleet.check(duplicates_allowed=PER_FAULT))
        await e_post()
    finally:
        await fleet.close()
    print_figures("e", figures, fleet)
    fail_on_known_bugs(fleet)


@pytest.mark.long
@pytest.mark.timeout(400)  # a loaded box (the whole suite on 2 cores) slows the hub down a lot
async def test_f_a_gateway_sigkilled_one_gateway_offline_for_the_hub_no_device_offline(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    fleet = await Fleet.start(daemon, receiver, tmp_path, pg_url, devices=DEVICES, seed=16, gateway_silence="3s")
    figures = {}
    try:
        fleet.start_load()
        await until("webhooks flow", lambda: delivered(fleet) >= 30, 120)
        f, f_post = await gateway_killed(fleet, "gw-a")
        figures.update(f)
        await fleet.end_load()
        figures["drain_s"] = round(await fleet.wait_quiet(), 2)
        figures.update(await fleet.check(duplicates_allowed=0))
        await f_post()
    finally:
        await fleet.close()
    print_figures("f", figures, fleet)
    fail_on_known_bugs(fleet)
