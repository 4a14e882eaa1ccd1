"""How the PostgreSQL writer runs a group commit of the write operations (the same `RecordOp`, `DevicesOp`,
`ReceiptsOp` data as the SQLite writer; `CallOp` here is an async function of the connection).

Each run of adjacent hot operations becomes ONE statement per table, whatever the number of rows: the rows go as
arrays (`unnest`), in pipeline mode, so a group commit of 2,000 transitions is about one round trip and one WAL
flush. Everything else runs in queue order between those runs, so no write overtakes one queued before it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from webhookd.leases import partition_of
from webhookd.payloads import EventData
from webhookd.store.api import Change, DeliveryRow, EndpointRow
from webhookd.store.postgres_leases import (
    DELIVERY_ID_LOCK,
    UPDATE_RECEIPT_FENCED,
    UPDATE_RECEIPTS_FENCED,
    Fence,
    notify,
)
from webhookd.store.postgres_schema import Conn
from webhookd.store.postgres_touches import TouchOp
from webhookd.store.sqlite_writes import (
    SELECT_DEVICE,
    DeviceRow,
    DevicesOp,
    EndpointTuple,
    ReceiptsOp,
    RecordOp,
    device_row,
    endpoint_row,
    newer_than,
    record_op,
)

UPSERT_DEVICES = (
    "INSERT INTO devices (id, state, name, owner, address, last_seen, changed_at, source, timed, reminders,"
    " offline_reason, held_reason, held_previous)"
    " SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::float8[],"
    " %b::float8[], %b::text[], %b::bool[], %b::int[], %b::text[], %b::text[], %b::text[])"
    " ON CONFLICT (id) DO UPDATE SET state=excluded.state,"
    " name=excluded.name, owner=excluded.owner, address=excluded.address,"
    " last_seen=excluded.last_seen, changed_at=excluded.changed_at, source=excluded.source, timed=excluded.timed,"
    " reminders=excluded.reminders, offline_reason=excluded.offline_reason, held_reason=excluded.held_reason,"
    " held_previous=excluded.held_previous"
)
INSERT_EVENTS = (
    "INSERT INTO events (id, type, device_id, created_at, data)"
    " SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::float8[], %b::bytea[])"
)
# Ids come from the sequence in the order of `ord` (the rows are inserted in that order); RETURNING gives them
# back with their keys, and the writer checks that they map one to one.
INSERT_DELIVERIES = (
    "INSERT INTO deliveries (event_id, endpoint, device_id, type, status, attempts, next_attempt_at,"
    " created_at, updated_at, part)"
    " SELECT e, ep, dev, ty, st, 0, t, t, t, pt FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[],"
    " %b::text[], %b::float8[], %b::int[]) WITH ORDINALITY AS r(e, ep, dev, ty, st, t, pt, ord) ORDER BY ord"
    " RETURNING id, event_id, endpoint"
)
# On a hub of several processes a delivery is held or pending as the shared endpoint row says at the commit, not
# as this process's copy of it said (it may be a second behind another process's disable or enable).
INSERT_DELIVERIES_HUB = (
    "INSERT INTO deliveries (event_id, endpoint, device_id, type, status, attempts, next_attempt_at,"
    " created_at, updated_at, part)"
    " SELECT e, ep, dev, ty, CASE WHEN EXISTS (SELECT 1 FROM endpoints x WHERE x.name = ep AND x.disabled)"
    " THEN 'held' ELSE 'pending' END, 0, t, t, t, pt FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[],"
    " %b::text[], %b::float8[], %b::int[]) WITH ORDINALITY AS r(e, ep, dev, ty, st, t, pt, ord) ORDER BY ord"
    " RETURNING id, event_id, endpoint, status"
)
# A receipt (delivered) or a hold may land on a row that is held by now; a retry or a death may not take a row
# out of held (see sqlite_writes.UPDATE_RECEIPT). One statement for a batch of distinct ids ...
UPDATE_RECEIPTS = (
    "UPDATE deliveries d SET status=r.status, attempts=r.attempts, next_attempt_at=r.nxt, last_status=r.ls,"
    " last_error=r.le, updated_at=r.now FROM unnest(%b::text[], %b::int[], %b::float8[], %b::int[], %b::text[],"
    " %b::float8[], %b::bigint[], %b::text[]) AS r(status, attempts, nxt, ls, le, now, id, also)"
    " WHERE d.id = r.id AND d.status IN ('pending', r.also)"
)
# ... and one at a time, in order, when an id repeats (then the order of the receipts decides).
UPDATE_RECEIPT = (
    "UPDATE deliveries SET status=%s, attempts=%s, next_attempt_at=%s, last_status=%s, last_error=%s,"
    " updated_at=%s WHERE id=%s AND status IN ('pending', %s)"
)
UPSERT_ENDPOINTS = (
    "INSERT INTO endpoints (name, disabled, disabled_reason, consecutive_failures, last_error)"
    " SELECT * FROM unnest(%b::text[], %b::bool[], %b::text[], %b::int[], %b::text[])"
    " ON CONFLICT (name) DO UPDATE SET disabled=excluded.disabled, disabled_reason=excluded.disabled_reason,"
    " consecutive_failures=excluded.consecutive_failures, last_error=excluded.last_error"
)


@dataclass(slots=True)
class CallOp:
    fn: Callable[[Conn], Awaitable[Any]]
    rows: int = 1


WriteOp = RecordOp | DevicesOp | ReceiptsOp | CallOp | TouchOp


class MappingError(RuntimeError):
    """The ids RETURNING gave back do not match the rows asked for (never expected: a bug, so it stops the
    writer loudly rather than passing for a database error)."""


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    return [[r[i] for r in rows] for i in range(width)]


def needs_id_lock(ops: Sequence[WriteOp]) -> bool:
    """On a hub: whether a batch of `ops` may insert deliveries (and so must hold DELIVERY_ID_LOCK)."""
    return any(isinstance(op, (RecordOp, CallOp, TouchOp)) for op in ops)


async def take_id_lock(c: Conn) -> None:
    """DELIVERY_ID_LOCK, first in the transaction, before any row lock of the batch (an event id's, a
    gateway's): taken later it could close a cycle with another process holding such a lock and waiting for
    this one."""
    await c.execute("SELECT pg_advisory_xact_lock(%s)", (DELIVERY_ID_LOCK,))


async def apply(c: Conn, ops: Sequence[WriteOp], fence: Fence | None = None, *, nested: bool = False) -> list[Any]:
    """Run `ops` on `c` inside the caller's transaction; returns each op's result, in order. With a `fence`
    (a hub of several processes) receipts land only on rows of partitions we hold, new deliveries take their
    ids under DELIVERY_ID_LOCK and the other processes are told of them. `nested`: called from a CallOp, whose
    batch took the lock already."""
    results: list[Any] = [None] * len(ops)
    if fence is not None and not nested and needs_id_lock(ops):
        await take_id_lock(c)
    run: list[int] = []
    touch: list[int] = []  # a run of adjacent gateway touches (postgres_touches)
    for i, op in enumerate(ops):
        if not isinstance(op, TouchOp) and touch:
            await _touches(c, ops, touch, results, fence)
            touch = []
        if isinstance(op, (CallOp, TouchOp)) and run:
            await _merged(c, ops, run, results, fence)
            run = []
        if isinstance(op, CallOp):
            results[i] = await op.fn(c)
        elif isinstance(op, TouchOp):
            touch.append(i)
        else:
            run.append(i)
    if touch:
        await _touches(c, ops, touch, results, fence)
    if run:
        await _merged(c, ops, run, results, fence)
    return results


async def _touches(c: Conn, ops: Sequence[WriteOp], run: list[int], results: list[Any], fence: Fence | None) -> None:
    from webhookd.store.postgres_touches import touches

    done = await touches(c, [ops[i] for i in run], fence)  # type: ignore[misc]
    for i, result in zip(run, done, strict=True):
        results[i] = result


async def upsert_endpoints(c: Conn, rows: Sequence[EndpointRow]) -> None:
    await _upsert_endpoints(c, [endpoint_row(r) for r in rows])


async def _upsert_endpoints(c: Conn, rows: Sequence[EndpointTuple]) -> None:
    unique = list({e[0]: e for e in rows}.values())  # one row per endpoint: the last copy wins
    cols = _columns(unique, 5)
    cols[1] = [bool(v) for v in cols[1]]
    await c.execute(UPSERT_ENDPOINTS, cols)


async def _merged(
    c: Conn, ops: Sequence[WriteOp], run: list[int], results: list[Any], fence: Fence | None = None
) -> None:
    """One statement per table for the hot operations `ops[i] for i in run` (adjacent in the queue); see
    sqlite_writes._merged for why the order within the run is kept."""
    devices: dict[str, DeviceRow] = {}  # the last copy of a device wins
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
                device, event = ch.device, ch.event
                devices.pop(device.id, None)
                devices[device.id] = device_row(device)
                if event is not None:
                    events.append((event.id, event.type, event.device_id, event.time, event.to_json()))
                    wanted.extend((event, endpoint, status) for endpoint, status in ch.targets)
            slices.append((i, start, len(wanted)))
        elif isinstance(op, DevicesOp):
            for row in op.devices:
                devices.pop(row[0], None)
                devices[row[0]] = row
        elif isinstance(op, ReceiptsOp):
            receipts.extend(op.receipts)
            endpoints.extend(op.endpoints)
    async with c.pipeline():
        if devices:
            cols = _columns(list(devices.values()), 13)
            cols[8] = [bool(v) for v in cols[8]]
            await c.execute(UPSERT_DEVICES, cols)
        if events:
            await c.execute(INSERT_EVENTS, _columns(events, 5))
        cur = None
        if wanted:
            if fence is not None:  # DELIVERY_ID_LOCK is held since the start of the batch (apply)
                await notify(c, "new " + ",".join(sorted({ep for _, ep, _ in wanted})))
            cur = c.cursor()
            await cur.execute(
                INSERT_DELIVERIES if fence is None else INSERT_DELIVERIES_HUB,
                [
                    [e.id for e, _, _ in wanted],
                    [ep for _, ep, _ in wanted],
                    [e.device_id for e, _, _ in wanted],
                    [e.type for e, _, _ in wanted],
                    [st for _, _, st in wanted],
                    [e.time for e, _, _ in wanted],
                    [partition_of(ep, e.device_id) for e, ep, _ in wanted],
                ],
            )
        if receipts and fence is not None:
            parts, epochs = fence.fence()
            if len({r[6] for r in receipts}) == len(receipts):
                # A join by id: planned at each run, as postgres_touches' lookups are (a generic plan cached while
                # the table was small would scan it whole).
                await c.execute(
                    UPDATE_RECEIPTS_FENCED, [parts, epochs, fence.owner, *_columns(receipts, 8)], prepare=False
                )
            else:
                await c.cursor().executemany(
                    UPDATE_RECEIPT_FENCED, [(parts, epochs, fence.owner, r[0], *r) for r in receipts]
                )
        elif receipts:
            if len({r[6] for r in receipts}) == len(receipts):
                await c.execute(UPDATE_RECEIPTS, _columns(receipts, 8), prepare=False)
            else:
                await c.cursor().executemany(UPDATE_RECEIPT, receipts)
        if endpoints:
            await _upsert_endpoints(c, endpoints)
        ids: list[int] = []
        statuses = [st for _, _, st in wanted]
        if cur is not None:
            returned = sorted(await cur.fetchall())
            if [(r[1], r[2]) for r in returned] != [(e.id, ep) for e, ep, _ in wanted]:
                raise MappingError(f"the {len(wanted)} new deliveries came back out of order")
            ids = [r[0] for r in returned]
            if fence is not None:
                statuses = [r[3] for r in returned]  # as the shared endpoint rows said
    for i, start, end in slices:
        results[i] = [
            DeliveryRow(ids[k], wanted[k][0], wanted[k][1], 0, wanted[k][0].time)
            for k in range(start, end)
            if statuses[k] == "pending"
        ]


async def record_relayed(c: Conn, change: Change, fence: Fence | None = None) -> list[DeliveryRow] | None:
    """A relayed event's `record`, skipped (None) when an event with its id exists. A transaction-scoped
    advisory lock on the id makes a second process taking the same event wait for the first one's commit, and
    then see its row."""
    assert change.event is not None
    # One round trip: the statements run in order on the server, so the reads (each with its own snapshot, taken
    # as it starts) see whatever a process holding the id's lock committed before we got it.
    async with c.pipeline():
        await c.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (change.event.id,))
        taken = await c.execute("SELECT 1 FROM events WHERE id = %s", (change.event.id,))
        device = await c.execute(SELECT_DEVICE.replace("?", "%s"), (change.device.id,))
        exists, stored = await taken.fetchone(), await device.fetchone()
    if exists is not None:
        return None
    rows: list[DeliveryRow] = (await apply(c, [record_op([change])], fence, nested=True))[0]
    if newer_than(stored, change.event.time):
        await apply(c, [DevicesOp([tuple(stored)])], nested=True)  # type: ignore[arg-type]
    return rows
