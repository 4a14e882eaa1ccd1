"""A hub's gateway liveness with real daemons (CONTRACT §14): a gateway process with `upstream:` relaying to a hub
process (SQLite), and on PostgreSQL two hub processes sharing one database. gateway.online at the first
heartbeat, exactly one gateway.offline within silence_timeout + 1 s of the gateway's SIGKILL and no per-device
offline, its devices `stale` meanwhile, gateway.online with offline_for when it is back; `webhookd gateways`."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import Daemon, Receiver, endpoint, eventually
from tests.test_hub import GATEWAY, GW_SECRET, post, sign

SILENCE = 1.5  # seconds: the hub's silence_timeout for the gateway
BEAT = "300ms"  # the gateway's upstream heartbeat


def hub_section() -> dict[str, Any]:
    return {
        "gateways": [
            {"name": GATEWAY, "secret": GW_SECRET, "silence_timeout": f"{SILENCE}s"},
            {"name": "site-b", "secret": "site-b-Other-Secret-987654321"},  # never heard from
        ]
    }


def of_type(at: Receiver, etype: str) -> list[dict[str, Any]]:
    return [e for e in at.events() if e["type"] == etype]


def arrivals(at: Receiver, etype: str) -> list[float]:
    return [r.at for r in at.got if r.json["type"] == etype]


async def gateways_json(hub: Daemon, cli: bool = False) -> dict[str, dict[str, Any]]:
    """`webhookd gateways --json` (cli), or the admin API's document it prints (quicker than a CLI process)."""
    if cli:
        out = await hub.cli("gateways", "--json")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
    else:
        status, doc = await hub.admin("GET", "/v1/gateways")
        assert status == 200, doc
    assert isinstance(doc, list)
    return {g["name"]: g for g in doc}


async def devices_json(hub: Daemon) -> dict[str, dict[str, Any]]:
    status, doc = await hub.admin("GET", "/v1/devices")
    assert status == 200, doc
    return {d["id"]: d for d in doc}


async def start_gateway(daemon: DaemonFactory, tmp_path: Path, hub: Daemon) -> Daemon:
    return await daemon(
        [],
        tmp=tmp_path / "gateway",
        upstream={"url": hub.base, "gateway": GATEWAY, "secret": GW_SECRET, "heartbeat": BEAT},
    )


async def test_a_gateway_goes_online_offline_once_and_back(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    at_hub = await receiver()
    hub = await daemon([endpoint("hub-hook", at_hub)], tmp=tmp_path / "hub", hub=hub_section())
    before = await gateways_json(hub)
    assert {n: (g["state"], g["last_seen"], g["relayed"]) for n, g in before.items()} == {
        GATEWAY: ("unknown", None, 0),
        "site-b": ("unknown", None, 0),
    }
    # A refused request from a configured gateway is its last_error (never its secret).
    beat = json.dumps({"gateway": "site-b", "devices": 1}).encode()
    status, _ = await post(hub, "/v1/gateways/site-b/heartbeat", beat, gateway="site-b", signature=sign(beat, "wrong"))
    assert status == 401

    gw = await start_gateway(daemon, tmp_path, hub)
    assert (await gateways_json(hub))["site-b"]["last_error"] is not None
    await eventually(lambda: of_type(at_hub, "gateway.online"), timeout=10)
    await gw.heartbeat("dev-1", name="Printer")
    await eventually(lambda: of_type(at_hub, "device.online"), timeout=10)
    [online] = of_type(at_hub, "gateway.online")
    assert online["device"]["id"] == GATEWAY and online["device"]["name"] == GATEWAY
    assert online["device"]["previous_state"] == "unknown" and online["reason"] == "heartbeat"
    assert online["device"]["address"] == "127.0.0.1" and online["gateway"] == GATEWAY
    assert online["offline_for"] is None and online["endpoint"] == "hub-hook"
    listed = await gateways_json(hub, cli=True)
    site_a, site_b = listed[GATEWAY], listed["site-b"]
    assert set(site_a) == {"name", "state", "last_seen", "address", "devices", "relayed", "last_error"}
    assert (site_a["state"], site_a["address"], site_a["relayed"]) == ("online", "127.0.0.1", 1)
    assert site_a["last_seen"].endswith("Z") and site_a["last_error"] is None
    assert (site_b["state"], site_b["relayed"]) == ("unknown", 0)
    assert site_b["last_error"].startswith("401 ") and "wrong" not in site_b["last_error"]
    table = await hub.cli("gateways")
    assert table.returncode == 0 and "LAST ERROR" in table.stdout.splitlines()[0]
    assert [line.split()[:2] for line in table.stdout.splitlines()[1:]] == [[GATEWAY, "online"], ["site-b", "unknown"]]
    assert (await devices_json(hub))[f"{GATEWAY}:dev-1"]["stale"] is False

    # SIGKILL: no goodbye. Exactly one gateway.offline, within silence_timeout + 1 s; no device.offline.
    await gw.kill()
    killed = time.monotonic()
    await eventually(lambda: of_type(at_hub, "gateway.offline"), timeout=SILENCE + 5)
    took = arrivals(at_hub, "gateway.offline")[0] - killed
    assert took <= SILENCE + 1.0, took
    [offline] = of_type(at_hub, "gateway.offline")
    assert (offline["reason"], offline["device"]["state"], offline["device"]["previous_state"]) == (
        "timeout",
        "offline",
        "online",
    )
    devices = await devices_json(hub)
    assert devices[f"{GATEWAY}:dev-1"]["stale"] is True and devices[f"{GATEWAY}:dev-1"]["state"] == "online"
    table = await hub.cli("devices")
    assert "online (stale)" in table.stdout, table.stdout
    assert (await gateways_json(hub))[GATEWAY]["state"] == "offline"
    await asyncio.sleep(SILENCE + 0.5)
    assert len(of_type(at_hub, "gateway.offline")) == 1
    assert not [e for e in at_hub.events() if e["type"] == "device.offline"]

    # Back: gateway.online with offline_for; its devices are no longer stale.
    await gw.start()
    await eventually(lambda: len(of_type(at_hub, "gateway.online")) == 2, timeout=10)
    back = of_type(at_hub, "gateway.online")[1]
    assert back["device"]["previous_state"] == "offline" and back["offline_for"] > SILENCE
    assert (await devices_json(hub))[f"{GATEWAY}:dev-1"]["stale"] is False
    offline_lines = [e for e in hub.logs() if e.get("event") == "gateway_offline"]
    assert len(offline_lines) == 1 and offline_lines[0]["gateway"] == GATEWAY


async def test_two_hub_processes_on_postgresql_make_one_offline(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    # pg_url first: its database is dropped only after the daemons have stopped
    at_hub = await receiver()
    hubs = await asyncio.gather(  # the two processes start together
        *(
            daemon([endpoint("hub-hook", at_hub)], tmp=tmp_path / f"hub-{i}", hub=hub_section(), store=pg_url)
            for i in (1, 2)
        )
    )
    gw = await start_gateway(daemon, tmp_path, hubs[0])  # heartbeats reach the first hub process only
    await eventually(lambda: of_type(at_hub, "gateway.online"), timeout=10)
    # The second process shows the whole hub: the gateway the first one hears.
    assert (await gateways_json(hubs[1]))[GATEWAY]["state"] == "online"
    await gw.kill()
    killed = time.monotonic()
    await eventually(lambda: of_type(at_hub, "gateway.offline"), timeout=SILENCE + 5)
    assert arrivals(at_hub, "gateway.offline")[0] - killed <= SILENCE + 1.0
    await asyncio.sleep(SILENCE + 1.0)
    assert len(of_type(at_hub, "gateway.offline")) == 1, at_hub.events()
    made = [e for h in hubs for e in h.logs() if e.get("event") == "gateway_offline"]
    assert len(made) == 1, made  # by whichever process noticed first
    for hub in hubs:
        assert (await gateways_json(hub))[GATEWAY]["state"] == "offline"
    for out in await asyncio.gather(*(hub.cli("deliveries", "--json") for hub in hubs)):
        assert [d["type"] for d in json.loads(out.stdout)].count("gateway.offline") == 1
    assert len(of_type(at_hub, "gateway.online")) == 1
    await gw.start()  # the teardown checks it stops cleanly


async def test_gateways_on_a_process_that_is_not_a_hub(daemon: DaemonFactory) -> None:
    d = await daemon([])
    out = await d.cli("gateways", "--json")
    assert out.returncode == 1 and "not a hub" in out.stderr and "Traceback" not in out.stderr
    status, answer = await d.admin("GET", "/v1/gateways")
    assert status == 404 and "not a hub" in answer["error"]
    await d.heartbeat("x")
    assert "stale" not in (await devices_json(d))["x"]


async def test_after_a_hub_restart_a_gateway_gets_a_full_timeout(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    at_hub = await receiver()
    hub = await daemon([endpoint("hub-hook", at_hub)], tmp=tmp_path / "hub", hub=hub_section())
    gw = await start_gateway(daemon, tmp_path, hub)
    await eventually(lambda: of_type(at_hub, "gateway.online"), timeout=10)
    await hub.stop()
    await gw.kill()
    await asyncio.sleep(SILENCE + 0.5)  # its deadline passes while no hub process is there to see it
    started = time.monotonic()
    await hub.start()
    await eventually(lambda: of_type(at_hub, "gateway.offline"), timeout=SILENCE + 5)
    # not at once: one full silence_timeout from the hub's start (which began before `started`)
    assert arrivals(at_hub, "gateway.offline")[0] - started >= SILENCE - 0.5
    assert any(e.get("event") == "gateways_restarted" for e in hub.logs())
    await asyncio.sleep(0.5)
    assert len(of_type(at_hub, "gateway.offline")) == 1 and len(of_type(at_hub, "gateway.online")) == 1
