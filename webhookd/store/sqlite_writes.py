"""Write operations as data, and how the SQLite writer runs a group commit of them.

The hot writes are data, not closures: `RecordOp` (transitions: device rows, events, deliveries), `DevicesOp`
(liveness), `ReceiptsOp` (attempt results and endpoint rows). The writer runs everything queued meanwhile in one
transaction, and `apply` merges each run of adjacent hot operations into ONE `executemany` per table, then maps
the generated delivery ids back to each `record()` caller. Everything else (`CallOp`: a function of the
connection) runs in queue order between those runs, so no write overtakes one queued before it that it could
depend on.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from webhookd.payloads import EventData
from webhookd.presence import Device
from webhookd.store.api import Change, DeliveryRow, EndpointRow, Receipt

# (device, event, [(endpoint, status)]): what record() took before Change existed (kept while callers switch)

# One device as a DeviceRow (its columns in that order); `?` for SQLite, `%s` for PostgreSQL.
SELECT_DEVICE = (
    "SELECT id, state, name, owner, address, last_seen, changed_at, source, timed, reminders, offline_reason,"
    " held_reason, held_previous FROM devices WHERE id = ?"
)
UPSERT_DEVICE = (
    "INSERT INTO devices (id, state, name, owner, address, last_seen, changed_at, source, timed, reminders,"
    " offline_reason, held_reason, held_previous) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (id) DO UPDATE SET state=excluded.state,"
    " name=excluded.name, owner=excluded.owner, address=excluded.address,"
    " last_seen=excluded.last_seen, changed_at=excluded.changed_at, source=excluded.source, timed=excluded.timed,"
    " reminders=excluded.reminders, offline_reason=excluded.offline_reason, held_reason=excluded.held_reason,"
    " held_previous=excluded.held_previous"
)
INSERT_EVENT = "INSERT INTO events (id, type, device_id, created_at, data) VALUES (?, ?, ?, ?, ?)"
INSERT_DELIVERY = (
    "INSERT INTO deliveries (event_id, endpoint, device_id, type, status, attempts,"
    " next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)"
)
# A receipt (delivered) or a hold may land on a row that is held by now; a retry or a death may not take a row
# out of held (the endpoint was disabled meanwhile, and held rows wait for `release`).
UPDATE_RECEIPT = (
    "UPDATE deliveries SET status=?, attempts=?, next_attempt_at=?, last_status=?, last_error=?,"
    " updated_at=? WHERE id=? AND status IN ('pending', ?)"
)
UPSERT_ENDPOINT = (
    "INSERT INTO endpoints (name, disabled, disabled_reason, consecutive_failures, last_error)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET disabled=excluded.disabled,"
    " disabled_reason=excluded.disabled_reason,"
    " consecutive_failures=excluded.consecutive_failures, last_error=excluded.last_error"
)

DeviceRow = tuple[
    str,
    str,
    str | None,
    str | None,
    str | None,
    float | None,
    float | None,
    str,
    int,
    int,
    str | None,
    str | None,
    str | None,
]
EndpointTuple = tuple[str, int, str | None, int, str | None]


def device_row(d: Device) -> DeviceRow:
    return (
        d.id,
        d.state,
        d.name,
        d.owner,
        d.address,
        d.last_seen,
        d.changed_at,
        d.source,
        int(d.timed),
        d.reminders,
        d.offline_reason,
        d.held_reason,
        d.held_previous,
    )


def endpoint_row(r: EndpointRow) -> EndpointTuple:
    return (r.name, int(r.disabled), r.disabled_reason, r.consecutive_failures, r.last_error)


@dataclass(slots=True)
class RecordOp:
    changes: Sequence[Change]
    rows: int


@dataclass(slots=True)
class DevicesOp:
    devices: list[DeviceRow]  # converted when queued: later changes to the Device objects do not leak in

    @property
    def rows(self) -> int:
        return len(self.devices)


@dataclass(slots=True)
class ReceiptsOp:
    receipts: list[tuple[Any, ...]]  # UPDATE_RECEIPT parameters, built when queued
    endpoints: list[EndpointTuple]  # copied when queued

    @property
    def rows(self) -> int:
        return len(self.receipts) + len(self.endpoints)


@dataclass(slots=True)
class CallOp:
    fn: Callable[[sqlite3.Connection], Any]
    rows: int = 1


WriteOp = RecordOp | DevicesOp | ReceiptsOp | CallOp


def record_op(changes: Sequence[Change]) -> RecordOp:
    rows = 0
    for ch in changes:
        rows += 2 + len(ch.targets)
    return RecordOp(changes, rows)


def receipts_op(receipts: Sequence[Receipt], endpoints: Sequence[EndpointRow], now: float) -> ReceiptsOp:
    return ReceiptsOp(
        [
            (
                r.status,
                r.attempts,
                r.next_attempt_at,
                r.last_status,
                r.last_error,
                now,
                r.delivery_id,
                "held" if r.status in ("delivered", "held") else "pending",
            )
            for r in receipts
        ],
        [endpoint_row(e) for e in endpoints],
    )


def apply(c: sqlite3.Connection, ops: Sequence[WriteOp]) -> list[Any]:
    """Run `ops` on `c` inside the caller's transaction; returns each op's result, in order."""
    results: list[Any] = [None] * len(ops)
    run: list[int] = []
    for i, op in enumerate(ops):
        if isinstance(op, CallOp):
            if run:
                _merged(c, ops, run, results)
                run = []
            results[i] = op.fn(c)
        else:
            run.append(i)
    if run:
        _merged(c, ops, run, results)
    return results


def _merged(c: sqlite3.Connection, ops: Sequence[WriteOp], run: list[int], results: list[Any]) -> None:
    """One executemany per table for the hot operations `ops[i] for i in run` (adjacent in the queue).

    Within the run, rows keep queue order (the last copy of a device wins, delivery ids follow the order of the
    record() calls). Receipts never refer to deliveries created in the same run (a delivery reaches a worker
    only after its commit), so updating them after the inserts changes nothing."""
    devices: list[DeviceRow] = []
    events: list[tuple[str, str, str, float, bytes]] = []
    wanted: list[tuple[EventData, str, str]] = []  # (event, endpoint, status), one per delivery row
    slices: list[tuple[int, int, int]] = []  # (op index, start, end) in `wanted`
    receipts: list[tuple[Any, ...]] = []
    endpoints: list[EndpointTuple] = []
    for i in run:
        op = ops[i]
        if isinstance(op, RecordOp):
            start = len(wanted)
            for ch in op.changes:
                device, event, targets = ch.device, ch.event, ch.targets
                devices.append(device_row(device))
                if event is not None:
                    events.append((event.id, event.type, event.device_id, event.time, event.to_json()))
                    wanted.extend((event, endpoint, status) for endpoint, status in targets)
            slices.append((i, start, len(wanted)))
        elif isinstance(op, DevicesOp):
            devices.extend(op.devices)
        elif isinstance(op, ReceiptsOp):
            receipts.extend(op.receipts)
            endpoints.extend(op.endpoints)
    if devices:
        c.executemany(UPSERT_DEVICE, devices)
    if events:
        c.executemany(INSERT_EVENT, events)
    ids: list[int] = []
    if wanted:
        # The ids come back by range: this transaction is the only writer, so its rows are those above the
        # old max (one statement for every delivery of the group; a power cut records thousands at once).
        (before,) = c.execute("SELECT coalesce(max(id), 0) FROM deliveries").fetchone()
        c.executemany(
            INSERT_DELIVERY,
            [(e.id, endpoint, e.device_id, e.type, status, e.time, e.time, e.time) for e, endpoint, status in wanted],
        )
        ids = [r[0] for r in c.execute("SELECT id FROM deliveries WHERE id > ? ORDER BY id", (before,))]
        if len(ids) != len(wanted):
            raise sqlite3.DatabaseError(f"expected {len(wanted)} new deliveries, found {len(ids)}")
    for i, start, end in slices:
        results[i] = [
            DeliveryRow(ids[k], wanted[k][0], wanted[k][1], 0, wanted[k][0].time)
            for k in range(start, end)
            if wanted[k][2] == "pending"
        ]
    if receipts:
        c.executemany(UPDATE_RECEIPT, receipts)
    if endpoints:  # one row per endpoint: the last copy queued wins
        c.executemany(UPSERT_ENDPOINT, list({e[0]: e for e in endpoints}.values()))


def upsert_endpoints(c: sqlite3.Connection, rows: Sequence[EndpointRow]) -> None:
    c.executemany(UPSERT_ENDPOINT, [endpoint_row(r) for r in rows])


def record_relayed(c: sqlite3.Connection, change: Change) -> list[DeliveryRow] | None:
    """A relayed event's `record`, skipped (None) when an event with its id exists (this transaction is the only
    writer, so the check holds until the commit)."""
    assert change.event is not None
    if c.execute("SELECT 1 FROM events WHERE id = ?", (change.event.id,)).fetchone() is not None:
        return None
    stored = c.execute(SELECT_DEVICE, (change.device.id,)).fetchone()
    rows: list[DeliveryRow] = apply(c, [record_op([change])])[0]
    if newer_than(stored, change.event.time):
        apply(c, [DevicesOp([tuple(stored)])])
    return rows


def newer_than(stored: Sequence[Any] | None, event_time: float) -> bool:
    """Is the stored device row (SELECT_DEVICE) newer than a relayed event? An older event relayed late is
    recorded and delivered, but the device keeps the newer state (as the hub's engine does)."""
    return stored is not None and stored[6] is not None and stored[6] > event_time
