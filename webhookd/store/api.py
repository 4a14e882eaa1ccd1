"""What the rest of webhookd needs from a store, independent of the backend: row types, errors, `DeliveryStore`.

The tracker records state changes through it (`record`, `save_devices`), the dispatcher pages pending deliveries
out of it and saves receipts (`load_pending_page`, `load_pending_lane`, `save_receipts`, `hold`, `release`,
`requeue`), the admin API and the metrics read counts and listings, retention prunes, and the daemon opens,
supervises and closes it. The SQLite backend (`webhookd.store.sqlite`) implements it; a PostgreSQL backend will
implement the same Protocol and pass the same conformance suite (tests/test_store_conformance.py).

Nothing here knows about SQL connections: a backend-specific escape hatch (the SQLite backend's `read(fn)` /
`write(fn)`) stays on that backend's class.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from webhookd.gateways import GatewayRow, Seen
from webhookd.mutes import MuteRule
from webhookd.payloads import EventData
from webhookd.presence import Device
from webhookd.states import DeliveryStatus


class StoreError(Exception):
    """The store cannot be opened or written; the message is meant for an operator."""


class StoreUnavailable(StoreError):
    """A write failed (disk full, read-only, I/O error): nothing of it was recorded."""


@dataclass(slots=True)
class EndpointRow:
    """An endpoint's persisted health: survives restarts and reloads."""

    name: str
    disabled: bool = False
    disabled_reason: str | None = None
    consecutive_failures: int = 0
    last_error: str | None = None


@dataclass(slots=True)
class DeliveryRow:
    """A pending delivery as the dispatcher needs it (its event decoded; the device is `event.device_id`)."""

    id: int
    event: EventData
    endpoint: str
    attempts: int
    next_attempt_at: float | None  # unix seconds


@dataclass(frozen=True, slots=True)
class Receipt:
    """One attempt's result as it is persisted on its delivery row."""

    delivery_id: int
    status: DeliveryStatus
    attempts: int
    next_attempt_at: float | None
    last_status: int | None
    last_error: str | None


@dataclass(slots=True)
class Change:
    """One device's new state, its event (None: the device row only) and one delivery per (endpoint, status)."""

    device: Device
    event: EventData | None
    targets: list[tuple[str, DeliveryStatus]] = field(default_factory=list)


@dataclass(slots=True)
class Requeued:
    """What `requeue` did."""

    total: int  # rows requeued (pending or held)
    held: int  # of those, how many became held (their endpoint is disabled or not configured)
    first_pending: dict[str, int]  # per endpoint: the smallest id that became pending
    missing: list[int]  # ids asked for that do not exist


class Pruned(NamedTuple):
    """What one `prune` removed (compares equal to the plain tuple)."""

    deliveries: int
    events: int
    pages: int  # storage handed back (SQLite: freed pages; 0 where a backend has no such thing)


@dataclass(slots=True)
class GatewayWrite:
    """What a gateway write did: the gateway's new row, and the event it made (None: none) with the deliveries
    created `pending` for it (in id order); for a relay, the relayed event's pending deliveries (None: the hub had
    taken that event id already, or no event was relayed)."""

    row: GatewayRow
    event: EventData | None = None
    rows: list[DeliveryRow] = field(default_factory=list)
    relayed: list[DeliveryRow] | None = None


Targets = list[tuple[str, DeliveryStatus]]


class DeliveryStore(Protocol):
    """The store of device states, events and their deliveries (the transactional outbox).

    Every write is durable when its awaitable resolves; a write that fails raises `StoreUnavailable` and left
    nothing of itself behind. Once the store itself is broken (its writer died of an unexpected exception) every
    write fails at once with `StoreError`, `healthy` is False and `supervise()` raises."""

    on_write: Callable[[float], None] | None
    """Metrics hook: called with each write transaction's duration in seconds."""

    @property
    def healthy(self) -> bool:
        """True while the last write committed (and the store is alive); /healthz and metrics show it."""

    @property
    def last_error(self) -> str | None:
        """Why the last write failed, while `healthy` is False."""

    @property
    def location(self) -> str:
        """Where the data lives, for operator messages (a path, or a URL without credentials)."""

    # --- lifecycle -----------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, refuse a store this version must not use (newer schema, foreign or garbage data) with a
        `StoreError` naming it and without changing it, then migrate the schema and start the writer."""

    async def close(self) -> None:
        """Let queued writes finish, stop the writer, disconnect; `supervise()` then returns."""

    async def supervise(self) -> None:
        """Return when the store is closed normally; raise the exception its writer (or its own background
        probe) died of. The daemon runs this in its TaskGroup, so a broken store exits the process."""

    async def probe(self) -> bool:
        """A tiny real write: whether the store can commit again. (The store also probes by itself while
        unhealthy, so it recovers within about a second of the fault going away.)"""

    # --- devices -------------------------------------------------------------------------------------

    async def load_devices(self) -> list[Device]:
        """Every device as last saved."""

    async def save_devices(self, devices: Sequence[Device]) -> None:
        """Upsert device rows (liveness: last_seen, name, address), in order: the last copy of a device wins."""

    async def forget_device(self, device_id: str) -> bool:
        """Delete the device's row and the mute rule whose match is exactly its id, in one transaction; its
        events and deliveries stay (pending ones are still delivered). Returns whether the device had a row."""

    # --- mutes ---------------------------------------------------------------------------------------

    async def load_mutes(self) -> list[MuteRule]:
        """Every mute rule saved (expired ones included: the caller ignores them), by match."""

    async def save_mute(self, rule: MuteRule) -> None:
        """Insert the rule, or replace the rule with the same match."""

    async def delete_mutes(self, matches: Sequence[str]) -> int:
        """Delete the rules with these matches; returns how many existed."""

    # --- the outbox ----------------------------------------------------------------------------------

    async def record(self, changes: Sequence[Change]) -> list[DeliveryRow]:
        """Write every change's device row, event and deliveries in ONE transaction: an event exists durably
        exactly when its device's new state does. Delivery ids increase in the order of `changes` and
        `targets`; returns the deliveries created `pending` (not `held`), in id order."""

    async def record_relayed(self, change: Change) -> list[DeliveryRow] | None:
        """`record([change])` for an event relayed to a hub, unless an event with its id exists already: then
        None and nothing is written (a gateway's retry of an event the hub has taken; across every process
        sharing the store)."""

    async def load_pending_page(self, endpoint: str, after_id: int, limit: int) -> list[DeliveryRow]:
        """Pending deliveries of `endpoint` with id > `after_id`, in id order, at most `limit` (an index range:
        as fast with a million pending rows as with ten)."""

    async def load_pending_lane(self, endpoint: str, device_id: str, after_id: int, limit: int) -> list[DeliveryRow]:
        """`load_pending_page` restricted to the events of one device (one lane)."""

    async def pending_count(self) -> int:
        """How many deliveries are pending, over every endpoint (a status line every few seconds)."""

    def save_receipts(self, receipts: Sequence[Receipt], endpoints: Sequence[EndpointRow]) -> asyncio.Future[None]:
        """Queue attempt results and endpoint rows (copied now) as one write, at once, without a task; the
        future resolves when they are committed, or fails with `StoreUnavailable`.

        A receipt (`delivered`) or a hold may land on a row that is `held` by now; a retry (`pending`) or a death
        (`dead`) may not take a row out of `held` (its endpoint was disabled meanwhile; held rows wait for
        `release`). Rows that are neither pending nor held are left alone."""

    async def requeue(
        self,
        ids: Sequence[int] | None,
        endpoint: str | None,
        status: DeliveryStatus | None,
        held_endpoints: set[str],
    ) -> Requeued:
        """Give deliveries a fresh attempt budget (attempts 0, due now, no last error): the rows `ids` whatever
        their status, or (ids None) the rows of `endpoint` with `status` (None: any status). Rows of an
        endpoint in `held_endpoints` become held, the others pending. Rows are never loaded into memory."""

    # --- endpoints -----------------------------------------------------------------------------------

    async def load_endpoints(self) -> dict[str, EndpointRow]:
        """Every endpoint row saved, by name."""

    async def hold(self, endpoint: EndpointRow | str) -> int:
        """Pending deliveries of the endpoint become held (disabled, or no longer configured); an EndpointRow
        is saved in the same transaction. Returns how many rows became held."""

    async def release(self, endpoint: EndpointRow) -> int:
        """Save the endpoint row; its held deliveries become pending, each with a fresh attempt budget, due now.
        Returns how many."""

    async def endpoint_names(self) -> set[str]:
        """Every endpoint name the store knows: saved rows and names on deliveries."""

    # --- admin and metrics ---------------------------------------------------------------------------

    async def delivery_counts(self) -> dict[str, dict[str, int]]:
        """{endpoint: {status: n}} over every delivery (statuses with no rows are absent)."""

    async def list_deliveries(
        self, status: DeliveryStatus | None, endpoint: str | None, limit: int
    ) -> list[dict[str, Any]]:
        """The newest `limit` deliveries (id descending) with that status / endpoint (None: any), as dicts with
        the keys id, event_id, endpoint, device, type, status, attempts, next_attempt_at, last_status,
        last_error, created_at (unix seconds)."""

    # --- retention -----------------------------------------------------------------------------------

    async def prune(self, older_than: float) -> Pruned:
        """Delete delivered and dead deliveries last updated before `older_than` (unix seconds), then events
        older than that no delivery refers to, in small transactions (other writes get in between)."""

    # --- gateways (a hub's) --------------------------------------------------------------------------

    async def touch_gateway(
        self, name: str, now: float, silence: float, seen: Seen, targets: Targets, relayed: Change | None = None
    ) -> GatewayWrite:
        """An accepted relay or heartbeat of gateway `name`, in ONE transaction: the relayed event (if any) as
        `record_relayed` records it (counted in `relayed` when it was new), then the gateway's row locked and
        read, the rule (gateways.seen) applied, the row written, and a `gateway.online` it makes recorded with one
        delivery per `targets` as `record()` does (no device row)."""

    async def gateway_rejected(self, name: str, error: str) -> None:
        """Keep why the last request from a configured gateway was refused (its row's `last_error`)."""

    async def expire_gateways(self, now: float, targets: Mapping[str, Targets]) -> list[GatewayWrite]:
        """Every gateway named in `targets` that is online with its deadline passed goes offline with one
        `gateway.offline` (its deliveries: its `targets`); each flip under the row's lock and rechecked, so that
        of several processes sharing the store exactly one makes it."""

    async def restart_gateways(self, now: float, timeouts: Mapping[str, float], started: float) -> int:
        """At a hub's start: unless another hub process (one that started before `started`) is alive, every
        online gateway in `timeouts` gets a full timeout from `now`. Returns how many were given one."""

    async def load_gateways(self) -> list[GatewayRow]:
        """Every gateway row, by name."""
