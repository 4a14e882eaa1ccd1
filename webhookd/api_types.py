"""The admin API's documents (CONTRACT §2 ``--json`` shapes, §8) as msgspec Structs, one place for both sides.

The CLI decodes the daemon's answers into these: a missing or mistyped field is refused with the field's path
(``Expected `int`, got `str` - at `$[0].attempts```), never half-read. Fields a newer daemon adds are ignored,
so they do not break an older CLI. ``admin.py`` can build its answers from the same Structs. Times are
RFC 3339 UTC strings on the wire and ``datetime`` here (msgspec validates and parses them).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from webhookd.states import DeliveryStatus, DeviceState

# GET /v1/deliveries: how many rows matched the filter, whatever the limit (the body stays a list).
TOTAL_HEADER = "X-Total-Count"
# GET /v1/gateways on a process without hub: (404)
NOT_A_HUB = "this webhookd is not a hub (no hub: in its config): it has no gateways"

__all__ = [
    "NOT_A_HUB",
    "TOTAL_HEADER",
    "ApiError",
    "DeliveryCounts",
    "DeliveryInfo",
    "DeviceCounts",
    "DeviceInfo",
    "EndpointCounts",
    "EndpointInfo",
    "EndpointTestResult",
    "GatewayInfo",
    "MqttStatus",
    "MuteInfo",
    "MuteRequest",
    "ReplayRequest",
    "Replayed",
    "Status",
    "StoreHealth",
    "UnmuteRequest",
]

Count = Annotated[int, msgspec.Meta(ge=0)]


class ApiError(msgspec.Struct, frozen=True):
    """Every 4xx/5xx answer: ``{"error": "unknown endpoint 'x'"}``."""

    error: Annotated[str, msgspec.Meta(min_length=1)]


# ---------------------------------------------------------------------------------------- GET /v1/status


class DeviceCounts(msgspec.Struct, frozen=True):
    online: Count
    utilizing: Count
    unplugged: Count
    offline: Count
    total: Count


class EndpointCounts(msgspec.Struct, frozen=True):
    enabled: Count
    disabled: Count


class DeliveryCounts(msgspec.Struct, frozen=True):
    """Deliveries per status, over every endpoint."""

    pending: Count
    held: Count
    delivered: Count
    dead: Count


class StoreHealth(msgspec.Struct, frozen=True):
    healthy: bool  # false: the store cannot write (state changes are refused with 503)


class MqttStatus(msgspec.Struct, frozen=True):
    connected: bool
    broker: str  # the URL without credentials
    since: datetime | None  # of the last connect, or of the drop while disconnected
    sources: dict[str, int]  # source name -> devices seen through it


class Status(msgspec.Struct, frozen=True):
    version: str
    pid: int
    started_at: datetime
    uptime_s: float
    devices: DeviceCounts
    endpoints: EndpointCounts
    deliveries: DeliveryCounts
    store: StoreHealth
    mqtt: MqttStatus | None = None


# -------------------------------------------------------------------------- GET /v1/devices, /v1/devices/{id}


class DeviceInfo(msgspec.Struct, frozen=True):
    id: str
    name: str | None
    state: DeviceState
    address: str | None
    owner: str | None
    last_seen: datetime | None
    source: Literal["http", "udp", "mqtt", "relay"] = "http"
    muted: bool = False  # (a daemon older than mutes: never)
    muted_until: datetime | None = None  # a timed mute's end; None: not muted, or until unmute
    stale: bool | None = None  # on a hub: its gateway is offline (its state is the last one it relayed)


# ------------------------------------------------------------------ POST /v1/devices/mute, /v1/devices/unmute


class MuteRequest(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """``{"match": "printer-*", "for": "2h", "reason": "toner swap"}``: without ``for``, until unmute."""

    match: Annotated[str, msgspec.Meta(min_length=1)]
    for_: str | None = msgspec.field(default=None, name="for")
    reason: str | None = None


class UnmuteRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    match: Annotated[str, msgspec.Meta(min_length=1)]  # exactly the match of a mute


class MuteInfo(msgspec.Struct, frozen=True):
    """A mute rule (the answer to mute and unmute) and the devices it covers (covered, for unmute) now."""

    match: str
    until: datetime | None  # None: until unmute
    reason: str | None
    created_at: datetime
    created_by: str | None  # the user who muted (the admin socket's peer)
    devices: list[str]


# ------------------------------------------------------ GET /v1/endpoints; POST /v1/endpoints/{name}/enable|disable


class EndpointInfo(msgspec.Struct, frozen=True):
    """One endpoint; also the answer to enable and disable (the endpoint as they left it)."""

    name: str
    url: str  # without credentials; "" for an endpoint known to the store only (no longer in the config)
    enabled: bool
    disabled_reason: str | None
    consecutive_failures: Count
    pending: Count
    held: Count
    delivered: Count
    dead: Count
    last_error: str | None


# ------------------------------------------------------------------------- POST /v1/endpoints/{name}/test


class EndpointTestResult(msgspec.Struct, frozen=True):
    endpoint: str
    ok: bool  # a 2xx arrived in full
    status: int | None  # None: no HTTP answer (refused, timed out, ...)
    latency_ms: float
    error: str | None


# ----------------------------------------------------------------------------------------- GET /v1/gateways


class GatewayInfo(msgspec.Struct, frozen=True):
    """One of a hub's gateways (every configured one; never heard from: state unknown)."""

    name: str
    state: Literal["unknown", "online", "offline"]
    last_seen: datetime | None  # of its last accepted relay or heartbeat
    address: str | None  # the peer address of that request
    devices: int | None  # as its last heartbeat said
    relayed: Count  # events taken from it
    last_error: str | None  # why its last refused request was refused


# --------------------------------------------------------------------------------------- GET /v1/deliveries


class DeliveryInfo(msgspec.Struct, frozen=True):
    id: int
    event_id: str
    endpoint: str
    device: str
    type: str  # the event type: device.online, device.address_changed, webhook.test, ...
    status: DeliveryStatus
    attempts: Count
    next_attempt_at: datetime | None  # only while pending
    last_status: int | None
    last_error: str | None
    created_at: datetime


# ---------------------------------------------------------------------------------- POST /v1/deliveries/replay


class ReplayRequest(msgspec.Struct, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """``{"ids": [...]}``, or ``{"endpoint": NAME, "status": S}`` (the daemon takes ``dead`` without one)."""

    ids: Annotated[list[int], msgspec.Meta(min_length=1)] | None = None
    endpoint: str | None = None
    status: DeliveryStatus | None = None


class Replayed(msgspec.Struct, frozen=True):
    """``replayed`` counts every delivery queued again; ``held`` those of them that wait for their endpoint,
    which ``held_endpoints`` names when the daemon can tell (name -> ``disabled`` or ``not configured``);
    ``missing``: the ids asked for that no delivery has. The defaults are what a daemon older than them meant."""

    replayed: Count
    held: Count = 0
    held_endpoints: dict[str, str] = {}
    missing: list[int] = []
