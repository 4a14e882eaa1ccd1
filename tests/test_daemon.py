"""Whole-daemon tests: `webhookd run` as a subprocess, real receivers, real SQLite, real signals."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import standardwebhooks
import stripe

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import SECRET, Daemon, endpoint


async def test_online_webhook_in_each_format_with_verified_signatures(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    plain, remote, kob = await receiver(), await receiver(), await receiver()
    second = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk="
    d = await daemon(
        [
            endpoint("plain", plain, format="webhookd", secret=[SECRET, second]),
            endpoint("remote", remote, format="remoteit", signature="standard-webhooks"),
            endpoint("kob", kob, format="kobiton", signature_header="Biotz-IoT-Signature"),
        ],
    )
    assert await d.heartbeat("dev-1", name="Lab printer", owner="ops@example.com") == {
        "device": "dev-1",
        "state": "online",
        "changed": True,
    }
    for r in (plain, remote, kob):
        await r.wait_for(1)
    p, rm, k = plain.got[0], remote.got[0], kob.got[0]

    # Stripe-style: every secret's v1 verifies with Stripe's own library.
    for secret in (SECRET, second):
        stripe.WebhookSignature.verify_header(p.body.decode(), p.headers["Webhookd-Signature"], secret, 300)
    stripe.WebhookSignature.verify_header(k.body.decode(), k.headers["Biotz-IoT-Signature"], SECRET, 300)
    # Standard Webhooks: the reference library.
    standardwebhooks.Webhook(SECRET).verify(rm.body, rm.headers)

    ids = {r.headers["Webhook-Id"] for r in (p, rm, k)}
    assert len(ids) == 1 and ids.pop().startswith("evt_")  # one event, one id, every endpoint
    assert all(r.headers["Webhook-Attempt"] == "1" for r in (p, rm, k))
    assert all(r.headers["User-Agent"].startswith("webhookd/") for r in (p, rm, k))
    assert all(r.headers["Content-Type"] == "application/json" for r in (p, rm, k))

    body = p.json
    assert body["type"] == "device.online" and body["reason"] == "heartbeat"
    assert body["device"]["id"] == "dev-1" and body["device"]["name"] == "Lab printer"
    assert body["device"]["previous_state"] == "unknown" and body["device"]["address"] == "127.0.0.1"
    assert body["endpoint"] == "plain" and body["time"].endswith("Z")
    assert rm.json["State"] == "online" and rm.json["Type"] == "device_state"
    assert rm.json["Device"] == "dev-1" and rm.json["Email"] == "ops@example.com"
    assert k.json["eventActivity"] == "device.status.online" and k.json["webhookName"] == "kob"
    assert isinstance(k.json["webhookId"], int)
    assert await d.stop() == 0


async def test_silence_goes_offline_within_one_second_of_the_deadline(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    r = await receiver()
    d = await daemon([endpoint("r", r)], presence={"silence_timeout": "1s"})
    sent = time.monotonic()
    await d.heartbeat("quiet")
    answered = time.monotonic()
    await r.wait_for(2, timeout=5)
    assert r.got[1].json["type"] == "device.offline"
    assert r.got[1].json["reason"] == "timeout"
    # The deadline is 1 s after the daemon handled the heartbeat (between sent and answered); the offline
    # webhook must not come before it, and must arrive within 1 s after it.
    assert r.got[1].at - sent >= 1.0, r.got[1].at - sent
    assert r.got[1].at - answered < 2.0, r.got[1].at - answered


async def test_shutdown_and_reboot_are_offline_at_once(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    r = await receiver()
    d = await daemon([endpoint("r", r)], presence={"silence_timeout": "1h"})
    await d.heartbeat("a")
    await d.heartbeat("b")
    assert (await d.heartbeat("a", state="shutdown"))["state"] == "offline"
    assert (await d.heartbeat("b", state="reboot"))["changed"] is True
    await r.wait_for(4, timeout=3)
    offline = {e["device"]["id"]: e["reason"] for e in r.events() if e["type"] == "device.offline"}
    assert offline == {"a": "shutdown", "b": "reboot"}


async def test_receiver_down_then_up_loses_nothing_and_keeps_order(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    r = await receiver(start=False)  # not started: connection refused
    d = await daemon(
        [endpoint("r", r)],
        delivery={"retry_schedule": ["200ms", "300ms", "300ms", "300ms", "300ms", "300ms"]},
    )
    sequence = ["utilizing", "unplugged", "online", "shutdown"]
    for dev in ("x", "y", "z"):
        await d.heartbeat(dev)
        for state in sequence:
            await d.heartbeat(dev, state=state)
    await asyncio.sleep(0.8)
    await r.start()
    await r.wait_for(15, timeout=20)
    await asyncio.sleep(0.3)
    assert len(r.got) == 15
    for dev in ("x", "y", "z"):
        states = [e["device"]["state"] for e in r.events() if e["device"]["id"] == dev]
        assert states == ["online", *[("offline" if s == "shutdown" else s) for s in sequence]]


async def test_failing_endpoint_is_disabled_held_not_hammered_then_enabled(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    healthy = False
    r = await receiver(status=lambda _req: 200 if healthy else 500)
    d = await daemon(
        [endpoint("flaky", r, concurrency=4)],
        delivery={"retry_schedule": ["300ms", "300ms", "300ms"], "disable_after": 3},
    )
    for i in range(10):
        await d.heartbeat(f"dev-{i}")
        await d.heartbeat(f"dev-{i}", state="utilizing")
    # The switch is immediate; the held rows are counted once the store has committed them.
    _, eps = await eventually_admin(d, lambda eps: eps[0]["enabled"] is False and eps[0]["held"] == 20)
    ep = eps[0]
    assert ep["disabled_reason"] and "consecutive failures" in ep["disabled_reason"]
    assert ep["held"] == 20 and ep["pending"] == 0
    await asyncio.sleep(1.0)
    # 20 queued events, yet the receiver saw at most one burst (<= endpoint concurrency) plus the probes.
    assert r.attempts <= 4 + 3, r.attempts
    attempts_when_disabled = r.attempts
    await asyncio.sleep(0.5)
    assert r.attempts == attempts_when_disabled  # disabled: no more attempts
    assert any(e.get("event") == "endpoint_disabled" for e in d.logs())

    healthy = True
    out = await d.cli("endpoints", "enable", "flaky")
    assert out.returncode == 0, out.stderr
    await r.wait_for(20, timeout=10)
    for i in range(10):
        states = [e["device"]["state"] for e in r.events() if e["device"]["id"] == f"dev-{i}"]
        assert states == ["online", "utilizing"]
    # The receiver has them before their receipts commit (a worker goes on while its receipt is saved).
    _, eps = await eventually_admin(d, lambda eps: eps[0]["delivered"] == 20)
    assert eps[0]["enabled"] is True and eps[0]["delivered"] == 20 and eps[0]["consecutive_failures"] == 0


async def eventually_admin(d: Daemon, pred, timeout: float = 10.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        status, body = await d.admin("GET", "/v1/endpoints")
        if status == 200 and pred(body):
            return status, body
        if time.monotonic() > deadline:
            raise AssertionError(f"admin state not reached: {body}")
        await asyncio.sleep(0.05)


async def test_410_disables_at_once(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    r = await receiver(status=lambda _req: 410)
    d = await daemon([endpoint("gone", r)], delivery={"disable_after": 50})
    await d.heartbeat("a")
    await d.heartbeat("b")
    _, eps = await eventually_admin(d, lambda eps: eps[0]["enabled"] is False and eps[0]["held"] == 2)
    assert "410" in eps[0]["disabled_reason"]
    await asyncio.sleep(0.3)
    _, eps = await d.admin("GET", "/v1/endpoints")
    assert eps[0]["held"] == 2 and eps[0]["dead"] == 0
    assert r.attempts <= 2  # both deliveries may have been in flight together; nothing after the 410


async def test_sigkill_with_pending_deliveries_then_restart_delivers_everything(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    r = await receiver(start=False)
    d = await daemon([endpoint("r", r)], delivery={"retry_schedule": ["200ms"] * 8})
    for i in range(20):
        await d.heartbeat(f"k-{i}")
    await d.kill()
    await r.start()
    await d.start()
    await r.wait_for(20, timeout=15)
    assert {e["device"]["id"] for e in r.events()} == {f"k-{i}" for i in range(20)}
    # The restart did not invent events: states persisted, so no second online for these devices.
    await d.heartbeat("k-0")
    await asyncio.sleep(0.3)
    assert len(r.got) == 20


async def test_restart_after_long_downtime_no_offline_storm(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    r = await receiver()
    d = await daemon([endpoint("r", r)], presence={"silence_timeout": "1500ms"})
    await d.heartbeat("busy")
    await d.heartbeat("silent")
    await r.wait_for(2)
    assert await d.stop() == 0
    await asyncio.sleep(1.7)  # down for longer than the timeout
    started = time.monotonic()
    await d.start()
    ready = time.monotonic()
    for _ in range(6):  # 'busy' keeps heartbeating after the restart
        await d.heartbeat("busy")
        await asyncio.sleep(0.4)
    await r.wait_for(3, timeout=5)
    await asyncio.sleep(0.3)
    offline = [(x.json["device"]["id"], x.at) for x in r.got if x.json["type"] == "device.offline"]
    assert [dev for dev, _ in offline] == ["silent"]
    # A full timeout measured from the start, not from the last heartbeat before the downtime.
    assert offline[0][1] - started >= 1.5 - 0.05
    assert offline[0][1] - ready < 1.5 + 1.0


async def test_sigterm_exits_zero_and_logs_json(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    r = await receiver()
    d = await daemon([endpoint("r", r)])
    await d.heartbeat("a")
    await r.wait_for(1)
    d.signal(signal.SIGTERM)
    assert await d.wait_exit() == 0
    records = d.logs()
    assert all(rec.get("event") != "<not json>" for rec in records), records
    events = [rec["event"] for rec in records]
    assert "daemon_started" in events and "device_online" in events and "delivery_succeeded" in events
    assert events[-1] == "daemon_stopped"
    assert all({"timestamp", "level", "event"} <= rec.keys() for rec in records)
    assert SECRET not in d.logs_text()


BAD_INPUTS = [
    (
        "POST",
        "/v1/heartbeat",
        {"data": b'{"device":"\xff"}', "headers": {"Content-Type": "application/json"}},
        400,
        "malformed",
        None,
    ),
    (
        "POST",
        "/v1/heartbeat",
        {"data": b"[" * 100_000, "headers": {"Content-Type": "application/json"}},
        400,
        "malformed",
        None,
    ),
    # (method, path, kwargs, status, error substring, field)
    (
        "POST",
        "/v1/heartbeat",
        {"data": b"{not json", "headers": {"Content-Type": "application/json"}},
        400,
        "malformed",
        None,
    ),
    (
        "POST",
        "/v1/heartbeat",
        {"data": b'\xff\xfe{"device":"a"}', "headers": {"Content-Type": "application/json"}},
        400,
        "malformed",
        None,
    ),
    ("POST", "/v1/heartbeat", {"json": ["a"]}, 400, "object", None),
    ("POST", "/v1/heartbeat", {"json": {}}, 400, "required", "device"),
    ("POST", "/v1/heartbeat", {"json": {"device": 5}}, 400, "string", "device"),
    ("POST", "/v1/heartbeat", {"json": {"device": "-bad"}}, 400, "match", "device"),
    ("POST", "/v1/heartbeat", {"json": {"device": "a" * 129}}, 400, "match", "device"),
    ("POST", "/v1/heartbeat", {"json": {"device": "a b"}}, 400, "match", "device"),
    ("POST", "/v1/heartbeat", {"json": {"device": "a", "state": "sleeping"}}, 400, "state", "state"),
    ("POST", "/v1/heartbeat", {"json": {"device": "a", "address": "999.1.1.1"}}, 400, "IP", "address"),
    ("POST", "/v1/heartbeat", {"json": {"device": "a", "name": 3}}, 400, "string", "name"),
    ("POST", "/v1/heartbeat", {"json": {"device": "a", "name": "x\ny"}}, 400, "control", "name"),
    ("POST", "/v1/heartbeat", {"json": {"device": "a", "stat": "online"}}, 400, "unknown field", "stat"),
    (
        "POST",
        "/v1/heartbeat",
        {"data": b'{"device":"a"}', "headers": {"Content-Type": "text/plain"}},
        415,
        "Content-Type",
        None,
    ),
    ("POST", "/v1/heartbeat", {"json": {"device": "a", "name": "x" * 300_000}}, 413, "larger", None),
    ("PUT", "/v1/heartbeat", {"json": {"device": "a"}}, 405, "method", None),
    ("DELETE", "/v1/heartbeat/a", {}, 405, "method", None),
    ("GET", "/v1/heartbeat/-x", {}, 400, "match", "device"),
    ("GET", "/v1/heartbeat/a?state=nope", {}, 400, "state", "state"),
    ("GET", "/v1/nothing", {}, 404, "not found", None),
    ("POST", "/v1/heartbeats", {"json": {"device": "a"}}, 400, "array", None),
    (
        "POST",
        "/v1/heartbeats",
        {"json": [{"device": "a"}, {"device": "b"}, {"device": "c"}, {"device": "!"}]},
        400,
        "match",
        "[3].device",
    ),
    ("POST", "/v1/heartbeats", {"json": [{"device": "a"}, "x"]}, 400, "object", "[1]"),
    ("POST", "/v1/heartbeats", {"json": [{"device": f"d{i}"} for i in range(1001)]}, 400, "at most", None),
]


async def test_bad_input_gets_4xx_json_and_records_nothing(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    r = await receiver()
    d = await daemon([endpoint("r", r)])
    for method, path, kw, status, error, field in BAD_INPUTS:
        got_status, body = await d.request(method, path, **kw)
        assert got_status == status, (method, path, got_status, body)
        assert isinstance(body, dict) and error.lower() in body["error"].lower(), (path, body)
        assert body.get("field") == field, (path, body)
        assert "Traceback" not in json.dumps(body)
    _, devices = await d.admin("GET", "/v1/devices")
    assert devices == []
    assert r.attempts == 0


async def test_tokens_required_when_configured(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    r = await receiver()
    d = await daemon([endpoint("r", r)], listen={"tokens": ["t0ken-one", "t0ken-two"]})
    status, body = await d.request("POST", "/v1/heartbeat", json={"device": "a"})
    assert status == 401 and "token" in body["error"]
    status, _ = await d.request(
        "POST", "/v1/heartbeat", json={"device": "a"}, headers={"Authorization": "Bearer wrong"}
    )
    assert status == 401
    status, body = await d.request(
        "POST", "/v1/heartbeat", json={"device": "a"}, headers={"Authorization": "Bearer t0ken-two"}
    )
    assert status == 200 and body["changed"] is True
    status, body = await d.request("GET", "/v1/heartbeat/b?token=t0ken-one&state=utilizing")
    assert status == 200 and body == {"device": "b", "state": "utilizing", "changed": True}
    status, _ = await d.request("POST", "/v1/heartbeat/c?token=t0ken-one")
    assert status == 401  # ?token= is for GET only
    assert "t0ken" not in d.logs_text()


async def test_batch_and_per_device_path(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    r = await receiver()
    d = await daemon([endpoint("r", r)])
    status, body = await d.request(
        "POST",
        "/v1/heartbeats",
        json=[{"device": "a"}, {"device": "b", "state": "utilizing", "address": "10.1.2.3"}, {"device": "a"}],
    )
    assert status == 200
    assert body == [
        {"device": "a", "state": "online", "changed": True},
        {"device": "b", "state": "utilizing", "changed": True},
        {"device": "a", "state": "online", "changed": False},
    ]
    status, body = await d.request("POST", "/v1/heartbeat/c")
    assert status == 200 and body["changed"] is True
    status, body = await d.request("GET", "/v1/heartbeat/c?state=unplugged")
    assert body == {"device": "c", "state": "unplugged", "changed": True}
    status, body = await d.request("GET", "/healthz")
    assert (status, body) == (200, {"status": "ok"})
    _, dev = await d.admin("GET", "/v1/devices/b")
    assert dev["address"] == "10.1.2.3" and dev["state"] == "utilizing"
    await r.wait_for(4)


async def test_retries_carry_the_same_id_and_a_growing_attempt_number(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    calls = 0

    def flaky(_req: object) -> int:
        nonlocal calls
        calls += 1
        return 503 if calls < 3 else 200

    seen: list[tuple[str, str]] = []
    r = await receiver(start=False)
    r.status = lambda req: (seen.append((req.headers["Webhook-Id"], req.headers["Webhook-Attempt"])), flaky(req))[1]
    await r.start()
    d = await daemon([endpoint("r", r)])
    await d.heartbeat("a")
    await r.wait_for(1, timeout=10)
    assert [a for _, a in seen] == ["1", "2", "3"]
    assert len({i for i, _ in seen}) == 1
    stripe.WebhookSignature.verify_header(r.got[0].body.decode(), r.got[0].headers["Webhookd-Signature"], SECRET, 300)


async def test_dead_after_schedule_then_replay(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    ok = False
    r = await receiver(status=lambda _req: 200 if ok else 500)
    d = await daemon([endpoint("r", r)], delivery={"retry_schedule": ["100ms", "100ms"]})
    await d.heartbeat("a")
    await eventually_admin(d, lambda eps: eps[0]["dead"] == 1)
    assert r.attempts == 3  # len(retry_schedule) + 1 attempts, then dead
    ok = True
    out = await d.cli("deliveries", "replay", "--endpoint", "r", "--status", "dead")
    assert out.returncode == 0, out.stderr
    await r.wait_for(1)
    _, _eps = await eventually_admin(d, lambda eps: eps[0]["delivered"] == 1)


async def test_cli_against_running_daemon_and_without_one(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    r = await receiver()
    d = await daemon([endpoint("r", r)])
    await d.heartbeat("lab-1", name="Lab one")
    await r.wait_for(1)
    await eventually_admin(d, lambda eps: eps[0]["delivered"] == 1)  # recorded as delivered, for `deliveries`
    # The read-only commands run concurrently (each is a Python start-up).
    status_out, devices_out, endpoints_out, deliveries_out, table_out = await asyncio.gather(
        d.cli("status", "--json"),
        d.cli("devices", "--json"),
        d.cli("endpoints", "--json"),
        d.cli("deliveries", "--json", "--status", "delivered"),
        d.cli("endpoints"),
    )
    out = status_out
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["devices"]["online"] == 1 and status["endpoints"]["enabled"] == 1
    out = devices_out
    devices = json.loads(out.stdout)
    assert devices[0]["id"] == "lab-1" and devices[0]["last_seen"].endswith("Z")
    assert set(devices[0]) == {"id", "name", "state", "address", "owner", "last_seen", "muted", "muted_until", "source"}
    assert devices[0]["muted"] is False and devices[0]["muted_until"] is None
    out = endpoints_out
    eps = json.loads(out.stdout)
    assert set(eps[0]) == {
        "name",
        "url",
        "enabled",
        "disabled_reason",
        "consecutive_failures",
        "pending",
        "held",
        "delivered",
        "dead",
        "last_error",
    }
    out = deliveries_out
    rows = json.loads(out.stdout)
    assert rows[0]["status"] == "delivered" and rows[0]["device"] == "lab-1"
    out = table_out
    assert out.returncode == 0 and "r" in out.stdout
    assert all(len(line) <= 100 for line in out.stdout.splitlines())
    out = await d.cli("endpoints", "test", "r")
    assert out.returncode == 0 and "200" in out.stdout
    assert r.got[-1].json["type"] == "webhook.test" and r.got[-1].json["device"]["id"] == "webhookd-test"
    out = await d.cli("endpoints", "disable", "r")
    assert out.returncode == 0
    _, eps = await d.admin("GET", "/v1/endpoints")
    assert eps[0]["enabled"] is False and eps[0]["disabled_reason"] == "operator"
    out = await d.cli("endpoints", "enable", "nope")
    assert out.returncode != 0 and "nope" in out.stderr + out.stdout
    assert await d.stop() == 0
    out = await d.cli("status")
    assert out.returncode == 3 and "not running" in out.stderr
    assert "Traceback" not in out.stderr


def test_tune_gc_freezes_what_startup_loaded_and_raises_the_thresholds() -> None:
    import gc

    from webhookd.lifecycle import GC_THRESHOLDS, tune_gc

    before = gc.get_threshold()
    loaded = [object() for _ in range(10)]  # stands for the devices and deliveries read at startup
    try:
        tune_gc()
        assert gc.get_freeze_count() >= len(loaded)
        assert gc.get_threshold() == GC_THRESHOLDS
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
