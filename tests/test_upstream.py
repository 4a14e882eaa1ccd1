"""A gateway's relay to a hub (CONTRACT §14, the gateway side): the `upstream:` config, the endpoint `upstream`
through the outbox (in order, signed, never disabled nor dead) and the signed heartbeat, against the real daemon
and a real aiohttp server on 127.0.0.1 playing the hub. Every signature is verified with Stripe's library."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import stripe

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import Daemon, NotifySocket, Received, Receiver, eventually
from webhookd.config import ConfigError, load_config, parse_config
from webhookd.dispatch.sender import Sender
from webhookd.store import EndpointRow, Store
from webhookd.upstream import Heartbeat

HUB_SECRET = "site-a-Shared-Secret-0123456789"  # test-only
GATEWAY = "site-a"
SEQUENCE = ["utilizing", "unplugged", "online", "shutdown"]  # after the first heartbeat's online


def hub_url(hub: Receiver) -> str:
    return f"http://127.0.0.1:{hub.port}"


def upstream(hub: Receiver, **extra: Any) -> dict[str, Any]:
    up: dict[str, Any] = {"url": hub_url(hub), "gateway": GATEWAY, "secret": HUB_SECRET, "heartbeat": "1h"}
    up.update(extra)
    return up


def relays(hub: Receiver) -> list[Received]:
    return [r for r in hub.got if r.path == "/v1/relay"]


def heartbeats(hub: Receiver) -> list[Received]:
    return [r for r in hub.got if r.path == f"/v1/gateways/{GATEWAY}/heartbeat"]


def verify(r: Received) -> None:
    """The hub's check: Webhookd-Gateway names us, and Webhookd-Signature verifies (Stripe's library)."""
    assert r.headers["Webhookd-Gateway"] == GATEWAY
    stripe.WebhookSignature.verify_header(r.body.decode(), r.headers["Webhookd-Signature"], HUB_SECRET, 300)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(r.body.decode(), r.headers["Webhookd-Signature"], "other", 300)


async def send_sequences(d: Daemon, devices: tuple[str, ...]) -> None:
    for dev in devices:
        await d.heartbeat(dev)
        for state in SEQUENCE:
            await d.heartbeat(dev, state=state)


def assert_in_order(hub: Receiver, devices: tuple[str, ...]) -> None:
    events = [r.json for r in relays(hub)]
    assert len(events) == len({e["id"] for e in events}) == len(devices) * (1 + len(SEQUENCE))
    for dev in devices:
        states = [e["device"]["state"] for e in events if e["device"]["id"] == dev]
        assert states == ["online", *[("offline" if s == "shutdown" else s) for s in SEQUENCE]], dev


async def wait_relays(hub: Receiver, n: int, timeout: float = 20.0) -> None:
    await eventually(lambda: len(relays(hub)) >= n, timeout=timeout)
    await asyncio.sleep(0.3)  # nothing more comes
    assert len(relays(hub)) == n


async def upstream_row(d: Daemon) -> dict[str, Any]:
    status, eps = await d.admin("GET", "/v1/endpoints")
    assert status == 200, eps
    return next(ep for ep in eps if ep["name"] == "upstream")


# ---------------------------------------------------------------------------------------------------------
# the relay
# ---------------------------------------------------------------------------------------------------------


async def test_events_are_relayed_in_order_signed_with_the_gateway_header(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    hub = await receiver()
    d = await daemon([], upstream=upstream(hub))
    devices = ("x", "y", "z")
    await send_sequences(d, devices)
    await wait_relays(hub, 15)
    assert_in_order(hub, devices)
    for r in relays(hub):
        verify(r)
        body = r.json
        assert body["endpoint"] == "upstream"
        assert r.headers["Webhook-Id"] == body["id"] and r.headers["Webhook-Attempt"] == "1"
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers["User-Agent"].startswith("webhookd/")
    assert {r.json["type"] for r in relays(hub)} >= {"device.online", "device.offline", "device.utilizing"}

    out = await d.cli("endpoints", "--json")
    assert out.returncode == 0, out.stderr
    (ep,) = json.loads(out.stdout)
    assert ep["name"] == "upstream" and ep["url"] == hub_url(hub) + "/v1/relay"
    assert ep["enabled"] is True and ep["delivered"] == 15 and ep["dead"] == 0
    out = await d.cli("endpoints")
    assert out.returncode == 0 and "upstream" in out.stdout
    out = await d.cli("endpoints", "disable", "upstream")
    assert out.returncode != 0 and "never disabled" in out.stdout + out.stderr
    assert (await upstream_row(d))["enabled"] is True


async def test_hub_answering_503_then_200_loses_nothing_never_disables_never_dead(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    healthy = False
    tries: list[float] = []

    def answer(r: Received) -> int:
        if r.path == "/v1/relay":
            tries.append(r.at)
        return 200 if healthy else 503

    hub = await receiver(status=answer)
    d = await daemon(
        [],
        upstream=upstream(hub, concurrency=2),
        delivery={"retry_schedule": ["100ms", "200ms"], "disable_after": 3},
    )
    devices = ("a", "b", "c")
    await send_sequences(d, devices)
    # Far past the schedule (2 steps) and disable_after (3): still pending, still enabled.
    await eventually(lambda: len(tries) >= 15, timeout=15)
    ep = await upstream_row(d)
    assert ep["enabled"] is True and ep["disabled_reason"] is None
    assert ep["dead"] == 0 and ep["held"] == 0 and ep["consecutive_failures"] >= 14
    # Retried at the last step (200 ms, the endpoint paused in between: one probe at a time).
    gaps = [b - a for a, b in itertools.pairwise(tries[5:])]
    assert 0.12 <= statistics.median(gaps) <= 0.6, gaps

    healthy = True
    await wait_relays(hub, 15)
    assert_in_order(hub, devices)
    for r in relays(hub):
        verify(r)
    ep = await upstream_row(d)
    assert ep["enabled"] is True and ep["delivered"] == 15 and ep["dead"] == 0 and ep["consecutive_failures"] == 0
    names = {e.get("event") for e in d.logs()}
    assert "endpoint_disabled" not in names and "delivery_dead" not in names
    assert max(int(r.headers["Webhook-Attempt"]) for r in relays(hub)) > 3


async def test_hub_down_longer_than_the_schedule_keeps_retrying_at_the_last_step(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    hub = await receiver(start=False)  # connection refused
    d = await daemon([], upstream=upstream(hub), delivery={"retry_schedule": ["100ms", "200ms"], "disable_after": 2})
    devices = ("p", "q")
    await send_sequences(d, devices)

    def failed_attempts() -> list[int]:
        return [
            e["attempt"] for e in d.logs() if e.get("event") == "delivery_failed" and e.get("endpoint") == "upstream"
        ]

    await eventually(lambda: max(failed_attempts(), default=0) >= 8, timeout=15)
    retries = [e for e in d.logs() if e.get("event") == "delivery_failed" and e.get("attempt", 0) >= 3]
    assert retries and all(0.16 <= e["retry_in_s"] <= 0.24 for e in retries)  # the last step, +-20% jitter
    assert all(e["error"].startswith("connection refused") for e in retries)
    assert (await upstream_row(d))["enabled"] is True
    await hub.start()
    await wait_relays(hub, 10)
    assert_in_order(hub, devices)
    names = {e.get("event") for e in d.logs()}
    assert "endpoint_disabled" not in names and "delivery_dead" not in names


async def test_a_redirect_or_4xx_from_the_hub_is_retried(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    answers = iter([302, 404, 410, 401])
    hub = await receiver(status=lambda r: next(answers, 200) if r.path == "/v1/relay" else 200)
    d = await daemon([], upstream=upstream(hub), delivery={"retry_schedule": ["100ms"], "disable_after": 1})
    await d.heartbeat("solo")
    await wait_relays(hub, 1)
    assert relays(hub)[0].headers["Webhook-Attempt"] == "5"
    ep = await upstream_row(d)
    assert ep["enabled"] is True and ep["delivered"] == 1 and ep["dead"] == 0


async def test_an_upstream_disabled_in_the_store_from_before_is_enabled_at_startup(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    store = Store(tmp_path / "state" / "webhookd.db")
    (tmp_path / "state").mkdir()
    await store.open()
    await store.hold(EndpointRow("upstream", disabled=True, disabled_reason="operator"))
    await store.close()
    hub = await receiver()
    d = await daemon([], upstream=upstream(hub))
    ep = await upstream_row(d)
    assert ep["enabled"] is True and ep["disabled_reason"] is None
    await d.heartbeat("late")
    await wait_relays(hub, 1)


# ---------------------------------------------------------------------------------------------------------
# the heartbeat
# ---------------------------------------------------------------------------------------------------------


async def test_heartbeats_arrive_at_the_interval_signed_with_the_device_count(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    hub = await receiver()
    d = await daemon([], upstream=upstream(hub, heartbeat="300ms"))
    await d.heartbeat("dev-1")
    await d.heartbeat("dev-2")
    await eventually(lambda: len(heartbeats(hub)) >= 7, timeout=10)
    got = heartbeats(hub)
    gaps = [b.at - a.at for a, b in itertools.pairwise(got)]
    assert 0.2 <= statistics.median(gaps) <= 0.45, gaps
    for r in got:
        verify(r)
        body = r.json
        assert set(body) == {"gateway", "time", "devices"} and body["gateway"] == GATEWAY
        assert abs(datetime.fromisoformat(body["time"]).timestamp() - time.time()) < 30
        assert body["time"].endswith("Z")
        assert "Webhook-Id" not in r.headers and r.headers["Content-Type"] == "application/json"
    assert got[-1].json["devices"] == 2


async def test_heartbeat_failures_warn_once_a_minute_then_one_recovery_line(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    hub = await receiver(start=False)
    d = await daemon([], upstream=upstream(hub, heartbeat="100ms"))
    await asyncio.sleep(1.5)  # ~15 failed heartbeats
    failed = [e for e in d.logs() if e.get("event") == "upstream_heartbeat_failed"]
    assert len(failed) == 1 and failed[0]["level"] == "warning"
    assert failed[0]["error"] == f"connection refused (127.0.0.1:{hub.port})"
    assert HUB_SECRET not in d.logs_text()
    await hub.start()
    await eventually(lambda: len(heartbeats(hub)) >= 3, timeout=10)
    recovered = [e for e in d.logs() if e.get("event") == "upstream_heartbeat_recovered"]
    assert len(recovered) == 1 and recovered[0]["failures"] >= 10
    assert d.running


async def test_heartbeat_survives_a_closed_session_and_counts_failures() -> None:
    sender = Sender(1.0)  # never opened: every attempt fails, none raises
    up = parse_config(
        {"admin": {"socket": "/tmp/x.sock"}, "upstream": {"url": "http://127.0.0.1:9", "gateway": "g", "secret": "s"}},
        Path("/srv"),
        env={},
    ).upstream
    hb = Heartbeat(up, sender, lambda: 0)
    assert hb.cfg is not None and hb._target is not None
    assert await hb.beat(hb.cfg, hb._target) is False
    assert hb.failures == 1 and hb.last_error


async def test_sighup_adds_changes_and_removes_upstream(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    hub, hub2 = await receiver(), await receiver()
    async with NotifySocket(tmp_path) as ns:
        d = await daemon([], start=False)
        await d.start(env=ns.env())
        await ns.wait_for("READY", "1")

        async def reload() -> None:
            d.write_config()
            mark = len(ns.messages)
            d.signal(signal.SIGHUP)
            started = await ns.wait_for("RELOADING", "1", since=mark)
            await ns.wait_for("READY", "1", since=ns.messages.index(started) + 1)

        d.cfg["upstream"] = upstream(hub, heartbeat="200ms")
        await reload()
        await eventually(lambda: len(heartbeats(hub)) >= 2, timeout=10)
        await d.heartbeat("h1")
        await wait_relays(hub, 1)
        assert (await upstream_row(d))["enabled"] is True

        d.cfg["upstream"] = upstream(hub2, heartbeat="200ms")
        await reload()
        reloaded = [e for e in d.logs() if e.get("event") == "config_reloaded"][-1]
        assert "upstream.url" in reloaded["changed"] and reloaded["endpoints_changed"] == ["upstream"]
        await eventually(lambda: len(heartbeats(hub2)) >= 2, timeout=10)
        await d.heartbeat("h2")
        await wait_relays(hub2, 1)
        assert relays(hub2)[0].json["device"]["id"] == "h2"

        del d.cfg["upstream"]
        await reload()
        await asyncio.sleep(0.2)
        seen = len(heartbeats(hub2))
        await asyncio.sleep(0.6)
        assert len(heartbeats(hub2)) == seen
        status, eps = await d.admin("GET", "/v1/endpoints")
        assert status == 200 and [(e["name"], e["disabled_reason"]) for e in eps] == [("upstream", "not in config")]


# ---------------------------------------------------------------------------------------------------------
# the config
# ---------------------------------------------------------------------------------------------------------

BASE: dict[str, Any] = {"admin": {"socket": "/srv/wh/admin.sock"}}


def parse(upstream: object, **top: Any) -> Any:
    return parse_config({**BASE, "upstream": upstream, **top}, Path("/srv/wh"), env={})


def problems(upstream: object, **top: Any) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse(upstream, **top)
    return ei.value.problems


def test_upstream_defaults_and_the_relay_endpoint() -> None:
    cfg = parse({"url": "https://hub.example.com:8470/", "gateway": "site-a", "secret": "k"})
    up = cfg.upstream
    assert up.url == "https://hub.example.com:8470"
    assert (up.heartbeat, up.timeout, up.concurrency, up.tls_verify, up.ca_file) == (30.0, 10.0, 8, True, None)
    (ep,) = cfg.endpoints
    assert ep.name == "upstream" and ep.url == "https://hub.example.com:8470/v1/relay" and ep.relay
    assert ep.format == "webhookd" and ep.devices == ("*",) and len(ep.events) == 8
    assert ep.signature == "hmac-sha256" and ep.secrets == ("k",) and ep.signature_header == "Webhookd-Signature"
    assert ep.headers == {"Webhookd-Gateway": "site-a"} and ep.timeout == 10.0 and ep.concurrency == 8
    assert parse_config(BASE, Path("/srv/wh"), env={}).upstream is None
    assert parse(None).upstream is None


def test_upstream_secret_file(tmp_path: Path) -> None:
    f = tmp_path / "hub.secret"
    f.write_text("\n  from-a-file  \n")
    cfg = parse({"url": "http://10.0.0.5:8470", "gateway": "g", "secret_file": str(f)})
    assert cfg.upstream.secret == "from-a-file" and cfg.endpoints[0].secrets == ("from-a-file",)
    f.write_text("one\ntwo\n")
    assert problems({"url": "http://10.0.0.5", "gateway": "g", "secret_file": str(f)}) == [
        f"upstream.secret_file: more than one line in {f} (expected the one shared secret)"
    ]
    assert problems({"url": "http://10.0.0.5", "gateway": "g", "secret_file": str(tmp_path / "nope")}) == [
        f"upstream.secret_file: file not found: {tmp_path / 'nope'}"
    ]


@pytest.mark.parametrize(
    ("upstream", "expected"),
    [
        ({"gateway": "g", "secret": "k"}, "upstream.url: missing required key"),
        ({"url": "http://h", "secret": "k"}, "upstream.gateway: missing required key"),
        ({"url": "http://h", "gateway": "g"}, "upstream.secret: missing required key"),
        ({"url": "ftp://h", "gateway": "g", "secret": "k"}, "upstream.url: must be http or https"),
        ({"url": "http://h/?a=b", "gateway": "g", "secret": "k"}, "upstream.url: must be a base URL"),
        ({"url": "http://169.254.169.254", "gateway": "g", "secret": "k"}, "upstream.url: link-local"),
        ({"url": "http://h", "gateway": "-x", "secret": "k"}, "upstream.gateway: must be 1-50 characters"),
        ({"url": "http://h", "gateway": "a/b", "secret": "k"}, "upstream.gateway: must be 1-50 characters"),
        ({"url": "http://h", "gateway": "g" * 51, "secret": "k"}, "upstream.gateway: must be 1-50 characters"),
        ({"url": "http://h", "gateway": "", "secret": "k"}, "upstream.gateway: must be 1-50 characters"),
        ({"url": "http://h", "gateway": "g", "secret": ""}, "upstream.secret: must not be empty"),
        ({"url": "http://h", "gateway": "g", "secret": "k", "secret_file": "/x"}, "upstream.secret_file: use either"),
        ({"url": "http://h", "gateway": "g", "secret": "k", "heartbeat": "0s"}, "upstream.heartbeat:"),
        ({"url": "http://h", "gateway": "g", "secret": "k", "concurrency": 0}, "upstream.concurrency:"),
        ({"url": "http://h", "gateway": "g", "secret": "k", "ca_file": "/nope.pem"}, "upstream.ca_file: file not"),
        ({"url": "http://h", "gateway": "g", "secret": "k", "hub": 1}, "upstream.hub: unknown key"),
        ("http://h", "upstream: expected a mapping"),
    ],
)
def test_upstream_problems_name_their_key(upstream: object, expected: str) -> None:
    found = problems(upstream)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_gateway_names_of_the_device_id_alphabet() -> None:
    for name in ("a", "site-a", "Site_A.2", "gw@eu:1", "9" * 50):
        assert parse({"url": "http://h", "gateway": name, "secret": "k"}).upstream.gateway == name


def test_the_endpoint_name_upstream_is_reserved() -> None:
    endpoint = {"name": "upstream", "url": "https://hooks.example.com/x"}
    for up in (None, {"url": "http://h", "gateway": "g", "secret": "k"}):
        found = problems(up, endpoints=[{"name": "a", "url": "https://hooks.example.com/y"}, endpoint])
        assert found == ["endpoints[1].name: 'upstream' is reserved (the relay to a hub: configure it with upstream:)"]


def test_the_secret_is_never_echoed() -> None:
    secret = "Very-Secret-Hub-Key\x01"
    found = problems({"url": "http://h", "gateway": "g", "secret": secret})
    assert found and all("Very-Secret" not in p for p in found)
    found = problems({"url": "http://h/?k=Very-Secret", "gateway": "g", "secret": "Very-Secret"})
    assert found and all("Very-Secret" not in p for p in found)


def test_the_readme_upstream_block_passes_check_config(tmp_path: Path) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("## Relaying to a hub")
    section = readme[start : readme.index("\n## ", start + 1)]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = tmp_path / "webhookd.yaml"
    config.write_text(f"state_dir: {tmp_path}/var\nadmin:\n  socket: {tmp_path}/admin.sock\n" + block)
    out = subprocess.run(
        [sys.executable, "-m", "webhookd", "check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "SITE_A_SECRET": "k"},
        timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 endpoint (upstream)" in out.stdout and "relay to https://hub.example.com:8470 as site-a" in out.stdout


def test_the_example_config_upstream_block_loads_when_uncommented(tmp_path: Path) -> None:
    text = (Path(__file__).parent.parent / "config.example.yaml").read_text()
    block = text[text.index("#upstream:") :]
    uncommented = "\n".join(line.removeprefix("#") for line in block.splitlines())
    config = tmp_path / "c.yaml"
    config.write_text(text[: text.index("#upstream:")] + uncommented + "\n")
    cfg = load_config(config, env={"SITE_A_SECRET": "k"})
    assert cfg.upstream is not None and cfg.upstream.gateway == "site-a"
    assert [e.name for e in cfg.endpoints] == ["sink", "upstream"]
