"""A big backlog written straight into a store that the daemon itself created (rows 7 and 4-style fixtures).

    fill_pending(db, pending=1_000_000, devices=1_000, endpoint="bench")

The daemon creates the database (schema, `user_version`) on a first start; this then adds `devices` online
devices and `pending` pending deliveries for `endpoint` (one event each, device k % devices: every lane of
the endpoint has pending / devices rows), in chunks with one executemany per table, synchronous=OFF (a
fixture; the daemon reopens it with its own settings). Each event's JSON is its own (distinct id), so a
reader that caches decoded events by their bytes cannot fold them together.

Columns are matched by name against the live schema (`PRAGMA table_info`): a new NOT NULL column without a
default that this file does not know stops the build with its name instead of writing a wrong fixture.
"""

from __future__ import annotations

import operator
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

DEVICE_COLUMNS = ("id", "state", "name", "owner", "address", "last_seen", "changed_at")
EVENT_COLUMNS = ("id", "type", "device_id", "created_at", "data")
DELIVERY_COLUMNS = (
    "event_id",
    "endpoint",
    "device_id",
    "type",
    "status",
    "attempts",
    "next_attempt_at",
    "last_status",
    "last_error",
    "created_at",
    "updated_at",
)


def _columns(conn: sqlite3.Connection, table: str, known: Sequence[str]) -> tuple[str, Callable[[tuple], tuple]]:
    """(INSERT statement, row projection) for the columns of `known` that `table` has."""
    info = conn.execute(f"PRAGMA table_info({table})").fetchall()  # cid, name, type, notnull, dflt, pk
    if not info:
        raise RuntimeError(f"no table {table!r}: was the database created by the daemon?")
    have = {r[1] for r in info}
    required = {r[1] for r in info if r[3] and r[4] is None and not (r[5] and r[2].upper() == "INTEGER")}
    missing = sorted(required - set(known))
    if missing:
        raise RuntimeError(f"{table} has NOT NULL columns the backlog fixture does not fill: {', '.join(missing)}")
    cols = [c for c in known if c in have]
    sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
    if len(cols) == len(known):
        return sql, lambda row: row
    getter = operator.itemgetter(*(known.index(c) for c in cols))
    if len(cols) == 1:
        return sql, lambda row: (getter(row),)
    return sql, getter


def device_id(prefix: str, i: int) -> str:
    return f"{prefix}{i:06d}"


def fill_pending(
    path: Path,
    *,
    pending: int,
    devices: int,
    endpoint: str,
    prefix: str = "bl-",
    chunk: int = 50_000,
) -> float:
    """Add `devices` online devices and `pending` pending deliveries to the store at `path`; seconds taken."""
    from webhookd.payloads import EventData, new_event_id

    started = time.perf_counter()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-262144")  # 256 MiB while building the indexes
        dev_sql, dev_row = _columns(conn, "devices", DEVICE_COLUMNS)
        ev_sql, ev_row = _columns(conn, "events", EVENT_COLUMNS)
        del_sql, del_row = _columns(conn, "deliveries", DELIVERY_COLUMNS)
        now = time.time()
        ids = [device_id(prefix, i) for i in range(devices)]
        conn.execute("BEGIN")
        conn.executemany(dev_sql, (dev_row((d, "online", None, None, "10.0.0.1", now, now)) for d in ids))
        conn.execute("COMMIT")
        for base in range(0, pending, chunk):
            events: list[tuple[object, ...]] = []
            deliveries: list[tuple[object, ...]] = []
            for k in range(base, min(base + chunk, pending)):
                dev = ids[k % devices]
                t = now - (pending - k) * 1e-6  # in id order, all in the past, all due now
                ev = EventData(new_event_id(), "device.online", t, "heartbeat", dev, None, "online", "unknown",
                               "10.0.0.1", None, t, None)  # fmt: skip
                events.append(ev_row((ev.id, ev.type, dev, t, ev.to_json())))
                deliveries.append(del_row((ev.id, endpoint, dev, ev.type, "pending", 0, t, None, None, t, t)))
            conn.execute("BEGIN")
            conn.executemany(ev_sql, events)
            conn.executemany(del_sql, deliveries)
            conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.perf_counter() - started


def count_rows(path: Path, endpoint: str) -> dict[str, int]:
    """Deliveries of `endpoint` per status, and the device count (read-only)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        out = {
            str(s): int(n)
            for s, n in conn.execute(
                "SELECT status, count(*) FROM deliveries WHERE endpoint = ? GROUP BY status", (endpoint,)
            )
        }
        out["devices"] = int(conn.execute("SELECT count(*) FROM devices").fetchone()[0])
    finally:
        conn.close()
    return out
