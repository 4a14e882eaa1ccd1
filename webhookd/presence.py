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
from dataclasses import dataclass

from webhookd.states import DEVICE_STATES as STATES
from webhookd.states import REPORTED_STATES as REPORTED_STATES
from webhookd.states import UNKNOWN


@dataclass(frozen=True, slots=True)
class DeviceDefaults:
    """What the config says about a device id (first matching `devices:` rule, else the global values)."""

    silence_timeout: float
    name: str | None = None
    owner: str | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    device: str
    state: str | None = None  # one of REPORTED_STATES, or None: "I am alive"
    name: str | None = None
    address: str | None = None
    owner: str | None = None
    source: str = "http"  # http | udp | mqtt | relay: shown with the device
    reason: str | None = None  # the reason of a transition it makes, when not the default (MQTT: connected, ...)
    timed: bool = True  # False: an availability message, which starts no silence timer


@dataclass(slots=True)
class Device:
    id: str
    state: str
    name: str | None = None
    owner: str | None = None
    address: str | None = None
    last_seen: float | None = None  # wall clock of the last heartbeat
    changed_at: float | None = None  # wall clock of the last state change
    last_mono: float = 0.0  # monotonic time the silence timer counts from
    timeout: float = 900.0
    in_heap: bool = False
    version: int = 0  # bumped on every mutation; lets a failed commit undo exactly its own change
    source: str = "http"
    timed: bool = True  # has a silence timer (a device known only from MQTT availability has none)
    paused: bool = False  # timer paused: its source is unreachable (not persisted)

    def snapshot(self) -> Device:
        """A copy (dataclasses.replace costs 3x as much, and a power cut takes 200,000 of these)."""
        return Device(
            self.id,
            self.state,
            self.name,
            self.owner,
            self.address,
            self.last_seen,
            self.changed_at,
            self.last_mono,
            self.timeout,
            self.in_heap,
            self.version,
            self.source,
            self.timed,
            self.paused,
        )


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of persistent device state. `kind` names the event to emit, or None for a silent change."""

    device: Device  # snapshot after the change
    previous_state: str
    kind: str | None  # online|offline|utilizing|unplugged|address_changed, or None
    reason: str
    offline_for: float | None


@dataclass(frozen=True, slots=True)
class Applied:
    """What one heartbeat (or one expiry) did to a device."""

    state: str
    transition: Transition | None  # must be made durable before the heartbeat is acknowledged
    undo: Device | None  # snapshot to restore if making it durable fails


class PresenceEngine:
    def __init__(
        self,
        defaults_for: Callable[[str], DeviceDefaults],
        notify_online_after_utilizing: bool = False,
    ) -> None:
        self._defaults_for = defaults_for
        self._notify_online_after_utilizing = notify_online_after_utilizing
        self.devices: dict[str, Device] = {}
        self._heap: list[tuple[float, str]] = []
        self._dirty: set[str] = set()

    # --- setup -------------------------------------------------------------------------------------------

    def load(self, devices: Iterable[Device], now: float) -> None:
        """Adopt persisted devices after a (re)start: every live one gets a full timeout from `now`."""
        for dev in devices:
            dev.timeout = self._defaults_for(dev.id).silence_timeout
            dev.last_mono = now
            dev.in_heap = False
            self.devices[dev.id] = dev
            self._push(dev)

    def reconfigure(self, defaults_for: Callable[[str], DeviceDefaults], notify_online_after_utilizing: bool) -> None:
        """New timeouts take effect on the running timers (measured from each device's last heartbeat)."""
        self._defaults_for = defaults_for
        self._notify_online_after_utilizing = notify_online_after_utilizing
        self._heap = []
        for dev in self.devices.values():
            dev.timeout = defaults_for(dev.id).silence_timeout
            dev.in_heap = False
            self._push(dev)

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
        if target != previous:
            dev.state = target
            dev.changed_at = wall
            kind = target
            if target == "online" and previous == "utilizing" and not self._notify_online_after_utilizing:
                kind = None
            if target == "online" and previous == "offline" and undo.changed_at is not None:
                offline_for = max(0.0, wall - undo.changed_at)
        # Going offline leaves the heap entry to be discarded lazily when it is popped.
        if not dev.in_heap:
            self._push(dev)
        if target == previous and previous != "offline" and address_moved:
            kind, reason = "address_changed", "heartbeat"

        if dev.state == previous and kind is None:
            self._dirty.add(dev.id)
            return Applied(dev.state, None, None)
        dev.version += 1
        self._dirty.discard(dev.id)
        return Applied(dev.state, Transition(dev.snapshot(), previous, kind, reason, offline_for), undo)

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
        return self._heap[0][0] if self._heap else None

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
            dev.version += 1
            self._dirty.discard(dev.id)
            out.append(Applied("offline", Transition(dev.snapshot(), previous, "offline", "timeout", None), undo))
        return out

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
