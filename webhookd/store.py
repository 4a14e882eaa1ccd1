"""SQLite persistence: schema and migrations, the transactional outbox, and the group-committing writer.

One connection, owned by one thread, in WAL mode with synchronous=FULL: a commit that returned is on disk.
Every write is a function of that connection queued to the writer task; the writer runs everything that has
queued up meanwhile in ONE `BEGIN IMMEDIATE` transaction (group commit), so a burst of transitions costs one
fsync, not one each. If a batch fails, its operations are retried one by one so that a single bad one fails
alone. Checkpoints run in the same thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from webhookd.logs import get_logger
from webhookd.payloads import EventData
from webhookd.presence import Device

log = get_logger("webhookd.store")

T = TypeVar("T")

SCHEMA_VERSION = 1
MAX_BATCH = 512  # operations per group commit
MAX_BATCH_ROWS = 6000  # ... and rows (~2,000 events with their device and delivery rows): a power cut queues
# hundreds of chunks, and the first chunk's commit must not wait for the last one's inserts
PRUNE_BATCH = 500  # rows deleted per write transaction by the retention pruner
VACUUM_PAGES = 512  # pages released per write transaction by the incremental vacuum

_MIGRATIONS: dict[int, str] = {
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
}


class StoreError(Exception):
    """The store cannot be opened or written; the message is meant for an operator."""


class StoreUnavailable(StoreError):
    """A write failed (disk full, read-only, I/O error): nothing of it was recorded."""


@dataclass(slots=True)
class EndpointRow:
    name: str
    disabled: bool = False
    disabled_reason: str | None = None
    consecutive_failures: int = 0
    last_error: str | None = None


@dataclass(slots=True)
class DeliveryRow:
    id: int
    event: EventData
    endpoint: str
    attempts: int
    next_attempt_at: float | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt's result as it is persisted."""

    delivery_id: int
    status: str  # pending|held|delivered|dead
    attempts: int
    next_attempt_at: float | None
    last_status: int | None
    last_error: str | None


Op = Callable[[sqlite3.Connection], Any]


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhookd-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._queue: asyncio.Queue[tuple[Op, asyncio.Future[Any], int]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self.healthy = True
        self.last_error: str | None = None
        self.on_write: Callable[[float], None] | None = None  # metrics hook: each batch's duration
        self.auto_vacuum = 0  # PRAGMA auto_vacuum: 2 (incremental) for databases this version created

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def open(self) -> None:
        await self._run(self._open_sync)
        self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name="store-writer")
        if self.auto_vacuum == 0:
            log.info(
                "store_vacuum_needed",
                path=str(self.path),
                detail="this database was created without auto_vacuum: pruned space is reused but the file "
                "does not shrink; to fix, run `sqlite3 webhookd.db 'PRAGMA auto_vacuum=INCREMENTAL; VACUUM'` "
                "once while webhookd is stopped",
            )

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise StoreError(f"cannot open database {self.path}: {e}") from e
        try:
            # Look before touching: a file this webhookd must not use is refused before any PRAGMA below
            # writes to it (journal_mode=WAL rewrites the file header of a rollback-journal database).
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            tables = int(conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0])
        except sqlite3.DatabaseError as e:
            conn.close()
            raise StoreError(f"cannot open database {self.path}: {e}") from e
        if version > SCHEMA_VERSION:
            conn.close()
            raise StoreError(
                f"database {self.path} has schema version {version}, newer than this webhookd "
                f"({SCHEMA_VERSION}); refusing to start"
            )
        if version == 0 and tables:
            conn.close()
            raise StoreError(f"database {self.path} holds tables but no webhookd schema version; refusing")
        try:
            # Only takes on a new, empty database, and only before journal_mode=WAL and the first table;
            # a no-op on existing ones (which keep what they were created with).
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.execute("PRAGMA foreign_keys=OFF")
            self.auto_vacuum = int(conn.execute("PRAGMA auto_vacuum").fetchone()[0])
        except sqlite3.DatabaseError as e:
            conn.close()
            raise StoreError(f"cannot open database {self.path}: {e}") from e
        for v in range(version + 1, SCHEMA_VERSION + 1):
            try:
                conn.execute("BEGIN IMMEDIATE")
                for stmt in _MIGRATIONS[v].split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                conn.execute(f"PRAGMA user_version={v}")
                conn.execute("COMMIT")
            except sqlite3.Error as e:  # e.g. the disk is full at the very first start
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                conn.close()
                raise StoreError(f"cannot create the schema (version {v}) in {self.path}: {e}") from e
        self._conn = conn

    async def close(self) -> None:
        if self._writer is not None:
            # Let queued writes finish: they may be acknowledgements someone is waiting for.
            if not self._writer.done():
                await self._queue.join()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None
        if self._conn is not None:
            conn = self._conn
            self._conn = None
            await self._run(conn.close)
        self._executor.shutdown(wait=True)

    # --- plumbing ----------------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only query on the store's thread (admin and startup paths only)."""
        conn = self._conn
        assert conn is not None
        return await self._run(fn, conn)

    async def write(self, op: Callable[[sqlite3.Connection], T], rows: int = 1) -> T:
        """Queue a write of about `rows` rows; resolves once the transaction holding it has committed."""
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, fut, rows))
        return await fut

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            rows = batch[0][2]
            while len(batch) < MAX_BATCH and rows < MAX_BATCH_ROWS and not self._queue.empty():
                batch.append(self._queue.get_nowait())
                rows += batch[-1][2]
            started = time.perf_counter()
            was_healthy = self.healthy
            results = await self._run(self._commit_batch, [op for op, _, _ in batch])
            elapsed = time.perf_counter() - started
            if was_healthy and not self.healthy:
                # Once per outage (heartbeats that need a commit get 503 meanwhile); the flush loop probes.
                log.error("store_unavailable", path=str(self.path), error=self.last_error)
            elif self.healthy and not was_healthy:
                log.info("store_recovered", path=str(self.path))
            if self.on_write is not None:
                self.on_write(elapsed)
            for (_, fut, _), res in zip(batch, results, strict=True):
                self._queue.task_done()
                if fut.done():
                    continue
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)

    def _commit_batch(self, ops: Sequence[Op]) -> list[Any]:
        conn = self._conn
        assert conn is not None
        try:
            return self._transaction(conn, ops)
        except sqlite3.Error:
            if len(ops) == 1:
                return [self._failure()]
        # Isolate the failing operation(s): the others still commit.
        out: list[Any] = []
        for op in ops:
            try:
                out.extend(self._transaction(conn, [op]))
            except sqlite3.Error:
                out.append(self._failure())
        return out

    def _transaction(self, conn: sqlite3.Connection, ops: Sequence[Op]) -> list[Any]:
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = [op(conn) for op in ops]
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            self.healthy = False
            self.last_error = str(e)
            raise
        self.healthy = True
        self.last_error = None
        return results

    def _failure(self) -> StoreUnavailable:
        return StoreUnavailable(f"store unavailable: {self.last_error}")

    async def probe(self) -> bool:
        """A tiny write that tells whether the store can commit again."""
        try:
            # A real row write: a no-op statement would "succeed" on a full or read-only disk.
            await self.write(
                lambda c: c.execute(
                    "INSERT INTO meta (key, value) VALUES ('probe', ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (time.time(),),
                )
            )
        except StoreUnavailable:
            return False
        return True

    # --- devices -----------------------------------------------------------------------------------------

    async def load_devices(self) -> list[Device]:
        def q(c: sqlite3.Connection) -> list[Device]:
            rows = c.execute("SELECT id, state, name, owner, address, last_seen, changed_at FROM devices").fetchall()
            return [
                Device(id=r[0], state=r[1], name=r[2], owner=r[3], address=r[4], last_seen=r[5], changed_at=r[6])
                for r in rows
            ]

        return await self.read(q)

    @staticmethod
    def _upsert_devices(c: sqlite3.Connection, devices: Iterable[Device]) -> None:
        c.executemany(
            "INSERT INTO devices (id, state, name, owner, address, last_seen, changed_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET state=excluded.state,"
            " name=excluded.name, owner=excluded.owner, address=excluded.address,"
            " last_seen=excluded.last_seen, changed_at=excluded.changed_at",
            [(d.id, d.state, d.name, d.owner, d.address, d.last_seen, d.changed_at) for d in devices],
        )

    async def save_devices(self, devices: list[Device]) -> None:
        if devices:
            await self.write(lambda c: self._upsert_devices(c, devices), len(devices))

    # --- the outbox --------------------------------------------------------------------------------------

    async def record(
        self, items: Sequence[tuple[Device, EventData | None, Sequence[tuple[str, str]]]]
    ) -> list[DeliveryRow]:
        """For each item, write the device's new state, its event and one delivery per (endpoint, status),
        all in one transaction: the event exists durably exactly when the new state does."""

        def op(c: sqlite3.Connection) -> list[DeliveryRow]:
            self._upsert_devices(c, [device for device, _, _ in items])
            events = [event for _, event, _ in items if event is not None]
            if not events:
                return []
            c.executemany(
                "INSERT INTO events (id, type, device_id, created_at, data) VALUES (?, ?, ?, ?, ?)",
                [(e.id, e.type, e.device_id, e.time, e.to_json()) for e in events],
            )
            # One statement for every delivery of the batch (a power cut records thousands at once). The ids
            # come back by range: this transaction is the only writer, so its rows are those above the old max.
            wanted = [(event, endpoint, status) for _, event, targets in items if event for endpoint, status in targets]
            if not wanted:
                return []
            (before,) = c.execute("SELECT coalesce(max(id), 0) FROM deliveries").fetchone()
            c.executemany(
                "INSERT INTO deliveries (event_id, endpoint, device_id, type, status, attempts,"
                " next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)",
                [
                    (e.id, endpoint, e.device_id, e.type, status, e.time, e.time, e.time)
                    for e, endpoint, status in wanted
                ],
            )
            ids = [r[0] for r in c.execute("SELECT id FROM deliveries WHERE id > ? ORDER BY id", (before,))]
            if len(ids) != len(wanted):
                raise sqlite3.DatabaseError(f"expected {len(wanted)} new deliveries, found {len(ids)}")
            return [
                DeliveryRow(i, e, endpoint, 0, e.time)
                for i, (e, endpoint, status) in zip(ids, wanted, strict=True)
                if status == "pending"
            ]

        return await self.write(op, sum(2 + len(targets) for _, _, targets in items))

    @staticmethod
    def _pending_rows(c: sqlite3.Connection, where: str, args: Sequence[object]) -> list[DeliveryRow]:
        """Pending deliveries matching `where` (a fixed SQL fragment with placeholders), in id order (= the
        order their events happened); events shared by several deliveries are decoded once."""
        sql = (
            "SELECT d.id, d.endpoint, d.attempts, d.next_attempt_at, e.data FROM deliveries d"  # noqa: S608
            " JOIN events e ON e.id = d.event_id WHERE d.status = 'pending'" + where + " ORDER BY d.id"
        )
        cache: dict[bytes, EventData] = {}
        out = []
        for did, ep, attempts, nxt, data in c.execute(sql, tuple(args)):
            ev = cache.get(data)
            if ev is None:
                ev = cache[data] = EventData.from_json(data)
            out.append(DeliveryRow(did, ev, ep, attempts, nxt))
        return out

    async def load_pending(self, endpoint: str | None = None) -> list[DeliveryRow]:
        if endpoint is None:
            return await self.read(lambda c: self._pending_rows(c, "", ()))
        return await self.read(lambda c: self._pending_rows(c, " AND d.endpoint = ?", (endpoint,)))

    async def save_outcomes(self, outcomes: Sequence[Outcome], endpoints: Sequence[EndpointRow]) -> None:
        now = time.time()

        def op(c: sqlite3.Connection) -> None:
            # A receipt (delivered) or a hold may land on a row that is held by now; a retry or a death may not
            # take a row out of held (the endpoint was disabled meanwhile, and held rows wait for `enable`).
            sql = (
                "UPDATE deliveries SET status=?, attempts=?, next_attempt_at=?, last_status=?, last_error=?,"
                " updated_at=? WHERE id=? AND status IN ('pending', ?)"
            )
            c.executemany(
                sql,
                [
                    (
                        o.status,
                        o.attempts,
                        o.next_attempt_at,
                        o.last_status,
                        o.last_error,
                        now,
                        o.delivery_id,
                        "held" if o.status in ("delivered", "held") else "pending",
                    )
                    for o in outcomes
                ],
            )
            self._upsert_endpoints(c, endpoints)

        await self.write(op, len(outcomes))

    # --- endpoints ---------------------------------------------------------------------------------------

    @staticmethod
    def _upsert_endpoints(c: sqlite3.Connection, rows: Iterable[EndpointRow]) -> None:
        c.executemany(
            "INSERT INTO endpoints (name, disabled, disabled_reason, consecutive_failures, last_error)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET disabled=excluded.disabled,"
            " disabled_reason=excluded.disabled_reason,"
            " consecutive_failures=excluded.consecutive_failures, last_error=excluded.last_error",
            [(r.name, int(r.disabled), r.disabled_reason, r.consecutive_failures, r.last_error) for r in rows],
        )

    async def load_endpoints(self) -> dict[str, EndpointRow]:
        def q(c: sqlite3.Connection) -> dict[str, EndpointRow]:
            rows = c.execute(
                "SELECT name, disabled, disabled_reason, consecutive_failures, last_error FROM endpoints"
            ).fetchall()
            return {r[0]: EndpointRow(r[0], bool(r[1]), r[2], r[3], r[4]) for r in rows}

        return await self.read(q)

    async def hold(self, endpoint: EndpointRow | str) -> int:
        """Undelivered deliveries of an endpoint become held (disabled, or removed from the config)."""
        name = endpoint if isinstance(endpoint, str) else endpoint.name

        def op(c: sqlite3.Connection) -> int:
            if not isinstance(endpoint, str):
                self._upsert_endpoints(c, (endpoint,))
            cur = c.execute(
                "UPDATE deliveries SET status='held', updated_at=? WHERE endpoint=? AND status='pending'",
                (time.time(), name),
            )
            return cur.rowcount

        return await self.write(op)

    async def release(self, endpoint: EndpointRow) -> int:
        """Held deliveries of an endpoint become pending again, each with a fresh attempt budget."""
        now = time.time()

        def op(c: sqlite3.Connection) -> int:
            self._upsert_endpoints(c, (endpoint,))
            cur = c.execute(
                "UPDATE deliveries SET status='pending', attempts=0, next_attempt_at=?, updated_at=?"
                " WHERE endpoint=? AND status='held'",
                (now, now, endpoint.name),
            )
            return cur.rowcount

        return await self.write(op)

    async def replay(
        self, ids: Sequence[int] | None, endpoint: str | None, status: str | None, held_endpoints: set[str]
    ) -> tuple[list[DeliveryRow], int]:
        """Queue deliveries again with a fresh attempt budget; those of unavailable endpoints become held.

        Returns the rows that became pending (in id order) and how many rows were replayed in all."""
        now = time.time()

        def op(c: sqlite3.Connection) -> tuple[list[DeliveryRow], int]:
            if ids is not None:
                marks = ",".join("?" * len(ids))
                rows = c.execute(
                    f"SELECT id, endpoint FROM deliveries WHERE id IN ({marks})",  # noqa: S608 (placeholders)
                    tuple(ids),
                ).fetchall()
            else:
                rows = c.execute(
                    "SELECT id, endpoint FROM deliveries WHERE endpoint=? AND status=?", (endpoint, status)
                ).fetchall()
            c.executemany(
                "UPDATE deliveries SET status=?, attempts=0, next_attempt_at=?, last_error=NULL, updated_at=?"
                " WHERE id=?",
                [("held" if ep in held_endpoints else "pending", now, now, did) for did, ep in rows],
            )
            queued = [did for did, ep in rows if ep not in held_endpoints]
            pending: list[DeliveryRow] = []
            for i in range(0, len(queued), 500):
                chunk = queued[i : i + 500]
                pending += self._pending_rows(c, " AND d.id IN (" + ",".join("?" * len(chunk)) + ")", chunk)
            pending.sort(key=lambda r: r.id)
            return pending, len(rows)

        return await self.write(op)

    async def endpoint_names(self) -> set[str]:
        def q(c: sqlite3.Connection) -> set[str]:
            names = {r[0] for r in c.execute("SELECT name FROM endpoints")}
            return names | {r[0] for r in c.execute("SELECT DISTINCT endpoint FROM deliveries")}

        return await self.read(q)

    # --- retention ---------------------------------------------------------------------------------------

    @staticmethod
    def _prune_deliveries(c: sqlite3.Connection, cutoff: float, limit: int) -> int:
        cur = c.execute(
            "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries"
            " WHERE status IN ('delivered', 'dead') AND updated_at < ? LIMIT ?)",
            (cutoff, limit),
        )
        return cur.rowcount

    @staticmethod
    def _prune_events(
        c: sqlite3.Connection, cutoff: float, after: tuple[float, str], limit: int
    ) -> tuple[int, tuple[float, str] | None]:
        """Look at the next `limit` events older than `cutoff` after the key `after` (created_at, id) and
        delete those no delivery refers to. Returns (deleted, key of the last event looked at or None when
        there are no more); events still referenced (held or pending for long) are stepped over, not rescanned
        in every batch."""
        window = c.execute(
            "SELECT created_at, id FROM events WHERE created_at < ? AND (created_at, id) > (?, ?)"
            " ORDER BY created_at, id LIMIT ?",
            (cutoff, after[0], after[1], limit),
        ).fetchall()
        if not window:
            return 0, None
        cur = c.executemany(
            "DELETE FROM events WHERE id = ? AND NOT EXISTS (SELECT 1 FROM deliveries WHERE event_id = ?)",
            [(eid, eid) for _, eid in window],
        )
        last: tuple[float, str] = (window[-1][0], window[-1][1])
        return cur.rowcount, (last if len(window) == limit else None)

    @staticmethod
    def _vacuum_step(c: sqlite3.Connection, pages: int) -> int:
        free = int(c.execute("PRAGMA freelist_count").fetchone()[0])
        # Python's sqlite3 steps a PRAGMA that returns no columns only once, and incremental_vacuum frees
        # one page per step: so one execute per page (a cached statement; ~20 us each).
        for _ in range(min(free, pages)):
            c.execute("PRAGMA incremental_vacuum(1)")
        return int(c.execute("PRAGMA freelist_count").fetchone()[0])

    async def prune(
        self, older_than: float, batch: int = PRUNE_BATCH, vacuum_pages: int = VACUUM_PAGES
    ) -> tuple[int, int, int]:
        """Delete delivered and dead deliveries last updated before `older_than` (unix seconds), then events
        older than that which no delivery refers to, then give the freed pages back to the file system
        (databases with auto_vacuum=INCREMENTAL). Each step is its own small write transaction queued like any
        other write, so heartbeats' group commits wait for one batch at most, never for the whole prune.

        Returns (deliveries, events, pages) removed."""
        deliveries = events = pages = 0
        while True:
            n = await self.write(lambda c: self._prune_deliveries(c, older_than, batch))
            deliveries += n
            if n < batch:
                break
            await asyncio.sleep(0)
        key: tuple[float, str] | None = (float("-inf"), "")
        while key is not None:
            n, key = await self.write(functools.partial(self._prune_events, cutoff=older_than, after=key, limit=batch))
            events += n
            await asyncio.sleep(0)
        if (deliveries or events) and self.auto_vacuum == 2:
            free = await self.read(lambda c: int(c.execute("PRAGMA freelist_count").fetchone()[0]))
            for _ in range(free // max(vacuum_pages, 1) + 1):  # bounded, even if others free pages meanwhile
                if free == 0:
                    break
                left = await self.write(lambda c: self._vacuum_step(c, vacuum_pages))
                pages += max(free - left, 0)
                free = left
                await asyncio.sleep(0)
        return deliveries, events, pages

    async def retention_loop(
        self, retention: Callable[[], float], interval: float = 60.0, first_delay: float = 10.0
    ) -> None:
        """Prune every `interval` seconds (the first time after `first_delay`) what is older than
        `retention()` seconds (a callable, so that a config reload takes effect). A store error is logged
        and the next round tries again; this loop never takes the daemon down."""
        await asyncio.sleep(min(first_delay, interval))
        while True:
            started = time.perf_counter()
            try:
                deliveries, events, pages = await self.prune(time.time() - retention())
            except StoreError as e:
                log.warning("prune_failed", error=str(e))
            except Exception as e:  # a bug here must not stop the heartbeats
                log.exception("prune_failed", error=repr(e))
            else:
                if deliveries or events:
                    log.info(
                        "deliveries_pruned",
                        count=deliveries,
                        events=events,
                        vacuumed_pages=pages,
                        duration_ms=round((time.perf_counter() - started) * 1000, 1),
                    )
            await asyncio.sleep(interval)

    # --- queries for the admin API -----------------------------------------------------------------------

    async def delivery_counts(self) -> dict[str, dict[str, int]]:
        """{endpoint: {status: n}}"""

        def q(c: sqlite3.Connection) -> dict[str, dict[str, int]]:
            out: dict[str, dict[str, int]] = {}
            for ep, status, n in c.execute(
                "SELECT endpoint, status, count(*) FROM deliveries GROUP BY endpoint, status"
            ):
                out.setdefault(ep, {})[status] = n
            return out

        return await self.read(q)

    async def list_deliveries(self, status: str | None, endpoint: str | None, limit: int) -> list[dict[str, Any]]:
        def q(c: sqlite3.Connection) -> list[dict[str, Any]]:
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
            keys = (
                "id",
                "event_id",
                "endpoint",
                "device",
                "type",
                "status",
                "attempts",
                "next_attempt_at",
                "last_status",
                "last_error",
                "created_at",
            )
            return [dict(zip(keys, row, strict=True)) for row in c.execute(sql, (*args, limit))]

        return await self.read(q)
