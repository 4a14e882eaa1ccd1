"""The presence side of the pipeline: heartbeats through the engine into the outbox, and the silence timer.

listener -> Tracker.heartbeats -> PresenceEngine (pure) -> Store.record (one transaction) -> Dispatcher.enqueue

A transition is applied to the engine first and undone if its commit fails, so concurrent heartbeats see one
consistent state. A device with a commit in flight makes later heartbeats of that device wait for it, which
keeps its events in order and makes an undo exact. Heartbeats that change nothing only mark the device dirty;
`flush_loop` persists last_seen for all of them in one write every few seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from webhookd.dispatch import Dispatcher
from webhookd.logs import get_logger
from webhookd.payloads import EventData, event_type_for, new_event_id
from webhookd.presence import Heartbeat, Outcome, PresenceEngine
from webhookd.store import Store, StoreError

log = get_logger("webhookd.presence")

SWEEP_MAX_SLEEP = 0.25  # offline is detected at most this long after its deadline
EXPIRE_CHUNK = 2000
FLUSH_CHUNK = 5000


class Tracker:
    def __init__(
        self,
        engine: PresenceEngine,
        store: Store,
        dispatcher: Dispatcher,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.store = store
        self.dispatcher = dispatcher
        self._clock = clock
        self._wall = wall
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._wake = asyncio.Event()
        self.on_event: Callable[[str], None] | None = None  # metrics hook: one call per recorded event

    async def heartbeats(self, hbs: Sequence[Heartbeat]) -> list[tuple[str, str, bool]]:
        """Apply heartbeats in order; returns (device, state, changed) each once every event is durable.

        Raises StoreError when the events could not be recorded (nothing of this call is then applied)."""
        # Wait until none of these devices has a commit in flight, then apply them all and register our own
        # commit without yielding in between: a heartbeat arriving meanwhile for one of them then queues
        # behind this commit, so events and persisted states keep the order the engine saw.
        while True:
            pending = {p for hb in hbs if (p := self._pending.get(hb.device)) is not None}
            if not pending:
                break
            await asyncio.wait(pending)
        results: list[tuple[str, str, bool]] = []
        outcomes: list[Outcome] = []
        for hb in hbs:
            outcome = self.engine.heartbeat(hb, self._clock(), self._wall())
            changed = outcome.transition is not None and outcome.transition.kind is not None
            results.append((hb.device, outcome.state, changed))
            if outcome.transition is not None:
                outcomes.append(outcome)
        if outcomes:
            await self._commit(outcomes)
            self._wake.set()  # a new live device may now hold the earliest deadline
        return results

    async def _commit(self, outcomes: list[Outcome]) -> None:
        loop = asyncio.get_running_loop()
        gate: asyncio.Future[None] = loop.create_future()
        devices = []
        items = []
        for o in outcomes:
            t = o.transition
            assert t is not None
            devices.append(t.device.id)
            self._pending[t.device.id] = gate
            event = None
            targets: list[tuple[str, str]] = []
            if t.kind is not None:
                d = t.device
                event = EventData(
                    id=new_event_id(),
                    type=event_type_for(t.kind),
                    time=d.changed_at or self._wall(),
                    reason=t.reason,
                    device_id=d.id,
                    name=d.name,
                    state=d.state,
                    previous_state=t.previous_state,
                    address=d.address,
                    owner=d.owner,
                    last_seen=d.last_seen,
                    offline_for=t.offline_for,
                )
                targets = self.dispatcher.targets(event)
            items.append((t.device, event, targets))
        try:
            rows = await self.store.record(items)
        except StoreError:
            for o in reversed(outcomes):
                self.engine.undo(o)
            raise
        finally:
            for dev in devices:
                if self._pending.get(dev) is gate:
                    del self._pending[dev]
            gate.set_result(None)
        self.dispatcher.enqueue(rows)
        for o, (_, event, targets) in zip(outcomes, items, strict=True):
            t = o.transition
            assert t is not None
            if event is None:
                continue
            if self.on_event is not None:
                self.on_event(event.type)
            log.info(
                f"device_{t.kind}",
                device=t.device.id,
                state=t.device.state,
                previous_state=t.previous_state,
                reason=t.reason,
                address=t.device.address,
                event_id=event.id,
                deliveries=len(targets),
            )

    async def sweep_loop(self) -> None:
        """Send silent devices offline, within SWEEP_MAX_SLEEP of their deadline."""
        while True:
            failed = False
            while True:
                # A chunk at a time, each committed before the next is taken: heartbeats interleave, and no
                # device sits offline in memory without its commit gate (a heartbeat would overtake it).
                outcomes = self.engine.expire(self._clock(), self._wall(), limit=EXPIRE_CHUNK)
                if not outcomes:
                    break
                try:
                    await self._commit(outcomes)
                except StoreError as e:
                    # Undone: they expire again on a later sweep, once the store can write.
                    log.error("offline_not_recorded", devices=len(outcomes), error=str(e))
                    failed = True
                    break
                if len(outcomes) < EXPIRE_CHUNK:
                    break
            deadline = self.engine.next_deadline()
            delay = SWEEP_MAX_SLEEP if deadline is None else deadline - self._clock()
            delay = 1.0 if failed else min(max(delay, 0.005), SWEEP_MAX_SLEEP)
            self._wake.clear()
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def flush(self) -> None:
        while dirty := self.engine.take_dirty(limit=FLUSH_CHUNK):
            try:
                await self.store.save_devices(dirty)
            except StoreError as e:
                log.warning("liveness_not_saved", devices=len(dirty), error=str(e))
                return
            if len(dirty) < FLUSH_CHUNK:
                return

    async def flush_loop(self, interval: float = 5.0) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.flush()
            if not self.store.healthy:
                # Nothing else may write for a while: find out by ourselves when the store recovers.
                await self.store.probe()
