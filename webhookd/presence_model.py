"""What the presence engine works on: devices, heartbeats, and what a heartbeat or an expiry did (pure data)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DeviceDefaults:
    """What the config says about a device id (first matching `devices:` rule, else the global values)."""

    silence_timeout: float
    name: str | None = None
    owner: str | None = None
    debounce: float = 0.0  # seconds an offline that is not a timeout is held (0: not held)


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
    reminders: int = 0  # still_offline reminders made for the current offline
    offline_reason: str | None = None  # the reason of the current offline's event (reminders repeat it)
    held_reason: str | None = None  # an offline held by the debounce: its reason (None: nothing held) ...
    held_previous: str | None = None  # ... and the state before it; it went offline at changed_at
    held_due: float = 0.0  # monotonic end of the debounce (not persisted: from changed_at at load)
    remind_due: float = 0.0  # monotonic time of the next reminder (0: none; not persisted)

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
            self.reminders,
            self.offline_reason,
            self.held_reason,
            self.held_previous,
            self.held_due,
            self.remind_due,
        )


@dataclass(frozen=True, slots=True)
class Transition:
    """A change of persistent device state. `kind` names the event to emit, or None for a silent change."""

    device: Device  # snapshot after the change
    previous_state: str
    kind: str | None  # online|offline|utilizing|unplugged|address_changed, or None
    reason: str
    offline_for: float | None
    reminder: int | None = None  # still_offline: 1, 2, ...


@dataclass(frozen=True, slots=True)
class Applied:
    """What one heartbeat (or one expiry) did to a device."""

    state: str
    transition: Transition | None  # must be made durable before the heartbeat is acknowledged
    undo: Device | None  # snapshot to restore if making it durable fails
