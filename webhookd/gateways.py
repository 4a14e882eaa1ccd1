"""A hub's gateways' liveness (CONTRACT §14) as pure functions of a gateway's stored row and `now`.

Any accepted relay or heartbeat counts as the gateway being alive (`seen`): a gateway never heard from (no row,
or a row with state `unknown`) or one that is `offline` becomes `online` with one `gateway.online` event (reason
`heartbeat`; after an offline with `offline_for`), and its deadline moves to `now + silence_timeout`. A deadline
check (`check`) of an `online` gateway whose deadline has passed makes it `offline` with one `gateway.offline`
(reason `timeout`). At a hub's start (`restart`) an online gateway gets a full timeout from then. The event's
device object is the gateway itself: id and name = its name, address = the peer's address.

Times are wall-clock unix seconds: the rows are shared by every process of a hub (the store applies these rules
inside one transaction per gateway, with the row locked, so exactly one process makes each event).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final, Literal

from webhookd.payloads import EventData, new_event_id

GatewayState = Literal["unknown", "online", "offline"]
GATEWAY_STATES: Final[tuple[GatewayState, ...]] = ("unknown", "online", "offline")
ONLINE_TYPE: Final = "gateway.online"
OFFLINE_TYPE: Final = "gateway.offline"
ERROR_MAX: Final = 200  # characters of a stored last_error


@dataclass(frozen=True, slots=True)
class GatewayRow:
    """A gateway as the store keeps it (the `gateways` table)."""

    name: str
    state: GatewayState = "unknown"
    last_seen: float | None = None  # unix seconds of its last accepted relay or heartbeat
    deadline: float | None = None  # while online: when its silence timeout runs out
    changed_at: float | None = None  # when it last went online or offline
    address: str | None = None  # the peer address of its last accepted request
    devices: int | None = None  # as its last heartbeat said
    relayed: int = 0  # events taken from it (across the hub)
    last_error: str | None = None  # why its last rejected request was rejected


@dataclass(frozen=True, slots=True)
class Seen:
    """What one accepted request from a gateway says."""

    address: str | None
    devices: int | None = None  # a heartbeat's count (None: keep the stored one)
    relayed: int = 0  # new events taken with it (1 for a relay recorded, 0 for a heartbeat or a duplicate)


def gateway_event(
    row: GatewayRow, etype: str, previous: str, now: float, *, offline_for: float | None = None
) -> EventData:
    """A `gateway.online` / `gateway.offline` event of `row` (its new state) at `now`."""
    return EventData(
        id=new_event_id(),
        type=etype,
        time=now,
        reason="heartbeat" if etype == ONLINE_TYPE else "timeout",
        device_id=row.name,
        name=row.name,
        state="online" if etype == ONLINE_TYPE else "offline",
        previous_state=previous,
        address=row.address,
        owner=None,
        last_seen=row.last_seen,
        offline_for=offline_for,
        gateway=row.name,
    )


def probe_event(name: str, etype: str) -> EventData:
    """An event of that type for that gateway, to ask which endpoints want it (the dispatcher's `targets`)."""
    return gateway_event(GatewayRow(name), etype, "unknown", 0.0)


def seen(
    row: GatewayRow | None, name: str, now: float, timeout: float, what: Seen
) -> tuple[GatewayRow, EventData | None]:
    """An accepted relay or heartbeat from gateway `name` at `now`: its new row, and the `gateway.online` event
    when it was unknown or offline (None while it stays online)."""
    old = row if row is not None else GatewayRow(name)
    new = dataclasses.replace(
        old,
        last_seen=now,
        deadline=now + timeout,
        address=what.address if what.address is not None else old.address,
        devices=what.devices if what.devices is not None else old.devices,
        relayed=old.relayed + what.relayed,
    )
    if old.state == "online":
        return new, None
    new = dataclasses.replace(new, state="online", changed_at=now)
    offline_for = None
    if old.state == "offline" and old.changed_at is not None:
        offline_for = max(0.0, now - old.changed_at)
    return new, gateway_event(new, ONLINE_TYPE, old.state, now, offline_for=offline_for)


def check(row: GatewayRow, now: float) -> tuple[GatewayRow, EventData] | None:
    """A deadline check at `now`: an online gateway whose deadline has passed goes offline (its row and its
    `gateway.offline`); None for any other (online within its timeout, offline, unknown)."""
    if row.state != "online" or row.deadline is None or row.deadline > now:
        return None
    new = dataclasses.replace(row, state="offline", changed_at=now, deadline=None)
    return new, gateway_event(new, OFFLINE_TYPE, "online", now)


def restart(row: GatewayRow, now: float, timeout: float) -> GatewayRow | None:
    """A hub starting with no other live process: an online gateway gets a full timeout from `now` (its new
    row), so that the hub's own downtime makes no offline; None when nothing changes."""
    if row.state != "online":
        return None
    deadline = now + timeout
    if row.deadline is not None and row.deadline >= deadline:
        return None
    return dataclasses.replace(row, deadline=deadline)


def short_error(status: int, error: str) -> str:
    """A rejection as `last_error`: its status and reason, one line, at most ERROR_MAX characters (the reasons
    the hub gives never hold a secret)."""
    text = " ".join(f"{status} {error}".split())
    return text if len(text) <= ERROR_MAX else text[: ERROR_MAX - 1] + "…"
