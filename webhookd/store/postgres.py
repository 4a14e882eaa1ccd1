"""The PostgreSQL backend of `DeliveryStore` (`store: postgresql://...`): psycopg 3 async, a group-committing
writer on one connection of its own, reads on a small psycopg_pool pool.

Writes are queued to the writer task as data (`sqlite_writes`' operations, `postgres_writes.CallOp`); the writer
runs everything queued meanwhile in ONE transaction (group commit), one statement per table in pipeline mode, so a
burst of transitions costs one round trip and one WAL flush (synchronous_commit as the server has it: on by
default, so a commit that returned is on disk). If a group fails with a database error its operations are retried
one by one so that a single bad one fails alone (`StoreUnavailable`).

Supervised like the SQLite store: an unexpected exception (a bug) kills the writer loudly, every queued and later
write fails at once with `StoreError`, `healthy` turns False and `supervise()` raises it. A lost connection (the
server restarted or stopped) fails the writes meanwhile with `StoreUnavailable`; while unhealthy the store probes
every PROBE_INTERVAL with a real row write on a fresh connection, and it is healthy again within about a second
of the server answering. While healthy but idle it checks every IDLE_PROBE seconds, so that /healthz notices a
server gone away even when nothing is written.

A commit whose connection is cut before its answer arrives is reported failed but may have committed: a record()
retried then fails on its event id (nothing doubles), receipts and device rows are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from webhookd.config.units import redact_url
from webhookd.gateways import GatewayRow, Seen
from webhookd.logs import get_logger
from webhookd.mutes import MuteRule
from webhookd.presence import Device
from webhookd.store import chunked, gateway_rows
from webhookd.store import postgres_queries as q
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
from webhookd.store.postgres_leases import Fence
from webhookd.store.postgres_schema import Conn, connect, migrate
from webhookd.store.postgres_touches import TouchOp
from webhookd.store.postgres_writes import CallOp, WriteOp, apply, needs_id_lock, record_relayed, take_id_lock
from webhookd.store.sqlite_writes import DevicesOp, device_row, receipts_op, record_op

log = get_logger("webhookd.store")
# The pool warns at every failed reconnect of a read connection; an outage is logged once, as store_unavailable.
logging.getLogger("psycopg.pool").setLevel(logging.ERROR)

T = TypeVar("T")

MAX_BATCH = 512  # operations per group commit
MAX_BATCH_ROWS = 6000  # ... and rows
PROBE_INTERVAL = 0.2  # seconds between the store's own probes while it is unhealthy
IDLE_PROBE = 5.0  # seconds without a commit before a healthy store checks the server by itself
CONNECT_TIMEOUT = 5  # seconds (libpq connect_timeout)
# Our transactions never wait on us: one left open longer than this belongs to a process that is stopped
# (SIGSTOP, a VM paused) or cut off. The server then ends it, so that its locks (the delivery-id lock of a hub,
# lease rows under FOR SHARE) do not freeze every other process sharing the database.
SESSION_OPTIONS = "-c idle_in_transaction_session_timeout=2s"
READ_TIMEOUT = 5.0  # seconds a read waits for a pooled connection
UNHEALTHY_READ_TIMEOUT = 0.5  # ... while the store is unhealthy
POOL_SIZE = 4  # pooled read connections at most

_Queued = tuple[WriteOp, "asyncio.Future[Any]"]


async def _probe(c: Conn) -> None:
    # A real row write: a no-op statement would "succeed" on a read-only or full server.
    await c.execute(
        "INSERT INTO webhookd_meta (key, value) VALUES ('probe', %s)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (str(time.time()),),
    )


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class PostgresStore:
    """`DeliveryStore` on a PostgreSQL database (see the module docstring)."""

    def __init__(self, url: str, *, probe_interval: float = PROBE_INTERVAL, idle_probe: float = IDLE_PROBE) -> None:
        self.url = url
        self.probe_interval = probe_interval
        self.idle_probe = idle_probe
        self.on_write: Callable[[float], None] | None = None  # metrics hook: each batch's duration
        self._location = redact_url(url)
        self._conn: Conn | None = None  # the writer's own connection (None: reconnect before the next batch)
        self._pool: AsyncConnectionPool[Conn] | None = None  # for reads
        self._queue: asyncio.Queue[_Queued] = asyncio.Queue()
        self._inflight: list[_Queued] = []
        self._writer: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        self._unhealthy = asyncio.Event()  # wakes the prober
        self._done: asyncio.Future[None] | None = None
        self._healthy = True
        self._last_error: str | None = None
        self._failure: BaseException | None = None
        self._closed = False
        self._last_commit = time.monotonic()
        # Set on a hub of several processes (dispatch/claims.py): receipts are fenced by our leases, pages
        # read only our partitions, new deliveries are announced to the other processes.
        self.fence: Fence | None = None
        # Every session of this process says who it is (pg_stat_activity): on a hub, the member name, so that the
        # others can end the sessions of a member that stopped renewing (postgres_leases.fence_off).
        self.app_name = "webhookd"

    @property
    def healthy(self) -> bool:
        return self._healthy and self._failure is None

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def location(self) -> str:
        return self._location

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def _connect(self) -> Conn:
        return await connect(
            self.url, connect_timeout=CONNECT_TIMEOUT, options=SESSION_OPTIONS, application_name=self.app_name
        )

    async def open(self) -> None:
        conn = await self._connect()
        try:
            await migrate(conn, self._location)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        self._pool = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=POOL_SIZE,
            kwargs={
                "autocommit": True,
                "connect_timeout": CONNECT_TIMEOUT,
                "options": SESSION_OPTIONS,
                "application_name": self.app_name,
            },
            timeout=READ_TIMEOUT,
            check=AsyncConnectionPool.check_connection,  # a connection the server dropped is replaced
            open=False,
            name="webhookd-read",
        )
        try:
            await self._pool.open(wait=True, timeout=READ_TIMEOUT)
        except PoolTimeout as e:
            await self._pool.close()
            await conn.close()
            raise StoreError(f"cannot connect to {self._location}: {_reason(e)}") from e
        loop = asyncio.get_running_loop()
        self._done = loop.create_future()
        self._done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._writer = loop.create_task(self._write_loop(), name="store-writer")
        self._writer.add_done_callback(self._task_done)
        self._prober = loop.create_task(self._probe_loop(), name="store-prober")
        self._prober.add_done_callback(self._task_done)

    async def close(self) -> None:
        """Let queued writes finish, then stop. Never raises what the writer died of: supervise() does."""
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.wait([self._prober])
            self._prober = None
        if self._writer is not None:
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
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close(timeout=1.0)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(psycopg.Error):
                await conn.close()

    async def supervise(self) -> None:
        if self._done is None:
            raise RuntimeError("store not open")
        await asyncio.shield(self._done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        if self._failure is not None:
            return
        self._failure = exc
        self._last_error = f"store writer failed: {exc!r}"
        log.critical("store_writer_failed", url=self._location, error=repr(exc))
        if self._writer is None or self._writer.done():
            for _, fut in self._inflight:
                self._queue.task_done()
                if not fut.done():
                    fut.set_exception(StoreError(self._last_error))
            self._inflight = []
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

    async def read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """Run a read-only query on a pooled connection; it sees every write that has resolved. A database that
        cannot answer raises StoreUnavailable (after one retry on a fresh connection)."""
        pool = self._pool
        if pool is None or self._closed:
            raise StoreError("store not open")
        for attempt in (1, 2):
            try:
                # While the writer cannot reach the server either, do not wait long for a connection.
                async with pool.connection(timeout=READ_TIMEOUT if self._healthy else UNHEALTHY_READ_TIMEOUT) as conn:
                    return await fn(conn)
            except PoolTimeout as e:
                raise StoreUnavailable(f"store unavailable: {_reason(e)}") from e
            except psycopg.OperationalError as e:  # e.g. a connection the server closed at a restart
                if attempt == 2:
                    raise StoreUnavailable(f"store unavailable: {_reason(e)}") from e
            except psycopg.Error as e:
                raise StoreUnavailable(f"store unavailable: {_reason(e)}") from e
        raise AssertionError("unreachable")

    def _queue_op(self, op: WriteOp) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self._failure is not None:
            fut.set_exception(StoreError(self._last_error or "store writer failed"))
        elif self._closed or self._writer is None:
            fut.set_exception(StoreError("store not open"))
        else:
            self._queue.put_nowait((op, fut))
        return fut

    async def write(self, fn: Callable[[Conn], Awaitable[T]], rows: int = 1) -> T:
        """Queue a write of about `rows` rows (an async function of the connection, run inside a group commit);
        resolves once the transaction holding it has committed."""
        result: T = await self._queue_op(CallOp(fn, rows))
        return result

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            self._take(batch)
            self._inflight = batch
            started = time.perf_counter()
            results, error, bug = await self._commit_batch(batch)
            elapsed = time.perf_counter() - started
            if bug is not None:
                self._resolve(batch[: len(results)], results)
                self._inflight = batch[len(results) :]
                raise bug
            self._inflight = []
            was_healthy, self._healthy, self._last_error = self._healthy, error is None, error
            if error is None:
                self._last_commit = time.monotonic()
            if was_healthy and error is not None:
                log.error("store_unavailable", url=self._location, error=error)
                self._unhealthy.set()  # the prober takes over
            elif error is None and not was_healthy:
                log.info("store_recovered", url=self._location)
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

    def _take(self, batch: list[_Queued]) -> list[WriteOp]:
        """Move what is queued into `batch`, up to the batch limits; returns the operations added."""
        start = len(batch)
        rows = sum(op.rows for op, _ in batch)
        while len(batch) < MAX_BATCH and rows < MAX_BATCH_ROWS and not self._queue.empty():
            batch.append(self._queue.get_nowait())
            rows += batch[-1][0].rows
        return [op for op, _ in batch[start:]]

    async def _commit_batch(self, batch: list[_Queued]) -> tuple[list[Any], str | None, Exception | None]:
        """The results of the batch's operations (StoreUnavailable for those that failed), the error of the last
        transaction (None: it committed), and an unexpected exception that stopped it (see
        SQLiteStore._commit_batch). On a hub the batch may grow while its transaction waits for the delivery-id
        lock (see _transaction)."""
        ops = [op for op, _ in batch]
        try:
            return await self._transaction(ops, batch), None, None
        except (psycopg.Error, StoreError) as e:
            if len(ops) == 1 or self._conn is None:  # one op, or the connection is gone: all fail alike
                return [StoreUnavailable(f"store unavailable: {_reason(e)}")] * len(ops), _reason(e), None
        except Exception as e:
            return [], None, e
        out: list[Any] = []
        error: str | None = None
        for op in ops:
            try:
                out.extend(await self._transaction([op]))
                error = None
            except (psycopg.Error, StoreError) as e:
                error = _reason(e)
                out.append(StoreUnavailable(f"store unavailable: {error}"))
            except Exception as e:
                return out, None, e
        return out, error, None

    async def _writer_conn(self) -> Conn:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            self._conn = None
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            conn = self._conn = await self._connect()
        return conn

    async def _transaction(self, ops: list[WriteOp], batch: list[_Queued] | None = None) -> list[Any]:
        """One transaction of `ops`. With `batch` (the writer's group commit, whose operations `ops` are) on a
        hub, the delivery-id lock is taken first and what was queued while we waited for it joins the batch
        (appended to both): the other processes commit in turns under that lock, so the wait is most of a
        turn, and sealing the batch at the grant instead of before it about doubles the events per commit
        (bench row 13)."""
        for attempt in (1, 2):
            conn = await self._writer_conn()
            stack = contextlib.AsyncExitStack()
            try:
                await stack.enter_async_context(conn.transaction())
            except psycopg.OperationalError:
                # BEGIN failed: nothing of the batch was sent. A connection the server dropped while we were idle
                # (it restarted) is replaced once, so that a restart between writes fails none of them.
                self._conn = None
                if attempt == 2 or not (conn.closed or conn.broken):
                    raise
                continue
            try:
                async with stack:
                    locked = False
                    if batch is not None and self.fence is not None and needs_id_lock(ops):
                        await take_id_lock(conn)
                        ops.extend(self._take(batch))
                        locked = True
                    return await self._apply(conn, ops, locked)
            except psycopg.OperationalError:
                if conn.closed or conn.broken:
                    self._conn = None
                raise
        raise AssertionError("unreachable")

    async def _apply(self, conn: Conn, ops: Sequence[WriteOp], locked: bool = False) -> list[Any]:
        """The statements of one transaction (the seam a fault test may inject at); `locked`: the delivery-id
        lock is held already."""
        return await apply(conn, ops, self.fence, nested=locked)

    async def probe(self) -> bool:
        try:
            await self.write(_probe)
        except StoreError:
            return False
        return True

    async def _probe_loop(self) -> None:
        while True:
            if self._healthy:
                idle = time.monotonic() - self._last_commit
                if idle < self.idle_probe:
                    # Woken at once when a write fails; else when the store has been idle for idle_probe.
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._unhealthy.wait(), self.idle_probe - idle + 0.01)
                    self._unhealthy.clear()
                    continue
            else:
                await asyncio.sleep(self.probe_interval)
            await self.probe()

    # --- devices -----------------------------------------------------------------------------------------

    async def load_devices(self) -> list[Device]:
        return await self.read(q.load_devices)

    async def save_devices(self, devices: Sequence[Device]) -> None:
        if devices:
            await self._queue_op(DevicesOp([device_row(d) for d in devices]))

    async def forget_device(self, device_id: str) -> bool:
        return await self.write(functools.partial(q.forget_device, device_id=device_id))

    # --- mutes -------------------------------------------------------------------------------------------

    async def load_mutes(self) -> list[MuteRule]:
        return await self.read(q.load_mutes)

    async def save_mute(self, rule: MuteRule) -> None:
        await self.write(functools.partial(q.save_mute, rule=rule))

    async def delete_mutes(self, matches: Sequence[str]) -> int:
        return await self.write(functools.partial(q.delete_mutes, matches=list(matches)), len(matches))

    # --- the outbox --------------------------------------------------------------------------------------

    async def record(self, changes: Sequence[Change]) -> list[DeliveryRow]:
        rows: list[DeliveryRow] = await self._queue_op(record_op(changes))
        return rows

    async def record_relayed(self, change: Change) -> list[DeliveryRow] | None:
        rows: list[DeliveryRow] | None = await self.write(
            functools.partial(record_relayed, change=change, fence=self.fence), 2 + len(change.targets)
        )
        return rows

    async def load_pending_page(self, endpoint: str, after_id: int, limit: int) -> list[DeliveryRow]:
        parts = self._parts()
        return await self.read(
            functools.partial(q.pending_page, endpoint=endpoint, after_id=after_id, limit=limit, parts=parts)
        )

    async def load_pending_lane(self, endpoint: str, device_id: str, after_id: int, limit: int) -> list[DeliveryRow]:
        parts = self._parts()
        return await self.read(
            functools.partial(
                q.pending_lane, endpoint=endpoint, device_id=device_id, after_id=after_id, limit=limit, parts=parts
            )
        )

    def _parts(self) -> list[int] | None:
        return None if self.fence is None else self.fence.fence()[0]

    async def pending_count(self) -> int:
        return await self.read(q.pending_count)

    def save_receipts(self, receipts: Sequence[Receipt], endpoints: Sequence[EndpointRow]) -> asyncio.Future[None]:
        return self._queue_op(receipts_op(receipts, endpoints, time.time()))

    async def requeue(
        self, ids: Sequence[int] | None, endpoint: str | None, status: str | None, held_endpoints: set[str]
    ) -> Requeued:
        return await chunked.requeue(self.write, q.requeue_ids, q.requeue_where, ids, endpoint, status, held_endpoints)

    # --- endpoints ---------------------------------------------------------------------------------------

    async def load_endpoints(self) -> dict[str, EndpointRow]:
        return await self.read(q.load_endpoints)

    async def hold(self, endpoint: EndpointRow | str) -> int:
        return await self.write(functools.partial(q.hold, endpoint=endpoint, now=time.time()))

    async def release(self, endpoint: EndpointRow) -> int:
        return await self.write(functools.partial(q.release, endpoint=endpoint, now=time.time()))

    async def endpoint_names(self) -> set[str]:
        return await self.read(q.endpoint_names)

    # --- admin, metrics, retention -----------------------------------------------------------------------

    async def delivery_counts(self) -> dict[str, dict[str, int]]:
        return await self.read(q.delivery_counts)

    async def list_deliveries(self, status: str | None, endpoint: str | None, limit: int) -> list[dict[str, Any]]:
        return await self.read(functools.partial(q.list_deliveries, status=status, endpoint=endpoint, limit=limit))

    async def prune(self, older_than: float, batch: int = chunked.PRUNE_BATCH) -> Pruned:
        return await q.prune(self, older_than, batch)

    # --- gateways (a hub's) ---

    async def touch_gateway(
        self, name: str, now: float, silence: float, seen: Seen, targets: Targets, relayed: Change | None = None
    ) -> GatewayWrite:
        # Queued as data: the writer merges a run of touches into a few statements (store/postgres_touches.py).
        rows = 2 + len(targets) + (0 if relayed is None else 2 + len(relayed.targets))
        done: GatewayWrite = await self._queue_op(TouchOp(name, now, silence, seen, targets, relayed, rows))
        return done

    async def gateway_rejected(self, name: str, error: str) -> None:
        await self.write(functools.partial(gateway_rows.pg_rejected, name=name, error=error))

    async def expire_gateways(self, now: float, targets: Mapping[str, Targets]) -> list[GatewayWrite]:
        due = await self.read(functools.partial(gateway_rows.pg_due, now=now))
        wanted = {name: targets[name] for name in due if name in targets}  # asked here, on the loop's thread
        if not wanted:
            return []
        fn = functools.partial(gateway_rows.pg_expire, names=due, now=now, targets=wanted, fence=self.fence)
        return await self.write(fn, len(due))

    async def restart_gateways(self, now: float, timeouts: Mapping[str, float], started: float) -> int:
        fn = functools.partial(gateway_rows.pg_restart, now=now, timeouts=timeouts, started=started)
        return await self.write(fn)

    async def load_gateways(self) -> list[GatewayRow]:
        return await self.read(gateway_rows.pg_load)


def _conforms(store: PostgresStore) -> DeliveryStore:
    return store  # mypy checks here that PostgresStore implements the whole Protocol
