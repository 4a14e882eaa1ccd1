"""A hub's side of the relay (CONTRACT §14, one process): `hub:` config, `POST /v1/relay` and the gateway
heartbeat, signature checks, idempotency by event id, device ids `<gateway>:<id>` and the `gateway` field, the
device routes refused. Real daemons (a gateway with `upstream:` and a hub) and real receivers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import stripe
from aiohttp import web

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import SECRET, Daemon, Receiver, endpoint, free_port
from webhookd.config import ConfigError, parse_config
from webhookd.config.load import summary
from webhookd.hub import Hub
from webhookd.listener import HeartbeatAPI
from webhookd.presence import DeviceDefaults, PresenceEngine
from webhookd.store import StoreUnavailable

GATEWAY = "site-a"
GW_SECRET = "site-a-Shared-Secret-0123456789"  # test-only
# The device events only: the gateway's own liveness (gateway_online, ...) is tests/test_hub_gateways.py's.
DEVICE_EVENTS = ["online", "offline", "utilizing", "unplugged", "address_changed", "still_offline"]


def hub_config(**extra: Any) -> dict[str, Any]:
    gw: dict[str, Any] = {"name": GATEWAY, "secret": GW_SECRET}
    gw.update(extra)
    return {"gateways": [gw, {"name": "site-b", "secret": "site-b-Other-Secret-987654321"}]}


def sign(body: bytes, secret: str = GW_SECRET, ts: int | None = None) -> str:
    t = int(time.time()) if ts is None else ts
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def relayed_body(event_id: str = "evt_" + "ab" * 16, device: str = "dev-1", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": event_id,
        "type": "device.online",
        "time": "2026-12-03T14:46:30.123Z",
        "reason": "heartbeat",
        "device": {
            "id": device,
            "name": "Printer",
            "state": "online",
            "previous_state": "unknown",
            "address": "10.0.0.7",
            "owner": "ops",
            "last_seen": "2026-12-03T14:46:30.123Z",
        },
        "offline_for": None,
        "endpoint": "upstream",
    }
    body.update(extra)
    return body


async def post(
    hub: Daemon,
    path: str,
    body: bytes,
    *,
    gateway: str | None = GATEWAY,
    signature: str | None = None,
    secret: str = GW_SECRET,
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if gateway is not None:
        headers["Webhookd-Gateway"] = gateway
    headers["Webhookd-Signature"] = sign(body, secret) if signature is None else signature
    return await hub.request("POST", path, data=body, headers=headers)


async def start_pair(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path, store: str | None = None
) -> tuple[Daemon, Daemon, Receiver, Receiver]:
    at_hub, at_gateway = await receiver(), await receiver()
    overrides: dict[str, Any] = {"hub": hub_config()}
    if store is not None:
        overrides["store"] = store
    hub = await daemon([endpoint("hub-hook", at_hub, events=DEVICE_EVENTS)], tmp=tmp_path / "hub", **overrides)
    gateway = await daemon(
        [endpoint("local", at_gateway)],
        tmp=tmp_path / "gateway",
        upstream={"url": hub.base, "gateway": GATEWAY, "secret": GW_SECRET, "heartbeat": "200ms"},
    )
    return hub, gateway, at_hub, at_gateway


async def check_end_to_end(hub: Daemon, gateway: Daemon, at_hub: Receiver, at_gateway: Receiver) -> None:
    await gateway.heartbeat("dev-1", name="Printer", owner="ops")
    await gateway.heartbeat("dev-1", state="utilizing")
    got = await at_hub.wait_for(2, timeout=15)
    local = await at_gateway.wait_for(2)
    events = [r.json for r in got]
    assert [e["device"]["id"] for e in events] == ["site-a:dev-1"] * 2
    assert [e["type"] for e in events] == ["device.online", "device.utilizing"]
    assert all(e["gateway"] == GATEWAY and e["endpoint"] == "hub-hook" for e in events)
    assert events[0]["device"]["name"] == "Printer" and events[0]["device"]["owner"] == "ops"
    assert events[1]["device"]["previous_state"] == "online"
    # The same event ids (Webhook-Id) from the gateway's own receiver to the hub's.
    assert [r.headers["Webhook-Id"] for r in got] == [r.headers["Webhook-Id"] for r in local]
    assert [r.headers["Webhook-Id"] for r in got] == [e["id"] for e in events]
    for r in got:  # signed by the hub with its endpoint's secret
        stripe.WebhookSignature.verify_header(r.body.decode(), r.headers["Webhookd-Signature"], SECRET, 300)
    for r in local:
        assert "gateway" not in r.json and r.json["device"]["id"] == "dev-1"
    status, devices = await hub.admin("GET", "/v1/devices")
    assert status == 200, devices
    rows = devices if isinstance(devices, list) else devices.get("devices", devices.get("items"))
    (dev,) = [d for d in rows if d["id"] == "site-a:dev-1"]
    assert dev["state"] == "utilizing" and dev["source"] == "relay"
    # The gateway's heartbeat reaches the hub (200 {"status": "ok"}): no failure logged at the gateway.
    await asyncio.sleep(0.5)
    assert not [e for e in gateway.logs() if e.get("event") == "upstream_heartbeat_failed"]
    recorded = [e for e in hub.logs() if e.get("event") == "relay_recorded"]
    assert len(recorded) == 2 and recorded[0]["gateway"] == GATEWAY
    await asyncio.sleep(0.3)
    assert len(at_hub.got) == 2  # one delivery per event


async def test_a_gateway_event_ends_signed_at_the_hub_s_receiver(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    await check_end_to_end(*await start_pair(daemon, receiver, tmp_path))


async def test_a_hub_on_postgresql(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    # pg_url first: its database is dropped only after the daemons have stopped (their heartbeats write)
    await check_end_to_end(*await start_pair(daemon, receiver, tmp_path, store=pg_url))


async def test_signatures_gateways_and_bodies_are_checked(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    at_hub = await receiver()
    hub = await daemon([endpoint("hub-hook", at_hub, events=DEVICE_EVENTS)], hub=hub_config())
    body = json.dumps(relayed_body()).encode()
    beat = json.dumps({"gateway": GATEWAY, "time": "2026-12-03T14:46:30.000Z", "devices": 3}).encode()
    for path, raw in (("/v1/relay", body), (f"/v1/gateways/{GATEWAY}/heartbeat", beat)):
        cases = {
            "bad signature": await post(hub, path, raw, signature=sign(raw, "wrong-secret-0123456789")),
            "unknown gateway": await post(hub, path, raw, gateway="site-z"),
            "no gateway header": await post(hub, path, raw, gateway=None),
            "another gateway's secret": await post(hub, path, raw, gateway="site-b"),
            "stale timestamp": await post(hub, path, raw, signature=sign(raw, ts=int(time.time()) - 301)),
            "future timestamp": await post(hub, path, raw, signature=sign(raw, ts=int(time.time()) + 301)),
            "no signature": await post(hub, path, raw, signature=""),
            "body changed": await post(hub, path, raw + b" ", signature=sign(raw)),
        }
        for what, (status, answer) in cases.items():
            assert status == 401, (path, what, answer)
            assert isinstance(answer["error"], str) and GW_SECRET not in answer["error"]
    assert (await post(hub, f"/v1/gateways/{GATEWAY}/heartbeat", beat)) == (200, {"status": "ok"})
    # The path names another gateway than the signed header.
    status, _ = await post(hub, "/v1/gateways/site-b/heartbeat", beat)
    assert status == 401
    # Bodies that are not a relayable webhookd event: 400 with the reason.
    bad = {
        "test event": relayed_body(type="webhook.test"),
        "unknown type": relayed_body(type="device.exploded"),
        "no id": {k: v for k, v in relayed_body().items() if k != "id"},
        "no device": {k: v for k, v in relayed_body().items() if k != "device"},
        "bad time": relayed_body(time="yesterday"),
        "bad state": relayed_body(device={**relayed_body()["device"], "state": "asleep"}),
    }
    for what, obj in bad.items():
        raw = json.dumps(obj).encode()
        status, answer = await post(hub, "/v1/relay", raw)
        assert status == 400 and answer["error"], (what, answer)
    status, answer = await post(hub, "/v1/relay", b"[1, 2]")
    assert status == 400, answer
    status, answer = await hub.request("GET", "/v1/relay")
    assert status == 405
    await asyncio.sleep(0.3)
    assert at_hub.got == []  # nothing above was recorded


async def test_a_replayed_relay_is_2xx_and_delivered_once(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    at_hub = await receiver()
    hub = await daemon([endpoint("hub-hook", at_hub, events=DEVICE_EVENTS)], hub=hub_config())
    raw = json.dumps(relayed_body()).encode()
    first = await post(hub, "/v1/relay", raw)
    assert first[0] == 200 and first[1]["status"] == "recorded", first
    again = await post(hub, "/v1/relay", raw)  # a fresh signature, the same event id
    assert again[0] == 200 and again[1]["status"] == "duplicate", again
    # The same id with other contents changes nothing either.
    changed = json.dumps(relayed_body(type="device.offline", reason="timeout")).encode()
    assert (await post(hub, "/v1/relay", changed))[0] == 200
    results = await asyncio.gather(*(post(hub, "/v1/relay", raw) for _ in range(5)))
    assert all(status == 200 for status, _ in results)
    await at_hub.wait_for(1)
    await asyncio.sleep(0.5)
    assert len(at_hub.got) == 1
    event = at_hub.got[0].json
    assert event["id"] == "evt_" + "ab" * 16 and event["type"] == "device.online"
    assert event["device"]["id"] == "site-a:dev-1" and event["gateway"] == GATEWAY
    assert event["time"] == "2026-12-03T14:46:30.123Z" and event["device"]["address"] == "10.0.0.7"
    out = await hub.cli("deliveries", "--json")
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)) == 1


async def test_device_routes_answer_404_on_a_hub(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    hub = await daemon([], hub=hub_config())
    expected = {"error": "this is a hub: devices report to a gateway"}
    assert await hub.request("POST", "/v1/heartbeat", json={"device": "x"}) == (404, expected)
    assert await hub.request("GET", "/v1/heartbeat/x") == (404, expected)
    assert await hub.request("POST", "/v1/heartbeat/x") == (404, expected)
    assert await hub.request("POST", "/v1/heartbeats", json=[{"device": "x"}]) == (404, expected)
    assert (await hub.request("GET", "/healthz"))[0] == 200
    status, devices = await hub.admin("GET", "/v1/devices")
    assert status == 200 and "x" not in json.dumps(devices)


# ---------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------


def _problems(data: dict[str, Any], tmp_path: Path) -> list[str]:
    base = {"state_dir": str(tmp_path / "s"), "admin": {"socket": str(tmp_path / "a.sock")}}
    with pytest.raises(ConfigError) as e:
        parse_config({**base, **data}, tmp_path)
    return e.value.problems


def test_hub_config(tmp_path: Path) -> None:
    secret_file = tmp_path / "b.secret"
    secret_file.write_text("\nfile-Secret-0123456789\n")
    base = {"state_dir": str(tmp_path / "s"), "admin": {"socket": str(tmp_path / "a.sock")}}
    gateways = [{"name": "a", "secret": "k-0123456789"}, {"name": "b", "secret_file": "b.secret"}]
    cfg = parse_config({**base, "hub": {"gateways": gateways}}, tmp_path)
    assert cfg.hub is not None
    assert [(g.name, g.secret, g.silence_timeout) for g in cfg.hub.gateways] == [
        ("a", "k-0123456789", 120.0),
        ("b", "file-Secret-0123456789", 120.0),
    ]
    problems = _problems(
        {
            "hub": {
                "gateways": [
                    {"name": "bad name", "secret": "Hidden-Secret-1"},
                    {"name": "c"},
                    {"name": "d", "secret": "Hidden-Secret-2", "secret_file": "b.secret"},
                    {"name": "e", "secret": "Hidden-Secret-3", "silence_timeout": "0s"},
                    {"name": "f", "secret": "Hidden-Secret-4", "colour": "red"},
                ]
            }
        },
        tmp_path,
    )
    text = "\n".join(problems)
    assert "Hidden-Secret" not in text
    assert [p.split(":", 1)[0] for p in problems] == [
        "hub.gateways[0].name",
        "hub.gateways[1].secret",
        "hub.gateways[2].secret_file",
        "hub.gateways[3].silence_timeout",
        "hub.gateways[4].colour",
    ]
    dup = _problems({"hub": {"gateways": [{"name": "a", "secret": "s-1"}, {"name": "a", "secret": "s-2"}]}}, tmp_path)
    assert dup == ["hub.gateways[1].name: duplicate gateway name 'a'"]
    assert _problems({"hub": {"gateways": []}}, tmp_path) == ["hub.gateways: must name at least one gateway"]
    assert _problems({"hub": {}}, tmp_path)[0].startswith("hub.gateways: missing required key")
    udp = _problems({"hub": {"gateways": [{"name": "a", "secret": "s-1"}]}, "listen": {"udp": "127.0.0.1:9"}}, tmp_path)
    assert [p.split(":", 1)[0] for p in udp] == ["listen.udp"]


# ---------------------------------------------------------------------------------------------------------
# in process: the store cannot write
# ---------------------------------------------------------------------------------------------------------


class _FailingStore:
    healthy = False

    async def record_relayed(self, change: Any) -> None:
        raise StoreUnavailable("disk full")

    async def touch_gateway(self, *args: Any) -> None:  # a relay is recorded with its gateway's row
        raise StoreUnavailable("disk full")


class _Dispatcher:
    def targets(self, event: Any) -> list[tuple[str, str]]:
        return [("hub-hook", "pending")]

    def enqueue(self, rows: Any) -> None:
        raise AssertionError("nothing was recorded")


async def test_a_store_that_cannot_write_is_503_and_nothing_is_taken(tmp_path: Path) -> None:
    base = {"state_dir": str(tmp_path / "s"), "admin": {"socket": str(tmp_path / "a.sock")}}
    cfg = parse_config({**base, "hub": hub_config()}, tmp_path)
    assert cfg.hub is not None
    engine = PresenceEngine(lambda _id: DeviceDefaults(60.0))
    store, dispatcher = cast(Any, _FailingStore()), cast(Any, _Dispatcher())
    api = HeartbeatAPI(cast(Any, None), (), 262144, lambda: False)
    api.hub = Hub(cfg.hub, engine, store, dispatcher)
    runner = web.ServerRunner(api.server(), handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    try:
        raw = json.dumps(relayed_body()).encode()
        headers = {"Content-Type": "application/json", "Webhookd-Gateway": GATEWAY, "Webhookd-Signature": sign(raw)}
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/v1/relay", data=raw, headers=headers) as r:
                assert r.status == 503 and await r.json() == {"error": "store unavailable"}
            # a gateway heartbeat writes the gateway's row: not acknowledged either
            beat = json.dumps({"gateway": GATEWAY, "devices": 1}).encode()
            beat_headers = {**headers, "Webhookd-Signature": sign(beat)}
            async with s.post(url + f"/v1/gateways/{GATEWAY}/heartbeat", data=beat, headers=beat_headers) as r:
                assert r.status == 503 and await r.json() == {"error": "store unavailable"}
            async with s.get(url + "/healthz") as r:
                assert r.status == 503
    finally:
        await runner.cleanup()
    assert engine.devices == {}


def test_check_config_names_the_hub(tmp_path: Path) -> None:
    base = {"state_dir": str(tmp_path / "s"), "admin": {"socket": str(tmp_path / "a.sock")}}
    line = summary(parse_config({**base, "hub": hub_config()}, tmp_path))
    assert "hub for 2 gateways (site-a, site-b)" in line and GW_SECRET not in line
