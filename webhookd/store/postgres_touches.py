"""A hub's gateway touches on PostgreSQL (relays and gateway heartbeats), a run of them in one group commit as a
handful of statements, whatever their number.

A relay used to be a write of its own: about ten statements, each waiting for the one before it, which bound a
hub's ingest by round trips and CPU (bench row 13). Here a run of touches reads every gateway row, every event id
and every stored device it needs in one pipeline, applies the gateway rule (gateways.seen) to each touch in
queue order in memory, records the relayed events that are new through the merged record statements, and
writes the gateway rows back in one statement. The results are exactly those of the touches one after another:
each relay's event id is taken once (an id repeated inside the run counts for its first touch), a gateway's row
evolves touch by touch, and a device keeps the newest state among its stored row and the run's relays (an older
event relayed late is recorded and delivered but does not move the device back).

On a hub every such batch holds the delivery-id lock (postgres_writes.apply) from its start, so the reads need no
row locks of their own there; without a fence (never a hub in practice) the event ids are locked as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from webhookd import gateways as rules
from webhookd.gateways import GatewayRow, Seen
from webhookd.store.api import Change, DeliveryRow, GatewayWrite, Targets
from webhookd.store.gateway_rows import _pg_record, from_row, to_row
from webhookd.store.postgres_leases import Fence
from webhookd.store.postgres_schema import Conn
from webhookd.store.sqlite_writes import SELECT_DEVICE, DevicesOp, device_row, record_op

_GATEWAYS = (
    "SELECT name, state, last_seen, deadline, changed_at, address, devices, relayed, last_error"
    " FROM gateways WHERE name = ANY(%s) ORDER BY name"
)
_UPSERT = (
    "INSERT INTO gateways (name, state, last_seen, deadline, changed_at, address, devices, relayed, last_error)"
    " SELECT * FROM unnest(%s::text[], %s::text[], %s::float8[], %s::float8[], %s::float8[], %s::text[],"
    " %s::int[], %s::bigint[], %s::text[])"
    " ON CONFLICT (name) DO UPDATE SET state=excluded.state, last_seen=excluded.last_seen,"
    " deadline=excluded.deadline, changed_at=excluded.changed_at, address=excluded.address,"
    " devices=excluded.devices, relayed=excluded.relayed, last_error=excluded.last_error"
)
_DEVICES = SELECT_DEVICE.replace("WHERE id = ?", "WHERE id = ANY(%s)")


@dataclass(slots=True)
class TouchOp:
    """One accepted relay or gateway heartbeat (see DeliveryStore.touch_gateway)."""

    name: str
    now: float
    silence: float
    seen: Seen
    targets: Targets
    relayed: Change | None = None
    rows: int = 3


async def touches(c: Conn, ops: Sequence[TouchOp], fence: Fence | None) -> list[GatewayWrite]:
    from webhookd.store import postgres_writes

    names = sorted({op.name for op in ops})
    relays = [op.relayed for op in ops if op.relayed is not None and op.relayed.event is not None]
    ids = sorted({ch.event.id for ch in relays if ch.event is not None})
    devices = sorted({ch.device.id for ch in relays})
    async with c.pipeline():
        if fence is None and ids:
            await c.execute("SELECT pg_advisory_xact_lock(hashtextextended(x, 0)) FROM unnest(%s::text[]) AS x", (ids,))
        await c.execute("INSERT INTO gateways (name) SELECT unnest(%s::text[]) ON CONFLICT (name) DO NOTHING", (names,))
        g = await c.execute(_GATEWAYS + ("" if fence is not None else " FOR UPDATE"), (names,))
        # Planned at each run (prepare=False), not from a cached generic plan: one made while the table was
        # empty is a sequential scan, kept as the table grows until autovacuum's first ANALYZE (bench row 13:
        # 8-22 ms a lookup after 10,000 devices).
        e = await c.execute("SELECT id FROM events WHERE id = ANY(%s)", (ids,), prepare=False)
        d = await c.execute(_DEVICES, (devices,), prepare=False)
        current: dict[str, GatewayRow] = {r[0]: from_row(r) for r in await g.fetchall()}
        taken: set[str] = {r[0] for r in await e.fetchall()}
        stored: dict[str, tuple[Any, ...]] = {r[0]: tuple(r) for r in await d.fetchall()}
    new: list[Change] = []
    steps: list[tuple[TouchOp, GatewayRow, Any, bool]] = []  # (op, its gateway row after it, its event, took)
    for op in ops:
        took = False
        if op.relayed is not None and op.relayed.event is not None and op.relayed.event.id not in taken:
            taken.add(op.relayed.event.id)
            new.append(op.relayed)
            took = True
        seen = op.seen if op.relayed is None else dataclasses.replace(op.seen, relayed=1 if took else 0)
        row, event = rules.seen(current.get(op.name), op.name, op.now, op.silence, seen)
        current[op.name] = row
        steps.append((op, row, event, took))
    recorded: dict[str, list[DeliveryRow]] = {}
    if new:
        rows: list[DeliveryRow] = (await postgres_writes.apply(c, [record_op(new)], fence, nested=True))[0]
        for r in rows:
            recorded.setdefault(r.event.id, []).append(r)
        restore = _newest_devices(new, stored)
        if restore:
            await postgres_writes.apply(c, [DevicesOp(restore)], nested=True)
    cols = [list(x) for x in zip(*(to_row(r) for r in current.values()), strict=True)]
    await c.execute(_UPSERT, cols)
    out: list[GatewayWrite] = []
    for op, row, event, took in steps:
        relayed = (
            None
            if not took or op.relayed is None or op.relayed.event is None
            else recorded.get(op.relayed.event.id, [])
        )
        if event is None:
            out.append(GatewayWrite(row, relayed=relayed))
        else:  # a gateway.online: rare (a transition), recorded the way one touch alone records it
            out.append(GatewayWrite(row, event, await _pg_record(c, event, op.targets, fence), relayed))
    return out


def _newest_devices(new: Sequence[Change], stored: dict[str, tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The device rows to write back after the merged record (whose last copy of each device won): where the stored
    row, or an earlier relay of the run, is newer than the device's last relay in the run."""
    last: dict[str, Change] = {}
    best: dict[str, tuple[float, tuple[Any, ...]]] = {}
    for dev_id, row in stored.items():
        if row[6] is not None:
            best[dev_id] = (float(row[6]), row)
    for ch in new:
        assert ch.event is not None
        last[ch.device.id] = ch
        t = ch.event.time
        if ch.device.id not in best or t >= best[ch.device.id][0]:
            best[ch.device.id] = (t, device_row(ch.device))
    out = []
    for dev_id, ch in last.items():
        row = best[dev_id][1]
        if row != device_row(ch.device):
            out.append(row)
    return out
