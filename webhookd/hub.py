"""A hub's side of the relay (CONTRACT §14): the events its gateways relay, and their heartbeats.

On a process with `hub:` the heartbeat API serves ``POST /v1/relay`` and ``POST /v1/gateways/<name>/heartbeat``
(and answers its device routes 404: devices report to a gateway). Each request must name a configured gateway
(`Webhookd-Gateway`) and carry a fresh signature of its body with that gateway's secret (`Webhookd-Signature`,
hmac-sha256, 5 minutes either way), else 401. A relayed event is recorded with its id, its device id becomes
``<gateway>:<device id>`` and its deliveries to the hub's endpoints go through the outbox; the answer is 2xx only
once that is durable, and an event id the hub has taken already is a 2xx that changes nothing. The relayed
device's state is kept as the gateway says it (`source: relay`, no silence timer of the hub's).

Gateway liveness (the rules: gateways.py; the rows: the store's `gateways` table, shared by every hub process):
each accepted relay or heartbeat touches the gateway's row, which makes `gateway.online` when it was unknown or
offline; `liveness_loop`, in every hub process, makes `gateway.offline` for a gateway silent past its
`silence_timeout` (checked every CHECK_EVERY, the flip under the row's lock: one event for the whole hub). A
refused request from a configured gateway is kept as its `last_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from webhookd import gateways
from webhookd.config.fleet import GATEWAY_HEADER, RELAY_PATH
from webhookd.config.schema import DEFAULT_SIGNATURE_HEADER as SIGNATURE_HEADER
from webhookd.config.schema import HubConfig, HubGateway
from webhookd.dispatch import Dispatcher
from webhookd.listener import DEVICE_ID, MAX_TEXT, BadInput, error_response, json_response, not_allowed
from webhookd.logs import get_logger
from webhookd.payloads import EVENT_TYPES, EventData, rfc3339
from webhookd.presence import Device, PresenceEngine
from webhookd.signing import TOLERANCE, verify_hmac_sha256
from webhookd.states import DEVICE_STATES, UNKNOWN
from webhookd.store import Change, DeliveryStore, StoreError
from webhookd.store.api import GatewayWrite, Targets

if TYPE_CHECKING:
    from webhookd.listener import HeartbeatAPI
    from webhookd.mutes import MuteRule

log = get_logger("webhookd.hub")


GATEWAYS_PREFIX = "/v1/gateways/"
HEARTBEAT_SUFFIX = "/heartbeat"
RELAY_SOURCE = "relay"
NOT_HERE = "this is a hub: devices report to a gateway"
RELAYED_TYPES = frozenset(t for t in EVENT_TYPES if t != "webhook.test")
EVENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_PREVIOUS_STATES = frozenset((*DEVICE_STATES, UNKNOWN))
CHECK_EVERY = 0.25  # seconds between deadline checks: a silent gateway's offline within 1 s of its deadline


def _is_device_route(path: str) -> bool:
    return path == "/v1/heartbeat" or path == "/v1/heartbeats" or path.startswith("/v1/heartbeat/")


def _rfc3339(value: object, field: str, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > 40:
        raise BadInput(400, f"{field} must be an RFC 3339 time", field)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadInput(400, f"{field} must be an RFC 3339 time", field) from None
    if parsed.tzinfo is None:
        raise BadInput(400, f"{field} must be an RFC 3339 time with its offset (Z)", field)
    return parsed.timestamp()


def _opt_text(obj: dict[str, Any], key: str, field: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT or any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise BadInput(400, f"{key} must be a string of at most {MAX_TEXT} printable characters", field)
    return value


def _number(value: object, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise BadInput(400, f"{field} must be a number of seconds (or null)", field)
    return float(value)


def parse_relayed(obj: object, gateway: str) -> EventData:
    """The `webhookd`-format body a gateway relayed, as the hub's event: the same id, type, times and fields;
    its device id prefixed with `<gateway>:`, and `gateway` set. Raises BadInput (400) naming the bad field."""
    if not isinstance(obj, dict):
        raise BadInput(400, "a relayed event must be a JSON object (the webhookd format)")
    event_id = obj.get("id")
    if not isinstance(event_id, str) or EVENT_ID.fullmatch(event_id) is None:
        raise BadInput(400, "id must be an event id (evt_...)", "id")
    etype = obj.get("type")
    if not isinstance(etype, str) or etype not in RELAYED_TYPES:
        raise BadInput(400, "type must be one of " + ", ".join(sorted(RELAYED_TYPES)), "type")
    when = _rfc3339(obj.get("time"), "time")
    assert when is not None
    reason = _opt_text(obj, "reason", "reason")
    device = obj.get("device")
    if not isinstance(device, dict):
        raise BadInput(400, "device must be a JSON object", "device")
    device_id = device.get("id")
    if not isinstance(device_id, str) or DEVICE_ID.fullmatch(device_id) is None:
        raise BadInput(400, "device.id must match ^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$", "device.id")
    state = device.get("state")
    if not isinstance(state, str) or state not in DEVICE_STATES:
        raise BadInput(400, "device.state must be one of " + ", ".join(DEVICE_STATES), "device.state")
    previous = device.get("previous_state")
    if not isinstance(previous, str) or previous not in _PREVIOUS_STATES:
        raise BadInput(
            400, "device.previous_state must be one of " + ", ".join(sorted(_PREVIOUS_STATES)), "device.previous_state"
        )
    reminder = obj.get("reminder")
    if reminder is not None and (isinstance(reminder, bool) or not isinstance(reminder, int) or reminder < 1):
        raise BadInput(400, "reminder must be a positive integer", "reminder")
    return EventData(
        id=event_id,
        type=etype,
        time=when,
        reason=reason,
        device_id=f"{gateway}:{device_id}",
        name=_opt_text(device, "name", "device.name"),
        state=state,
        previous_state=previous,
        address=_opt_text(device, "address", "device.address"),
        owner=_opt_text(device, "owner", "device.owner"),
        last_seen=_rfc3339(device.get("last_seen"), "device.last_seen", optional=True),
        offline_for=_number(obj.get("offline_for"), "offline_for"),
        reminder=reminder,
        gateway=gateway,
    )


def relayed_device(event: EventData) -> Device:
    """The device row of a relayed event: the gateway's view, with no silence timer at the hub."""
    return Device(
        id=event.device_id,
        state=event.state,
        name=event.name,
        owner=event.owner,
        address=event.address,
        last_seen=event.last_seen,
        changed_at=event.time,
        source=RELAY_SOURCE,
        timed=False,
    )


class _OfflineTargets(Mapping[str, Targets]):
    """The configured gateways -> the endpoints that want their gateway.offline, asked only for those due (a
    deadline check runs 4 times a second; a gateway is rarely due)."""

    def __init__(self, names: list[str], targets: Callable[[str, str], Targets]) -> None:
        self._names = dict.fromkeys(names)
        self._targets = targets

    def __getitem__(self, name: str) -> Targets:
        if name not in self._names:
            raise KeyError(name)
        return self._targets(name, gateways.OFFLINE_TYPE)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names


class Hub:
    def __init__(
        self,
        cfg: HubConfig,
        engine: PresenceEngine,
        store: DeliveryStore,
        dispatcher: Dispatcher,
        *,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.store = store
        self.dispatcher = dispatcher
        self._wall = wall
        self.started = wall()  # a restart gives online gateways a full timeout unless an older process lives
        self._refused: dict[str, str] = {}  # gateway -> the last refusal this process stored as its last_error
        self.cfg = cfg
        self.configure(cfg)
        # metrics hook: one call per event recorded (a relayed event's type, gateway.online, gateway.offline)
        self.on_event: Callable[[str], None] | None = None
        # The mute covering a relayed device at a time (the daemon's rules, the same on every hub process): its
        # events are recorded without deliveries, as a gateway records its own muted devices' events.
        self.muted: Callable[[str, float], MuteRule | None] = lambda _device, _wall: None
        self.on_suppressed: Callable[[str], None] | None = None  # metrics hook: an event recorded undelivered

    def configure(self, cfg: HubConfig) -> None:
        """Startup and reload: the gateways and their secrets."""
        self.cfg = cfg
        self._gateways = {gw.name: gw for gw in cfg.gateways}

    async def serve(self, request: web.BaseRequest, api: HeartbeatAPI) -> web.StreamResponse | None:
        """The hub's answer to `request`, or None for a route the heartbeat API serves as usual (/healthz)."""
        path, method = request.path, request.method
        if path == RELAY_PATH:
            if method != "POST":
                return not_allowed("POST")
            return await self._refusals(request, self.relay(request, api))
        if path.startswith(GATEWAYS_PREFIX) and path.endswith(HEARTBEAT_SUFFIX):
            if method != "POST":
                return not_allowed("POST")
            name = path[len(GATEWAYS_PREFIX) : -len(HEARTBEAT_SUFFIX)]
            return await self._refusals(request, self.heartbeat(request, api, name))
        if _is_device_route(path):
            return error_response(404, NOT_HERE)
        return None

    async def _refusals(self, request: web.BaseRequest, answer: Coroutine[Any, Any, web.Response]) -> web.Response:
        """`answer`, keeping a refusal (4xx) of a request naming a configured gateway as its `last_error`."""
        try:
            return await answer
        except BadInput as e:
            name = request.headers.get(GATEWAY_HEADER, "")
            error = gateways.short_error(e.status, e.error)
            # A repeat of the refusal this process noted last costs no write (a flood of bad requests is no
            # flood of commits).
            if name in self._gateways and self._refused.get(name) != error:
                with contextlib.suppress(StoreError):  # the refusal stands; only its note is lost
                    await self.store.gateway_rejected(name, error)
                    self._refused[name] = error
            raise

    def _verify(self, request: web.BaseRequest, body: bytes) -> HubGateway:
        name = request.headers.get(GATEWAY_HEADER, "")
        gw = self._gateways.get(name)
        if gw is None or gw.secret is None:
            raise BadInput(401, f"unknown gateway (missing or unknown {GATEWAY_HEADER})")
        header = request.headers.get(SIGNATURE_HEADER, "")
        if not header:
            raise BadInput(401, f"missing {SIGNATURE_HEADER}")
        if not verify_hmac_sha256(header, body, [gw.secret], TOLERANCE, self._wall()):
            raise BadInput(401, f"invalid {SIGNATURE_HEADER} (bad signature, or a timestamp more than 5m off)")
        return gw

    def _targets(self, name: str, etype: str) -> Targets:
        return self.dispatcher.targets(gateways.probe_event(name, etype))

    async def _touch(self, gw: HubGateway, seen: gateways.Seen, relayed: Change | None = None) -> GatewayWrite:
        """The gateway is alive: its row (and a gateway.online when it was unknown or offline), with the relayed
        event if any, in one transaction, durable before the answer; StoreError (503) otherwise."""
        targets = self._targets(gw.name, gateways.ONLINE_TYPE)
        done = await self.store.touch_gateway(gw.name, self._wall(), gw.silence_timeout, seen, targets, relayed)
        self._made(done)
        return done

    def _made(self, done: GatewayWrite) -> None:
        event = done.event
        if event is None:
            return
        self.dispatcher.enqueue(done.rows)
        if self.on_event is not None:
            self.on_event(event.type)
        if event.type == gateways.ONLINE_TYPE:
            log.info(
                "gateway_online",
                gateway=event.device_id,
                previous_state=event.previous_state,
                offline_for=None if event.offline_for is None else round(event.offline_for, 3),
                address=event.address,
                event_id=event.id,
                deliveries=len(done.rows),
            )
        else:
            log.warning(
                "gateway_offline",
                gateway=event.device_id,
                reason=event.reason,
                last_seen=None if event.last_seen is None else rfc3339(event.last_seen),
                event_id=event.id,
                deliveries=len(done.rows),
            )

    async def relay(self, request: web.BaseRequest, api: HeartbeatAPI) -> web.Response:
        raw = await api.read_raw(request)
        gw = self._verify(request, raw)
        event = parse_relayed(api.decode_json(request, raw), gw.name)
        device = relayed_device(event)
        rule = self.muted(event.device_id, self._wall())
        change = Change(device, event, self.dispatcher.targets(event) if rule is None else [])
        rows = (await self._touch(gw, gateways.Seen(request.remote), change)).relayed
        if rows is None:
            log.debug("relay_duplicate", gateway=gw.name, event_id=event.id)
            return json_response(200, {"status": "duplicate", "id": event.id})
        current = self.engine.devices.get(device.id)
        if current is None or current.changed_at is None or current.changed_at <= event.time:
            self.engine.adopt(device)
        self.dispatcher.enqueue(rows)
        if self.on_event is not None:
            self.on_event(event.type)
        if rule is not None and self.on_suppressed is not None:
            self.on_suppressed("muted")
        log.info(
            "relay_recorded",
            gateway=gw.name,
            device=event.device_id,
            type=event.type,
            state=event.state,
            event_id=event.id,
            deliveries=len(rows),
            **({} if rule is None else {"muted_by": rule.match}),
        )
        return json_response(200, {"status": "recorded", "id": event.id})

    async def heartbeat(self, request: web.BaseRequest, api: HeartbeatAPI, name: str) -> web.Response:
        raw = await api.read_raw(request)
        gw = self._verify(request, raw)
        if name != gw.name:
            raise BadInput(401, f"the gateway in the path is not the one {GATEWAY_HEADER} names")
        body = api.decode_json(request, raw)
        if not isinstance(body, dict):
            raise BadInput(400, "a gateway heartbeat must be a JSON object")
        if body.get("gateway") not in (None, gw.name):
            raise BadInput(400, "gateway in the body differs from the path", "gateway")
        devices = body.get("devices")
        if devices is not None and (isinstance(devices, bool) or not isinstance(devices, int) or devices < 0):
            raise BadInput(400, "devices must be a count", "devices")
        await self._touch(gw, gateways.Seen(request.remote, devices=devices))
        return json_response(200, {"status": "ok"})

    # --- liveness: every hub process checks the deadlines; the store makes each flip once ------------------

    async def liveness_loop(self, every: float = CHECK_EVERY) -> None:
        """Forever (the daemon cancels it): first, at a start with no other live hub process, every online
        gateway gets a full timeout from now; then every `every` seconds the gateways silent past their
        deadline go offline. A store that cannot answer is tried again at the next turn."""
        while True:
            try:
                timeouts = {gw.name: gw.silence_timeout for gw in self.cfg.gateways}
                extended = await self.store.restart_gateways(self._wall(), timeouts, self.started)
                break
            except StoreError:
                await asyncio.sleep(every)
        if extended:
            log.info("gateways_restarted", gateways=extended, detail="each online gateway has a full timeout from now")
        while True:
            await asyncio.sleep(every)
            await self.check_deadlines()

    async def check_deadlines(self) -> list[GatewayWrite]:
        """One deadline check: the gateway.offline events this process made (another may make some first)."""
        targets = _OfflineTargets([gw.name for gw in self.cfg.gateways], self._targets)
        try:
            done = await self.store.expire_gateways(self._wall(), targets)
        except StoreError:
            return []  # the next turn tries again (the store logs its outage itself)
        for d in done:
            self._made(d)
        return done

    # --- the admin API's gateway list -------------------------------------------------------------------

    async def listing(self) -> list[gateways.GatewayRow]:
        """Every configured gateway, in config order: its stored row, or one in state unknown."""
        rows = {r.name: r for r in await self.store.load_gateways()}
        return [rows.get(gw.name, gateways.GatewayRow(gw.name)) for gw in self.cfg.gateways]

    async def offline(self) -> set[str]:
        """The configured gateways that are offline now (their devices are stale)."""
        return {r.name for r in await self.listing() if r.state == "offline"}
