"""Delivery: scheduling, workers, paging, and applying each attempt's Decision (CONTRACT §7).

Due lane heads (lanes.py) go to a fixed pool of worker tasks, within the global and per-endpoint concurrency:
handed out by one scheduler loop (timers, wake-ups) and by each worker as it finishes. A failing endpoint
pauses and then gets a single probe (retry.capacity); only a success reopens it. A lane moves on only once its
head's receipt is persisted, so a crash can repeat a delivery but never reorder one; a worker does not wait for
that commit: the head stays in its lane, *settling*, meanwhile (at most UNSAVED_FACTOR x concurrency per
endpoint). Every task (workers, page reads, retries of a hold) runs in the dispatcher's TaskGroup: an
unexpected exception anywhere ends `run()` with it, and the daemon exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from webhookd.config import Config
from webhookd.dispatch import retry
from webhookd.dispatch.lanes import Delivery, EndpointRuntime
from webhookd.dispatch.operator import OperatorActions
from webhookd.dispatch.paging import Paging
from webhookd.dispatch.sender import AttemptResult, Sender
from webhookd.dispatch.shared import SharedEndpoints
from webhookd.logs import get_logger
from webhookd.messages import RenderError
from webhookd.payloads import render_request
from webhookd.store import DeliveryRow, DeliveryStore, Receipt, StoreError

if TYPE_CHECKING:
    from webhookd.dispatch.claims import HubClaims

log = get_logger("webhookd.dispatch")

RESAVE_DELAY = 2.0  # seconds before a head whose receipt could not be saved (or a failed page read) is retried
# Receipts an endpoint may have waiting for their commit, per unit of its concurrency. Workers do not wait for
# the commit (an fsync), so this bounds what a crash can send twice: (1 + UNSAVED_FACTOR) x concurrency.
UNSAVED_FACTOR = 4


class Dispatcher(Paging, OperatorActions, SharedEndpoints):
    def __init__(
        self,
        cfg: Config,
        store: DeliveryStore,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self._clock = clock
        self._wall = wall
        self._rng = rng
        self.sender = Sender(cfg.delivery.timeout, wall=wall)
        self.endpoints: dict[str, EndpointRuntime] = {}
        self.inflight = 0
        self._jobs: asyncio.Queue[tuple[EndpointRuntime, int, Delivery]] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._drain = 0.0
        self._done = asyncio.Event()
        self._yielding = False
        self._tg: asyncio.TaskGroup | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()  # every task of ours in the TaskGroup (workers too)
        self._crash: BaseException | None = None
        self._receipts: set[asyncio.Future[None]] = set()
        # in flight or settling while their lanes were thrown away (disable/enable/removal): never taken again
        self._stale: set[int] = set()
        self.on_result: Callable[[str, AttemptResult], None] | None = None  # metrics hook
        self.on_outcome: Callable[[str, str], None] | None = None  # metrics hook: persisted status of an attempt
        # On a hub of several processes (attach_hub): the claims of this process, and which lanes are ours.
        self.hub: HubClaims | None = None
        self._db_skew = 0.0

    # --- the loop ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Schedule until stop(); then drain in-flight attempts for the stop's budget and cancel the rest (they
        stay pending in the store). Raises whatever any of the dispatcher's tasks raised unexpectedly."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                self._ensure_workers()
                await self._schedule()
                if self.inflight:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._drain):
                            await self._idle.wait()
                self._tg = None
                for t in self._tasks:
                    t.cancel()
            if self._receipts:  # receipts already known are worth saving: fewer repeats after a restart
                await asyncio.wait(self._receipts, timeout=max(self._drain, 1.0))
        finally:
            self._tg = None
            self._workers.clear()
            await self.sender.close()
            self._done.set()

    async def stop(self, drain_timeout: float) -> None:
        """Stop scheduling; in-flight attempts get `drain_timeout` seconds; returns once run() has ended."""
        self._stopping = True
        self._drain = drain_timeout
        self._wake.set()
        if self._tg is not None or self._workers:
            await self._done.wait()
        else:
            await self.sender.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        if self._tg is None or self._stopping:
            coro.close()
            return
        task = self._tg.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _guard(self, fn: Callable[[], None]) -> None:
        """Run a continuation from a callback: an exception there must end run(), not vanish in the loop's
        exception handler."""
        try:
            fn()
        except Exception as e:
            self._crash = self._crash or e
            self._wake.set()

    async def _schedule(self) -> None:
        while not self._stopping:
            if self._crash is not None:
                raise self._crash
            self._wake.clear()
            delay = self._dispatch_due()
            if self._stopping:
                break
            if delay is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()

    def _ensure_workers(self) -> None:
        while self._tg is not None and len(self._workers) < self.cfg.delivery.concurrency:
            task = self._tg.create_task(self._worker(), name=f"delivery-worker-{len(self._workers)}")
            self._workers.append(task)
            self._tasks.add(task)

    def yield_to_sweep(self, on: bool) -> None:
        """While on, start no new attempts (those in flight go on): a power cut's offline events are being
        recorded, and recording them on time matters more than delivering the first of them early."""
        if self._yielding and not on:
            self._wake.set()
        self._yielding = on

    def _dispatch_due(self) -> float | None:
        now = self._clock()
        for rt in self.endpoints.values():
            if rt.needs_page():
                self._page(rt)
        if self._yielding:
            return None  # yield_to_sweep(False) wakes us
        next_due = float("inf")
        limit = self.cfg.delivery.concurrency
        for rt in list(self.endpoints.values()):
            if rt.row.disabled or not rt.ready:
                continue
            cap = retry.capacity(rt.health, rt.cfg.concurrency, now)
            if cap == 0:
                next_due = min(next_due, rt.health.paused_until)
                continue
            if cap == 1 and rt.health.consecutive_failures and not self.probe_allowed(rt, now):
                continue  # the hub's single probe: asked for; its answer wakes us
            while rt.ready and self.inflight < limit:
                if rt.inflight >= cap or rt.unsaved >= UNSAVED_FACTOR * rt.cfg.concurrency:
                    break
                due, _, device = rt.ready[0]
                if due > now:
                    next_due = min(next_due, due)
                    break
                heapq.heappop(rt.ready)
                d = rt.head(device)
                if d is None or d.inflight or d.settling:
                    continue
                rt.inflight += 1
                self.inflight += 1
                self._idle.clear()
                d.inflight = True
                self._jobs.put_nowait((rt, rt.generation, d))
        if next_due == float("inf"):
            return None
        return max(0.0, next_due - now)

    async def _worker(self) -> None:
        while True:
            rt, generation, d = await self._jobs.get()
            try:
                await self._deliver(rt, generation, d)
            finally:
                d.inflight = False
                rt.inflight -= 1
                self.inflight -= 1
                if self.inflight == 0:
                    self._idle.set()
            # Hand out the next due job right here: this worker's next get() then finds it without a trip
            # through the scheduler task. Only a future due time needs the scheduler's timer.
            if not self._stopping and self._dispatch_due() is not None:
                self._wake.set()

    # --- one delivery --------------------------------------------------------------------------------------

    def _body(self, rt: EndpointRuntime, d: Delivery) -> bytes:
        """The body for this endpoint (rendered once per config; its own headers go to `d.headers`)."""
        if d.body_for is not rt.cfg:
            d.body, d.headers = render_request(d.event, rt.cfg)
            d.body_for = rt.cfg
        return d.body

    async def _deliver(self, rt: EndpointRuntime, generation: int, d: Delivery) -> None:
        try:
            body = self._body(rt, d)
        except RenderError as e:  # a template failing on this event: no attempt can succeed
            await self._undeliverable(rt, generation, d, f"template: {e}"[:200])
            return
        if self.hub is not None and not self.hub.holds(rt.cfg.name, d.event.device_id):
            # Our lease on this lane ran out (we were stopped, or the database is away): another process may
            # hold it now, so no attempt. The lanes are thrown away; the row stays pending for its holder.
            if not self.hub.lost_any():
                self.repartition()
            self._stale.discard(d.id)
            return
        started = self._clock()
        result = await self.sender.attempt(rt.target, d.event.id, body, d.attempts + 1, d.headers)
        d.inflight = False  # the request is over: dropping its lane from here on makes it no stale attempt
        if self.on_result is not None:
            self.on_result(rt.cfg.name, result)
        d.attempts += 1
        now = self._clock()
        ctx = {
            "endpoint": rt.cfg.name,
            "delivery_id": d.id,
            "device": d.event.device_id,
            "attempt": d.attempts,
            "status": result.status,
            "duration_ms": round(result.latency * 1000, 1),
        }
        stale = generation != rt.generation or self.endpoints.get(rt.cfg.name) is not rt
        if result.ok:
            log.info("delivery_succeeded", **ctx)
            if not stale:
                if rt.health.consecutive_failures or rt.row.last_error is not None:
                    self.shared_success(rt)
                rt.health = retry.Health()
                rt.row.consecutive_failures = 0
                rt.row.last_error = None  # the row changed: it goes with this receipt
            self._settle_receipt(rt, generation, d, result, now, stale)
            return
        if stale:
            await self._stale_failure(rt, d, result, ctx)
            return
        health = rt.health if self.hub is None else await self.shared_failure(rt, result.error)
        decision = retry.decide(
            ok=False,
            http_status=result.status,
            retry_after=result.retry_after,
            attempts=d.attempts,
            started=started,
            now=now,
            health=health,
            schedule=self.cfg.delivery.retry_schedule,
            disable_after=self.cfg.delivery.disable_after,
            jitter=self._rng(),
            forever=rt.cfg.relay,
        )
        rt.health = decision.health
        rt.row.consecutive_failures = decision.health.consecutive_failures
        rt.row.last_error = result.error
        if decision.disable is not None:
            log.warning("delivery_failed", error=result.error, detail=result.detail, next="held", **ctx)
            # On a hub exactly one process disables (compare-and-swap); the others stop sending at once.
            won = self.hub is None or await self.disable_once(rt, decision.disable)
            await self._persist(Receipt(d.id, "held", d.attempts, None, result.status, result.error), rt)
            if won:
                await self.disable(rt.cfg.name, decision.disable, won=self.hub is not None)
            else:
                self.disabled_elsewhere(rt, decision.disable)
        elif decision.status == "dead":
            log.warning("delivery_dead", error=result.error, detail=result.detail, **ctx)
            if await self._persist(Receipt(d.id, "dead", d.attempts, None, result.status, result.error), rt):
                self._advance(rt, d, now)
            else:
                self._retry_head(rt, generation, d, RESAVE_DELAY)
        else:
            if self.hub is not None:
                await self.shared_pause(rt, decision.health)
            delay = decision.retry_in or 0.0
            d.due = now + delay
            log.warning("delivery_failed", error=result.error, detail=result.detail, retry_in_s=round(delay, 3), **ctx)
            receipt = Receipt(d.id, "pending", d.attempts, self._wall() + delay, result.status, result.error)
            await self._persist(receipt, rt)
            if generation == rt.generation and self.endpoints.get(rt.cfg.name) is rt:
                heapq.heappush(rt.ready, (d.due, d.id, d.event.device_id))

    async def _undeliverable(self, rt: EndpointRuntime, generation: int, d: Delivery, error: str) -> None:
        """`d` has no body (its endpoint's template fails on its event): dead at once, nothing sent. Not the
        receiver's failure, so the endpoint's health and last_error stay as they are."""
        d.inflight = False
        log.warning("delivery_dead", endpoint=rt.cfg.name, delivery_id=d.id, device=d.event.device_id, error=error)
        if await self._persist(Receipt(d.id, "dead", d.attempts, None, None, error), rt):
            self._stale.discard(d.id)
            if generation == rt.generation and self.endpoints.get(rt.cfg.name) is rt:
                self._advance(rt, d, self._clock())
        else:
            self._retry_head(rt, generation, d, RESAVE_DELAY)

    def _settle_receipt(
        self, rt: EndpointRuntime, generation: int, d: Delivery, result: AttemptResult, now: float, stale: bool
    ) -> None:
        """The worker goes back to the pool at once; the lane moves on when the receipt is saved. Waiting here
        for the commit (an fsync) would bound throughput by concurrency / commit latency."""
        d.settling = True
        rt.unsaved += 1

        def saved(ok: bool) -> None:
            rt.unsaved -= 1
            d.settling = False
            dropped = d.id in self._stale  # its lane was thrown away while it was in flight or settling
            self._stale.discard(d.id)
            self._wake.set()
            if ok:
                self._advance(rt, d, now)
            elif not (dropped or stale):
                self._retry_head(rt, generation, d, RESAVE_DELAY)
            else:
                # Not saved, and its lane is gone: the row is still pending (or held) in the store. An enabled
                # endpoint takes it again now (its page skipped it while it settled).
                self._take_back(d)

        self._save(Receipt(d.id, "delivered", d.attempts, None, result.status, None), rt, saved)

    def _take_back(self, d: Delivery) -> None:
        current = self.endpoints.get(d.endpoint)
        if current is not None and not current.row.disabled:
            row = DeliveryRow(d.id, d.event, d.endpoint, 0, self._wall())
            current.offer([row], self._due(), (), force=True)
            self._wake.set()

    async def _stale_failure(
        self, rt: EndpointRuntime, d: Delivery, result: AttemptResult, ctx: dict[str, Any]
    ) -> None:
        self._stale.discard(d.id)
        current = self.endpoints.get(rt.cfg.name)
        if current is not None and not current.row.disabled:
            # Enabled again while this attempt was in flight: the release made the row pending with a fresh
            # budget, and the new lanes skipped it while it was in flight. Queue it now.
            log.warning("delivery_failed", error=result.error, detail=result.detail, next="retry", **ctx)
            wall = self._wall()
            await self._persist(Receipt(d.id, "pending", 0, wall, result.status, result.error), current)
            if not current.row.disabled and self.endpoints.get(rt.cfg.name) is current:
                self._take_back(d)
            return
        # Disabled or removed while this attempt was in flight: it stays held.
        log.warning("delivery_failed", error=result.error, detail=result.detail, next="held", **ctx)
        await self._persist(Receipt(d.id, "held", d.attempts, None, result.status, result.error), rt)

    def _retry_head(self, rt: EndpointRuntime, generation: int, d: Delivery, delay: float) -> None:
        """Keep `d` at its lane's head and try it again later (its receipt could not be saved): the lane must
        not move on, or a restart would deliver out of order."""
        if rt.retry_head(d, generation, self._clock() + delay):
            self._wake.set()

    async def _persist(self, receipt: Receipt, rt: EndpointRuntime) -> bool:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._save(receipt, rt, done.set_result)
        return await asyncio.shield(done)

    def _save(self, receipt: Receipt, rt: EndpointRuntime, then: Callable[[bool], None]) -> None:
        """Queue `receipt` (the store merges those of one group commit into one statement), then `then(saved)`."""
        try:
            # The endpoint row goes along only when it changed since it was last saved (rarely, on success).
            # On a hub the endpoint row is shared: it changes only by its own statements (shared.py).
            row = None if self.hub is not None or rt.row == rt.saved_row else replace(rt.row)
            fut = self.store.save_receipts([receipt], [] if row is None else [row])
            if row is not None:
                rt.saved_row = row
        except StoreError as e:  # the store is gone (its writer died): supervise() ends the daemon
            log.error("delivery_outcome_not_saved", deliveries=[receipt.delivery_id], error=str(e))
            self._guard(lambda: then(False))
            return
        self._receipts.add(fut)

        def finished(f: asyncio.Future[None]) -> None:
            self._receipts.discard(f)
            ok = not f.cancelled() and f.exception() is None
            if not ok:
                rt.saved_row = None  # the next receipt carries the row again
                # The row stays pending in the store: a restart would deliver it again (at-least-once).
                error = "cancelled" if f.cancelled() else str(f.exception())
                log.error("delivery_outcome_not_saved", deliveries=[receipt.delivery_id], error=error)
            self._guard(lambda: then(ok))

        fut.add_done_callback(finished)
        if self.on_outcome is not None:
            self.on_outcome(rt.cfg.name, receipt.status)
