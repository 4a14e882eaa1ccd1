"""The PostgreSQL backend's queries and its less frequent writes, as async functions of a connection.

Reads run on a pooled connection (autocommit: each sees the last commit); writes run as `CallOp`s inside the
writer's transactions, in queue order. Pending rows are read as a range of a partial index
(`deliveries_pending` for an endpoint, `deliveries_pending_lane` for one device). Requeue and prune go in chunks,
each its own transaction, so that a million rows neither come into memory nor hold the writer for long.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from webhookd.mutes import MuteRule
from webhookd.payloads import EventData
from webhookd.presence import Device
from webhookd.states import DELIVERY_STATUSES
from webhookd.store.api import DeliveryRow, EndpointRow, Pruned, Requeued
from webhookd.store.chunked import LIST_KEYS, PRUNE_BATCH, REQUEUE_CHUNK, prune_rows
from webhookd.store.postgres_leases import mutes_changed
from webhookd.store.postgres_schema import Conn
from webhookd.store.postgres_writes import upsert_endpoints

if TYPE_CHECKING:
    from webhookd.store.postgres import PostgresStore


_PENDING = (
    "SELECT d.id, d.endpoint, d.attempts, d.next_attempt_at, e.data FROM deliveries d"
    " JOIN events e ON e.id = d.event_id WHERE d.status = 'pending'{where} ORDER BY d.id LIMIT %s"
)
_PAGE = _PENDING.format(where=" AND d.endpoint = %s AND d.id > %s")
_LANE = _PENDING.format(where=" AND d.endpoint = %s AND d.device_id = %s AND d.id > %s")
# On a hub of several processes: only the partitions this process holds.
_PAGE_PARTS = _PENDING.format(where=" AND d.endpoint = %s AND d.id > %s AND d.part = ANY(%s)")
_LANE_PARTS = _PENDING.format(where=" AND d.endpoint = %s AND d.device_id = %s AND d.id > %s AND d.part = ANY(%s)")


async def load_devices(c: Conn) -> list[Device]:
    cur = await c.execute(
        "SELECT id, state, name, owner, address, last_seen, changed_at, source, timed, reminders, offline_reason,"
        " held_reason, held_previous FROM devices"
    )
    return [
        Device(
            id=r[0],
            state=r[1],
            name=r[2],
            owner=r[3],
            address=r[4],
            last_seen=r[5],
            changed_at=r[6],
            source=r[7],
            timed=bool(r[8]),
            reminders=r[9],
            offline_reason=r[10],
            held_reason=r[11],
            held_previous=r[12],
        )
        for r in await cur.fetchall()
    ]


def _rows(rows: Sequence[tuple[Any, ...]]) -> list[DeliveryRow]:
    """Delivery rows from (id, endpoint, attempts, next_attempt_at, event data); events shared by several
    deliveries are decoded once."""
    cache: dict[bytes, EventData] = {}
    out = []
    for did, ep, attempts, nxt, data in rows:
        raw = bytes(data)
        ev = cache.get(raw)
        if ev is None:
            ev = cache[raw] = EventData.from_json(raw)
        out.append(DeliveryRow(did, ev, ep, attempts, nxt))
    return out


async def pending_page(
    c: Conn, endpoint: str, after_id: int, limit: int, parts: list[int] | None = None
) -> list[DeliveryRow]:
    # A join with events: planned at each read (prepare=False), as the writer's by-key statements are, not from
    # a generic plan cached while the tables were empty (postgres_touches.touches says why).
    if parts is None:
        cur = await c.execute(_PAGE, (endpoint, after_id, limit), prepare=False)
    else:
        cur = await c.execute(_PAGE_PARTS, (endpoint, after_id, parts, limit), prepare=False)
    return _rows(await cur.fetchall())


async def pending_lane(
    c: Conn, endpoint: str, device_id: str, after_id: int, limit: int, parts: list[int] | None = None
) -> list[DeliveryRow]:
    if parts is None:
        cur = await c.execute(_LANE, (endpoint, device_id, after_id, limit), prepare=False)
    else:
        cur = await c.execute(_LANE_PARTS, (endpoint, device_id, after_id, parts, limit), prepare=False)
    return _rows(await cur.fetchall())


async def pending_count(c: Conn) -> int:
    cur = await c.execute("SELECT count(*) FROM deliveries WHERE status = 'pending'")
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def load_endpoints(c: Conn) -> dict[str, EndpointRow]:
    cur = await c.execute("SELECT name, disabled, disabled_reason, consecutive_failures, last_error FROM endpoints")
    return {r[0]: EndpointRow(r[0], bool(r[1]), r[2], r[3], r[4]) for r in await cur.fetchall()}


async def forget_device(c: Conn, device_id: str) -> bool:
    cur = await c.execute("DELETE FROM mutes WHERE match = %s", (device_id,))
    if cur.rowcount:
        await mutes_changed(c)  # the other hub processes drop it too
    cur = await c.execute("DELETE FROM devices WHERE id = %s", (device_id,))
    return cur.rowcount > 0


async def load_mutes(c: Conn) -> list[MuteRule]:
    cur = await c.execute('SELECT match, until, reason, created_at, created_by FROM mutes ORDER BY match COLLATE "C"')
    return [MuteRule(r[0], r[1], r[2], r[3], r[4]) for r in await cur.fetchall()]


async def save_mute(c: Conn, rule: MuteRule) -> None:
    await c.execute(
        "INSERT INTO mutes (match, until, reason, created_at, created_by) VALUES (%s, %s, %s, %s, %s)"
        " ON CONFLICT (match) DO UPDATE SET until=excluded.until, reason=excluded.reason,"
        " created_at=excluded.created_at, created_by=excluded.created_by",
        (rule.match, rule.until, rule.reason, rule.created_at, rule.created_by),
    )
    await mutes_changed(c)  # the other hub processes mute too


async def delete_mutes(c: Conn, matches: Sequence[str]) -> int:
    if not matches:
        return 0
    cur = await c.execute("DELETE FROM mutes WHERE match = ANY(%s::text[])", (list(matches),))
    if cur.rowcount:
        await mutes_changed(c)  # the other hub processes unmute too
    return cur.rowcount


async def endpoint_names(c: Conn) -> set[str]:
    cur = await c.execute("SELECT name FROM endpoints")
    names = {r[0] for r in await cur.fetchall()}
    # A skip scan of deliveries_by_status (status, endpoint, id): one index probe per (status, endpoint), not a
    # pass over every delivery.
    cur = await c.execute(
        "WITH RECURSIVE s(status, endpoint) AS ("
        " SELECT st, (SELECT min(endpoint) FROM deliveries WHERE status = st) FROM unnest(%s::text[]) AS st"
        " UNION ALL SELECT s.status, (SELECT min(d.endpoint) FROM deliveries d"
        " WHERE d.status = s.status AND d.endpoint > s.endpoint) FROM s WHERE s.endpoint IS NOT NULL)"
        " SELECT DISTINCT endpoint FROM s WHERE endpoint IS NOT NULL",
        (list(DELIVERY_STATUSES),),
    )
    names.update(r[0] for r in await cur.fetchall())
    return names


async def hold(c: Conn, endpoint: EndpointRow | str, now: float) -> int:
    if isinstance(endpoint, EndpointRow):
        await upsert_endpoints(c, (endpoint,))
        endpoint = endpoint.name
    cur = await c.execute(
        "UPDATE deliveries SET status='held', updated_at=%s WHERE endpoint=%s AND status='pending'", (now, endpoint)
    )
    return cur.rowcount


async def release(c: Conn, endpoint: EndpointRow, now: float) -> int:
    await upsert_endpoints(c, (endpoint,))
    if endpoint.consecutive_failures == 0:
        # An enable resets the failure count (CONTRACT §7): on a hub the shared pause and probe go with it, in
        # this commit. last_error stays, as on SQLite (it is what went wrong last; the next success clears it).
        await c.execute(
            "UPDATE endpoints SET paused_until = 0, pause_step = 0, probe_by = NULL, probe_until = 0"
            " WHERE name = %s AND (paused_until <> 0 OR pause_step <> 0 OR probe_by IS NOT NULL)",
            (endpoint.name,),
        )
    cur = await c.execute(
        "UPDATE deliveries SET status='pending', attempts=0, next_attempt_at=%s, updated_at=%s"
        " WHERE endpoint=%s AND status='held'",
        (now, now, endpoint.name),
    )
    return cur.rowcount


_REQUEUE = (
    "UPDATE deliveries SET status = CASE WHEN endpoint = ANY(%s::text[]) THEN 'held' ELSE 'pending' END,"
    " attempts=0, next_attempt_at=%s, last_error=NULL, updated_at=%s WHERE id = ANY(%s::bigint[])"
    " RETURNING id, endpoint, status"
)


async def requeue_ids(c: Conn, ids: Sequence[int], held_endpoints: set[str], now: float) -> Requeued:
    """Requeue the rows `ids` (at most IDS_CHUNK of them)."""
    cur = await c.execute(_REQUEUE, (list(held_endpoints), now, now, list(ids)))
    found = {r[0]: (r[1], r[2]) for r in await cur.fetchall()}
    out = Requeued(total=len(found), held=0, first_pending={}, missing=[i for i in ids if i not in found])
    for did, (ep, status) in sorted(found.items()):
        if status == "held":
            out.held += 1
        else:
            out.first_pending.setdefault(ep, did)
    return out


async def requeue_where(
    c: Conn, endpoint: str, status: str | None, target: str, after_id: int, now: float
) -> list[int]:
    """Requeue the next REQUEUE_CHUNK rows of `endpoint` (with `status`) above `after_id` as `target`; returns
    this chunk's ids (in order)."""
    cur = await c.execute(
        "WITH chunk AS (SELECT id FROM deliveries WHERE endpoint = %s AND (%s::text IS NULL OR status = %s)"
        " AND id > %s ORDER BY id LIMIT %s)"
        " UPDATE deliveries d SET status=%s, attempts=0, next_attempt_at=%s, last_error=NULL, updated_at=%s"
        " FROM chunk WHERE d.id = chunk.id RETURNING d.id",
        (endpoint, status, status, after_id, REQUEUE_CHUNK, target, now, now),
    )
    return sorted(r[0] for r in await cur.fetchall())


async def delivery_counts(c: Conn) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    cur = await c.execute("SELECT endpoint, status, count(*) FROM deliveries GROUP BY endpoint, status")
    for ep, status, n in await cur.fetchall():
        out.setdefault(ep, {})[status] = n
    return out


async def list_deliveries(c: Conn, status: str | None, endpoint: str | None, limit: int) -> list[dict[str, Any]]:
    cur = await c.execute(
        "SELECT id, event_id, endpoint, device_id, type, status, attempts, next_attempt_at,"
        " last_status, last_error, created_at FROM deliveries"
        " WHERE (%s::text IS NULL OR status = %s) AND (%s::text IS NULL OR endpoint = %s)"
        " ORDER BY id DESC LIMIT %s",
        (status or None, status or None, endpoint or None, endpoint or None, limit),
    )
    return [dict(zip(LIST_KEYS, row, strict=True)) for row in await cur.fetchall()]


# --- retention ------------------------------------------------------------------------------------------------


async def _prune_deliveries(c: Conn, cutoff: float, limit: int) -> int:
    cur = await c.execute(
        "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries"
        " WHERE status IN ('delivered', 'dead') AND updated_at < %s LIMIT %s)",
        (cutoff, limit),
    )
    return cur.rowcount


async def _prune_events(
    c: Conn, cutoff: float, after: tuple[float, str], limit: int
) -> tuple[int, tuple[float, str] | None]:
    """See retention._prune_events: the next `limit` events older than `cutoff` after the key `after`, those no
    delivery refers to deleted; events still referenced are stepped over, not rescanned."""
    cur = await c.execute(
        "SELECT created_at, id FROM events WHERE created_at < %s AND (created_at, id) > (%s, %s)"
        " ORDER BY created_at, id LIMIT %s",
        (cutoff, after[0], after[1], limit),
    )
    window = await cur.fetchall()
    if not window:
        return 0, None
    cur = await c.execute(
        "DELETE FROM events e WHERE e.id = ANY(%s::text[])"
        " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id)",
        ([eid for _, eid in window],),
    )
    last: tuple[float, str] = (window[-1][0], window[-1][1])
    return cur.rowcount, (last if len(window) == limit else None)


async def prune(store: PostgresStore, older_than: float, batch: int = PRUNE_BATCH) -> Pruned:
    """Delete delivered and dead deliveries last updated before `older_than`, then events older than that no
    delivery refers to, each batch its own small write transaction (autovacuum hands the space back)."""
    deliveries, events = await prune_rows(store.write, _prune_deliveries, _prune_events, older_than, batch)
    return Pruned(deliveries, events, 0)
