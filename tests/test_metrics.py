"""`GET /metrics` on the admin socket: the real daemon moving real counters, and the collector on fakes."""

from __future__ import annotations

import asyncio
import platform
import time
from types import SimpleNamespace
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import Daemon, endpoint
from webhookd import __version__
from webhookd.dispatch import AttemptResult
from webhookd.metrics import Metrics
from webhookd.store import EndpointRow

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate series {key}"
            out[key] = s.value
    return out


def get(m: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in m, f"no series {name}{labels}"
    return m[key]


async def scrape(d: Daemon) -> Samples:
    conn = aiohttp.UnixConnector(path=str(d.tmp / "admin.sock"))
    async with aiohttp.ClientSession(connector=conn) as s, s.get("http://webhookd/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse(await r.text())


async def scrape_until(d: Daemon, check: Any, timeout: float = 15.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        m = await scrape(d)
        if check(m):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(
                f"metrics never satisfied the check: { {k: v for k, v in m.items() if 'webhookd' in k[0]} }"
            )
        await asyncio.sleep(0.05)


async def test_metrics_follow_heartbeats_events_and_deliveries(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    flaky = await receiver()
    down = await receiver(status=lambda _r: 500)
    gone = await receiver(status=lambda _r: 410)
    ok = await receiver()
    flaky.status = lambda _r: 500 if flaky.attempts == 1 else 200  # the first attempt fails, then all succeed
    d = await daemon(
        [
            endpoint("flaky", flaky),
            endpoint("down", down, devices=["dev-1"], events=["online"]),
            endpoint("gone", gone, devices=["dev-2"]),
            endpoint("ok", ok),
        ],
    )
    m = await scrape(d)
    assert get(m, "webhookd_heartbeats_total", transport="http") == 0
    assert ("webhookd_heartbeats_total", (("transport", "udp"),)) not in m  # no UDP listener configured
    for state in ("online", "utilizing", "unplugged", "offline"):
        assert get(m, "webhookd_devices", state=state) == 0
    assert get(m, "webhookd_build_info", version=__version__, python=platform.python_version()) == 1
    assert get(m, "webhookd_uptime_seconds") > 0
    assert get(m, "webhookd_store_healthy") == 1
    for name in ("flaky", "down", "gone", "ok"):
        assert get(m, "webhookd_endpoint_disabled", endpoint=name) == 0
        assert get(m, "webhookd_endpoint_consecutive_failures", endpoint=name) == 0
        assert get(m, "webhookd_deliveries", endpoint=name, status="pending") == 0
    assert any(k[0] == "process_resident_memory_bytes" for k in m)

    await d.heartbeat("dev-1")  # device.online
    await d.heartbeat("dev-1")  # nothing changes
    await d.heartbeat("dev-2", state="utilizing")  # device.utilizing
    await d.heartbeat("dev-3", state="unplugged")  # device.unplugged
    await d.heartbeat("dev-4", state="shutdown")  # first seen offline: no event
    status, _ = await d.request(
        "POST", "/v1/heartbeats", json=[{"device": "dev-1"}, {"device": "dev-5"}, {"device": "dev-6"}]
    )
    assert status == 200
    # Rejections, each a 4xx answer.
    bad_json = {"data": b"{", "headers": {"Content-Type": "application/json"}}
    assert (await d.request("POST", "/v1/heartbeat", **bad_json))[0] == 400
    assert (await d.request("POST", "/v1/heartbeat", json={"device": "x", "color": "red"}))[0] == 400
    assert (await d.request("POST", "/v1/heartbeat", data=b"{}", headers={"Content-Type": "text/plain"}))[0] == 415

    await flaky.wait_for(5)
    await ok.wait_for(5)

    def settled(m: Samples) -> bool:
        def n(name: str, **labels: str) -> float:
            return m.get((name, tuple(sorted(labels.items()))), 0.0)

        return (
            n("webhookd_deliveries", endpoint="flaky", status="delivered") == 5
            and n("webhookd_deliveries", endpoint="ok", status="delivered") == 5
            and n("webhookd_deliveries", endpoint="down", status="dead") == 1
            and n("webhookd_deliveries", endpoint="gone", status="held") == 1
        )

    m = await scrape_until(d, settled)
    assert get(m, "webhookd_heartbeats_total", transport="http") == 8
    assert get(m, "webhookd_heartbeat_rejected_total", status="400") == 2
    assert get(m, "webhookd_heartbeat_rejected_total", status="415") == 1
    assert get(m, "webhookd_events_total", type="device.online") == 3
    assert get(m, "webhookd_events_total", type="device.utilizing") == 1
    assert get(m, "webhookd_events_total", type="device.unplugged") == 1
    assert get(m, "webhookd_devices", state="online") == 3
    assert get(m, "webhookd_devices", state="utilizing") == 1
    assert get(m, "webhookd_devices", state="unplugged") == 1
    assert get(m, "webhookd_devices", state="offline") == 1

    # Attempt outcomes: 500 then 200 (flaky), 500 until out of retries (down), 410 (gone).
    assert get(m, "webhookd_deliveries_total", endpoint="flaky", outcome="failed") == 1
    assert get(m, "webhookd_deliveries_total", endpoint="flaky", outcome="delivered") == 5
    assert get(m, "webhookd_deliveries_total", endpoint="ok", outcome="delivered") == 5
    assert get(m, "webhookd_deliveries_total", endpoint="down", outcome="failed") == 3
    assert get(m, "webhookd_deliveries_total", endpoint="down", outcome="dead") == 1
    assert get(m, "webhookd_deliveries_total", endpoint="gone", outcome="held") == 1
    assert get(m, "webhookd_endpoint_disabled", endpoint="gone") == 1
    assert get(m, "webhookd_endpoint_consecutive_failures", endpoint="gone") == 1
    assert get(m, "webhookd_endpoint_consecutive_failures", endpoint="flaky") == 0

    # One histogram observation per attempt.
    for name, attempts in (("flaky", 6), ("ok", 5), ("down", 4), ("gone", 1)):
        assert get(m, "webhookd_delivery_duration_seconds_count", endpoint=name) == attempts
        assert get(m, "webhookd_delivery_duration_seconds_bucket", endpoint=name, le="+Inf") == attempts
        assert get(m, "webhookd_delivery_duration_seconds_sum", endpoint=name) > 0
    assert get(m, "webhookd_delivery_duration_seconds_bucket", endpoint="ok", le="10.0") == 5
    assert get(m, "webhookd_store_write_seconds_count") >= 5  # at least the five events' transactions
    assert get(m, "webhookd_store_write_seconds_sum") > 0

    # Operator disable: the gauge flips, and a new event for that endpoint is held, not attempted.
    status, _ = await d.admin("POST", "/v1/endpoints/ok/disable")
    assert status == 200
    m = await scrape(d)
    assert get(m, "webhookd_endpoint_disabled", endpoint="ok") == 1
    assert get(m, "webhookd_endpoint_disabled", endpoint="flaky") == 0
    await d.heartbeat("dev-7")
    await flaky.wait_for(6)
    m = await scrape(d)
    assert get(m, "webhookd_deliveries", endpoint="ok", status="held") == 1
    assert get(m, "webhookd_events_total", type="device.online") == 4
    assert get(m, "webhookd_heartbeats_total", transport="http") == 9
    assert ok.attempts == 5

    status, _ = await d.admin("POST", "/v1/endpoints/ok/enable")
    assert status == 200
    m = await scrape_until(
        d, lambda m: m.get(("webhookd_deliveries_total", (("endpoint", "ok"), ("outcome", "delivered")))) == 6
    )
    assert get(m, "webhookd_endpoint_disabled", endpoint="ok") == 0


# --- the collector on fakes --------------------------------------------------------------------------------


class FakeStore:
    def __init__(self) -> None:
        self.healthy = True
        self.on_write: Any = None
        self.counts: dict[str, dict[str, int]] | Exception = {}

    async def delivery_counts(self) -> dict[str, dict[str, int]]:
        if isinstance(self.counts, Exception):
            raise self.counts
        return self.counts


def fake_daemon() -> tuple[Metrics, SimpleNamespace]:
    engine = SimpleNamespace(counts=lambda: {"online": 2, "utilizing": 0, "unplugged": 1, "offline": 4})
    store = FakeStore()
    a = SimpleNamespace(row=EndpointRow("a"))
    b = SimpleNamespace(row=EndpointRow("b", disabled=True, disabled_reason="operator", consecutive_failures=3))
    dispatcher = SimpleNamespace(endpoints={"a": a, "b": b}, on_result=None, on_outcome=None, hub=None)
    tracker = SimpleNamespace(on_event=None)
    api = SimpleNamespace(on_heartbeats=None, on_rejected=None)
    now = [1000.0]
    metrics = Metrics(engine, store, dispatcher, 990.0, clock=lambda: now[0], process=False)  # type: ignore[arg-type]
    metrics.attach(tracker, api)  # type: ignore[arg-type]
    parts = SimpleNamespace(engine=engine, store=store, dispatcher=dispatcher, tracker=tracker, api=api, now=now)
    return metrics, parts


async def test_collector_and_hooks_on_fakes() -> None:
    metrics, p = fake_daemon()
    # Hooks are pre-bound callables; the components call them as they would in the daemon.
    p.api.on_heartbeats(3)
    p.api.on_heartbeats(1)
    p.api.on_rejected(401)
    p.api.on_rejected(401)
    p.tracker.on_event("device.online")
    for status in ("pending", "pending", "delivered", "dead", "held"):
        p.dispatcher.on_result("a", AttemptResult(status == "delivered", 200, None, 0.02))
        p.dispatcher.on_outcome("a", status)
    p.store.on_write(0.003)
    p.store.counts = {"a": {"pending": 2, "delivered": 7}, "removed": {"held": 5}}

    m = parse((await metrics.render()).decode())
    assert get(m, "webhookd_heartbeats_total", transport="http") == 4
    assert get(m, "webhookd_heartbeat_rejected_total", status="401") == 2
    assert get(m, "webhookd_events_total", type="device.online") == 1
    assert get(m, "webhookd_deliveries_total", endpoint="a", outcome="failed") == 2  # persisted "pending"
    for outcome in ("delivered", "dead", "held"):
        assert get(m, "webhookd_deliveries_total", endpoint="a", outcome=outcome) == 1
    assert get(m, "webhookd_delivery_duration_seconds_count", endpoint="a") == 5
    assert get(m, "webhookd_delivery_duration_seconds_bucket", endpoint="a", le="0.01") == 0
    assert get(m, "webhookd_delivery_duration_seconds_bucket", endpoint="a", le="0.025") == 5
    assert get(m, "webhookd_store_write_seconds_bucket", le="0.005") == 1
    assert get(m, "webhookd_devices", state="online") == 2
    assert get(m, "webhookd_devices", state="offline") == 4
    assert get(m, "webhookd_deliveries", endpoint="a", status="pending") == 2
    assert get(m, "webhookd_deliveries", endpoint="a", status="delivered") == 7
    assert get(m, "webhookd_deliveries", endpoint="b", status="pending") == 0  # configured: always exported
    assert get(m, "webhookd_deliveries", endpoint="removed", status="held") == 5  # rows of a removed endpoint
    assert get(m, "webhookd_endpoint_disabled", endpoint="a") == 0
    assert get(m, "webhookd_endpoint_disabled", endpoint="b") == 1
    assert get(m, "webhookd_endpoint_consecutive_failures", endpoint="b") == 3
    assert get(m, "webhookd_uptime_seconds") == 10.0
    assert get(m, "webhookd_store_healthy") == 1

    # A sick store: the scrape still answers, without the store-read gauge.
    p.store.healthy = False
    p.store.counts = OSError("disk I/O error")
    m = parse((await metrics.render()).decode())
    assert get(m, "webhookd_store_healthy") == 0
    assert not any(k[0] == "webhookd_deliveries" for k in m)
    assert get(m, "webhookd_heartbeats_total", transport="http") == 4


async def test_udp_counters_are_read_at_scrape_time() -> None:
    metrics, _ = fake_daemon()
    udp = SimpleNamespace(received=0, rejected=0, dropped=0, failed=0, inflight=0, rejected_by={"empty": 0})
    metrics.udp = lambda: udp  # type: ignore[assignment,return-value]
    m = parse((await metrics.render()).decode())
    assert get(m, "webhookd_heartbeats_total", transport="udp") == 0

    assert get(m, "webhookd_udp_datagrams_rejected_total", reason="empty") == 0

    udp.received, udp.rejected, udp.dropped, udp.inflight = 10, 2, 1, 2
    udp.rejected_by = {"empty": 1, "invalid": 1}
    m = parse((await metrics.render()).decode())
    assert get(m, "webhookd_heartbeats_total", transport="udp") == 5
    assert get(m, "webhookd_udp_datagrams_total", result="received") == 10
    assert get(m, "webhookd_udp_datagrams_total", result="rejected") == 2
    assert get(m, "webhookd_udp_inflight") == 2
    assert get(m, "webhookd_udp_datagrams_rejected_total", reason="empty") == 1
    assert get(m, "webhookd_udp_datagrams_rejected_total", reason="invalid") == 1

    # A failed heartbeat is counted before it leaves the in-flight set: the counter must not go back...
    udp.failed = 1
    m = parse((await metrics.render()).decode())
    assert get(m, "webhookd_heartbeats_total", transport="udp") == 5
    # ...nor count it twice once it has left.
    udp.inflight = 0
    m = parse((await metrics.render()).decode())
    assert get(m, "webhookd_heartbeats_total", transport="udp") == 6


def test_each_daemon_has_its_own_registry() -> None:
    first, _ = fake_daemon()
    second, _ = fake_daemon()  # the global registry would refuse the second set of names
    first.on_event("device.offline")
    assert second.registry is not first.registry


async def test_no_created_series_beside_the_counters() -> None:
    metrics, _ = fake_daemon()
    metrics.on_event("device.offline")
    metrics.on_rejected(400)
    metrics.on_result("a", AttemptResult(True, 200, None, 0.01))
    metrics.on_outcome("a", "delivered")
    metrics.store_write.observe(0.001)
    text = (await metrics.render()).decode()
    assert not [line for line in text.splitlines() if "_created" in line]
    types = {line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE ")}
    for name in ("heartbeats", "heartbeat_rejected", "events", "deliveries"):  # every counter still there
        assert types.get(f"webhookd_{name}_total") == "counter", name
    for name in ("delivery_duration_seconds", "store_write_seconds"):
        assert types.get(f"webhookd_{name}") == "histogram", name
    m = parse(text)
    assert get(m, "webhookd_events_total", type="device.offline") == 1
    assert get(m, "webhookd_heartbeat_rejected_total", status="400") == 1
    assert get(m, "webhookd_deliveries_total", endpoint="a", outcome="delivered") == 1
