"""Prometheus metrics for `GET /metrics` on the admin socket (CONTRACT §8).

Two kinds of numbers:
- counters and histograms moved on the hot paths (heartbeats, events, delivery attempts, store batches). The
  components expose plain callback attributes; `Metrics.attach` points them at pre-bound children, so a
  heartbeat costs one `inc` and a delivery one dict lookup, one `observe` and one `inc`;
- gauges of current state (devices by state, deliveries by status, endpoint health, store health, uptime),
  computed only when scraped by `_StateCollector` from the engine, the dispatcher and the store.

Everything lives in a per-daemon `CollectorRegistry`, never the process-global one. No `_created` series:
prometheus_client has no per-registry switch, so `Metrics` turns them off with its documented process-wide one
(`disable_created_metrics()`, read at every collect; the env var PROMETHEUS_DISABLE_CREATED_SERIES is the same).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from webhookd import __version__
from webhookd.logs import get_logger
from webhookd.states import DELIVERY_STATUSES
from webhookd.states import DEVICE_STATES as STATES

if TYPE_CHECKING:
    from webhookd.dispatch import AttemptResult, Dispatcher
    from webhookd.listener import HeartbeatAPI
    from webhookd.mqtt.client import MqttPresence
    from webhookd.presence import PresenceEngine
    from webhookd.store import DeliveryStore
    from webhookd.tracker import Tracker
    from webhookd.udp import UDPListener

log = get_logger("webhookd.metrics")

NS = "webhookd"
# Persisted delivery status after an attempt -> the attempt's outcome label.
_OUTCOME_OF = {"delivered": "delivered", "pending": "failed", "dead": "dead", "held": "held"}
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EndpointChildren:
    """The pre-bound children of one endpoint, created on its first attempt."""

    __slots__ = ("duration", "outcomes")

    def __init__(self, m: Metrics, endpoint: str) -> None:
        self.duration = m.delivery_duration.labels(endpoint)
        self.outcomes = {status: m.deliveries.labels(endpoint, outcome).inc for status, outcome in _OUTCOME_OF.items()}


class Metrics:
    def __init__(
        self,
        engine: PresenceEngine,
        store: DeliveryStore,
        dispatcher: Dispatcher,
        started_mono: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        process: bool = True,
    ) -> None:
        self.engine = engine
        self.store = store
        self.dispatcher = dispatcher
        self.started_mono = started_mono
        self._clock = clock
        # No `_created` beside every counter and histogram (noise to an operator); see the module docstring.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = r = CollectorRegistry()
        self.heartbeats = Counter(f"{NS}_heartbeats", "Heartbeats accepted and applied.", ["transport"], registry=r)
        self.rejected = Counter(
            f"{NS}_heartbeat_rejected", "Heartbeat requests answered with a 4xx error.", ["status"], registry=r
        )
        self.events = Counter(f"{NS}_events", "Events recorded in the outbox.", ["type"], registry=r)
        self.suppressed = Counter(
            f"{NS}_events_suppressed",
            "Events recorded without deliveries, by why (muted: the device was muted).",
            ["reason"],
            registry=r,
        )
        self.suppressed.labels("muted")  # shown at 0 from the start
        self.deliveries = Counter(
            f"{NS}_deliveries",
            "Delivery attempts by outcome: delivered, failed (will retry), dead (out of retries), held.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.delivery_duration = Histogram(
            f"{NS}_delivery_duration_seconds",
            "Duration of one delivery attempt (request and response).",
            ["endpoint"],
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.store_write = Histogram(
            f"{NS}_store_write_seconds",
            "Duration of one group-commit batch of the store (one transaction).",
            buckets=STORE_BUCKETS,
            registry=r,
        )
        Info(f"{NS}_build", "webhookd build information.", registry=r).info(
            {"version": __version__, "python": platform.python_version()}
        )
        self._state = _StateCollector(self)
        r.register(self._state)
        if process:
            ProcessCollector(registry=r)
        # Pre-bound children: the hot paths never build label tuples.
        self._heartbeats: dict[str, Callable[[int], None]] = {"http": self.heartbeats.labels("http").inc}
        self._rejected: dict[int, Callable[[], None]] = {}
        self._events: dict[str, Callable[[], None]] = {}
        self._endpoints: dict[str, _EndpointChildren] = {}
        # The UDP listener keeps plain-int counters; they are read at scrape time (see `_sync_udp`).
        self.udp: Callable[[], UDPListener | None] = lambda: None
        self.mqtt: Callable[[], MqttPresence | None] = lambda: None
        self._udp_applied = 0

    # --- hooks -------------------------------------------------------------------------------------------

    def attach(self, tracker: Tracker, api: HeartbeatAPI) -> None:
        """Point the components' metric hooks at this registry."""
        api.on_heartbeats = self.heartbeat_counter("http")
        api.on_rejected = self.on_rejected
        tracker.on_event = self.on_event
        tracker.on_suppressed = self.on_suppressed
        self.dispatcher.on_result = self.on_result
        self.dispatcher.on_outcome = self.on_outcome
        self.store.on_write = self.store_write.observe

    def heartbeat_counter(self, transport: str) -> Callable[[int], None]:
        """`inc(n)` of the heartbeat counter of one transport (http, udp)."""
        inc = self._heartbeats.get(transport)
        if inc is None:
            inc = self._heartbeats[transport] = self.heartbeats.labels(transport).inc
        return inc

    def on_rejected(self, status: int) -> None:
        inc = self._rejected.get(status)
        if inc is None:
            inc = self._rejected[status] = self.rejected.labels(str(status)).inc
        inc()

    def on_event(self, event_type: str) -> None:
        inc = self._events.get(event_type)
        if inc is None:
            inc = self._events[event_type] = self.events.labels(event_type).inc
        inc()

    def on_suppressed(self, reason: str) -> None:
        self.suppressed.labels(reason).inc()

    def _endpoint(self, name: str) -> _EndpointChildren:
        children = self._endpoints.get(name)
        if children is None:
            children = self._endpoints[name] = _EndpointChildren(self, name)
        return children

    def on_result(self, endpoint: str, result: AttemptResult) -> None:
        self._endpoint(endpoint).duration.observe(result.latency)

    def on_outcome(self, endpoint: str, status: str) -> None:
        inc = self._endpoint(endpoint).outcomes.get(status)
        if inc is not None:
            inc()

    # --- the scrape --------------------------------------------------------------------------------------

    def _sync_udp(self) -> None:
        """Bring heartbeats{transport="udp"} up to the heartbeats the UDP listener has applied.

        applied = received - rejected - dropped - failed - in flight; it can dip by one for a moment (a failed
        task counted before it leaves the in-flight set), so the counter only ever moves up to its maximum."""
        udp = self.udp()
        if udp is None:
            return
        inc = self.heartbeat_counter("udp")  # exported (at 0) as soon as UDP listens
        applied = udp.received - udp.rejected - udp.dropped - udp.failed - udp.inflight
        if applied > self._udp_applied:
            inc(applied - self._udp_applied)
            self._udp_applied = applied

    async def render(self) -> bytes:
        """The Prometheus text exposition (the admin API's `metrics` hook)."""
        self._sync_udp()
        try:
            self._state.delivery_counts = await self.store.delivery_counts()
        except Exception as e:
            # Still answer: store_healthy and the rest are what an operator needs when the store is sick.
            log.warning("metrics_delivery_counts_failed", error=str(e))
            self._state.delivery_counts = None
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """Gauges computed at scrape time; `delivery_counts` is read by `Metrics.render` just before."""

    def __init__(self, m: Metrics) -> None:
        self.m = m
        self.delivery_counts: dict[str, dict[str, int]] | None = None

    def collect(self) -> Iterable[Metric]:
        m = self.m
        devices = GaugeMetricFamily(f"{NS}_devices", "Known devices by presence state.", labels=["state"])
        counts = m.engine.counts()
        for state in (*STATES, *sorted(set(counts) - set(STATES))):
            devices.add_metric([state], counts.get(state, 0))
        yield devices

        endpoints = m.dispatcher.endpoints
        if self.delivery_counts is not None:
            rows = GaugeMetricFamily(
                f"{NS}_deliveries", "Deliveries in the store by status.", labels=["endpoint", "status"]
            )
            per_endpoint = self.delivery_counts
            for name in (*endpoints, *sorted(n for n in per_endpoint if n not in endpoints)):
                per = per_endpoint.get(name, {})
                for status in DELIVERY_STATUSES:
                    rows.add_metric([name, status], per.get(status, 0))
            yield rows

        failures = GaugeMetricFamily(
            f"{NS}_endpoint_consecutive_failures",
            "Failed attempts of an endpoint since its last success.",
            labels=["endpoint"],
        )
        disabled = GaugeMetricFamily(
            f"{NS}_endpoint_disabled", "1 while an endpoint is disabled (its deliveries are held).", labels=["endpoint"]
        )
        for name, rt in endpoints.items():
            failures.add_metric([name], rt.row.consecutive_failures)
            disabled.add_metric([name], 1 if rt.row.disabled else 0)
        yield failures
        yield disabled

        udp = m.udp()
        if udp is not None:
            datagrams = CounterMetricFamily(
                f"{NS}_udp_datagrams",
                "UDP datagrams: received; rejected (invalid), dropped (too many in flight), failed (not recorded).",
                labels=["result"],
            )
            for result, n in (
                ("received", udp.received),
                ("rejected", udp.rejected),
                ("dropped", udp.dropped),
                ("failed", udp.failed),
            ):
                datagrams.add_metric([result], n)
            yield datagrams
            rejected = CounterMetricFamily(
                f"{NS}_udp_datagrams_rejected",
                "Bad UDP datagrams by reason: too_large, empty, not_utf8, malformed_json, invalid (a field or shape).",
                labels=["reason"],
            )
            for reason, n in udp.rejected_by.items():
                rejected.add_metric([reason], n)
            yield rejected
            yield GaugeMetricFamily(f"{NS}_udp_inflight", "UDP heartbeats being applied.", udp.inflight)

        mqtt = m.mqtt()
        if mqtt is not None:
            yield from _mqtt_metrics(mqtt)

        hub = m.dispatcher.hub
        if hub is not None:  # a hub of several processes on one PostgreSQL
            yield GaugeMetricFamily(
                f"{NS}_hub_partitions",
                "Delivery partitions this hub process holds (of 32): a live process holds its fair share.",
                len(hub.holdings.owned(hub.now())),
            )
        yield GaugeMetricFamily(
            f"{NS}_store_healthy", "1 while the store's last transaction committed.", 1 if m.store.healthy else 0
        )
        yield GaugeMetricFamily(
            f"{NS}_uptime_seconds", "Seconds since the daemon started.", m._clock() - m.started_mono
        )


def _mqtt_metrics(mqtt: MqttPresence) -> Iterable[Metric]:
    yield GaugeMetricFamily(
        f"{NS}_mqtt_connected",
        "1 while connected to the MQTT broker (subscriptions acknowledged).",
        int(mqtt.connected),
    )
    c = mqtt.counters
    messages = CounterMetricFamily(
        f"{NS}_mqtt_messages", "MQTT messages received, by the source they matched.", labels=["source"]
    )
    ignored = CounterMetricFamily(
        f"{NS}_mqtt_ignored", "MQTT payloads that meant no state (logged at debug), by source.", labels=["source"]
    )
    for name in mqtt.sources.names:
        messages.add_metric([name], c.messages.get(name, 0))
        ignored.add_metric([name], c.ignored.get(name, 0))
    yield messages
    yield ignored
    yield CounterMetricFamily(
        f"{NS}_mqtt_dropped", "MQTT messages dropped because the incoming queue was full.", c.dropped
    )
    yield CounterMetricFamily(f"{NS}_mqtt_connections", "Connections to the MQTT broker made.", c.connections)
