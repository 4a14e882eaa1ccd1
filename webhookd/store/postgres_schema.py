"""The PostgreSQL schema, its migrations (`webhookd_meta.schema_version`), and connecting to a database safely.

The tables mirror the SQLite schema (sqlite_schema.py at its version 4) in PostgreSQL's types. A database this
webhookd must not use (a newer schema, someone else's tables in our schema) is refused with a `StoreError` before
anything writes to it. Migrations run one version at a time, each in its own transaction under an advisory lock,
so that several hub processes starting together migrate once.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import TupleRow

from webhookd.config.units import redact_url
from webhookd.store.api import StoreError

SCHEMA_VERSION = 2

# pg_advisory_xact_lock key of the migrations: b"webhookd" as a big-endian int64
MIGRATION_LOCK = int.from_bytes(b"webhookd", "big", signed=True)

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE webhookd_meta (
            key text PRIMARY KEY,
            value text
        )""",
        """CREATE TABLE devices (
            id text PRIMARY KEY,
            name text, owner text, address text,
            state text NOT NULL,
            last_seen double precision, changed_at double precision,
            source text NOT NULL DEFAULT 'http',
            timed boolean NOT NULL DEFAULT true,
            reminders integer NOT NULL DEFAULT 0,
            offline_reason text, held_reason text, held_previous text
        )""",
        """CREATE TABLE events (
            id text PRIMARY KEY,
            type text NOT NULL,
            device_id text NOT NULL,
            created_at double precision NOT NULL,
            data bytea NOT NULL
        )""",
        """CREATE TABLE deliveries (
            id bigserial PRIMARY KEY,
            event_id text NOT NULL,
            endpoint text NOT NULL,
            device_id text NOT NULL,
            type text NOT NULL,
            status text NOT NULL CHECK (status IN ('pending', 'held', 'delivered', 'dead')),
            attempts integer NOT NULL DEFAULT 0,
            next_attempt_at double precision,
            last_status integer,
            last_error text,
            created_at double precision NOT NULL,
            updated_at double precision NOT NULL
        )""",
        "CREATE INDEX deliveries_by_status ON deliveries (status, endpoint, id)",
        "CREATE INDEX deliveries_by_event ON deliveries (event_id)",
        "CREATE INDEX deliveries_by_age ON deliveries (status, updated_at)",
        # The pending rows of an endpoint (load_pending_page) and of one lane (load_pending_lane): partial
        # indexes, so they hold only what is still to deliver.
        "CREATE INDEX deliveries_pending ON deliveries (endpoint, id) WHERE status = 'pending'",
        "CREATE INDEX deliveries_pending_lane ON deliveries (endpoint, device_id, id) WHERE status = 'pending'",
        "CREATE INDEX events_by_time ON events (created_at, id)",
        """CREATE TABLE endpoints (
            name text PRIMARY KEY,
            disabled boolean NOT NULL DEFAULT false,
            disabled_reason text,
            consecutive_failures integer NOT NULL DEFAULT 0,
            last_error text
        )""",
        """CREATE TABLE mutes (
            match text PRIMARY KEY,
            until double precision,
            reason text,
            created_at double precision NOT NULL,
            created_by text
        )""",
    ),
    # A hub of several processes (§14). Deliveries are split into PARTITIONS by (endpoint, device), each held
    # by one process through its lease row; the epoch, bumped at every change of owner, fences the holder's
    # writes. hub_members: the live processes (their fair share of partitions). Endpoints carry the shared
    # pause and the probe's owner. gateways: as in SQLite version 5.
    2: (
        "ALTER TABLE deliveries ADD COLUMN part integer NOT NULL DEFAULT 0",
        "CREATE INDEX deliveries_pending_part ON deliveries (endpoint, part, id) WHERE status = 'pending'",
        """CREATE TABLE leases (
            part integer PRIMARY KEY,
            owner text,
            epoch bigint NOT NULL DEFAULT 0,
            expires_at double precision NOT NULL DEFAULT 0
        )""",
        "INSERT INTO leases (part) SELECT generate_series(0, 31)",
        """CREATE TABLE hub_members (
            owner text PRIMARY KEY,
            started_at double precision NOT NULL,
            seen_at double precision NOT NULL
        )""",
        "ALTER TABLE endpoints ADD COLUMN paused_until double precision NOT NULL DEFAULT 0",
        "ALTER TABLE endpoints ADD COLUMN pause_step integer NOT NULL DEFAULT 0",
        "ALTER TABLE endpoints ADD COLUMN probe_by text",
        "ALTER TABLE endpoints ADD COLUMN probe_until double precision NOT NULL DEFAULT 0",
        """CREATE TABLE gateways (
            name text PRIMARY KEY,
            state text NOT NULL DEFAULT 'unknown',
            last_seen double precision,
            deadline double precision,
            changed_at double precision,
            address text,
            devices integer,
            relayed bigint NOT NULL DEFAULT 0,
            last_error text
        )""",
    ),
}

Conn = psycopg.AsyncConnection[TupleRow]


async def connect(url: str, **kwargs: Any) -> Conn:
    """A connection in autocommit mode (transactions are explicit); StoreError naming the redacted URL."""
    try:
        return await psycopg.AsyncConnection.connect(url, autocommit=True, **kwargs)
    except psycopg.Error as e:
        raise StoreError(f"cannot connect to {redact_url(url)}: {_message(e)}") from e


def _message(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


async def current_version(conn: Conn) -> int | None:
    """Our schema version, or None when this database schema has no `webhookd_meta` table."""
    # pg_class, not to_regclass(): an MVCC read, so it agrees with the table count in _check even while another
    # process's migration commits.
    cur = await conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = current_schema() AND c.relname = 'webhookd_meta')"
    )
    row = await cur.fetchone()
    if row is None or not row[0]:
        return None
    cur = await conn.execute("SELECT value FROM webhookd_meta WHERE key = 'schema_version'")
    row = await cur.fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


async def migrate(conn: Conn, where: str, version: int = SCHEMA_VERSION) -> None:
    """Refuse a database this webhookd must not use, then migrate it to `version` one step at a time."""
    try:
        await _check(conn, where)
        while True:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                # Under the lock: another process may have migrated (or created the schema) meanwhile.
                current = await _check(conn, where)
                if current >= version:
                    return
                step = current + 1
                for stmt in MIGRATIONS[step]:
                    await conn.execute(stmt)
                await conn.execute(
                    "INSERT INTO webhookd_meta (key, value) VALUES ('schema_version', %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(step),),
                )
    except psycopg.Error as e:
        raise StoreError(f"cannot create or migrate the schema in {where}: {_message(e)}") from e


async def _check(conn: Conn, where: str) -> int:
    current = await current_version(conn)
    if current is None:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"
        )
        row = await cur.fetchone()
        if row is not None and row[0]:
            raise StoreError(
                f"database {where} holds {row[0]} tables but no webhookd schema (no webhookd_meta table); "
                "refusing to use it: give webhookd a database of its own"
            )
        return 0
    if current > SCHEMA_VERSION:
        raise StoreError(
            f"database {where} has schema version {current}, newer than this webhookd ({SCHEMA_VERSION}); "
            "refusing to start"
        )
    if current == 0:
        raise StoreError(f"database {where} has a webhookd_meta table without a schema version; refusing")
    return current
