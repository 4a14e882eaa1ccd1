"""Events and their webhook bodies (CONTRACT §6).

An :class:`EventData` is what the outbox stores (``to_json``/``from_json``); :func:`render` turns one event
into the body for one endpoint in that endpoint's ``format`` (compact JSON; the formats for people are in
messages.py, and `render_request` adds the headers that go with a body). Rendering is on the delivery hot
path: it builds plain dicts and encodes them with one shared msgspec encoder.
"""

from __future__ import annotations

import functools
import itertools
import secrets
import time
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from webhookd import messages

if TYPE_CHECKING:
    from webhookd.config import EndpointConfig

__all__ = [
    "EVENT_TYPES",
    "TEST_DEVICE_ID",
    "EventData",
    "content_type",
    "event_type_for",
    "kobiton_webhook_id",
    "make_test_event",
    "new_event_id",
    "render",
    "render_request",
    "rfc3339",
    "rfc3339_opt",
    "webhookd_object",
]

#: Event types, in CONTRACT order.
EVENT_TYPES: tuple[str, ...] = (
    "device.online",
    "device.offline",
    "device.utilizing",
    "device.unplugged",
    "device.address_changed",
    "device.still_offline",
    "gateway.online",
    "gateway.offline",
    "webhook.test",
)
#: Device id carried by ``webhook.test`` events in every format.
TEST_DEVICE_ID = "webhookd-test"

_REMOTEIT_TYPE: dict[str, str] = {
    "device.online": "device_state",
    "device.offline": "device_state",
    "device.utilizing": "device_state",
    "device.unplugged": "device_state",
    "device.address_changed": "address_changed",
    "device.still_offline": "device_state",  # a reminder: still offline, as remote.it knows it
    "gateway.online": "device_state",  # a hub's gateway (its device id is the gateway's name)
    "gateway.offline": "device_state",
    "webhook.test": "test",
}
_KOBITON_ACTIVITY: dict[str, tuple[str, str]] = {
    "device.online": ("device.status.online", "Online"),
    "device.offline": ("device.status.offline", "Offline"),
    "device.utilizing": ("device.state.utilizing", "Utilizing"),
    "device.unplugged": ("device.state.unplugged", "Unplugged"),
    "device.address_changed": ("device.address_changed", "Address changed"),
    "device.still_offline": ("device.status.offline", "Offline"),  # a reminder renders as offline
    "gateway.online": ("device.status.online", "Online"),  # a hub's gateway, as a device
    "gateway.offline": ("device.status.offline", "Offline"),
    "webhook.test": ("webhook.test", "Test"),
}


@dataclass(frozen=True, slots=True)
class EventData:
    id: str  # "evt_<32 hex>": Webhook-Id, same for every endpoint
    type: str  # one of EVENT_TYPES
    time: float  # unix seconds (wall clock) when it happened
    reason: str | None  # heartbeat|timeout|shutdown|reboot|reported (None for webhook.test)
    device_id: str
    name: str | None
    state: str  # the device's new state
    previous_state: str  # "unknown" for the first event
    address: str | None
    owner: str | None
    last_seen: float | None  # unix seconds
    offline_for: float | None  # seconds offline, on online after offline (and on still_offline)
    reminder: int | None = None  # device.still_offline: 1, 2, ...
    gateway: str | None = None  # at a hub: the gateway that relayed it (its device id is `<gateway>:<id>`)

    def to_json(self) -> bytes:
        return _STORE_ENCODER.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> EventData:
        return _STORE_DECODER.decode(data)


_STORE_ENCODER = msgspec.json.Encoder()
_STORE_DECODER = msgspec.json.Decoder(EventData)
_ENCODER = msgspec.json.Encoder()


_ID_PREFIX = "evt_" + secrets.token_hex(8)  # 64 random bits per process
_id_counter = itertools.count(int.from_bytes(secrets.token_bytes(4)))


def new_event_id() -> str:
    """A fresh event id: ``evt_`` + 32 hex digits (a random per-process half, then a counter).

    Unique without a urandom call per event, which showed in the transition profile."""
    return f"{_ID_PREFIX}{next(_id_counter) & 0xFFFFFFFFFFFFFFFF:016x}"


def event_type_for(kind: str) -> str:
    """Config event kind (``online``, ``address_changed``, ``gateway_online``...) -> event type
    (``device.online``, ``device.address_changed``, ``gateway.online``...)."""
    if kind.startswith("gateway_"):
        return "gateway." + kind.removeprefix("gateway_")
    return "device." + kind


def make_test_event(now: float | None = None, event_id: str | None = None) -> EventData:
    """The ``webhook.test`` event sent by ``webhookd endpoints test``."""
    ts = time.time() if now is None else now
    return EventData(
        id=event_id or new_event_id(),
        type="webhook.test",
        time=ts,
        reason=None,
        device_id=TEST_DEVICE_ID,
        name="webhookd test",
        state="online",
        previous_state="online",
        address=None,
        owner=None,
        last_seen=ts,
        offline_for=None,
    )


@functools.lru_cache(maxsize=4096)
def _utc_seconds(sec: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))


def rfc3339(ts: float) -> str:
    """Unix seconds -> RFC 3339 UTC with milliseconds (rounded), e.g. ``2026-11-22T05:04:00.123Z``."""
    sec, ms = divmod(round(ts * 1000), 1000)
    return f"{_utc_seconds(sec)}.{ms:03d}Z"


def rfc3339_opt(ts: float | None) -> str | None:
    return None if ts is None else rfc3339(ts)


@functools.lru_cache(maxsize=1024)
def kobiton_webhook_id(endpoint_name: str) -> int:
    """A stable positive 31-bit integer per endpoint name (CRC-32 of its UTF-8 bytes)."""
    return zlib.crc32(endpoint_name.encode()) & 0x7FFFFFFF


def webhookd_object(event: EventData, endpoint_name: str) -> dict[str, Any]:
    """The ``webhookd`` format's object (also a template's ``event``)."""
    return {
        "id": event.id,
        "type": event.type,
        "time": rfc3339(event.time),
        "reason": event.reason,
        "device": {
            "id": event.device_id,
            "name": event.name,
            "state": event.state,
            "previous_state": event.previous_state,
            "address": event.address,
            "owner": event.owner,
            "last_seen": rfc3339_opt(event.last_seen),
        },
        "offline_for": None if event.offline_for is None else round(event.offline_for, 3),
        "endpoint": endpoint_name,
        **({"reminder": event.reminder} if event.reminder is not None else {}),
        **({"gateway": event.gateway} if event.gateway is not None else {}),
    }


def _remoteit(event: EventData) -> dict[str, Any]:
    try:
        kind = _REMOTEIT_TYPE[event.type]
    except KeyError:
        raise ValueError(f"unknown event type {event.type!r}") from None
    return {
        "Address": event.address,
        "Device": event.device_id,
        "Email": event.owner,
        "Name": event.name or event.device_id,
        "State": event.state,
        "Time": rfc3339(event.time),
        "Type": kind,
    }


def _kobiton(event: EventData, endpoint_name: str) -> dict[str, Any]:
    try:
        activity, description = _KOBITON_ACTIVITY[event.type]
    except KeyError:
        raise ValueError(f"unknown event type {event.type!r}") from None
    return {
        "creationTime": rfc3339(event.time),
        "eventType": "DEVICE",
        "eventActivity": activity,
        "eventDescription": description,
        "deviceUdid": event.device_id,
        "deviceName": event.name or event.device_id,
        "orgId": None,
        "webhookId": kobiton_webhook_id(endpoint_name),
        "webhookName": endpoint_name,
    }


def content_type(endpoint: EndpointConfig) -> str:
    """The Content-Type of every body of `endpoint` (its format's; `content_type` for ``format: template``)."""
    if endpoint.format == "ntfy":
        return "text/plain; charset=utf-8"
    if endpoint.format == "template":
        return endpoint.content_type
    return "application/json"


_NO_HEADERS: dict[str, str] = {}


def render_request(event: EventData, endpoint: EndpointConfig) -> tuple[bytes, dict[str, str]]:
    """The body of `event` for `endpoint` and the headers that go with this body (ntfy's Title, Priority, Tags;
    none for the other formats). Raises messages.RenderError when a template fails."""
    fmt = endpoint.format
    if fmt == "ntfy":
        return messages.sentence(event).encode(), messages.ntfy_headers(event)
    if fmt == "template":
        if endpoint.template is None:
            raise messages.RenderError("format: template without a template")
        context = {
            "event": webhookd_object(event, endpoint.name),
            "text": messages.sentence(event),
            "endpoint": endpoint.name,
        }
        return messages.render_template(endpoint.template, endpoint.content_type, context), _NO_HEADERS
    return render(event, endpoint), _NO_HEADERS


def render(event: EventData, endpoint: EndpointConfig) -> bytes:
    """The body of `event` for `endpoint` (its ``format`` and ``secret_field``): compact JSON, or text for ntfy.

    Render once per (event, endpoint) and reuse the bytes for every attempt: only the signature changes.
    """
    fmt = endpoint.format
    body: dict[str, Any]
    if fmt == "webhookd":
        body = webhookd_object(event, endpoint.name)
    elif fmt == "remoteit":
        body = _remoteit(event)
    elif fmt == "kobiton":
        body = _kobiton(event, endpoint.name)
    elif fmt == "slack":
        body = messages.slack(event)
    elif fmt == "discord":
        body = messages.discord(event)
    elif fmt == "teams":
        body = messages.teams(event, rfc3339(event.time))
    elif fmt in ("ntfy", "template"):
        return render_request(event, endpoint)[0]
    else:
        raise ValueError(f"unknown payload format {fmt!r}")
    if endpoint.secret_field and endpoint.secrets:
        body[endpoint.secret_field] = endpoint.secrets[0]
    return _ENCODER.encode(body)
