"""The SQLite schema, its `user_version` migrations, and opening a database file safely.

A file this webhookd must not use (a newer schema, someone else's tables, not a database at all) is refused with a
`StoreError` before anything writes to it. Migrations run one version at a time, each in its own transaction.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from webhookd.store.api import StoreError

SCHEMA_VERSION = 5

MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        name TEXT, owner TEXT, address TEXT,
        state TEXT NOT NULL,
        last_seen REAL, changed_at REAL
    ) WITHOUT ROWID;
    CREATE TABLE events (
        id TEXT PRIMARY KEY,
        type TEXT NOT NULL,
        device_id TEXT NOT NULL,
        created_at REAL NOT NULL,
        data BLOB NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        event_id TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        device_id TEXT NOT NULL,
        type TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'held', 'delivered', 'dead')),
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL,
        last_status INTEGER,
        last_error TEXT,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX deliveries_by_status ON deliveries (status, endpoint, id);
    CREATE INDEX deliveries_by_event ON deliveries (event_id);
    CREATE INDEX deliveries_by_age ON deliveries (status, updated_at);
    CREATE INDEX events_by_time ON events (created_at);
    CREATE TABLE endpoints (
        name TEXT PRIMARY KEY,
        disabled INTEGER NOT NULL DEFAULT 0,
        disabled_reason TEXT,
        consecutive_failures INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
    ) WITHOUT ROWID;
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value
    ) WITHOUT ROWID;
    """,
    # One lane (endpoint, device) of pending deliveries, paged in id order (load_pending_lane).
    2: """
    CREATE INDEX deliveries_pending_lane ON deliveries (endpoint, device_id, id) WHERE status = 'pending';
    """,
    # Where a device's state comes from (http, udp, mqtt, relay), and whether it has a silence timer (a device
    # known only from MQTT availability has none). Rows from before were HTTP or UDP devices, all timed.
    3: """
    ALTER TABLE devices ADD COLUMN source TEXT NOT NULL DEFAULT 'http';
    ALTER TABLE devices ADD COLUMN timed INTEGER NOT NULL DEFAULT 1;
    """,
    # Operators' controls (§12): reminders sent for the current offline; an offline held by the debounce (its
    # reason and the state before it; the time it went offline is changed_at); mute rules (globs).
    4: """
    ALTER TABLE devices ADD COLUMN reminders INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE devices ADD COLUMN offline_reason TEXT;
    ALTER TABLE devices ADD COLUMN held_reason TEXT;
    ALTER TABLE devices ADD COLUMN held_previous TEXT;
    CREATE TABLE mutes (
        match TEXT PRIMARY KEY,
        until REAL,
        reason TEXT,
        created_at REAL NOT NULL,
        created_by TEXT
    ) WITHOUT ROWID;
    """,
    # A hub's gateways (§14): their liveness (state, the deadline of their silence timeout) and what the
    # gateway list shows; one row per configured gateway heard from.
    5: """
    CREATE TABLE gateways (
        name TEXT PRIMARY KEY,
        state TEXT NOT NULL DEFAULT 'unknown',
        last_seen REAL,
        deadline REAL,
        changed_at REAL,
        address TEXT,
        devices INTEGER,
        relayed INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
    ) WITHOUT ROWID;
    """,
}


def connect(path: Path, version: int = SCHEMA_VERSION) -> tuple[sqlite3.Connection, int]:
    """Open (creating if needed) and migrate the database at `path` to `version`; returns the connection
    (autocommit mode: transactions are explicit) and its auto_vacuum mode (2 = incremental)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open database {path}: {e}") from e
    try:
        # Look before touching: a file this webhookd must not use is refused before any PRAGMA below writes
        # to it (journal_mode=WAL rewrites the file header of a rollback-journal database).
        current = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = int(conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0])
    except sqlite3.DatabaseError as e:
        conn.close()
        raise StoreError(f"cannot open database {path}: {e}") from e
    if current > SCHEMA_VERSION:
        conn.close()
        raise StoreError(
            f"database {path} has schema version {current}, newer than this webhookd ({SCHEMA_VERSION}); "
            "refusing to start"
        )
    if current == 0 and tables:
        conn.close()
        raise StoreError(f"database {path} holds tables but no webhookd schema version; refusing")
    try:
        # Only takes on a new, empty database, and only before journal_mode=WAL and the first table; a no-op
        # on existing ones (which keep what they were created with).
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("PRAGMA foreign_keys=OFF")
        auto_vacuum = int(conn.execute("PRAGMA auto_vacuum").fetchone()[0])
    except sqlite3.DatabaseError as e:
        conn.close()
        raise StoreError(f"cannot open database {path}: {e}") from e
    for v in range(current + 1, version + 1):
        try:
            conn.execute("BEGIN IMMEDIATE")
            for stmt in MIGRATIONS[v].split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(f"PRAGMA user_version={v}")
            conn.execute("COMMIT")
        except sqlite3.Error as e:  # e.g. the disk is full at the very first start
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            conn.close()
            raise StoreError(f"cannot create the schema (version {v}) in {path}: {e}") from e
    return conn, auto_vacuum


def connect_reader(path: Path) -> sqlite3.Connection:
    """A second connection to the (opened and migrated) database, for reads only: in WAL mode its queries see
    the last commit and neither wait for the writer nor hold it up."""
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
    except sqlite3.Error as e:
        raise StoreError(f"cannot open database {path}: {e}") from e
    return conn
