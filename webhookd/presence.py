"""The presence engine: a pure state machine over devices and their silence deadlines.

No I/O and no clock reads: every call takes `now` (monotonic seconds) and `wall` (unix seconds) from the
caller. A heartbeat costs O(1): it only moves the device's `last_mono`. Deadlines live in a min-heap with one
entry per live device; an entry that turns out early when popped (the device heartbeated since) is pushed
back with the real deadline, so the heap is never rewritten on the heartbeat path.

A device whose state comes only from MQTT availability has no silence timer (`timed` False): the broker's
keep-alive and the device's will are its liveness. One heartbeat that is "I am alive" (HTTP, UDP, an MQTT
`heartbeat: true` source) gives it a timer for good. Timers of some devices can be paused (their source is
unreachable, so their silence says nothing) and resumed with a full timeout.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable

from webhookd.presence_model import Applied, Device, DeviceDefaults, Heartbeat, Transition
from webhookd.states import DEVICE_STATES as STATES
from webhookd.states import REPORTED_STATES as REPORTED_STATES
from webhookd.states import UNKNOWN

__all__ = ["REPORTED_STATES", "Applied", "Device", "DeviceDefaults", "Heartbeat", "PresenceEngine", "Transition"]


class PresenceEngine:
    def __init__(
        self,
        defaults_for: Callable[[str], DeviceDefaults],
        notify_online_after_utilizing: bool = False,
        remind_every: float = 0.0,
    ) -> None:
        self._defaults_for = defaults_for
        self._notify_online_after_utilizing = notify_online_after_utilizing
        self._remind_every = remind_every
        self.devices: dict[str, Device] = {}
        self._heap: list[tuple[float, str]] = []
        # Debounce ends and reminders: (due, device, "held" | "remind"); an entry whose due no longer equals the
        # device's held_due / remind_due is stale and dropped when popped.
        self._timers: list[tuple[float, str, str]] = []
        self._dirty: set[str] = set()

    # --- setup -------------------------------------------------------------------------------------------

    def load(self, devices: Iterable[Device], now: float, wall: float | None = None) -> None:
        """Adopt persisted devices after a (re)start: every live one gets a full timeout from `now`; a held
        offline and the next reminder keep their wall-clock times (measured from the offline)."""
        wall = now if wall is None else wall
        for dev in devices:
            dev.timeout = self._defaults_for(dev.id).silence_timeout
            dev.last_mono = now
            dev.in_heap = False
            self.devices[dev.id] = dev
            self._push(dev)
            self._schedule(dev, now, wall)

    def reconfigure(
        self,
        defaults_for: Callable[[str], DeviceDefaults],
        notify_online_after_utilizing: bool,
        remind_every: float | None = None,
        now: float = 0.0,
        wall: float = 0.0,
    ) -> None:
        """New timeouts take effect on the running timers (measured from each device's last heartbeat); a new
        debounce or reminder interval on the held offlines and reminders (measured from each offline)."""
        self._defaults_for = defaults_for
        self._notify_online_after_utilizing = notify_online_after_utilizing
        self._heap = []
        retime = remind_every is not None
        if remind_every is not None:
            self._remind_every = remind_every
            self._timers = []
        for dev in self.devices.values():
            dev.timeout = defaults_for(dev.id).silence_timeout
            dev.in_heap = False
            self._push(dev)
            if retime:
                self._schedule(dev, now, wall)

    def _schedule(self, dev: Device, now: float, wall: float) -> None:
        """Push the debounce end or the next reminder of an offline device, from its wall-clock offline time."""
        if dev.state != "offline":
            return
        since = dev.changed_at if dev.changed_at is not None else wall
        if dev.held_reason is not None:
            dev.held_due = now + max(0.0, since + self._defaults_for(dev.id).debounce - wall)
            heapq.heappush(self._timers, (dev.held_due, dev.id, "held"))
        elif self._remind_every > 0 and dev.offline_reason is not None:  # an offline event was made
            due = since + (dev.reminders + 1) * self._remind_every
            dev.remind_due = now + max(0.0, due - wall)
            heapq.heappush(self._timers, (dev.remind_due, dev.id, "remind"))

    def _offline_made(self, dev: Device, now: float, wall: float, reason: str) -> None:
        """An offline event was made: reminders count from it."""
        dev.offline_reason = reason
        dev.reminders = 0
        dev.remind_due = 0.0
        self._schedule(dev, now, wall)

    # --- the state machine -------------------------------------------------------------------------------

    def heartbeat(self, hb: Heartbeat, now: float, wall: float) -> Applied:
        dev = self.devices.get(hb.device)
        if dev is None:
            return self._first_heartbeat(hb, now, wall)

        previous = dev.state
        target, reason = self._target(previous, hb.state, hb.reason)
        address_moved = hb.address is not None and dev.address is not None and hb.address != dev.address
        if target == previous and not address_moved:
            # The common case, routine liveness: no snapshot, no event, persisted lazily.
            self._refresh(dev, hb, now, wall)
            if not dev.in_heap:  # the first timed heartbeat of a device known from availability only
                self._push(dev)
            self._dirty.add(dev.id)
            return Applied(previous, None, None)
        undo = dev.snapshot()
        self._refresh(dev, hb, now, wall)

        kind: str | None = None
        offline_for: float | None = None
        shown = previous  # the state the event says it left (a held offline was never shown)
        if target != previous:
            held = dev.held_reason is not None
            if held:  # back within the debounce: as far as anyone was told, it never went offline
                shown = dev.held_previous or UNKNOWN
                dev.held_reason = dev.held_previous = None
            dev.state = target
            dev.changed_at = wall
            kind = target
            if target == "offline":
                debounce = self._defaults_for(dev.id).debounce if reason != "timeout" else 0.0
                if debounce > 0:
                    dev.held_reason, dev.held_previous = reason, previous
                    dev.held_due = now + debounce
                    heapq.heappush(self._timers, (dev.held_due, dev.id, "held"))
                    kind = None
                else:
                    self._offline_made(dev, now, wall, reason)
            else:
                dev.reminders, dev.remind_due = 0, 0.0
                if held and target == shown:
                    kind = None
            if target == "online" and shown == "utilizing" and not self._notify_online_after_utilizing:
                kind = None
            if target == "online" and shown == "offline" and undo.changed_at is not None:
                offline_for = max(0.0, wall - undo.changed_at)
        # Going offline leaves the heap entry to be discarded lazily when it is popped.
        if not dev.in_heap:
            self._push(dev)
        # Back within the debounce is, to receivers, no change of state: a new address is still news.
        unseen_offline = target != previous and kind is None and target == shown
        if address_moved and (unseen_offline or (target == previous and previous != "offline")):
            kind, reason = "address_changed", "heartbeat"

        if dev.state == previous and kind is None:
            self._dirty.add(dev.id)
            return Applied(dev.state, None, None)
        dev.version += 1
        self._dirty.discard(dev.id)
        return Applied(dev.state, Transition(dev.snapshot(), shown, kind, reason, offline_for), undo)

    def _first_heartbeat(self, hb: Heartbeat, now: float, wall: float) -> Applied:
        defaults = self._defaults_for(hb.device)
        target, reason = self._target(UNKNOWN, hb.state, hb.reason)
        dev = Device(id=hb.device, state=target, timeout=defaults.silence_timeout, changed_at=wall, timed=hb.timed)
        dev.name, dev.owner = defaults.name, defaults.owner
        self._refresh(dev, hb, now, wall)
        self.devices[dev.id] = dev
        self._push(dev)
        kind = None if target == "offline" else target
        return Applied(target, Transition(dev.snapshot(), UNKNOWN, kind, reason, None), None)

    @staticmethod
    def _target(previous: str, reported: str | None, reason: str | None) -> tuple[str, str]:
        if reported is None:
            if previous in (UNKNOWN, "offline"):
                return "online", reason or "heartbeat"
            return previous, "heartbeat"
        if reported in ("shutdown", "reboot"):
            return "offline", reported
        return reported, reason or "reported"

    @staticmethod
    def _refresh(dev: Device, hb: Heartbeat, now: float, wall: float) -> None:
        dev.last_mono = now
        dev.last_seen = wall
        dev.source = hb.source
        dev.timed = dev.timed or hb.timed
        if hb.name is not None:
            dev.name = hb.name
        if hb.owner is not None:
            dev.owner = hb.owner
        if hb.address is not None:
            dev.address = hb.address

    def undo(self, applied: Applied) -> None:
        """Restore the device as it was before `applied`, when its transition could not be made durable."""
        if applied.transition is None:
            return
        dev_id = applied.transition.device.id
        current = self.devices.get(dev_id)
        if current is None or current.version != applied.transition.device.version:
            return
        if applied.undo is None:
            del self.devices[dev_id]  # its heap entry is dropped lazily
            return
        restored = applied.undo.snapshot()
        restored.in_heap = current.in_heap
        self.devices[dev_id] = restored
        if restored.state != "offline" and not restored.in_heap:
            self._push(restored)
        # Its timer entries may have been popped (a reminder, a debounce end): push them again; a duplicate is
        # harmless, the first to fire moves the due time and the other turns stale.
        if restored.held_reason is not None:
            heapq.heappush(self._timers, (restored.held_due, dev_id, "held"))
        elif restored.state == "offline" and restored.remind_due:
            heapq.heappush(self._timers, (restored.remind_due, dev_id, "remind"))

    # --- deadlines ---------------------------------------------------------------------------------------

    def _push(self, dev: Device) -> None:
        """Put a live device's deadline on the heap, if its timer runs at all."""
        if dev.state == "offline" or not dev.timed or dev.paused or math.isinf(dev.timeout):
            return
        heapq.heappush(self._heap, (dev.last_mono + dev.timeout, dev.id))
        dev.in_heap = True

    def pause(self, ids: Iterable[str]) -> None:
        """Stop the silence timers of `ids` (their heap entries are dropped when popped)."""
        for dev_id in ids:
            if (dev := self.devices.get(dev_id)) is not None:
                dev.paused = True

    def resume(self, ids: Iterable[str], now: float) -> None:
        """Restart the timers of paused `ids` with a full timeout from `now` (as after our own restart)."""
        for dev_id in ids:
            dev = self.devices.get(dev_id)
            if dev is None or not dev.paused:
                continue
            dev.paused = False
            dev.last_mono = now
            if not dev.in_heap:
                self._push(dev)

    def next_deadline(self) -> float | None:
        times = [h[0][0] for h in (self._heap, self._timers) if h]
        return min(times, default=None)

    def expire(self, now: float, wall: float, limit: int | None = None) -> list[Applied]:
        """Devices whose silence deadline is at or before `now` go offline (reason timeout); at most `limit`."""
        out: list[Applied] = []
        heap = self._heap
        while heap and heap[0][0] <= now and (limit is None or len(out) < limit):
            _, dev_id = heapq.heappop(heap)
            dev = self.devices.get(dev_id)
            if dev is None:
                continue
            dev.in_heap = False
            if dev.state == "offline" or not dev.timed or dev.paused:
                continue
            deadline = dev.last_mono + dev.timeout
            if deadline > now:
                self._push(dev)
                continue
            undo = dev.snapshot()
            previous = dev.state
            dev.state = "offline"
            dev.changed_at = wall
            self._offline_made(dev, now, wall, "timeout")
            dev.version += 1
            self._dirty.discard(dev.id)
            out.append(Applied("offline", Transition(dev.snapshot(), previous, "offline", "timeout", None), undo))
        timers = self._timers
        while timers and timers[0][0] <= now and (limit is None or len(out) < limit):
            due, dev_id, what = heapq.heappop(timers)
            dev = self.devices.get(dev_id)
            if dev is None or dev.state != "offline":
                continue
            if what == "held" and dev.held_reason is not None and dev.held_due == due:
                out.append(self._release_held(dev, now, wall))
            elif what == "remind" and dev.held_reason is None and dev.remind_due == due:
                out.append(self._remind(dev, now, wall))
        return out

    def _release_held(self, dev: Device, now: float, wall: float) -> Applied:
        """The debounce ended with the device still offline: its offline event, at the time it went offline."""
        undo = dev.snapshot()
        reason, shown = dev.held_reason or "reported", dev.held_previous or UNKNOWN
        dev.held_reason = dev.held_previous = None
        self._offline_made(dev, now, wall, reason)
        dev.version += 1
        return Applied("offline", Transition(dev.snapshot(), shown, "offline", reason, None), undo)

    def _remind(self, dev: Device, now: float, wall: float) -> Applied:
        """A still_offline reminder; after downtime spanning several intervals, one, numbered for the time."""
        undo = dev.snapshot()
        since = dev.changed_at if dev.changed_at is not None else wall
        offline_for = max(0.0, wall - since)
        dev.reminders = max(dev.reminders + 1, int(offline_for // self._remind_every))
        self._schedule(dev, now, wall)
        dev.version += 1
        reason = dev.offline_reason or "timeout"
        t = Transition(dev.snapshot(), "offline", "still_offline", reason, offline_for, dev.reminders)
        return Applied("offline", t, undo)

    def adopt(self, dev: Device) -> None:
        """A device whose state another webhookd decides (a gateway's, relayed to a hub): kept as given, with no
        silence timer, debounce or reminder here."""
        dev.timed, dev.in_heap = False, False
        self._dirty.discard(dev.id)
        self.devices[dev.id] = dev

    def forget(self, device_id: str) -> Device | None:
        """Drop a device: its state, silence timer, held offline and reminders (their heap entries are dropped
        lazily when popped). A later heartbeat makes it a new device. Returns the device (None: unknown)."""
        self._dirty.discard(device_id)
        return self.devices.pop(device_id, None)

    # --- liveness that is persisted lazily ---------------------------------------------------------------

    def take_dirty(self, limit: int | None = None) -> list[Device]:
        """Devices whose last_seen/name/address moved without a transition since the last call (at most
        `limit` of them; the rest stay dirty)."""
        if limit is None or len(self._dirty) <= limit:
            ids, self._dirty = self._dirty, set()
        else:
            ids = {self._dirty.pop() for _ in range(limit)}
        return [self.devices[d].snapshot() for d in ids if d in self.devices]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(STATES, 0)
        for dev in self.devices.values():
            counts[dev.state] = counts.get(dev.state, 0) + 1
        return counts
