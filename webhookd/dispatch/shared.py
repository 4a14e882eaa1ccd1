"""The dispatcher on a hub of several processes (CONTRACT §14): lanes only of the partitions this process holds,
and each endpoint's failure counter, pause, single probe and disabled state shared through its database row.

A mixin of Dispatcher. Without a hub (`self.hub` None) nothing here runs and the dispatcher is the gateway's.
With one, the claims loop (claims.py) calls `repartition` when what we hold changes, `poke` when rows may have
been committed by another process, and `sync_endpoints` with the endpoint rows every second. The delivery loop
asks `shared_failure` after a failed attempt (an atomic increment of the hub's counter, and a compare-and-swap
to disabled so that exactly one process disables), `claim_probe` before a probe (one process at a time), and
`shared_success` after a success that reopens a failing endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from webhookd.dispatch import retry
from webhookd.dispatch.lanes import EndpointRuntime
from webhookd.logs import get_logger
from webhookd.store import StoreError

if TYPE_CHECKING:
    from webhookd.dispatch.claims import HubClaims
    from webhookd.store.postgres_leases import SharedEndpoint

log = get_logger("webhookd.dispatch")

PROBE_MARGIN = 2.0  # seconds a probe's claim outlasts its attempt's timeout in the database
BUSY_RETRY = 0.5  # seconds before asking again for a probe the database could not give


class SharedEndpoints:
    endpoints: dict[str, EndpointRuntime]
    hub: HubClaims | None
    _stale: set[int]
    _wake: asyncio.Event
    _clock: Callable[[], float]
    _db_skew: float  # the database's clock minus our monotonic clock, as last seen

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        raise NotImplementedError

    def attach_hub(self, hub: HubClaims) -> None:
        self.hub = hub
        for rt in self.endpoints.values():
            rt.accept = hub.holds

    # --- partitions --------------------------------------------------------------------------------------

    def repartition(self) -> None:
        """What we hold changed: throw every lane away; pages read the partitions held now."""
        for rt in self.endpoints.values():
            self._stale |= rt.clear()
        self._wake.set()

    def poke(self, names: Iterable[str] | None) -> None:
        for name in self.endpoints if names is None else names:
            rt = self.endpoints.get(name)
            if rt is not None and not rt.row.disabled:
                rt.poke()
        self._wake.set()

    def rescan_from(self, name: str, after_id: int) -> None:
        rt = self.endpoints.get(name)
        if rt is not None and not rt.row.disabled:
            rt.rescan(after_id)
            self._wake.set()

    def rescan_all(self) -> None:
        """Read every endpoint's pending rows again from the first: a row can become pending below a page's
        cursor (a hold that found its endpoint enabled again lands as pending), and a notice can be lost."""
        for name in self.endpoints:
            self.rescan_from(name, 0)

    # --- the shared endpoint rows ------------------------------------------------------------------------

    def _mono(self, db_time: float, db_now: float) -> float:
        now = self._clock()
        self._db_skew = db_now - now
        return now + (db_time - db_now)

    def sync_endpoints(self, rows: Mapping[str, SharedEndpoint], db_now: float) -> None:
        """Take the hub's view of each endpoint: disabled or enabled by another process, reopened by another
        process's success, or paused longer by another process's failure."""
        for name, rt in self.endpoints.items():
            row = rows.get(name)
            if row is None:
                continue
            if row.disabled and not rt.row.disabled:
                rt.row.disabled, rt.row.disabled_reason = True, row.disabled_reason
                rt.row.consecutive_failures = row.consecutive_failures
                self._stale |= rt.clear()  # the disabling process held the rows; nothing of ours is sent now
            elif not row.disabled and rt.row.disabled:
                rt.row.disabled, rt.row.disabled_reason = False, None
                rt.health = retry.Health()
                self._stale |= rt.clear()  # released by the enabling process: read again from the first row
            if not rt.row.disabled:
                self._take_health(rt, row, db_now)
            rt.saved_row = replace(rt.row)
        self._wake.set()

    def _take_health(self, rt: EndpointRuntime, row: SharedEndpoint, db_now: float) -> None:
        rt.row.consecutive_failures, rt.row.last_error = row.consecutive_failures, row.last_error
        if row.consecutive_failures == 0:
            if rt.health.consecutive_failures:
                rt.health = retry.Health()  # another process's success reopened it
            return
        rt.health = replace(
            rt.health,
            consecutive_failures=row.consecutive_failures,
            pause_step=max(rt.health.pause_step, row.pause_step),
            paused_until=max(rt.health.paused_until, self._mono(row.paused_until, db_now)),
        )

    async def shared_failure(self, rt: EndpointRuntime, error: str | None) -> retry.Health:
        """Count the failure for the whole hub; returns the health to decide with (the hub's counter before
        this failure, since decide() adds it)."""
        assert self.hub is not None
        rt.probe_until = 0.0
        try:
            db_now, row = await self.hub.failed(rt.cfg.name, error)
        except StoreError:
            return rt.health  # the database is away: decide on what this process knows
        if row is None:
            return rt.health
        self._db_skew = db_now - self._clock()
        self._take_health(rt, row, db_now)
        return replace(rt.health, consecutive_failures=row.consecutive_failures - 1)

    async def shared_pause(self, rt: EndpointRuntime, health: retry.Health) -> None:
        assert self.hub is not None
        if health.paused_until <= self._clock():
            return
        # In the database's time: its clock is the one every process compares with.
        with contextlib.suppress(StoreError):
            await self.hub.pause(rt.cfg.name, health.paused_until + self._db_skew, health.pause_step)

    async def disable_once(self, rt: EndpointRuntime, reason: str) -> bool:
        """Whether this process is the one that disables the endpoint (compare-and-swap)."""
        assert self.hub is not None
        try:
            return await self.hub.disable_once(rt.cfg.name, reason)
        except StoreError:
            return True  # the database is away: disable here; the row is saved by the hold when it can be

    def disabled_elsewhere(self, rt: EndpointRuntime, reason: str) -> None:
        rt.row.disabled, rt.row.disabled_reason = True, reason
        rt.saved_row = replace(rt.row)
        self._stale |= rt.clear()
        self._wake.set()

    def shared_success(self, rt: EndpointRuntime) -> None:
        if self.hub is None:
            return
        hub, name = self.hub, rt.cfg.name
        rt.probe_until = 0.0

        async def reopen() -> None:
            with contextlib.suppress(StoreError):
                await hub.succeeded(name)

        self._spawn(reopen(), f"reopen-{name}")

    def probe_allowed(self, rt: EndpointRuntime, now: float) -> bool:
        """A failing endpoint whose pause is over gets one probe for the whole hub: ours only once we won it."""
        if self.hub is None or rt.probe_until > now:
            return True
        if not rt.probing and rt.inflight == 0:
            rt.probing = True
            self._spawn(self._claim_probe(rt), f"probe-{rt.cfg.name}")
        return False

    async def _claim_probe(self, rt: EndpointRuntime) -> None:
        assert self.hub is not None
        hold = rt.cfg.timeout + PROBE_MARGIN
        try:
            won, db_now, row = await self.hub.take_probe(rt.cfg.name, hold)
        except StoreError:
            won, db_now, row = False, 0.0, None
        finally:
            rt.probing = False
        now = self._clock()
        if won:
            rt.probe_until = now + rt.cfg.timeout + PROBE_MARGIN / 2
        elif row is None or row.disabled:
            rt.health = replace(rt.health, paused_until=now + BUSY_RETRY)
        elif row.consecutive_failures == 0:
            rt.health = retry.Health()
        else:
            wait_until = max(row.paused_until, row.probe_until)
            rt.health = replace(rt.health, paused_until=max(now + 0.05, self._mono(wait_until, db_now)))
        self._wake.set()
