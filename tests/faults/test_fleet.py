"""Fault tests of a fleet (CONTRACT §14, issue 13 item 5), small scale: 2 gateway processes with a few hundred
devices each relay to hub processes sharing one PostgreSQL; faults are real (a cut load balancer, pg_ctl stop,
a failing receiver, SIGKILL, SIGSTOP/SIGCONT). After each, `Fleet.check()` (tests/faults/fleet_rig.py): every
event the hub acknowledged reached every subscribed endpoint, per-(endpoint, device) order is the gateway's,
duplicates only within the bound of the fault. The long runs (~10,000 devices) are in test_fleet_long.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import DaemonFactory, PostgresFactory, ReceiverFactory
from tests.faults.fleet_rig import ENDPOINTS, PER_FAULT, Fleet, Hit, print_figures
from tests.harness import Daemon

HUBS = 1  # hub processes of scenarios a and b: 3 once deliveries are shared between processes (hub: partitions)
DEVICES = 150  # per gateway (a third of them timed)


async def healthz(d: Daemon) -> int | None:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s,
            s.get(d.base + "/healthz") as r,
        ):
            return r.status
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


async def until(what: str, check: object, timeout: float) -> float:
    """Wait for `check()` (sync or async) to be true; returns the seconds it took."""
    started = time.monotonic()
    while True:
        result = check()  # type: ignore[operator]
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


def delivered(fleet: Fleet) -> int:
    return sum(len(r.delivered()) for r in fleet.receivers.values())


def acked(fleet: Fleet, gw: str) -> int:
    sql = "SELECT count(*) FROM deliveries WHERE endpoint = 'upstream' AND status = 'delivered'"
    return int(fleet.gateway_rows(gw, sql)[0][0])


async def test_a_hub_unreachable_from_a_gateway_buffers_then_delivers_in_order(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    fleet = await Fleet.start(daemon, receiver, tmp_path, pg_url, hubs=HUBS, devices=DEVICES, seed=11)
    try:
        fleet.start_load()
        await until("webhooks flow", lambda: delivered(fleet) >= 100, 20)
        gw_a = fleet.gateways["gw-a"]
        await fleet.balancers["gw-a"].cut()
        fleet.mark("cut")
        before = acked(fleet, "gw-a")
        fleet.loads["gw-a"].wave(0.3, 1.8)  # offline events (timeouts) while the hub is unreachable
        await until("gw-a buffers", lambda: fleet.upstream_backlog("gw-a") >= 60, 15)
        await asyncio.sleep(1.0)  # the outage goes on for a while
        refused = [
            e
            for e in gw_a.logs()
            if e.get("event") == "delivery_failed" and str(e.get("error", "")).startswith("connection refused")
        ]
        assert refused, "gw-a's relays did not fail while the hub was unreachable"
        assert acked(fleet, "gw-a") - before <= 5 * 8, "gw-a's events were acknowledged with the hub unreachable"
        backlog = fleet.upstream_backlog("gw-a")
        await fleet.balancers["gw-a"].heal()
        fleet.mark("heal")
        took = await until("gw-a's backlog delivered", lambda: fleet.upstream_backlog("gw-a") < 20, 20)
        await fleet.end_load()
        drain = await fleet.wait_quiet()
        figures = await fleet.check(duplicates_allowed=0)
    finally:
        await fleet.close()
    figures.update(backlog_at_heal=backlog, backlog_delivered_s=round(took, 2), drain_s=round(drain, 2))
    print_figures("a", figures, fleet)


async def test_b_postgresql_restarted_under_load_503_then_recovers(
    postgres: PostgresFactory, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    cluster = await postgres()
    url = cluster.create_db()
    fleet = await Fleet.start(
        daemon, receiver, tmp_path, url, hubs=HUBS, devices=DEVICES, seed=12, hub_allow_errors=True
    )
    try:
        fleet.start_load()
        await until("webhooks flow", lambda: delivered(fleet) >= 100, 20)
        await asyncio.to_thread(cluster.stop)
        fleet.mark("pg_stopped")
        fleet.loads["gw-b"].wave(0.3, 1.5)

        async def all_503() -> bool:
            return all([await healthz(h) == 503 for h in fleet.hubs])

        await until("every hub's /healthz answers 503", all_503, 10)

        def relays_503() -> bool:
            return any(
                e.get("event") == "delivery_failed" and e.get("error") == "HTTP 503"
                for g in fleet.gateways.values()
                for e in g.logs()
            )

        await until("relays answered 503", relays_503, 10)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(cluster.start)
        fleet.mark("pg_started")

        async def all_200() -> bool:
            return all([await healthz(h) == 200 for h in fleet.hubs])

        recovered = await until("every hub recovers by itself", all_200, 20)
        await fleet.end_load()
        drain = await fleet.wait_quiet()
        # Deliveries whose receipt was not yet committed when PostgreSQL went away may go again.
        figures = await fleet.check(duplicates_allowed=5 * 4 * len(fleet.hubs))
    finally:
        await fleet.close()
    logs = {e.get("event") for h in fleet.hubs for e in h.logs()}
    assert "store_unavailable" in logs and "store_recovered" in logs, logs
    figures.update(recovered_s=round(recovered, 2), drain_s=round(drain, 2))
    print_figures("b", figures, fleet)


# ---------------------------------------------------------------------------------------------------------
# several hub processes: shared endpoint state, partition leases, gateway liveness
# ---------------------------------------------------------------------------------------------------------


def landed(prefix: str) -> bool:
    """Whether a commit whose message starts with `prefix` is in this checkout's history."""
    try:
        out = subprocess.run(
            ["git", "log", "--format=%s"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return True  # not a git checkout (a release tarball): the code is what it is
    return not out or any(line.startswith(prefix) for line in out.splitlines())


needs_partitions = pytest.mark.skipif(
    not landed("hub: partitions"), reason="needs the hub's shared deliveries (commit 'hub: partitions ...')"
)


@needs_partitions
async def test_c_a_failing_receiver_is_disabled_once_for_the_hub_then_enable_delivers_held_rows_in_order(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    endpoints = {**ENDPOINTS, "ep-flaky": (["all"], ["gw-a:*"])}
    fleet = await Fleet.start(
        daemon, receiver, tmp_path, pg_url, devices=DEVICES, seed=13, endpoints=endpoints,
        hub_delivery={"disable_after": 8},
    )  # fmt: skip
    flaky = fleet.receivers["ep-flaky"]
    flaky.failing = True
    try:
        fleet.start_load()
        await until("ep-flaky disabled", lambda: fleet.hub_log_events("endpoint_disabled"), 30)
        fleet.mark("disabled")

        async def held() -> bool:
            return (await fleet.hub_backlog()).get("held", 0) >= 30

        await until("ep-flaky's deliveries held", held, 15)
        fleet.loads["gw-a"].wave(0.3, 1.5)
        await asyncio.sleep(1.5)  # every process has seen the disable by now; held rows pile up
        failed_at_enable = len(flaky.hits)
        flaky.failing = False
        out = await fleet.hubs[-1].cli("endpoints", "enable", "ep-flaky")
        assert out.returncode == 0, out.stdout + out.stderr
        fleet.mark("enabled")
        await fleet.end_load()
        drain = await fleet.wait_quiet()
        figures = await fleet.check(duplicates_allowed=0)
    finally:
        await fleet.close()
    disabled = fleet.hub_log_events("endpoint_disabled")
    assert len(disabled) == 1, disabled
    assert disabled[0][1]["endpoint"] == "ep-flaky"
    # Attempts stopped at the disable: only what was in flight (every process's window) came after it.
    assert failed_at_enable - sum(1 for h in flaky.hits[:failed_at_enable] if h.at <= fleet.marks["disabled"]) <= (
        3 * 4
    ), "attempts went on after ep-flaky was disabled"
    for hub in fleet.hubs:  # the CLI through any process shows the hub's one state
        out = await hub.cli("endpoints", "--json")
        assert out.returncode == 0, out.stderr
        (ep,) = [e for e in json.loads(out.stdout) if e["name"] == "ep-flaky"]
        assert ep["enabled"] is True and ep["held"] == 0 and ep["pending"] == 0, ep
    figures.update(drain_s=round(drain, 2), disabled_by=f"hub-{disabled[0][0]}", failed_attempts=failed_at_enable)
    print_figures("c", figures, fleet)


async def hold_leases(fleet: Fleet, hub: Daemon) -> tuple[str, dict[int, int]]:
    """Wait until `hub` holds its share of the partitions (it joined and claimed); its owner name and leases."""
    owner = await fleet.owner_of(hub)
    parts: dict[int, int] = {}

    async def holds() -> bool:
        nonlocal parts
        parts = await fleet.parts_of(owner)
        return len(parts) >= 32 // len(fleet.hubs) - 1

    await until(f"{owner} holds its share of the partitions", holds, 15)
    return owner, parts


async def taken_over(fleet: Fleet, owner: str, parts: dict[int, int], timeout: float) -> float:
    """Wait until every partition in `parts` has another owner with a newer epoch; returns the seconds it took."""

    async def done() -> bool:
        now = await fleet.leases()
        return all(now[p][0] not in (None, owner) and now[p][1] > e for p, e in parts.items())

    return await until(f"{owner}'s partitions taken over", done, timeout)


@needs_partitions
async def test_d_sigkill_one_hub_process_under_load_the_others_take_over_within_10s(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    fleet = await Fleet.start(daemon, receiver, tmp_path, pg_url, devices=DEVICES, seed=14)
    victim = fleet.hubs[1]
    try:
        owner, parts = await hold_leases(fleet, victim)
        fleet.start_load()
        await until(
            "hub-1 delivers", lambda: sum(h.process == "hub-1" for h in fleet.receivers["ep-all"].hits) >= 20, 30
        )
        await victim.kill()
        killed = fleet.mark("killed")
        fleet.loads["gw-a"].wave(0.3, 1.5)
        takeover = await taken_over(fleet, owner, parts, 10)
        fleet.mark("taken_over")

        def others_deliver_its_lanes() -> bool:
            return any(h.at > fleet.marks["taken_over"] and h.ok for r in fleet.receivers.values() for h in r.hits)

        await until("deliveries go on", others_deliver_its_lanes, 10)
        await fleet.end_load()
        drain = await fleet.wait_quiet()
        figures = await fleet.check(duplicates_allowed=PER_FAULT)
    finally:
        await fleet.close()
    late = [h for r in fleet.receivers.values() for h in r.hits if h.process == "hub-1" and h.at > killed + 0.5]
    assert not late, f"attempts of the killed process after its death: {late[:3]}"
    # The killed process's lanes were delivered by the others after the kill.
    lanes = await fleet.delivery_parts()
    after = {lanes.get((ep, h.event_id)) for ep, r in fleet.receivers.items() for h in r.hits if h.at > killed}
    assert set(parts) & after, "none of the killed process's partitions was delivered after the kill"
    figures.update(takeover_s=round(takeover, 2), drain_s=round(drain, 2), partitions_of_killed=len(parts))
    print_figures("d", figures, fleet)


@needs_partitions
async def test_e_sigstop_a_hub_process_past_its_leases_it_resumes_without_touching_them(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    fleet = await Fleet.start(daemon, receiver, tmp_path, pg_url, devices=DEVICES, seed=15)
    victim = fleet.hubs[2]
    regained: dict[int, float] = {}  # part -> when the resumed process held it again (a fresh lease)
    try:
        owner, parts = await hold_leases(fleet, victim)
        fleet.start_load()
        await until(
            "hub-2 delivers", lambda: sum(h.process == "hub-2" for h in fleet.receivers["ep-all"].hits) >= 20, 30
        )
        fleet.sigstop(victim)
        stopped_at = fleet.mark("stopped")
        fleet.loads["gw-b"].wave(0.3, 1.5)
        takeover = await taken_over(fleet, owner, parts, 10)
        lost = {p: e for p, (o, e, _) in (await fleet.leases()).items() if p in parts}
        await asyncio.sleep(max(0.0, stopped_at + 5.0 - time.monotonic()))  # stopped for 5 s at least
        fleet.sigcont(victim)
        resumed = fleet.mark("resumed")

        async def watch() -> bool:  # when does it hold one of the lost partitions again (a newer epoch)?
            for p, (o, e, _) in (await fleet.leases()).items():
                if p in lost and o == owner and e > lost[p] and p not in regained:
                    regained[p] = time.monotonic()
            return time.monotonic() - resumed > 3.0

        await until("3 s after the resume", watch, 10)
        await fleet.end_load()
        drain = await fleet.wait_quiet()
        figures = await fleet.check(duplicates_allowed=PER_FAULT)
    finally:
        await fleet.close()
    # After the resume, no attempt of hub-2 on a partition it lost, unless it got that partition again first
    # (a newer lease: then it is its own again). Attempts are attributed by the X-Rig-Process header.
    lanes = await fleet.delivery_parts()
    stale = [
        (ep, h.event_id, lanes.get((ep, h.event_id)))
        for ep, r in fleet.receivers.items()
        for h in r.hits
        if h.process == "hub-2"
        and h.at > resumed
        and lanes.get((ep, h.event_id)) in lost
        and h.at < regained.get(lanes[(ep, h.event_id)], float("inf"))
    ]
    assert not stale, f"attempts of the resumed process on partitions it had lost: {stale[:5]}"
    logs = [e for e in victim.logs() if e.get("event") == "hub_partitions_lost"]
    assert logs, "the resumed process did not log the partitions it lost"
    figures.update(
        takeover_s=round(takeover, 2), drain_s=round(drain, 2), partitions_lost=len(lost), regained=len(regained)
    )
    print_figures("e", figures, fleet)


def has_command(name: str) -> bool:
    """Whether the CLI has a command `name` (what `webhookd --help` lists)."""
    out = subprocess.run(
        [sys.executable, "-m", "webhookd", "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    return any(line.split()[:1] == [name] for line in out.stdout.splitlines() if line.startswith("    "))


needs_liveness = pytest.mark.skipif(
    not (landed("hub: partitions") and has_command("gateways")),
    reason="needs gateway liveness (gateway.online/offline exactly once, `webhookd gateways`)",
)


@needs_liveness
async def test_f_a_gateway_sigkilled_makes_one_gateway_offline_for_the_hub_and_no_device_offline(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    fleet = await Fleet.start(daemon, receiver, tmp_path, pg_url, devices=DEVICES, seed=16, gateway_silence="2s")
    at_hub = fleet.receivers["ep-all"]

    def liveness(gw: str, etype: str) -> list[Hit]:
        return [h for h in at_hub.delivered() if h.device == gw and h.type == etype]

    gw_a = fleet.gateways["gw-a"]
    try:
        fleet.start_load()
        await until(
            "both gateways online",
            lambda: liveness("gw-a", "gateway.online") and liveness("gw-b", "gateway.online"),
            20,
        )
        await until("webhooks flow", lambda: delivered(fleet) >= 100, 20)
        await gw_a.kill()
        killed = fleet.mark("killed")
        offline_in = await until("gw-a's gateway.offline", lambda: liveness("gw-a", "gateway.offline"), 10)
        await asyncio.sleep(2.0)  # every hub process has checked the deadline a few times since
        for hub in fleet.hubs:
            out = await hub.cli("gateways", "--json")
            assert out.returncode == 0, out.stderr
            states = {g["name"]: g["state"] for g in json.loads(out.stdout)}
            assert states == {"gw-a": "offline", "gw-b": "online"}, states
        out = await fleet.hubs[0].cli("devices", "--json")
        assert out.returncode == 0, out.stderr
        listed = json.loads(out.stdout)
        listed = listed if isinstance(listed, list) else listed.get("devices", [])
        stale = {d["id"].split(":")[0] for d in listed if d.get("stale")}
        assert stale == {"gw-a"}, stale
        await gw_a.start()
        fleet.mark("restarted")
        await until("gw-a's gateway.online again", lambda: len(liveness("gw-a", "gateway.online")) >= 2, 10)
        await fleet.end_load()
        drain = await fleet.wait_quiet()
        figures = await fleet.check(duplicates_allowed=0)
    finally:
        await fleet.close()
    assert len(liveness("gw-a", "gateway.offline")) == 1
    assert len(liveness("gw-a", "gateway.online")) == 2 and not liveness("gw-b", "gateway.offline")
    back = liveness("gw-a", "gateway.online")[1]
    assert back.at > killed
    # No per-device offline for gw-a's devices made at the hub while gw-a was gone (check() proves every hub
    # event of a relayed device is one its gateway made; here: none of gw-a's arrived made after the kill).
    figures.update(offline_after_kill_s=round(offline_in, 2), drain_s=round(drain, 2))
    print_figures("f", figures, fleet)
