"""Bare store: SQLite inserts of the rows one transition writes, with the daemon's durability settings.

    python -m bench.baseline_store --dir DIR --seconds 3 --batch 1 --batch 64

One transition = the device upsert + its event + one delivery row (webhookd.store's schema and statements,
WAL + synchronous=FULL), committed one transition per transaction (`--batch 1`) or N per transaction.
Batches are also timed with one executemany per table (key "N-many"), the cheapest way to write them.
Prints one `RESULT {json}` line: transitions/s for each batch size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import time
from pathlib import Path

from webhookd.payloads import EventData, new_event_id
from webhookd.store import Store

UPSERT_DEVICE = (
    "INSERT INTO devices (id, state, name, owner, address, last_seen, changed_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET state=excluded.state,"
    " name=excluded.name, owner=excluded.owner, address=excluded.address,"
    " last_seen=excluded.last_seen, changed_at=excluded.changed_at"
)
INSERT_EVENT = "INSERT INTO events (id, type, device_id, created_at, data) VALUES (?, ?, ?, ?, ?)"
INSERT_DELIVERY = (
    "INSERT INTO deliveries (event_id, endpoint, device_id, type, status, attempts,"
    " next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)"
)


def create_db(path: Path) -> None:
    """A fresh database with webhookd's own schema (its migrations), closed again."""

    async def go() -> None:
        store = Store(path)
        await store.open()
        await store.close()

    asyncio.run(go())


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def transition_rows(i: int, devices: int) -> tuple[tuple[object, ...], tuple[object, ...], tuple[object, ...]]:
    now = time.time()
    dev = f"store-{i % devices:06d}"
    state = "unplugged" if (i // devices) % 2 == 0 else "online"
    ev = EventData(
        id=new_event_id(),
        type=f"device.{state}",
        time=now,
        reason="reported",
        device_id=dev,
        name=None,
        state=state,
        previous_state="online" if state == "unplugged" else "unplugged",
        address="127.0.0.1",
        owner=None,
        last_seen=now,
        offline_for=None,
    )
    return (
        (dev, state, None, None, "127.0.0.1", now, now),
        (ev.id, ev.type, dev, now, ev.to_json()),
        (ev.id, "bench", dev, ev.type, "held", now, now, now),
    )


def run(path: Path, seconds: float, batch: int, devices: int = 10000, many: bool = False) -> float:
    """Transitions per second committed `batch` per transaction for about `seconds`; `many`: each table's
    rows of a batch in one executemany instead of one execute per row (as webhookd does it)."""
    conn = connect(path)
    done = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        conn.execute("BEGIN IMMEDIATE")
        if many:
            rows = [transition_rows(done + k, devices) for k in range(batch)]
            conn.executemany(UPSERT_DEVICE, [r[0] for r in rows])
            conn.executemany(INSERT_EVENT, [r[1] for r in rows])
            conn.executemany(INSERT_DELIVERY, [r[2] for r in rows])
            done += batch
        else:
            for _ in range(batch):
                dev, event, delivery = transition_rows(done, devices)
                conn.execute(UPSERT_DEVICE, dev)
                conn.execute(INSERT_EVENT, event)
                conn.execute(INSERT_DELIVERY, delivery)
                done += 1
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return done / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--batch", type=int, action="append")
    args = p.parse_args()
    out = {}
    for b in args.batch or [1, 64]:
        for many in (False, True) if b > 1 else (False,):
            db = args.dir / f"store-batch{b}.db"
            for suffix in ("", "-wal", "-shm"):
                Path(str(db) + suffix).unlink(missing_ok=True)
            args.dir.mkdir(parents=True, exist_ok=True)
            create_db(db)
            out[f"{b}{'-many' if many else ''}"] = run(db, args.seconds, b, many=many)
        for suffix in ("", "-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
