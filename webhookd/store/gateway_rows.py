"""The SQL of a hub's gateways (the `gateways` table, CONTRACT §14) on both backends; the rules themselves are
webhookd/gateways.py's.

Each write runs inside the store's writer transaction: the gateway's row is locked and read (SQLite: the writer
is the only one, `BEGIN IMMEDIATE`; PostgreSQL: `SELECT ... FOR UPDATE`, after an `INSERT ... ON CONFLICT DO
NOTHING` so that a first touch has a row to lock), the rule is applied to what was read, and the new row and the
event the rule made (with its deliveries, through the writer's own `record` path) are written in the same
transaction. So of several hub processes sharing a PostgreSQL database, exactly one makes each `gateway.offline`:
the others wait for its row lock, then read the row it wrote and find nothing to do. On PostgreSQL every gateway
write first takes the hub's delivery id lock (which its event's deliveries need anyway): one lock order for all
of them, whatever a group commit puts together.

A gateway event has no device row: `record`'s device upsert is undone in the same transaction (the row a device
of that id had is put back).
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from webhookd import gateways as rules
from webhookd.gateways import GatewayRow, Seen
from webhookd.payloads import EventData
from webhookd.presence import Device
from webhookd.store import sqlite_writes
from webhookd.store.api import Change, DeliveryRow, GatewayWrite, Targets
from webhookd.store.sqlite_writes import SELECT_DEVICE, DevicesOp, record_op

if TYPE_CHECKING:  # psycopg only for those who use it
    from webhookd.store.postgres_leases import Fence
    from webhookd.store.postgres_schema import Conn

SELECT_ONE = (
    "SELECT name, state, last_seen, deadline, changed_at, address, devices, relayed, last_error"
    " FROM gateways WHERE name = ?"
)
SELECT_ALL = (
    "SELECT name, state, last_seen, deadline, changed_at, address, devices, relayed, last_error"
    " FROM gateways ORDER BY name"
)
# Online gateways whose deadline has passed (a read first: the writer is asked only when there is one).
SELECT_DUE = "SELECT name FROM gateways WHERE state = 'online' AND deadline <= ? ORDER BY name"
UPSERT = (
    "INSERT INTO gateways (name, state, last_seen, deadline, changed_at, address, devices, relayed, last_error)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (name) DO UPDATE SET state=excluded.state, last_seen=excluded.last_seen,"
    " deadline=excluded.deadline, changed_at=excluded.changed_at, address=excluded.address,"
    " devices=excluded.devices, relayed=excluded.relayed, last_error=excluded.last_error"
)
UPSERT_ERROR = (
    "INSERT INTO gateways (name, last_error) VALUES (?, ?)"
    " ON CONFLICT (name) DO UPDATE SET last_error=excluded.last_error"
)
# PostgreSQL: another hub process seen within MEMBER_ALIVE seconds (the database's clock, as hub_members is
# written) that started before this one.
OTHERS_ALIVE = (
    "SELECT count(*) FROM hub_members WHERE seen_at >= extract(epoch from clock_timestamp()) - %s AND started_at < %s"
)
MEMBER_ALIVE = 10.0  # seconds: a hub_members row seen within this is a live process
SAME_START = 0.5  # seconds: members that started within this of us are taken as starting with us

Row = Sequence[Any]


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")


def from_row(r: Row) -> GatewayRow:
    state: rules.GatewayState = r[1] if r[1] in rules.GATEWAY_STATES else "unknown"
    return GatewayRow(
        name=r[0],
        state=state,
        last_seen=r[2],
        deadline=r[3],
        changed_at=r[4],
        address=r[5],
        devices=r[6],
        relayed=int(r[7] or 0),
        last_error=r[8],
    )


def to_row(g: GatewayRow) -> tuple[Any, ...]:
    return (g.name, g.state, g.last_seen, g.deadline, g.changed_at, g.address, g.devices, g.relayed, g.last_error)


def _change(event: EventData, targets: Targets) -> Change:
    return Change(Device(id=event.device_id, state=event.state, name=event.name, address=event.address), event, targets)


# --- SQLite (functions of the writer's connection, inside its transaction) ------------------------------------


def _sqlite_record(c: sqlite3.Connection, event: EventData, targets: Targets) -> list[DeliveryRow]:
    stored = c.execute(SELECT_DEVICE, (event.device_id,)).fetchone()
    rows: list[DeliveryRow] = sqlite_writes.apply(c, [record_op([_change(event, targets)])])[0]
    if stored is None:
        c.execute("DELETE FROM devices WHERE id = ?", (event.device_id,))
    else:
        sqlite_writes.apply(c, [DevicesOp([tuple(stored)])])
    return rows


def sqlite_touch(
    c: sqlite3.Connection,
    name: str,
    now: float,
    silence: float,
    seen: Seen,
    targets: Targets,
    relayed: Change | None = None,
) -> GatewayWrite:
    taken = None if relayed is None else sqlite_writes.record_relayed(c, relayed)
    if relayed is not None:
        seen = dataclasses.replace(seen, relayed=0 if taken is None else 1)
    found = c.execute(SELECT_ONE, (name,)).fetchone()
    row, event = rules.seen(None if found is None else from_row(found), name, now, silence, seen)
    c.execute(UPSERT, to_row(row))
    if event is None:
        return GatewayWrite(row, relayed=taken)
    return GatewayWrite(row, event, _sqlite_record(c, event, targets), taken)


def sqlite_rejected(c: sqlite3.Connection, name: str, error: str) -> None:
    c.execute(UPSERT_ERROR, (name, error))


def sqlite_due(c: sqlite3.Connection, now: float) -> list[str]:
    return [r[0] for r in c.execute(SELECT_DUE, (now,))]


def sqlite_expire(
    c: sqlite3.Connection, names: Sequence[str], now: float, targets: Mapping[str, Targets]
) -> list[GatewayWrite]:
    out: list[GatewayWrite] = []
    for name in names:
        found = c.execute(SELECT_ONE, (name,)).fetchone()
        flip = None if found is None or name not in targets else rules.check(from_row(found), now)
        if flip is None:
            continue
        row, event = flip
        c.execute(UPSERT, to_row(row))
        out.append(GatewayWrite(row, event, _sqlite_record(c, event, targets[name])))
    return out


def sqlite_restart(c: sqlite3.Connection, now: float, timeouts: Mapping[str, float]) -> int:
    """SQLite has one process: every start is a start with no other live process."""
    n = 0
    for found in c.execute(SELECT_ALL).fetchall():
        row = from_row(found)
        new = rules.restart(row, now, timeouts[row.name]) if row.name in timeouts else None
        if new is not None:
            c.execute(UPSERT, to_row(new))
            n += 1
    return n


def sqlite_load(c: sqlite3.Connection) -> list[GatewayRow]:
    return [from_row(r) for r in c.execute(SELECT_ALL)]


# --- PostgreSQL (async functions of the writer's connection, inside its transaction; reads on a pooled one) ------


async def _pg_locked(c: Conn, name: str) -> GatewayRow | None:
    """The gateway's row, locked until the transaction ends (None: never heard from)."""
    cur = await c.execute(_pg(SELECT_ONE) + " FOR UPDATE", (name,))
    found = await cur.fetchone()
    return None if found is None else from_row(found)


async def _pg_record(c: Conn, event: EventData, targets: Targets, fence: Fence | None) -> list[DeliveryRow]:
    """`record`'s path for the event (with the store's lease fence on a hub of several processes)."""
    from webhookd.store import postgres_writes

    cur = await c.execute(_pg(SELECT_DEVICE), (event.device_id,))
    stored = await cur.fetchone()
    rows: list[DeliveryRow] = (
        await postgres_writes.apply(c, [record_op([_change(event, targets)])], fence, nested=True)
    )[0]
    if stored is None:
        await c.execute("DELETE FROM devices WHERE id = %s", (event.device_id,))
    else:
        await postgres_writes.apply(c, [DevicesOp([tuple(stored)])], nested=True)
    return rows


async def pg_rejected(c: Conn, name: str, error: str) -> None:
    await c.execute(_pg(UPSERT_ERROR), (name, error))


async def pg_due(c: Conn, now: float) -> list[str]:
    cur = await c.execute(_pg(SELECT_DUE), (now,))
    return [r[0] for r in await cur.fetchall()]


async def pg_expire(
    c: Conn, names: Sequence[str], now: float, targets: Mapping[str, Targets], fence: Fence | None = None
) -> list[GatewayWrite]:
    out: list[GatewayWrite] = []
    for name in sorted(names):  # one lock order for every process
        if name not in targets:
            continue
        found = await _pg_locked(c, name)
        # Rechecked under the lock: another process may have flipped it (or it was touched) meanwhile.
        flip = None if found is None else rules.check(found, now)
        if flip is None:
            continue
        row, event = flip
        await c.execute(_pg(UPSERT), to_row(row))
        out.append(GatewayWrite(row, event, await _pg_record(c, event, targets[name], fence)))
    return out


async def pg_restart(c: Conn, now: float, timeouts: Mapping[str, float], started: float) -> int:
    """Unless another hub process that started before us is alive (hub_members), every online gateway gets a
    full timeout from `now`."""
    cur = await c.execute(OTHERS_ALIVE, (MEMBER_ALIVE, started - SAME_START))
    alive = await cur.fetchone()
    if alive is not None and alive[0]:
        return 0
    cur = await c.execute(_pg(SELECT_ALL) + " FOR UPDATE")
    n = 0
    for found in await cur.fetchall():
        row = from_row(found)
        new = rules.restart(row, now, timeouts[row.name]) if row.name in timeouts else None
        if new is not None:
            await c.execute(_pg(UPSERT), to_row(new))
            n += 1
    return n


async def pg_load(c: Conn) -> list[GatewayRow]:
    cur = await c.execute(_pg(SELECT_ALL))
    return [from_row(r) for r in await cur.fetchall()]
