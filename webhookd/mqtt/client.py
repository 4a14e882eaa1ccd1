"""MQTT presence: one supervised connection to the broker, whose availability messages become heartbeats.

broker -> aiomqtt (a fresh client per attempt) -> Sources.route (pure) -> Settle (pure) -> Tracker.heartbeats

- A fresh `aiomqtt.Client` for every attempt: one reused after a keep-alive timeout can report itself connected
  without a CONNACK. Backoff 1 s doubling to 30 s, with jitter, forever; a refused login or an unreachable
  broker is logged and never ends the daemon.
- A fixed client id with a persistent session (clean_session false) and QoS 1 subscriptions: a will the broker
  publishes while we reconnect is queued for us. "Connected" (log, gauge, settle window) only once every
  subscription is acknowledged.
- Our own availability on `status_topic`: "online" retained, will "offline" retained.
- The incoming queue is bounded; a message it has no room for is counted and logged (QoS 1 was already
  acknowledged by the client library, so it is lost: the bound is sized far above what the tracker drains).
- Readings are applied in arrival order, each batch durable (`Tracker.heartbeats`) before the next; when the
  store fails, the batch waits and is applied again (the engine undid it), never dropped.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError  # not re-exported by aiomqtt 2.x

from webhookd.config.mqtt import MqttConfig
from webhookd.logs import get_logger
from webhookd.mqtt.settle import Settle
from webhookd.mqtt.sources import Ignored, Reading, Sources
from webhookd.mqtt.wire import Client
from webhookd.presence import Heartbeat
from webhookd.store import StoreError
from webhookd.tracker import Tracker

log = get_logger("webhookd.mqtt")
# paho's own lines ("failed to receive on socket: Connection reset by peer" at error level on every broker
# restart) would say in its words what mqtt_disconnected / mqtt_unreachable already say in ours.
_paho_log = logging.getLogger("webhookd.mqtt.paho")
_paho_log.setLevel(logging.CRITICAL)

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
INBOX_MAX = 100_000  # messages received and not yet routed
BATCH_MAX = 2_000  # readings per durable batch
STORE_RETRY = 0.5  # seconds before a batch the store refused is applied again
# CONNACK codes (MQTT 3.1.1) that mean the broker refused us: wrong credentials or not authorized.
_AUTH_CODES = frozenset({4, 5, 134, 135})


@dataclass(slots=True)
class MqttCounters:
    """Plain counters read at scrape time (metrics.py)."""

    messages: dict[str, int] = field(default_factory=dict)  # source -> messages routed to it
    ignored: dict[str, int] = field(default_factory=dict)  # source -> payloads that meant nothing
    dropped: int = 0  # messages the full inbox had no room for
    connections: int = 0


def _inbox_type(counters: MqttCounters, created: list[asyncio.Queue[aiomqtt.Message]]) -> type[Any]:
    """aiomqtt's queue class for one client: bounded, counting what it drops, and known to us (so that what was
    received before a connection dropped is still routed)."""

    class Inbox(asyncio.Queue[aiomqtt.Message]):
        def __init__(self, maxsize: int = 0) -> None:
            super().__init__(maxsize)
            created.append(self)

        def put_nowait(self, item: aiomqtt.Message) -> None:
            if self.full():
                counters.dropped += 1
                if counters.dropped == 1 or counters.dropped % 10_000 == 0:
                    log.warning("mqtt_queue_full", dropped=counters.dropped, limit=INBOX_MAX)
            super().put_nowait(item)

    return Inbox


def _tls_context(cfg: MqttConfig) -> ssl.SSLContext | None:
    if not cfg.tls:
        return None
    ctx = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
    if not cfg.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def connection_settings(cfg: MqttConfig | None) -> tuple[object, ...] | None:
    """What a reload must reconnect for (anything but the sources, settle and status topic)."""
    if cfg is None:
        return None
    return (cfg.url, cfg.username, cfg.password, cfg.effective_client_id, cfg.keepalive, cfg.tls_verify, cfg.ca_file)


class MqttPresence:
    def __init__(
        self,
        cfg: MqttConfig,
        tracker: Tracker,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.tracker = tracker
        self.sources = Sources(cfg)
        self.settle: Settle[Reading] = Settle(cfg.settle)
        self.counters = MqttCounters()
        self.connected = False
        self.since: float | None = None  # wall clock of the last connect (or of the drop, while disconnected)
        self._clock = clock
        self._wall = wall
        self._device_source: dict[str, str] = {}
        self._apply_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._reconnect = asyncio.Event()
        self._paused: set[str] = set()
        self._session_lost = False  # the broker kept no session of ours at the last connect

    # --- what status and metrics show ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        counts = dict.fromkeys(self.sources.names, 0)
        known = self.tracker.engine.devices
        for device in [d for d in self._device_source if d not in known]:  # forgotten (`devices forget`)
            del self._device_source[device]
        for name in self._device_source.values():
            counts[name] = counts.get(name, 0) + 1
        return {"connected": self.connected, "broker": self.cfg.broker, "since": self.since, "sources": counts}

    def reconfigure(self, cfg: MqttConfig) -> None:
        """A reload: new sources and settle apply at once; new connection settings reconnect."""
        sources = Sources(cfg)
        sources.keep_state(self.sources)  # a SIGHUP forgets neither an offline bridge nor a bdSeq
        reconnect = connection_settings(cfg) != connection_settings(self.cfg) or (
            self.sources.filters() != sources.filters() or cfg.status_topic != self.cfg.status_topic
        )
        self.cfg = cfg
        self.sources = sources
        self.settle.settle = cfg.settle
        if reconnect:
            self._reconnect.set()

    # --- the connection -------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Forever: connect, subscribe, route; reconnect with backoff. Only a bug ends it."""
        delay = BACKOFF_FIRST
        while True:
            self._reconnect.clear()
            try:
                await self._session()
                delay = BACKOFF_FIRST  # it was up: the next attempt starts from the short delay
            except MqttConnectError as e:
                rc = getattr(e.rc, "value", e.rc)
                if rc in _AUTH_CODES:
                    log.error("mqtt_auth_failed", broker=self.cfg.broker, user=self.cfg.username, error=str(e))
                else:
                    log.warning("mqtt_unreachable", broker=self.cfg.broker, error=str(e))
            except aiomqtt.MqttError as e:
                if self.connected:
                    delay = BACKOFF_FIRST
                    self._lost(str(e))
                else:
                    log.warning("mqtt_unreachable", broker=self.cfg.broker, error=str(e) or type(e).__name__)
            if self.connected:
                self._lost("reconnecting for new settings")
            wait = delay * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
            delay = min(delay * 2, BACKOFF_MAX)
            try:
                async with asyncio.timeout(wait):
                    await self._reconnect.wait()  # a reload with new settings does not wait the backoff out
            except TimeoutError:
                pass

    def _lost(self, why: str) -> None:
        self.connected = False
        self.since = self._wall()
        self.settle.disconnect()
        # MQTT heartbeat devices say nothing while we cannot hear them: their silence timers stop.
        ids = [d for d, dev in self.tracker.engine.devices.items() if dev.source == "mqtt" and dev.timed]
        self.tracker.engine.pause(ids)
        self._paused.update(ids)
        log.warning("mqtt_disconnected", broker=self.cfg.broker, error=why, waiting=self.settle.waiting())

    async def _session(self) -> None:
        cfg = self.cfg
        inboxes: list[asyncio.Queue[aiomqtt.Message]] = []
        will = None
        if cfg.status_topic:
            will = aiomqtt.Will(cfg.status_topic, b"offline", qos=1, retain=True)
        client = Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=cfg.password,
            identifier=cfg.effective_client_id,
            clean_session=False,
            keepalive=round(cfg.keepalive),
            will=will,
            tls_context=_tls_context(cfg),
            queue_type=_inbox_type(self.counters, inboxes),
            max_queued_incoming_messages=INBOX_MAX,
            timeout=10.0,
            logger=_paho_log,
        )
        client._loop_thread = threading.get_ident()
        try:
            async with client:
                filters = self.sources.filters()
                for topic in filters:
                    granted = await client.subscribe(topic, qos=1)
                    if any((g if isinstance(g, int) else g.value) >= 0x80 for g in granted):
                        log.error("mqtt_subscription_refused", broker=cfg.broker, topic=topic)
                if cfg.status_topic:
                    await client.publish(cfg.status_topic, b"online", qos=1, retain=True)
                self._session_lost = not client.session_present
                self._connected(filters)
                try:
                    async with asyncio.TaskGroup() as tg:
                        tg.create_task(self._ticker())
                        tg.create_task(self._watch_reconnect(client))
                        await self._consume(client, inboxes[0])
                except asyncio.CancelledError:
                    await self._goodbye(client)
                    raise
        except* aiomqtt.MqttError as group:
            # Route what arrived before the drop (a stopping broker's wills) before reconnecting.
            for inbox in inboxes:
                await self._drain(inbox)
            raise group.exceptions[0] from None

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        """On our own stop: "offline" on the status topic (a clean disconnect publishes no will)."""
        if not self.cfg.status_topic:
            return
        try:
            async with asyncio.timeout(1.0):
                await client.publish(self.cfg.status_topic, b"offline", qos=1, retain=True)
        except (aiomqtt.MqttError, TimeoutError) as e:
            log.warning("mqtt_status_not_published", topic=self.cfg.status_topic, error=str(e) or type(e).__name__)

    def _connected(self, filters: Sequence[str]) -> None:
        self.connected = True
        self.since = self._wall()
        self.counters.connections += 1
        self.settle.connect(self._clock())
        self._wake.set()
        log.info(
            "mqtt_connected",
            broker=self.cfg.broker,
            client_id=self.cfg.effective_client_id,
            topics=list(filters),
            settle_s=self.cfg.settle,
        )

    async def _watch_reconnect(self, client: aiomqtt.Client) -> None:
        await self._reconnect.wait()
        raise aiomqtt.MqttError("new connection settings")

    async def _consume(self, client: aiomqtt.Client, inbox: asyncio.Queue[aiomqtt.Message]) -> None:
        async for message in client.messages:
            batch = [message]
            while len(batch) < BATCH_MAX and not inbox.empty():
                batch.append(inbox.get_nowait())
            await self._route(batch)
        raise aiomqtt.MqttError("message stream ended")

    async def _drain(self, inbox: asyncio.Queue[aiomqtt.Message]) -> None:
        while not inbox.empty():
            batch = [inbox.get_nowait() for _ in range(min(BATCH_MAX, inbox.qsize()))]
            await self._route(batch)

    async def _route(self, messages: Sequence[aiomqtt.Message]) -> None:
        now = self._clock()
        # Wills whose grace is over go with this batch (before its own readings, which may be for the same
        # devices): one commit for both, not the ticker's own beside it.
        ready: list[Reading] = self.settle.held_due(now)
        waiting = self.settle.waiting()
        for m in messages:
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload or "").encode()
            routed = self.sources.route(m.topic.value, payload)
            if routed is None:
                continue
            name, meaning = routed
            self.counters.messages[name] = self.counters.messages.get(name, 0) + 1
            if isinstance(meaning, Ignored):
                self.counters.ignored[name] = self.counters.ignored.get(name, 0) + 1
                log.debug("mqtt_ignored", source=name, topic=m.topic.value, why=meaning.why)
                continue
            for reading in meaning:
                self._device_source[reading.device] = name
                ready.extend(self.settle.offer(reading, now))
        if self.settle.waiting() != waiting:
            self._wake.set()  # the settle holds something new: the ticker looks at its next due time
        if ready:
            await self._apply(ready)

    async def _ticker(self) -> None:
        """Applies what the settle releases on time: held wills after their grace, the window at its end."""
        while True:
            self._wake.clear()
            was_settling = self.settle.settling
            due = self.settle.due(self._clock())
            if was_settling and not self.settle.settling and self._session_lost:
                due = [*due, *self._unheard(due)]
            if due or (was_settling and not self.settle.settling):
                changed = await self._apply(due)
                if was_settling and not self.settle.settling:
                    self._settled(len(due), changed)
            wakeup = self.settle.next_wakeup()
            delay = 3600.0 if wakeup is None else max(0.0, wakeup - self._clock())
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _unheard(self, heard: Sequence[Reading]) -> list[Reading]:
        """After a connect where the broker kept no session of ours (a broker restarted without persistence:
        its retained messages and the wills it published while stopping are gone), a device online by its
        availability alone that said nothing during the whole window is taken as gone: offline, reason
        disconnected. A device heard from later simply comes back online."""
        said = {r.device for r in heard}
        devices = self.tracker.engine.devices
        return [
            Reading(dev_id, "offline", "disconnected")
            for dev_id, dev in devices.items()
            if dev.source == "mqtt" and not dev.timed and dev.state != "offline" and dev_id not in said
        ]

    def _settled(self, reconciled: int, events: int) -> None:
        if self._paused:
            self.tracker.engine.resume(self._paused, self._clock())
            self._paused.clear()
        log.info("mqtt_settled", broker=self.cfg.broker, devices=reconciled, events=events)
        # Mosquitto grants a subscription its ACL denies (SUBACK QoS 1) and then sends nothing: a source that
        # had no message at all by the end of the first window is worth a look.
        if self.counters.connections == 1:
            silent = [name for name in self.sources.names if not self.counters.messages.get(name)]
            if silent:
                log.warning(
                    "mqtt_sources_silent",
                    broker=self.cfg.broker,
                    sources=silent,
                    detail="no message on their topics yet: no such devices, or the broker's ACL denies "
                    f"{self.cfg.username or 'this client'} reading them",
                )

    async def _apply(self, readings: Sequence[Reading]) -> int:
        """Make `readings` durable in order; returns how many made an event."""
        changed = 0
        async with self._apply_lock:
            for i in range(0, len(readings), BATCH_MAX):
                hbs = [
                    Heartbeat(r.device, state=r.state, source="mqtt", reason=r.reason, timed=r.state is None)
                    for r in readings[i : i + BATCH_MAX]
                ]
                while True:
                    try:
                        answers = await self.tracker.heartbeats(hbs, summarize=True)
                        break
                    except StoreError as e:
                        log.warning("mqtt_not_recorded", devices=len(hbs), error=str(e), retry_in_s=STORE_RETRY)
                        await asyncio.sleep(STORE_RETRY)
                changed += sum(1 for a in answers if a.changed)
        return changed
