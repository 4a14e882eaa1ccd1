"""The SQLite backend's queries and its less frequent writes, as functions of a connection.

They run on the store's thread: reads through `SQLiteStore.read`, writes as `CallOp`s inside the writer's
transactions. Pending rows are always read as an index range (`deliveries_by_status` for an endpoint,
`deliveries_pending_lane` for one device), so a page costs the same with a million pending rows as with ten.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from webhookd.mutes import MuteRule
from webhookd.payloads import EventData
from webhookd.presence import Device
from webhookd.states import DELIVERY_STATUSES
from webhookd.store.api import DeliveryRow, EndpointRow, Requeued
from webhookd.store.chunked import LIST_KEYS, REQUEUE_CHUNK
from webhookd.store.sqlite_writes import upsert_endpoints

if TYPE_CHECKING:
    pass


_PENDING = (
    "SELECT d.id, d.endpoint, d.attempts, d.next_attempt_at, e.data FROM deliveries d {index}"
    " JOIN events e ON e.id = d.event_id WHERE d.status = 'pending'{where} ORDER BY d.id"
)
_PAGE = _PENDING.format(index="INDEXED BY deliveries_by_status", where=" AND d.endpoint = ? AND d.id > ?") + " LIMIT ?"
_LANE = (
    _PENDING.format(
        index="INDEXED BY deliveries_pending_lane", where=" AND d.endpoint = ? AND d.device_id = ? AND d.id > ?"
    )
    + " LIMIT ?"
)


def load_devices(c: sqlite3.Connection) -> list[Device]:
    rows = c.execute(
        "SELECT id, state, name, owner, address, last_seen, changed_at, source, timed, reminders, offline_reason,"
        " held_reason, held_previous FROM devices"
    ).fetchall()
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
        for r in rows
    ]


def _rows(cursor: sqlite3.Cursor) -> list[DeliveryRow]:
    """Delivery rows from (id, endpoint, attempts, next_attempt_at, event data); events shared by several
    deliveries are decoded once."""
    cache: dict[bytes, EventData] = {}
    out = []
    for did, ep, attempts, nxt, data in cursor:
        ev = cache.get(data)
        if ev is None:
            ev = cache[data] = EventData.from_json(data)
        out.append(DeliveryRow(did, ev, ep, attempts, nxt))
    return out


def pending_page(c: sqlite3.Connection, endpoint: str, after_id: int, limit: int) -> list[DeliveryRow]:
    return _rows(c.execute(_PAGE, (endpoint, after_id, limit)))


def pending_lane(c: sqlite3.Connection, endpoint: str, device_id: str, after_id: int, limit: int) -> list[DeliveryRow]:
    return _rows(c.execute(_LANE, (endpoint, device_id, after_id, limit)))


# A covering index range (1,000,000 pending rows: ~0.1 s, on the reader's thread without holding the GIL).
_COUNT = "SELECT count(*) FROM deliveries INDEXED BY deliveries_by_status WHERE status = 'pending'"


def pending_count(c: sqlite3.Connection) -> int:
    return int(c.execute(_COUNT).fetchone()[0])


def load_endpoints(c: sqlite3.Connection) -> dict[str, EndpointRow]:
    rows = c.execute("SELECT name, disabled, disabled_reason, consecutive_failures, last_error FROM endpoints")
    return {r[0]: EndpointRow(r[0], bool(r[1]), r[2], r[3], r[4]) for r in rows}


def forget_device(c: sqlite3.Connection, device_id: str) -> bool:
    c.execute("DELETE FROM mutes WHERE match = ?", (device_id,))
    return c.execute("DELETE FROM devices WHERE id = ?", (device_id,)).rowcount > 0


def load_mutes(c: sqlite3.Connection) -> list[MuteRule]:
    rows = c.execute("SELECT match, until, reason, created_at, created_by FROM mutes ORDER BY match").fetchall()
    return [MuteRule(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def save_mute(c: sqlite3.Connection, rule: MuteRule) -> None:
    c.execute(
        "INSERT INTO mutes (match, until, reason, created_at, created_by) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT (match) DO UPDATE SET until=excluded.until, reason=excluded.reason,"
        " created_at=excluded.created_at, created_by=excluded.created_by",
        (rule.match, rule.until, rule.reason, rule.created_at, rule.created_by),
    )


def delete_mutes(c: sqlite3.Connection, matches: Sequence[str]) -> int:
    n = 0
    for match in matches:
        n += c.execute("DELETE FROM mutes WHERE match = ?", (match,)).rowcount
    return n


def endpoint_names(c: sqlite3.Connection) -> set[str]:
    names = {r[0] for r in c.execute("SELECT name FROM endpoints")}
    # A skip scan of deliveries_by_status (status, endpoint, id): one index probe per (status, endpoint), not a
    # pass over every delivery.
    for status in DELIVERY_STATUSES:
        after = ""
        while True:
            (after,) = c.execute(
                "SELECT min(endpoint) FROM deliveries WHERE status = ? AND endpoint > ?", (status, after)
            ).fetchone()
            if after is None:
                break
            names.add(after)
    return names


def hold(c: sqlite3.Connection, endpoint: EndpointRow | str, now: float) -> int:
    if isinstance(endpoint, EndpointRow):
        upsert_endpoints(c, (endpoint,))
        endpoint = endpoint.name
    cur = c.execute(
        "UPDATE deliveries SET status='held', updated_at=? WHERE endpoint=? AND status='pending'", (now, endpoint)
    )
    return cur.rowcount


def release(c: sqlite3.Connection, endpoint: EndpointRow, now: float) -> int:
    upsert_endpoints(c, (endpoint,))
    cur = c.execute(
        "UPDATE deliveries SET status='pending', attempts=0, next_attempt_at=?, updated_at=?"
        " WHERE endpoint=? AND status='held'",
        (now, now, endpoint.name),
    )
    return cur.rowcount


_REQUEUE = "UPDATE deliveries SET status=?, attempts=0, next_attempt_at=?, last_error=NULL, updated_at=? WHERE id=?"


def requeue_ids(c: sqlite3.Connection, ids: Sequence[int], held_endpoints: set[str], now: float) -> Requeued:
    """Requeue the rows `ids` (at most IDS_CHUNK of them)."""
    marks = ",".join("?" * len(ids))
    found = dict(c.execute(f"SELECT id, endpoint FROM deliveries WHERE id IN ({marks})", tuple(ids)).fetchall())  # noqa: S608
    c.executemany(
        _REQUEUE, [("held" if ep in held_endpoints else "pending", now, now, did) for did, ep in found.items()]
    )
    out = Requeued(total=len(found), held=0, first_pending={}, missing=[i for i in ids if i not in found])
    for did, ep in found.items():
        if ep in held_endpoints:
            out.held += 1
        elif did < out.first_pending.get(ep, did + 1):
            out.first_pending[ep] = did
    return out


def requeue_where(
    c: sqlite3.Connection, endpoint: str, status: str | None, target: str, after_id: int, now: float
) -> list[int]:
    """Requeue the next REQUEUE_CHUNK rows of `endpoint` (with `status`) above `after_id` as `target`; returns
    this chunk's ids (in order)."""
    if status is None:
        sql = "SELECT id FROM deliveries WHERE endpoint = ? AND id > ? ORDER BY id LIMIT ?"
        args: tuple[Any, ...] = (endpoint, after_id, REQUEUE_CHUNK)
    else:
        sql = "SELECT id FROM deliveries WHERE status = ? AND endpoint = ? AND id > ? ORDER BY id LIMIT ?"
        args = (status, endpoint, after_id, REQUEUE_CHUNK)
    ids = [r[0] for r in c.execute(sql, args)]
    c.executemany(_REQUEUE, [(target, now, now, did) for did in ids])
    return ids


def delivery_counts(c: sqlite3.Connection) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for ep, status, n in c.execute("SELECT endpoint, status, count(*) FROM deliveries GROUP BY endpoint, status"):
        out.setdefault(ep, {})[status] = n
    return out


def list_deliveries(
    c: sqlite3.Connection, status: str | None, endpoint: str | None, limit: int
) -> list[dict[str, Any]]:
    where, args = [], []
    if status:
        where.append("status = ?")
        args.append(status)
    if endpoint:
        where.append("endpoint = ?")
        args.append(endpoint)
    sql = (
        "SELECT id, event_id, endpoint, device_id, type, status, attempts, next_attempt_at,"
        " last_status, last_error, created_at FROM deliveries"
    )
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY id DESC LIMIT ?"
    return [dict(zip(LIST_KEYS, row, strict=True)) for row in c.execute(sql, (*args, limit))]
