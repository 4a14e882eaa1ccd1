"""What changes an endpoint from outside the delivery loop: startup and reload, disable, enable, replay, test.

A mixin of Dispatcher, kept apart so that dispatcher.py holds only the delivery loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from webhookd.config import Config
from webhookd.dispatch import retry
from webhookd.dispatch.lanes import EndpointRuntime
from webhookd.dispatch.sender import AttemptResult, Sender
from webhookd.logs import get_logger
from webhookd.messages import RenderError
from webhookd.payloads import make_test_event, render_request
from webhookd.states import DeliveryStatus
from webhookd.store import DeliveryStore, EndpointRow, Requeued, StoreError

if TYPE_CHECKING:
    from webhookd.dispatch.claims import HubClaims

log = get_logger("webhookd.dispatch")

HOLD_RETRY = 2.0  # seconds between tries to save a disable the store refused


class OperatorActions:
    cfg: Config
    store: DeliveryStore
    sender: Sender
    endpoints: dict[str, EndpointRuntime]
    _stale: set[int]
    _wake: asyncio.Event
    _wall: Callable[[], float]
    hub: HubClaims | None

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        raise NotImplementedError

    def _ensure_workers(self) -> None:
        raise NotImplementedError

    # --- startup and reload ----------------------------------------------------------------------------

    async def start(self) -> None:
        self.sender.open()
        await self._apply_endpoints(self.cfg, await self.store.load_endpoints())

    async def reconfigure(self, cfg: Config) -> None:
        await self._apply_endpoints(cfg, await self.store.load_endpoints())

    async def _apply_endpoints(self, cfg: Config, rows: dict[str, EndpointRow]) -> None:
        """Reconcile runtime and store with the endpoints of `cfg` (startup and reload)."""
        self.cfg = cfg
        self.sender.allow_link_local(cfg.endpoints)
        wanted = {e.name: e for e in cfg.endpoints}
        removed = [name for name in self.endpoints if name not in wanted]
        for name in removed:
            rt = self.endpoints.pop(name)
            self._stale |= rt.clear()
            held = await self.store.hold(name)
            log.info("endpoint_removed", endpoint=name, held=held)
        for name, ecfg in wanted.items():
            existing = self.endpoints.get(name)
            if existing is not None:
                if existing.cfg != ecfg:
                    existing.configure(ecfg)
                continue
            row = rows.get(name) or EndpointRow(name)
            if ecfg.relay and row.disabled:  # the relay is never disabled: a disable from before is undone
                row = replace(row, disabled=False, disabled_reason=None)
                log.info("endpoint_enabled", endpoint=name, reason="the relay to a hub is never disabled")
            rt = EndpointRuntime(cfg=ecfg, row=row, accept=None if self.hub is None else self.hub.holds)
            self.endpoints[name] = rt
            if row.disabled:
                await self.store.hold(row)
            else:
                # Rows held while the endpoint was absent from the config resume with it; its pending rows are
                # read page by page from the first (rt starts with `more` set).
                await self.store.release(row)
        for name in rows.keys() - wanted.keys() - set(removed):  # absent before: their rows stay held
            await self.store.hold(name)
        self._ensure_workers()  # delivery.concurrency may have grown
        self._wake.set()

    # --- disable and enable ----------------------------------------------------------------------------

    async def disable(self, name: str, reason: str, *, won: bool = False) -> EndpointRuntime | None:
        """`won`: this hub process flipped the shared row (its copy may say disabled already: the claims loop
        can read the row between that flip and this call); it logs the one `endpoint_disabled`."""
        rt = self.endpoints.get(name)
        if rt is None:
            return None
        already = rt.row.disabled and not won
        rt.row.disabled = True
        rt.row.disabled_reason = reason
        self._stale |= rt.clear()
        try:
            held = await self.store.hold(replace(rt.row))
        except StoreError as e:
            # Disabled in memory at once; the store learns it as soon as it can write again, so the disabled
            # state still survives a restart.
            log.error("endpoint_disable_not_saved", endpoint=name, error=str(e))
            self._spawn(self._hold_when_possible(rt), f"hold-{name}")
            held = 0
        self._announce(f"endpoint {name}")
        if not already:
            log.warning(
                "endpoint_disabled",
                endpoint=name,
                reason=reason,
                held=held,
                consecutive_failures=rt.row.consecutive_failures,
            )
        return rt

    async def _hold_when_possible(self, rt: EndpointRuntime) -> None:
        while rt.row.disabled and self.endpoints.get(rt.row.name) is rt:
            await asyncio.sleep(HOLD_RETRY)
            try:
                await self.store.hold(replace(rt.row))
            except StoreError:
                continue
            return

    async def enable(self, name: str) -> EndpointRuntime | None:
        rt = self.endpoints.get(name)
        if rt is None:
            return None
        rt.row.disabled = False
        rt.row.disabled_reason = None
        rt.row.consecutive_failures = 0
        rt.health = retry.Health()
        self._stale |= rt.clear()  # paging starts over: the released rows come back in id order
        # The count goes, last_error stays (on a hub too: the release reopens the shared pause and probe in its
        # commit); the next success clears it.
        released = await self.store.release(replace(rt.row))
        self._announce(f"endpoint {name}")
        log.info("endpoint_enabled", endpoint=name, released=released)
        self._wake.set()
        return rt

    def _announce(self, payload: str) -> None:
        hub = self.hub
        if hub is not None:
            self._spawn(hub.announce(payload), "hub-announce")

    # --- replay and test -------------------------------------------------------------------------------

    async def replay(self, ids: Sequence[int] | None, endpoint: str | None, status: DeliveryStatus | None) -> Requeued:
        """Queue deliveries again with a fresh budget; those of disabled or removed endpoints become held."""
        unavailable = {n for n in await self.store.endpoint_names() if n not in self.endpoints}
        unavailable |= {n for n, rt in self.endpoints.items() if rt.row.disabled}
        done = await self.store.requeue(ids, endpoint, status, unavailable)
        fresh = set(ids or ())
        for name, first in done.first_pending.items():
            self._announce(f"rescan {name} {first - 1}")  # rows of other processes' partitions
            rt = self.endpoints.get(name)
            if rt is None or rt.row.disabled:
                continue
            rt.rescan(first - 1)
            # A replayed row may still sit in a lane (e.g. waiting for a retry): give it the fresh budget.
            for lane in rt.lanes.values():
                for d in lane.items:
                    if d.id in fresh or (ids is None and status == "pending"):
                        d.attempts = 0
        self._wake.set()
        return done

    async def test(self, name: str) -> AttemptResult | None:
        rt = self.endpoints.get(name)
        if rt is None:
            return None
        event = make_test_event(self._wall())
        try:
            body, headers = render_request(event, rt.cfg)
        except RenderError as e:
            result = AttemptResult(False, None, f"template: {e}"[:200], 0.0)
        else:
            result = await self.sender.attempt(rt.target, event.id, body, 1, headers)
        log.info(
            "endpoint_tested",
            endpoint=name,
            status=result.status,
            error=result.error,
            duration_ms=round(result.latency * 1000, 1),
        )
        return result
