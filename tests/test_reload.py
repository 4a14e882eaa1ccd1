"""SIGHUP reload against the real daemon (CONTRACT §3, §7): endpoint sets, broken files, presence timeouts, log
levels and the disabled state, with deliveries queued across every step."""

from __future__ import annotations

import asyncio
import copy
import signal
import time
from pathlib import Path
from typing import Any

import standardwebhooks
import yaml

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import SECRET, Daemon, NotifySocket, Received, Receiver, endpoint, eventually

SECRET_2 = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk="
SLOW_RETRIES = {"retry_schedule": ["300ms"] * 20}  # a down receiver keeps its deliveries pending for ~6 s


async def reload(d: Daemon, ns: NotifySocket) -> list[dict[str, Any]]:
    """SIGHUP, wait for the reload to finish (RELOADING=1 ... READY=1); the log records it wrote."""
    logs_before, mark = len(d.logs()), len(ns.messages)
    d.signal(signal.SIGHUP)
    started = await ns.wait_for("RELOADING", "1", since=mark)
    await ns.wait_for("READY", "1", since=ns.messages.index(started) + 1)
    return d.logs()[logs_before:]


def events_named(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("event") == name]


async def endpoints_by_name(d: Daemon) -> dict[str, dict[str, Any]]:
    status, body = await d.admin("GET", "/v1/endpoints")
    assert status == 200, body
    return {ep["name"]: ep for ep in body}


async def wait_endpoint(d: Daemon, name: str, timeout: float = 10.0, **expected: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        ep = (await endpoints_by_name(d)).get(name)
        if ep is not None and all(ep[k] == v for k, v in expected.items()):
            return ep
        if time.monotonic() > deadline:
            raise AssertionError(f"endpoint {name} never reached {expected}: {ep}")
        await asyncio.sleep(0.05)


def device_states(r: Receiver) -> list[tuple[str, str]]:
    return [(e["device"]["id"], e["device"]["state"]) for e in r.events()]


async def test_reload_changes_the_endpoint_set_without_losing_queued_deliveries(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    a = await receiver(start=False)  # down: A's deliveries stay pending
    b = await receiver()
    d = await daemon([endpoint("A", a)], start=False, delivery=SLOW_RETRIES)
    async with NotifySocket(tmp_path) as ns:
        await d.start(env=ns.env())
        await d.heartbeat("dev-1")
        await d.heartbeat("dev-2")
        await d.heartbeat("dev-1", state="utilizing")
        await wait_endpoint(d, "A", pending=3)
        await eventually(lambda: any(r["event"] == "delivery_failed" for r in d.logs()))

        # A removed, B added: A's undelivered rows are held, not dropped and not dead.
        d.cfg["endpoints"] = [endpoint("B", b)]
        d.write_config()
        records = await reload(d, ns)
        assert events_named(records, "endpoint_removed")[0]["held"] == 3
        reloaded = events_named(records, "config_reloaded")[0]
        assert reloaded["endpoints"] == ["B"]
        # what changed, by name (webhookd.lifecycle.changes)
        assert (reloaded["changed"], reloaded["endpoints_added"], reloaded["endpoints_removed"]) == (
            ["endpoints"],
            ["B"],
            ["A"],
        )
        eps = await endpoints_by_name(d)
        assert eps["A"]["enabled"] is False and eps["A"]["disabled_reason"] == "not in config"
        assert (eps["A"]["pending"], eps["A"]["held"], eps["A"]["dead"], eps["A"]["delivered"]) == (0, 3, 0, 0)
        assert eps["B"]["enabled"] is True and eps["B"]["pending"] == 0
        status, held = await d.admin("GET", "/v1/deliveries?status=held")
        assert status == 200
        assert sorted((r["endpoint"], r["device"], r["type"]) for r in held) == [
            ("A", "dev-1", "device.online"),
            ("A", "dev-1", "device.utilizing"),
            ("A", "dev-2", "device.online"),
        ]
        held_events = {r["event_id"] for r in held}

        # New events go to B only; A gets no new rows and no attempts, even once its receiver is up.
        await d.heartbeat("dev-3")
        await b.wait_for(1)
        assert device_states(b) == [("dev-3", "online")]
        await a.start()
        await asyncio.sleep(0.7)
        assert a.attempts == 0
        eps = await endpoints_by_name(d)
        assert eps["A"]["held"] == 3 and eps["B"]["delivered"] == 1

        # A comes back under the same name: what it had held is delivered, in order per device.
        d.cfg["endpoints"] = [endpoint("A", a), endpoint("B", b)]
        d.write_config()
        await reload(d, ns)
        await a.wait_for(3)
        await wait_endpoint(d, "A", delivered=3, held=0, pending=0, dead=0, enabled=True)
        assert {x.headers["Webhook-Id"] for x in a.got} == held_events
        assert [s for dev, s in device_states(a) if dev == "dev-1"] == ["online", "utilizing"]
        assert len(b.got) == 1  # B did not get A's backlog

        await d.heartbeat("dev-2", state="shutdown")
        await a.wait_for(4)
        await b.wait_for(2)
        assert device_states(a)[-1] == device_states(b)[-1] == ("dev-2", "offline")
        assert await d.stop() == 0


async def test_reload_of_an_endpoint_config_applies_to_its_pending_retries(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    def only_second_secret(req: Received) -> int:
        try:
            standardwebhooks.Webhook(SECRET_2).verify(req.body, dict(req.headers))
        except standardwebhooks.WebhookVerificationError:
            return 401
        return 200

    r = await receiver(status=only_second_secret)
    d = await daemon([endpoint("r", r, signature="standard-webhooks")], start=False, delivery=SLOW_RETRIES)
    async with NotifySocket(tmp_path) as ns:
        await d.start(env=ns.env())
        for state in (None, "utilizing", "unplugged"):
            await d.heartbeat("dev", state)
        await eventually(lambda: r.attempts >= 2)
        assert r.got == []
        # the secret is rotated: the queued retries are re-signed with the new one
        d.cfg["endpoints"] = [endpoint("r", r, signature="standard-webhooks", secret=SECRET_2)]
        d.write_config()
        await reload(d, ns)
        await r.wait_for(3)
        assert [s for _, s in device_states(r)] == ["online", "utilizing", "unplugged"]
        await wait_endpoint(d, "r", delivered=3, pending=0, consecutive_failures=0)


async def test_broken_reload_keeps_the_old_config_running(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    r = await receiver()
    # Each broken reload logs an error-level config_reload_failed, on purpose.
    d = await daemon([endpoint("r", r)], start=False, allow_errors=True)
    good = copy.deepcopy(d.cfg)
    async with NotifySocket(tmp_path) as ns:
        await d.start(env=ns.env())
        await d.heartbeat("before")
        await r.wait_for(1)

        # 1. not YAML at all
        d.config_path.write_text("endpoints: [\n  - {name: r\n")
        records = await reload(d, ns)
        failed = events_named(records, "config_reload_failed")
        assert len(failed) == 1 and failed[0]["level"] == "error"
        assert any("invalid YAML at line 2" in p for p in failed[0]["problems"]), failed
        assert not events_named(records, "config_reloaded")
        await d.heartbeat("after-bad-yaml")
        await r.wait_for(2)

        # 2. valid YAML with unknown keys, and a new endpoint set that must not take effect
        bad = copy.deepcopy(good)
        bad["delivery"]["concurency"] = 4
        bad["endpoints"] = [{**endpoint("other", r), "evnts": ["all"]}]
        d.config_path.write_text(yaml.safe_dump(bad))
        records = await reload(d, ns)
        problems = events_named(records, "config_reload_failed")[0]["problems"]
        assert any(p.startswith("delivery.concurency: unknown key") for p in problems), problems
        assert any(p.startswith("endpoints[0].evnts: unknown key") for p in problems), problems
        assert SECRET not in d.logs_text()
        assert list(await endpoints_by_name(d)) == ["r"]
        assert (await d.request("GET", "/healthz"))[0] == 200
        await d.heartbeat("after-bad-keys")
        await r.wait_for(3)
        assert [dev for dev, _ in device_states(r)] == ["before", "after-bad-yaml", "after-bad-keys"]
        out = await d.cli("status", "--json")  # the operator still reaches the daemon
        assert out.returncode == 0, out.stderr
        assert d.proc is not None and d.proc.poll() is None

        # 3. fixed: the next reload applies
        d.cfg = good
        d.cfg["endpoints"] = [endpoint("r", r), endpoint("r2", r)]
        d.write_config()
        records = await reload(d, ns)
        assert events_named(records, "config_reloaded")[0]["endpoints"] == ["r", "r2"]
        await d.heartbeat("fixed")
        await r.wait_for(5)
        assert await d.stop() == 0


async def test_reload_of_silence_timeouts_takes_effect_on_running_timers(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    r = await receiver()
    d = await daemon([endpoint("r", r)], start=False, presence={"silence_timeout": "1500ms"})
    async with NotifySocket(tmp_path) as ns:
        await d.start(env=ns.env())
        await d.heartbeat("lab-1")
        await d.heartbeat("printer-1")
        last_heartbeat = time.monotonic()
        await r.wait_for(2)
        # longer globally, shorter for printers
        d.cfg["presence"] = {"silence_timeout": "1h"}
        d.cfg["devices"] = [{"match": "printer-*", "silence_timeout": "1s"}]
        d.write_config()
        reloaded = events_named(await reload(d, ns), "config_reloaded")[0]
        assert reloaded["silence_timeout"] == [1.5, 3600.0]
        assert reloaded["device_rules_changed"] == ["printer-*"]
        await r.wait_for(3, timeout=5)
        offline = r.got[2]
        assert offline.json["type"] == "device.offline" and offline.json["device"]["id"] == "printer-1"
        assert offline.json["reason"] == "timeout"
        assert 0.95 <= offline.at - last_heartbeat < 2.0
        await asyncio.sleep(2.0 - (time.monotonic() - last_heartbeat))
        assert len(r.got) == 3  # lab-1 is past its old 1.5 s deadline, yet online under the new 1 h

        # shorter globally: lab-1 has been silent for more than that already, so it goes offline at once
        d.cfg["presence"] = {"silence_timeout": "1s"}
        d.write_config()
        await reload(d, ns)
        reloaded = time.monotonic()
        await r.wait_for(4, timeout=5)
        assert r.got[3].json["device"]["id"] == "lab-1" and r.got[3].json["type"] == "device.offline"
        assert r.got[3].at - reloaded < 1.0


async def test_reload_of_the_log_level_takes_effect(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    r = await receiver()
    # The bad level's config_reload_failed is an error-level line, on purpose.
    d = await daemon([endpoint("r", r)], start=False, allow_errors=True, logging={"format": "json", "level": "info"})
    async with NotifySocket(tmp_path) as ns:
        await d.start(env=ns.env())
        await d.heartbeat("one")
        await r.wait_for(1)
        assert [x["device"] for x in events_named(d.logs(), "device_online")] == ["one"]

        d.cfg["logging"]["level"] = "warning"
        d.write_config()
        await reload(d, ns)
        mark = len(d.logs())
        await d.heartbeat("two")
        await r.wait_for(2)
        await asyncio.sleep(0.2)
        d.config_path.write_text("logging: {level: loud}\n")  # an error is still logged at warning
        await reload(d, ns)
        after = d.logs()[mark:]
        assert [x["event"] for x in after] == ["config_reload_failed"], after

        d.cfg["logging"]["level"] = "info"
        d.write_config()
        records = await reload(d, ns)
        reloaded = events_named(records, "config_reloaded")[0]
        assert (reloaded["changed"], reloaded["log_level"]) == (["logging.level"], ["warning", "info"])
        await d.heartbeat("three")
        await r.wait_for(3)
        await eventually(lambda: len(events_named(d.logs(), "device_online")) == 2)
        assert [x["device"] for x in events_named(d.logs(), "device_online")] == ["one", "three"]


async def test_disabled_endpoint_stays_disabled_across_reloads_and_restarts(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    r = await receiver()
    d = await daemon([endpoint("r", r)], start=False)
    async with NotifySocket(tmp_path) as ns:
        await d.start(env=ns.env())
        status, _ = await d.admin("POST", "/v1/endpoints/r/disable")
        assert status == 200
        await d.heartbeat("a")
        await wait_endpoint(d, "r", held=1)

        # the endpoint's settings change: still disabled
        d.cfg["endpoints"] = [endpoint("r", r, description="moved", timeout="3s")]
        d.write_config()
        await reload(d, ns)
        await wait_endpoint(d, "r", enabled=False, disabled_reason="operator", held=1)

        # removed, then back under the same name: still disabled, new events held
        d.cfg["endpoints"] = []
        d.write_config()
        await reload(d, ns)
        await d.heartbeat("b")  # no endpoint: recorded for nobody
        d.cfg["endpoints"] = [endpoint("r", r)]
        d.write_config()
        await reload(d, ns)
        await d.heartbeat("c")
        await wait_endpoint(d, "r", enabled=False, disabled_reason="operator", held=2, pending=0)

    # a restart, then another reload
    assert await d.stop() == 0
    async with NotifySocket(tmp_path) as ns:
        await d.start(env=ns.env())
        await wait_endpoint(d, "r", enabled=False, disabled_reason="operator", held=2)
        await reload(d, ns)
        await d.heartbeat("a", state="utilizing")
        await wait_endpoint(d, "r", enabled=False, held=3)
        await asyncio.sleep(0.3)
        assert r.attempts == 0

        status, _ = await d.admin("POST", "/v1/endpoints/r/enable")
        assert status == 200
        await r.wait_for(3)
        assert sorted(device_states(r)) == [("a", "online"), ("a", "utilizing"), ("c", "online")]
        assert [s for dev, s in device_states(r) if dev == "a"] == ["online", "utilizing"]
        await wait_endpoint(d, "r", enabled=True, delivered=3, held=0)


async def test_restart_only_keys_keep_their_running_values_until_a_restart(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    r = await receiver()
    d = await daemon([endpoint("r", r)], start=False)
    running_port, admin_sock = d.port, tmp_path / "admin.sock"
    batch = [{"device": f"dev-{i}", "owner": "x" * 40} for i in range(40)]  # about 2.5 KiB
    async with NotifySocket(tmp_path) as ns:
        await d.start(env=ns.env())
        d.cfg["listen"] = {"http": f"127.0.0.1:{d.port + 1}", "max_body": "1KiB"}
        d.cfg["admin"] = {"socket": str(tmp_path / "elsewhere.sock")}
        d.cfg["endpoints"] = [endpoint("r", r), endpoint("r2", r)]
        d.write_config()
        for _ in range(2):  # the warning repeats while the running values differ from the file's
            records = await reload(d, ns)
            warned = events_named(records, "config_restart_required")
            assert len(warned) == 1 and warned[0]["level"] == "warning", records
            assert sorted(warned[0]["keys"]) == ["admin.socket", "listen.http", "listen.max_body"]
            assert events_named(records, "config_reloaded")[0]["endpoints"] == ["r", "r2"]
            # still the old listener, the old body limit and the old admin socket
            status, body = await d.request("POST", "/v1/heartbeats", json=batch)
            assert status == 200, body
            assert (await endpoints_by_name(d)).keys() == {"r", "r2"}
        assert not (tmp_path / "elsewhere.sock").exists()
        assert await d.stop() == 0
        assert not admin_sock.exists()  # the socket it created is the one it removes
        assert d.port == running_port
