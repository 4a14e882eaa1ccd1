"""Rows into and out of the dispatcher's memory: new rows from the tracker, page reads and lane refills from
the store (the window itself is lanes.py's), and a lane moving on. A mixin of Dispatcher."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from webhookd.config import Config
from webhookd.dispatch.lanes import WINDOW, Delivery, Due, EndpointRuntime
from webhookd.logs import get_logger
from webhookd.payloads import EventData
from webhookd.states import DeliveryStatus
from webhookd.store import DeliveryRow, DeliveryStore, StoreError

log = get_logger("webhookd.dispatch")

READ_RETRY = 2.0  # seconds before a page read or lane refill the store refused is tried again


class Paging:
    cfg: Config
    store: DeliveryStore
    endpoints: dict[str, EndpointRuntime]
    _stale: set[int]
    _wake: asyncio.Event
    _clock: Callable[[], float]
    _wall: Callable[[], float]

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        raise NotImplementedError

    def _due(self) -> Due:
        return Due(self._clock(), self._wall(), 2 * max(self.cfg.delivery.retry_schedule))

    def targets(self, event: EventData) -> list[tuple[str, DeliveryStatus]]:
        """(endpoint, initial status) for every endpoint subscribed to `event`."""
        return [
            (name, "held" if rt.row.disabled else "pending") for name, rt in self.endpoints.items() if rt.wants(event)
        ]

    def enqueue(self, rows: Iterable[DeliveryRow]) -> None:
        """Pending rows just committed (by the tracker)."""
        by_endpoint: dict[str, list[DeliveryRow]] = {}
        for r in rows:
            by_endpoint.setdefault(r.endpoint, []).append(r)
        due = self._due()
        for name, group in by_endpoint.items():
            rt = self.endpoints.get(name)
            if rt is not None and not rt.row.disabled:
                rt.offer(group, due, self._stale)
        self._wake.set()

    def _page(self, rt: EndpointRuntime) -> None:
        rt.paging = True
        self._spawn(self._read_page(rt, rt.generation, rt.fetch_started()), f"page-{rt.cfg.name}")

    async def _read_page(self, rt: EndpointRuntime, generation: int, started: int) -> None:
        try:
            while True:
                asked = rt.page_room()
                if asked <= 0:  # lane refills in flight hold the room; their ends wake the next page
                    return
                try:
                    rows = await self.store.load_pending_page(rt.cfg.name, rt.cursor, asked)
                except StoreError as e:
                    log.warning("deliveries_not_loaded", endpoint=rt.cfg.name, error=str(e))
                    await asyncio.sleep(READ_RETRY)
                    continue
                if generation != rt.generation or self.endpoints.get(rt.cfg.name) is not rt:
                    return
                rt.take_page(rows, asked, self._due(), self._stale)
                self._wake.set()
                if not rt.more or len(rt.known) >= WINDOW // 2 or rt.row.disabled:
                    return
                await asyncio.sleep(0)  # a backlog of skipped rows: heartbeats get in between pages
        finally:
            rt.fetch_done(started)
            if generation == rt.generation:
                rt.paging = False
                self._wake.set()

    def _refill(self, rt: EndpointRuntime, device: str) -> None:
        lane = rt.lanes.get(device)
        if lane is None or lane.refilling:
            return
        lane.refilling = True
        started = rt.fetch_started()
        self._spawn(self._read_lane(rt, rt.generation, device, lane.last_id, started), f"lane-{rt.cfg.name}")

    async def _read_lane(self, rt: EndpointRuntime, generation: int, device: str, after: int, started: int) -> None:
        asked = rt.reserve_lane()
        try:
            while True:
                try:
                    rows = await self.store.load_pending_lane(rt.cfg.name, device, after, asked)
                except StoreError as e:
                    log.warning("deliveries_not_loaded", endpoint=rt.cfg.name, device=device, error=str(e))
                    await asyncio.sleep(READ_RETRY)
                    continue
                if generation != rt.generation or self.endpoints.get(rt.cfg.name) is not rt:
                    return
                need_more = rt.take_lane(device, rows, asked, self._due(), self._stale)
                asked = 0
                if not need_more:
                    break
                asked = rt.reserve_lane()
                lane = rt.lanes[device]
                lane.refilling, after = True, lane.last_id
        finally:
            if asked and generation == rt.generation:  # left early: give the reservation back
                rt.reserved = max(0, rt.reserved - asked)
            rt.fetch_done(started)
            self._wake.set()

    def _advance(self, rt: EndpointRuntime, d: Delivery, now: float) -> None:
        if rt.advance(d, now):
            self._refill(rt, d.event.device_id)
