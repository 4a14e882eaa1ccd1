"""The SQLite backend of `DeliveryStore`: one connection, its thread, and the group-committing writer.

One writing connection, owned by one thread, in WAL mode with synchronous=FULL: a commit that returned is on disk;
reads run on a second connection and thread, so a page of a big backlog never holds up a group commit. Writes
are queued to the writer task as data (`sqlite_writes`); the writer runs everything that has queued up meanwhile
in ONE `BEGIN IMMEDIATE ... COMMIT` on that thread (group commit), so a burst of transitions costs one fsync and
one executemany per table, not one each. If a group fails with a SQLite error, its operations are retried one by
one so that a single bad one fails alone (`StoreUnavailable`).

Supervised: an unexpected exception (a bug, not a SQLite error) kills the writer loudly: it is logged once, every
queued and every later write fails at once with `StoreError`, `healthy` turns False and `supervise()` raises it.
While the store is unhealthy (disk full, read-only) it probes by itself every PROBE_INTERVAL with a real row write,
so it is healthy again within a fraction of a second once the fault is gone; it stays quiet while healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from webhookd.gateways import GatewayRow, Seen
from webhookd.logs import get_logger
from webhookd.mutes import MuteRule
from webhookd.presence import Device
from webhookd.store import chunked, gateway_rows, retention, sqlite_queries
from webhookd.store.api import (
    Change,
    DeliveryRow,
    DeliveryStore,
    EndpointRow,
    GatewayWrite,
    Pruned,
    Receipt,
    Requeued,
    StoreError,
    StoreUnavailable,
    Targets,
)
from webhookd.store.sqlite_schema import connect, connect_reader
from webhookd.store.sqlite_writes import (
    CallOp,
    DevicesOp,
    WriteOp,
    apply,
    device_row,
    receipts_op,
    record_op,
    record_relayed,
)

log = get_logger("webhookd.store")

T = TypeVar("T")

MAX_BATCH = 512  # operations per group commit
MAX_BATCH_ROWS = 6000  # ... and rows (~2,000 events with their device and delivery rows): a power cut queues
# hundreds of chunks, and the first chunk's commit must not wait for the last one's inserts
PROBE_INTERVAL = 0.2  # seconds between the store's own probes while it is unhealthy

_Queued = tuple[WriteOp, "asyncio.Future[Any]"]


def _probe(c: sqlite3.Connection) -> None:
    # A real row write: a no-op statement would "succeed" on a full or read-only disk.
    c.execute(
        "INSERT INTO meta (key, value) VALUES ('probe', ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (time.time(),),
    )


class SQLiteStore:
    """`DeliveryStore` on a SQLite file (see the module docstring)."""

    def __init__(self, path: Path, *, probe_interval: float = PROBE_INTERVAL) -> None:
        self.path = path
        self.probe_interval = probe_interval
        self.on_write: Callable[[float], None] | None = None  # metrics hook: each batch's duration
        self.auto_vacuum = 0  # PRAGMA auto_vacuum: 2 (incremental) for databases this version created
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhookd-sqlite")
        self._conn: sqlite3.Connection | None = None  # the writer's, used on _executor's thread only
        self._read_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhookd-sqlite-read")
        self._reader: sqlite3.Connection | None = None  # for reads, on _read_executor's thread only
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue()
        self._inflight: list[_Queued] = []  # the group commit the writer is running
        self._writer: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        self._unhealthy = asyncio.Event()  # wakes the prober
        self._done: asyncio.Future[None] | None = None  # what supervise() waits for
        self._healthy = True
        self._last_error: str | None = None
        self._failure: BaseException | None = None  # what the writer died of
        self._closed = False

    @property
    def healthy(self) -> bool:
        return self._healthy and self._failure is None

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def location(self) -> str:
        return str(self.path)

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def open(self) -> None:
        self._conn, self.auto_vacuum = await self._run(connect, self.path)
        self._reader = await self._run_read(connect_reader, self.path)
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        # Retrieved here, so that a store nobody supervises does not also log "exception never retrieved".
        self._done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._writer = loop.create_task(self._write_loop(), name="store-writer")
        self._writer.add_done_callback(self._task_done)
        self._prober = loop.create_task(self._probe_loop(), name="store-prober")
        self._prober.add_done_callback(self._task_done)
        if self.auto_vacuum == 0:
            log.info(
                "store_vacuum_needed",
                path=str(self.path),
                detail="this database was created without auto_vacuum: pruned space is reused but the file "
                "does not shrink; to fix, run `sqlite3 webhookd.db 'PRAGMA auto_vacuum=INCREMENTAL; VACUUM'` "
                "once while webhookd is stopped",
            )

    async def close(self) -> None:
        """Let queued writes finish, then stop. Never raises what the writer died of: supervise() does."""
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.wait([self._prober])
            self._prober = None
        if self._writer is not None:
            # Let queued writes finish: they may be acknowledgements someone is waiting for.
            if not self._writer.done():
                await self._queue.join()
            self._closed = True
            self._writer.cancel()
            await asyncio.wait([self._writer])
            self._writer = None
        self._closed = True
        self._fail_queued(StoreError("store closed"))
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await self._run_read(reader.close)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._run(conn.close)
        self._read_executor.shutdown(wait=True)
        self._executor.shutdown(wait=True)

    async def supervise(self) -> None:
        if self._done is None:
            raise RuntimeError("store not open")
        await asyncio.shield(self._done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        """The writer (or the prober) raised something unexpected: fail loudly, once."""
        if self._failure is not None:
            return
        self._failure = exc
        self._last_error = f"store writer failed: {exc!r}"
        log.critical("store_writer_failed", path=str(self.path), error=repr(exc))
        if self._writer is None or self._writer.done():
            # Its group commit was rolled back: none of it is on disk.
            for _, fut in self._inflight:
                self._queue.task_done()
                if not fut.done():
                    fut.set_exception(StoreError(self._last_error))
            self._inflight = []
        # (Else the prober died: the writer's running group commit still resolves its futures truthfully.)
        self._fail_queued(StoreError(self._last_error))
        if self._prober is not None and not self._prober.done():
            self._prober.cancel()
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)

    def _fail_queued(self, error: StoreError) -> None:
        while not self._queue.empty():
            _, fut = self._queue.get_nowait()
            self._queue.task_done()
            if not fut.done():
                fut.set_exception(StoreError(str(error)))

    # --- plumbing ----------------------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _run_read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._read_executor, fn, *args)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only query on the reader's thread (SQLite only): it sees every write that has resolved,
        and neither waits for the writer's group commits nor delays them."""
        conn = self._reader
        if conn is None:
            raise StoreError("store not open")
        return await self._run_read(fn, conn)

    def _queue_op(self, op: WriteOp) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._failure is not None:
            fut.set_exception(StoreError(self._last_error or "store writer failed"))
        elif self._closed or self._writer is None:
            fut.set_exception(StoreError("store not open"))
        else:
            self._queue.put_nowait((op, fut))
        return fut

    async def write(self, fn: Callable[[sqlite3.Connection], T], rows: int = 1) -> T:
        """Queue a write of about `rows` rows (SQLite only: a function of the connection, run inside a group
        commit); resolves once the transaction holding it has committed."""
        result: T = await self._queue_op(CallOp(fn, rows))
        return result

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            rows = batch[0][0].rows
            while len(batch) < MAX_BATCH and rows < MAX_BATCH_ROWS and not self._queue.empty():
                batch.append(self._queue.get_nowait())
                rows += batch[-1][0].rows
            self._inflight = batch
            started = time.perf_counter()
            results, error, bug = await self._run(self._commit_batch, [op for op, _ in batch])
            elapsed = time.perf_counter() - started
            if bug is not None:
                # What committed before the bug (when isolating) is acknowledged; the rest fails in _die.
                self._resolve(batch[: len(results)], results)
                self._inflight = batch[len(results) :]
                raise bug
            self._inflight = []
            was_healthy, self._healthy, self._last_error = self._healthy, error is None, error
            if was_healthy and error is not None:
                # Once per outage (heartbeats that need a commit get 503 meanwhile); the prober takes over.
                log.error("store_unavailable", path=str(self.path), error=error)
                self._unhealthy.set()
            elif error is None and not was_healthy:
                log.info("store_recovered", path=str(self.path))
            if self.on_write is not None:
                self.on_write(elapsed)
            self._resolve(batch, results)

    def _resolve(self, batch: Sequence[_Queued], results: Sequence[Any]) -> None:
        for (_, fut), res in zip(batch, results, strict=True):
            self._queue.task_done()
            if fut.done():
                continue
            if isinstance(res, StoreUnavailable):
                fut.set_exception(res)
            else:
                fut.set_result(res)

    def _commit_batch(self, ops: Sequence[WriteOp]) -> tuple[list[Any], str | None, Exception | None]:
        """On the store's thread: the results of `ops` (StoreUnavailable for those that failed), the error of
        the last transaction (None: it committed), and an unexpected exception that stopped it (the results then
        cover only the operations committed before it)."""
        conn = self._conn
        assert conn is not None
        try:
            return self._transaction(conn, ops), None, None
        except sqlite3.Error as e:
            if len(ops) == 1:
                return [StoreUnavailable(f"store unavailable: {e}")], str(e), None
        except Exception as e:  # a bug: the whole group was rolled back
            return [], None, e
        # Isolate the failing operation(s): the others still commit.
        out: list[Any] = []
        error: str | None = None
        for op in ops:
            try:
                out.extend(self._transaction(conn, [op]))
                error = None
            except sqlite3.Error as e:
                error = str(e)
                out.append(StoreUnavailable(f"store unavailable: {error}"))
            except Exception as e:
                return out, None, e
        return out, error, None

    def _transaction(self, conn: sqlite3.Connection, ops: Sequence[WriteOp]) -> list[Any]:
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = self._apply(conn, ops)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise
        return results

    def _apply(self, conn: sqlite3.Connection, ops: Sequence[WriteOp]) -> list[Any]:
        """The statements of one transaction (the seam tests/faults/test_storage.py injects faults at)."""
        return apply(conn, ops)

    async def probe(self) -> bool:
        try:
            await self.write(_probe)
        except StoreError:
            return False
        return True

    async def _probe_loop(self) -> None:
        while True:
            await self._unhealthy.wait()
            while not self._healthy:
                await asyncio.sleep(self.probe_interval)
                await self.probe()
            self._unhealthy.clear()

    # --- devices -----------------------------------------------------------------------------------------

    async def load_devices(self) -> list[Device]:
        return await self.read(sqlite_queries.load_devices)

    async def save_devices(self, devices: Sequence[Device]) -> None:
        if devices:
            await self._queue_op(DevicesOp([device_row(d) for d in devices]))

    async def forget_device(self, device_id: str) -> bool:
        return await self.write(functools.partial(sqlite_queries.forget_device, device_id=device_id))

    # --- mutes -------------------------------------------------------------------------------------------

    async def load_mutes(self) -> list[MuteRule]:
        return await self.read(sqlite_queries.load_mutes)

    async def save_mute(self, rule: MuteRule) -> None:
        await self.write(functools.partial(sqlite_queries.save_mute, rule=rule))

    async def delete_mutes(self, matches: Sequence[str]) -> int:
        return await self.write(functools.partial(sqlite_queries.delete_mutes, matches=list(matches)), len(matches))

    # --- the outbox --------------------------------------------------------------------------------------

    async def record(self, changes: Sequence[Change]) -> list[DeliveryRow]:
        rows: list[DeliveryRow] = await self._queue_op(record_op(changes))
        return rows

    async def record_relayed(self, change: Change) -> list[DeliveryRow] | None:
        rows: list[DeliveryRow] | None = await self.write(
            functools.partial(record_relayed, change=change), 2 + len(change.targets)
        )
        return rows

    async def load_pending_page(self, endpoint: str, after_id: int, limit: int) -> list[DeliveryRow]:
        return await self.read(
            functools.partial(sqlite_queries.pending_page, endpoint=endpoint, after_id=after_id, limit=limit)
        )

    async def load_pending_lane(self, endpoint: str, device_id: str, after_id: int, limit: int) -> list[DeliveryRow]:
        return await self.read(
            functools.partial(
                sqlite_queries.pending_lane, endpoint=endpoint, device_id=device_id, after_id=after_id, limit=limit
            )
        )

    async def pending_count(self) -> int:
        return await self.read(sqlite_queries.pending_count)

    def save_receipts(self, receipts: Sequence[Receipt], endpoints: Sequence[EndpointRow]) -> asyncio.Future[None]:
        return self._queue_op(receipts_op(receipts, endpoints, time.time()))

    async def requeue(
        self, ids: Sequence[int] | None, endpoint: str | None, status: str | None, held_endpoints: set[str]
    ) -> Requeued:
        return await chunked.requeue(
            self.write, sqlite_queries.requeue_ids, sqlite_queries.requeue_where, ids, endpoint, status, held_endpoints
        )

    # --- endpoints ---------------------------------------------------------------------------------------

    async def load_endpoints(self) -> dict[str, EndpointRow]:
        return await self.read(sqlite_queries.load_endpoints)

    async def hold(self, endpoint: EndpointRow | str) -> int:
        return await self.write(functools.partial(sqlite_queries.hold, endpoint=endpoint, now=time.time()))

    async def release(self, endpoint: EndpointRow) -> int:
        return await self.write(functools.partial(sqlite_queries.release, endpoint=endpoint, now=time.time()))

    async def endpoint_names(self) -> set[str]:
        return await self.read(sqlite_queries.endpoint_names)

    # --- admin, metrics, retention -----------------------------------------------------------------------

    async def delivery_counts(self) -> dict[str, dict[str, int]]:
        return await self.read(sqlite_queries.delivery_counts)

    async def list_deliveries(self, status: str | None, endpoint: str | None, limit: int) -> list[dict[str, Any]]:
        return await self.read(
            functools.partial(sqlite_queries.list_deliveries, status=status, endpoint=endpoint, limit=limit)
        )

    async def prune(
        self, older_than: float, batch: int = chunked.PRUNE_BATCH, vacuum_pages: int = retention.VACUUM_PAGES
    ) -> Pruned:
        return await retention.prune(self, older_than, batch, vacuum_pages)

    # --- gateways (a hub's) ---

    async def touch_gateway(
        self, name: str, now: float, silence: float, seen: Seen, targets: Targets, relayed: Change | None = None
    ) -> GatewayWrite:
        fn = functools.partial(
            gateway_rows.sqlite_touch, name=name, now=now, silence=silence, seen=seen, targets=targets, relayed=relayed
        )
        return await self.write(fn, 2 + len(targets) + (0 if relayed is None else 2 + len(relayed.targets)))

    async def gateway_rejected(self, name: str, error: str) -> None:
        await self.write(functools.partial(gateway_rows.sqlite_rejected, name=name, error=error))

    async def expire_gateways(self, now: float, targets: Mapping[str, Targets]) -> list[GatewayWrite]:
        due = await self.read(functools.partial(gateway_rows.sqlite_due, now=now))
        wanted = {name: targets[name] for name in due if name in targets}  # asked here, on the loop's thread
        if not wanted:
            return []
        fn = functools.partial(gateway_rows.sqlite_expire, names=due, now=now, targets=wanted)
        return await self.write(fn, len(due))

    async def restart_gateways(self, now: float, timeouts: Mapping[str, float], started: float) -> int:
        return await self.write(functools.partial(gateway_rows.sqlite_restart, now=now, timeouts=timeouts))

    async def load_gateways(self) -> list[GatewayRow]:
        return await self.read(gateway_rows.sqlite_load)


def _conforms(store: SQLiteStore) -> DeliveryStore:
    return store  # mypy checks here that SQLiteStore implements the whole Protocol
