"""A hub process's share of the deliveries (CONTRACT §14): its partition leases, their renewal, the notices
of the other processes, and the shared endpoint rows, kept in step with the dispatcher.

Every RENEW_EVERY the claims loop says it is alive, renews the leases it holds at their epoch, reads every lease
row and the live members, and claims or releases what `leases.plan` says. Any change of what it holds throws the
dispatcher's lanes away (they are read again from the store, now for the partitions held); a lease it could not
renew in time is dropped locally first, so no attempt starts on a partition another process may have taken. The
store fences receipts by the same leases (store/postgres_leases.py), so a process that was stopped past its lease
and resumes changes nothing. A second connection LISTENs for the others' notices (new rows, replays, endpoint
changes, mute rules); a poke of every endpoint each loop, and a read of the mutes every RESCAN_TICKS, are the
backstop for a notice lost while reconnecting.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import psycopg

from webhookd.leases import MEMBER_TTL, RENEW_EVERY, TTL, Holdings, partition_of, plan
from webhookd.logs import get_logger
from webhookd.store import StoreError, StoreUnavailable
from webhookd.store import postgres_leases as sql
from webhookd.store.postgres import SESSION_OPTIONS
from webhookd.store.postgres_schema import Conn, connect

if TYPE_CHECKING:
    from webhookd.dispatch.dispatcher import Dispatcher
    from webhookd.store.postgres import PostgresStore

log = get_logger("webhookd.hub")
T = TypeVar("T")

LEAVE_MAX = 2.0  # seconds a stopping process spends giving its leases back
RECONNECT = 1.0  # seconds between tries of a lost connection
RESCAN_TICKS = 10  # every this many loops, pending rows are read again from the first (dispatcher.rescan_all)


def member_name() -> str:
    """Unique per process, readable in the leases table: host, pid and a random tag (pids repeat)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class HubClaims:
    """The `Fence` of the PostgreSQL store and the dispatcher's view of which lanes are ours."""

    def __init__(
        self,
        store: PostgresStore,
        dispatcher: Dispatcher,
        *,
        owner: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.owner = owner or member_name()
        store.app_name = self.owner
        self.holdings = Holdings()
        self._clock = clock
        self._conn: Conn | None = None
        self._sync = asyncio.Event()  # an endpoint notice: read the endpoint rows now
        self._mutes_due = asyncio.Event()  # a mutes notice (or the backstop): read the mute rules now
        # Reads the store's mute rules into this process (the daemon's); None: mutes are not followed.
        self.on_mutes: Callable[[], Awaitable[None]] | None = None
        self._failing = False
        self._ticks = 0

    # --- what the store and the dispatcher ask ---------------------------------------------------------

    def fence(self) -> tuple[list[int], list[int]]:
        return self.holdings.epochs(self._clock())

    def now(self) -> float:
        return self._clock()

    def holds(self, endpoint: str, device_id: str) -> bool:
        return self.holdings.valid(partition_of(endpoint, device_id), self._clock())

    def lost_any(self) -> bool:
        """Drop leases that ran out locally (we could not renew them); True if there were any."""
        gone = self.holdings.expire(self._clock())
        if gone:
            log.warning("hub_partitions_lost", partitions=len(gone), held=len(self.holdings.held))
            self.dispatcher.repartition()
        return bool(gone)

    # --- the loop --------------------------------------------------------------------------------------

    async def join(self) -> None:
        """At startup, before the dispatcher pages: say we are here and claim a first share."""
        try:
            await self._tick(await self._connection())
        except (psycopg.Error, StoreError) as e:
            await self._lost_connection(e)

    async def run(self) -> None:
        try:
            # The listener in a TaskGroup of ours: an unexpected exception of it ends run() (and the daemon).
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._listen(), name="hub-notices")
                tg.create_task(self._mutes_loop(), name="hub-mutes")
                await self._renew_loop()
        finally:
            await self._leave()

    async def _renew_loop(self) -> None:
        while True:
            started = self._clock()
            try:
                await self._tick(await self._connection())
            except (psycopg.Error, StoreError) as e:
                await self._lost_connection(e)
            self.lost_any()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, RENEW_EVERY - (self._clock() - started))):
                    await self._sync.wait()
            self._sync.clear()

    async def _connection(self) -> Conn:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            conn = self._conn = await connect(
                self.store.url, connect_timeout=int(TTL), options=SESSION_OPTIONS, application_name=self.owner
            )
        return conn

    async def _lost_connection(self, e: BaseException) -> None:
        if not self._failing:
            log.warning("hub_leases_not_renewed", error=str(e).strip().splitlines()[0] if str(e).strip() else repr(e))
        self._failing = True
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await conn.close()

    async def _tick(self, conn: Conn) -> None:
        sent = self._clock()
        await sql.heartbeat(conn, self.owner)
        for gone in await sql.fence_off(conn, self.owner, MEMBER_TTL + 1.0):
            # A member that stopped renewing (SIGSTOP, a paused VM, cut off) may sit inside a transaction holding
            # the hub's delivery-id lock and its lease rows: every other process would wait for it for good.
            log.warning("hub_member_fenced", member=gone)
        got = await sql.renew(conn, self.owner, {p: e for p, (e, _) in self.holdings.held.items()}, TTL)
        now, rows = await sql.leases(conn)
        live = await sql.members(conn, MEMBER_TTL)
        # What plan() sees as ours is what the renew gave back: a lease taken from us meanwhile is not.
        rows = [r for r in rows if r.owner != self.owner or r.part in got]
        decided = plan(self.owner, rows, live, now)
        if decided.release:
            for p in decided.release:
                got.pop(p, None)
        if decided.claim:
            got.update(await sql.claim(conn, self.owner, list(decided.claim), TTL))
        gained, lost = self.holdings.renewed(got, sent)
        if gained or lost:  # a release is a loss: dropped locally first, then given back below
            self.dispatcher.repartition()
        if decided.release:  # no attempt of ours overlaps the next holder's
            await sql.release(conn, self.owner, list(decided.release))
        if self._failing:
            self._failing = False
            log.info("hub_leases_renewed", held=len(got))
        if gained or lost:
            log.info("hub_partitions", held=len(got), gained=len(gained), lost=len(lost), members=len(live))
        at, shared = await sql.endpoints(conn)
        self.dispatcher.sync_endpoints(shared, at)
        self._ticks += 1
        if self._ticks % RESCAN_TICKS == 0:
            self.dispatcher.rescan_all()
            self._mutes_due.set()
        else:
            self.dispatcher.poke(None)

    async def _leave(self) -> None:
        self.holdings.held.clear()
        conn = self._conn
        if conn is None or conn.closed:
            return
        with contextlib.suppress(Exception):
            async with asyncio.timeout(LEAVE_MAX):
                await sql.leave(conn, self.owner)
                log.info("hub_partitions_released", owner=self.owner)
        with contextlib.suppress(Exception):
            await conn.close()
        self._conn = None

    async def _listen(self) -> None:
        while True:
            try:
                conn = await connect(self.store.url, connect_timeout=int(TTL))
            except StoreError:
                await asyncio.sleep(RECONNECT)
                continue
            try:
                await conn.execute(f"LISTEN {sql.CHANNEL}")
                self.dispatcher.poke(None)  # whatever was announced while we were not listening
                self._mutes_due.set()
                async for n in conn.notifies():
                    self._notice(n.payload)
            except psycopg.Error:
                await asyncio.sleep(RECONNECT)
            finally:
                with contextlib.suppress(Exception):
                    await conn.close()

    def _notice(self, payload: str) -> None:
        kind, _, rest = payload.partition(" ")
        if kind == "new":
            self.dispatcher.poke(rest.split(","))
        elif kind == "rescan":
            name, _, after = rest.rpartition(" ")
            self.dispatcher.rescan_from(name, int(after) if after.isdigit() else 0)
        elif kind == "endpoint":
            self._sync.set()
        elif kind == sql.MUTES_NOTICE:
            self._mutes_due.set()

    async def _mutes_loop(self) -> None:
        """One read of the mutes at a time, again if a notice came during it: a read that began before the
        last write committed is followed by one that sees it (notices of a burst of mutes cost one or two)."""
        while True:
            await self._mutes_due.wait()
            self._mutes_due.clear()
            if self.on_mutes is None:
                continue
            with contextlib.suppress(StoreError):  # the backstop tries again (the store logs its outage itself)
                await self.on_mutes()

    # --- the shared endpoint row -----------------------------------------------------------------------

    async def announce(self, payload: str) -> None:
        """Tell the other processes (a replay, an enable or disable made here); their poll is the backstop."""
        with contextlib.suppress(StoreError):
            await self._call(lambda c: sql.notify(c, payload))

    async def failed(self, name: str, error: str | None) -> tuple[float, sql.SharedEndpoint | None]:
        return await self._call(lambda c: sql.failed(c, name, error))

    async def pause(self, name: str, until: float, step: int) -> None:
        await self._call(lambda c: sql.pause(c, name, until, step))

    async def succeeded(self, name: str) -> None:
        await self._call(lambda c: sql.succeeded(c, name))

    async def take_probe(self, name: str, hold: float) -> tuple[bool, float, sql.SharedEndpoint | None]:
        return await self._call(lambda c: sql.take_probe(c, name, self.owner, hold))

    async def disable_once(self, name: str, reason: str) -> bool:
        return await self._call(lambda c: sql.disable_once(c, name, reason))

    async def _call(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """One statement on the claims connection (psycopg serializes its users); StoreUnavailable if it fails."""
        try:
            return await fn(await self._connection())
        except psycopg.Error as e:
            await self._lost_connection(e)
            raise StoreUnavailable(f"store unavailable: {e}".strip()) from e
