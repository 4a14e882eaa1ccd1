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
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from webhookd.dispatch import Dispatcher
from webhookd.logs import get_logger
from webhookd.mutes import Mutes
from webhookd.payloads import EventData, event_type_for, new_event_id
from webhookd.presence import Applied, Heartbeat, PresenceEngine
from webhookd.states import DeliveryStatus
from webhookd.store import Change, DeliveryStore, StoreError

log = get_logger("webhookd.tracker")

SWEEP_MAX_SLEEP = 0.25  # offline is detected at most this long after its deadline
SWEEP_RETRY = 1.0  # after a failed offline commit, expire again this much later (the store is failing)
EXPIRE_CHUNK = 250  # devices taken offline per slice of the event loop (a few ms)
# Chunks whose commit may be in flight at once: two of the writer's group commits (~2,000 events each). A power
# cut of 100,000 devices then holds ~4,000 offline events in memory at a time, not all of them (bench row 8);
# it is recorded no later, the writer being the bound either way.
COMMITS_IN_FLIGHT = 16
FLUSH_CHUNK = 5000
LOG_EACH_MAX = 100  # a commit with more events than this logs one summary line
LOG_SAMPLE = 10  # device ids named in that line


class HeartbeatAnswer(NamedTuple):
    device: str
    state: str
    changed: bool  # an event was recorded


@dataclass(slots=True)
class _Commit:
    applied: list[Applied]
    gate: asyncio.Future[None]
    changes: list[Change]
    muted: dict[int, str] | None = None  # index in changes -> the match of the mute that took its deliveries


class Tracker:
    def __init__(
        self,
        engine: PresenceEngine,
        store: DeliveryStore,
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
        self._sweep_backoff_until = 0.0
        self._commits: set[asyncio.Task[HeartbeatAnswer]] = set()  # heartbeat_nowait's, referenced until done
        self.on_event: Callable[[str], None] | None = None  # metrics hook: one call per recorded event
        # Metrics hook: one call per recorded event that got no deliveries, with why ("muted").
        self.on_suppressed: Callable[[str], None] | None = None
        self.mutes = Mutes()  # maintenance: events of covered devices are recorded without deliveries

    async def heartbeats(self, hbs: Sequence[Heartbeat], *, summarize: bool = False) -> list[HeartbeatAnswer]:
        """Apply heartbeats in order; returns (device, state, changed) each once every event is durable. With
        `summarize`, a batch that makes more than LOG_EACH_MAX events logs one line (an MQTT burst).

        Raises StoreError when the events could not be recorded (nothing of this call is then applied)."""
        # Wait until none of these devices has a commit in flight, then apply them all and register our own
        # commit without yielding in between: a heartbeat arriving meanwhile for one of them then queues
        # behind this commit, so events and persisted states keep the order the engine saw.
        while True:
            pending = {p for hb in hbs if (p := self._pending.get(hb.device)) is not None}
            if not pending:
                break
            await asyncio.wait(pending)
        results: list[HeartbeatAnswer] = []
        applied: list[Applied] = []
        now, wall = self._clock(), self._wall()  # one moment: nothing yields in between
        for hb in hbs:
            a = self.engine.heartbeat(hb, now, wall)
            changed = a.transition is not None and a.transition.kind is not None
            results.append(HeartbeatAnswer(hb.device, a.state, changed))
            if a.transition is not None:
                applied.append(a)
        if applied:
            await self._record(self._prepare(applied), summarize)
        return results

    def heartbeat_nowait(self, hb: Heartbeat) -> HeartbeatAnswer | asyncio.Task[HeartbeatAnswer]:
        """`heartbeats([hb])` for one heartbeat, applied at once when that needs no commit (the usual "still
        alive"): its answer. Otherwise a task, already running, that waits for the device's commit in flight
        and then applies `hb`, or records the event `hb` made (its commit gate already taken, so order holds);
        awaiting it gives the answer once the event is durable, and a caller that never awaits it loses nothing."""
        if hb.device in self._pending:
            return self._track(self._one(hb))
        a = self.engine.heartbeat(hb, self._clock(), self._wall())
        t = a.transition
        answer = HeartbeatAnswer(hb.device, a.state, t is not None and t.kind is not None)
        if t is None:
            return answer
        return self._track(self._answer(self._prepare([a]), answer))

    def _track(self, coro: Coroutine[Any, Any, HeartbeatAnswer]) -> asyncio.Task[HeartbeatAnswer]:
        task = asyncio.get_running_loop().create_task(coro)
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)
        return task

    async def _one(self, hb: Heartbeat) -> HeartbeatAnswer:
        return (await self.heartbeats([hb]))[0]

    async def _answer(self, c: _Commit, answer: HeartbeatAnswer) -> HeartbeatAnswer:
        await self._record(c)
        return answer

    async def _record(self, c: _Commit, summarize: bool = False) -> None:
        await self._finish(c, summarize=summarize)
        self._wake.set()  # a new live device may now hold the earliest deadline

    def _prepare(self, applied: list[Applied]) -> _Commit:
        """Build the events of `applied` and register their devices' commit gate, without yielding: from here
        on a heartbeat for one of these devices waits for this commit."""
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        changes = []
        muted: dict[int, str] | None = None
        wall = self._wall()  # one moment for the whole batch (nothing yields in here)
        for a in applied:
            t = a.transition
            assert t is not None
            self._pending[t.device.id] = gate
            event = None
            targets: list[tuple[str, DeliveryStatus]] = []
            rule = self.mutes.covering(t.device.id, wall) if t.kind is not None and self.mutes else None
            if rule is not None and t.kind == "still_offline":
                changes.append(Change(t.device, None, targets))  # no reminder at all: its count is saved
                continue
            if t.kind is not None:
                d = t.device
                # A reminder happens now; every other event when the state changed (a debounced offline: then).
                when = wall if t.reminder is not None else d.changed_at or wall
                event = EventData(
                    id=new_event_id(),
                    type=event_type_for(t.kind),
                    time=when,
                    reason=t.reason,
                    device_id=d.id,
                    name=d.name,
                    state=d.state,
                    previous_state=t.previous_state,
                    address=d.address,
                    owner=d.owner,
                    last_seen=d.last_seen,
                    offline_for=t.offline_for,
                    reminder=t.reminder,
                )
                if rule is None:
                    targets = self.dispatcher.targets(event)
                else:  # recorded, not delivered
                    muted = muted or {}
                    muted[len(changes)] = rule.match
            changes.append(Change(t.device, event, targets))
        return _Commit(applied, gate, changes, muted)

    async def _finish(self, c: _Commit, *, summarize: bool = False) -> None:
        """Record a prepared commit (one transaction), then hand its deliveries to the dispatcher. With
        `summarize`, more than LOG_EACH_MAX events are logged as one line."""
        try:
            rows = await self.store.record(c.changes)
        except StoreError:
            self._undo(c)
            raise
        finally:
            self._open_gate(c)
        self.dispatcher.enqueue(rows)
        events = [(a, ch.event, ch.targets) for a, ch in zip(c.applied, c.changes, strict=True) if ch.event]
        if self.on_event is not None:
            for _, event, _ in events:
                self.on_event(event.type)
        muted = c.muted or {}
        if muted and self.on_suppressed is not None:
            for _ in muted:
                self.on_suppressed("muted")
        if summarize and len(events) > LOG_EACH_MAX:
            # A power cut or an MQTT burst: one line per chunk, not 100,000 (journald would drop most of them
            # anyway; every event is in the store and its webhooks).
            by_type: dict[str, int] = {}
            for _, e, _ in events:
                by_type[e.type] = by_type.get(e.type, 0) + 1
            common = {
                "count": len(events),
                "devices": [e.device_id for _, e, _ in events[:LOG_SAMPLE]],
                "deliveries": sum(len(targets) for _, _, targets in events),
            }
            if list(by_type) == ["device.offline"]:
                log.info("devices_offline", reason=events[0][1].reason, **common)
            else:
                log.info("devices_changed", types=by_type, **common)
            return
        for i, (a, ch) in enumerate(zip(c.applied, c.changes, strict=True)):
            t, made = a.transition, ch.event
            if made is None:
                continue
            assert t is not None
            log.info(
                f"device_{t.kind}",
                device=t.device.id,
                state=t.device.state,
                previous_state=t.previous_state,
                reason=t.reason,
                address=t.device.address,
                event_id=made.id,
                deliveries=len(ch.targets),
                **({"muted_by": muted[i]} if i in muted else {}),
            )

    async def _commit_expired(self, c: _Commit) -> None:
        try:
            await self._finish(c, summarize=True)
        except StoreError as e:
            # Undone: they expire again once the store can write.
            log.error("offline_not_recorded", devices=len(c.applied), error=str(e))
            self._sweep_backoff_until = self._clock() + SWEEP_RETRY

    async def sweep_loop(self) -> None:
        """Send silent devices offline, within SWEEP_MAX_SLEEP of their deadline.

        Due devices are expired a chunk at a time, each chunk's commit gate registered as it is taken, and the
        chunks' commits run behind the sweep (the store merges them into few transactions): a power cut is
        detected on time, heartbeats are served between chunks, and no heartbeat overtakes an offline event.
        From the first full chunk until the commits of that sweep are done, the dispatcher starts no new
        attempts, so that the CPU goes to recording first (it stays in flow for the usual few devices a pass)."""
        commits: dict[asyncio.Task[None], _Commit] = {}
        storm: set[asyncio.Task[None]] = set()  # commits of the big sweep the dispatcher is yielding to
        loop = asyncio.get_running_loop()

        def reap() -> None:
            for task in [t for t in commits if t.done()]:
                del commits[task]
                storm.discard(task)
                task.result()  # anything but a StoreError is a bug: let it take the daemon down

        try:
            while True:
                self._wake.clear()
                while self._clock() >= self._sweep_backoff_until:
                    reap()
                    if len(commits) >= COMMITS_IN_FLIGHT:
                        break  # memory holds this many chunks' events at most; a commit's end wakes us
                    expired = self.engine.expire(self._clock(), self._wall(), limit=EXPIRE_CHUNK)
                    if not expired:
                        break
                    c = self._prepare(expired)
                    task = loop.create_task(self._commit_expired(c))
                    task.add_done_callback(lambda _: self._wake.set())  # reap it, maybe release the dispatcher
                    commits[task] = c
                    if len(expired) < EXPIRE_CHUNK and not storm:
                        break
                    storm.add(task)  # a big sweep (or the tail of one)
                    self.dispatcher.yield_to_sweep(True)
                    if len(expired) < EXPIRE_CHUNK:
                        break
                    await asyncio.sleep(0)  # heartbeats get in between chunks
                reap()
                if not storm:
                    self.dispatcher.yield_to_sweep(False)
                now = self._clock()
                deadline = self.engine.next_deadline()
                delay = SWEEP_MAX_SLEEP if deadline is None else deadline - now
                delay = min(max(delay, 0.005, self._sweep_backoff_until - now), SWEEP_MAX_SLEEP)
                if len(commits) >= COMMITS_IN_FLIGHT:
                    delay = SWEEP_MAX_SLEEP
                try:
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            self.dispatcher.yield_to_sweep(False)
            for task in commits:
                task.cancel()
            await asyncio.gather(*commits, return_exceptions=True)
            for task, c in commits.items():
                if task.cancelled() and not c.gate.done():
                    # Cancelled before it ran: its devices must not stay gated, nor offline unrecorded.
                    self._undo(c)
                    self._open_gate(c)

    async def forget(self, device_id: str) -> bool:
        """Drop a device (`devices forget`): from the engine (state, timer, held offline, reminders), its row
        from the store, and the mute whose match is its id. Waits for its commit in flight first; heartbeats of
        it meanwhile wait, and then make it a new device. Its pending deliveries continue. False: unknown.

        Raises StoreError when the row could not be deleted (the device is then kept as it was)."""
        while (p := self._pending.get(device_id)) is not None:
            await asyncio.wait({p})
        dev = self.engine.forget(device_id)
        if dev is None:
            return False
        gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[device_id] = gate
        try:
            await self.store.forget_device(device_id)
        except StoreError:
            self.engine.load([dev], self._clock(), self._wall())  # back, with a full timeout
            raise
        finally:
            if self._pending.get(device_id) is gate:
                del self._pending[device_id]
            gate.set_result(None)
        self.mutes.remove(device_id)
        return True

    def _undo(self, c: _Commit) -> None:
        for a in reversed(c.applied):
            self.engine.undo(a)

    def _open_gate(self, c: _Commit) -> None:
        for ch in c.changes:
            if self._pending.get(ch.device.id) is c.gate:
                del self._pending[ch.device.id]
        c.gate.set_result(None)

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
            await self.flush()  # the store probes by itself while it is unavailable
