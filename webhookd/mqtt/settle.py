"""The storm guard after a (re)connection to the broker: which availability messages apply now, which wait.

Pure: no I/O, no clock; every call takes `now` (monotonic seconds). The client feeds it every reading in the
order received and applies what it hands back, in that order.

- Connected and settled: a reading applies at once, except an offline one, which waits `grace` first. A broker
  that stops publishes its clients' wills just before our connection drops; held for a moment, those wills
  turn out to be part of the restart (the connection drops within `grace`) and go to the next settle instead
  of making an offline event each.
- Disconnected: nothing arrives, nothing applies; wills still held when the connection dropped are kept.
- Within `settle` of a connection (our start, our reconnect, the broker's restart): readings are collected, the
  last one per device wins, and at the end of the window each device's last reading applies once. The
  presence engine makes no event for a reading that matches the stored state, so a device that is back
  online by then, and every retained message replayed to us, make none; a device that really went offline
  makes exactly one offline event, at the end of the window.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

# Wills published by a stopping broker arrive within milliseconds of the connection's end; a second of margin
# would eat the budget of "webhook within 1 s of the will".
WILL_GRACE = 0.25


class _Reading(Protocol):
    @property
    def device(self) -> str: ...

    @property
    def state(self) -> str | None: ...


R = TypeVar("R", bound=_Reading)


@dataclass(slots=True)
class Settle(Generic[R]):
    settle: float
    grace: float = WILL_GRACE
    connected: bool = False
    until: float | None = None  # end of the settle window in progress
    _window: dict[str, R] = field(default_factory=dict)  # device -> last reading within the window
    _held: dict[str, tuple[float, R]] = field(default_factory=dict)  # device -> (due, offline reading)
    # (due, device) of the held readings, so that a batch costs O(log n), not a scan of every held will; an
    # entry whose device is no longer held with that due is stale and dropped when it reaches the top.
    _dues: list[tuple[float, str]] = field(default_factory=list)

    @property
    def settling(self) -> bool:
        return self.until is not None

    def connect(self, now: float) -> None:
        """The connection is up and subscribed: a settle window starts, taking the wills held at the drop."""
        self.connected = True
        self.until = now + self.settle
        for device, (_, reading) in self._held.items():
            self._window[device] = reading
        self._held.clear()
        self._dues.clear()

    def disconnect(self) -> None:
        """The connection dropped: held wills stay held (they go to the next window)."""
        self.connected = False

    def offer(self, reading: R, now: float) -> list[R]:
        """A reading as it arrives; returns what applies now, in order."""
        if self.until is not None:
            self._window.pop(reading.device, None)  # re-inserted last: the window applies in arrival order
            self._window[reading.device] = reading
            return []
        held = self._held.pop(reading.device, None)
        if reading.state == "offline":
            # a repeated will keeps the first one's due time
            due = now + self.grace if held is None else held[0]
            self._held[reading.device] = (due, reading)
            if held is None:
                heapq.heappush(self._dues, (due, reading.device))
            return []
        return [held[1], reading] if held is not None else [reading]

    def due(self, now: float) -> list[R]:
        """What applies by `now`: held offline readings past their grace while connected, and the window's
        readings once it is over."""
        out: list[R] = []
        if self.until is not None and now >= self.until:
            out.extend(self._window.values())
            self._window.clear()
            self.until = None
        out.extend(self.held_due(now))
        return out

    def held_due(self, now: float) -> list[R]:
        """The held offline readings past their grace (while connected), oldest first; the window is left as
        it is. The client takes them with each batch it routes, so that they share its commit."""
        out: list[R] = []
        if self.connected:
            dues = self._dues
            while dues and dues[0][0] <= now:
                due, device = heapq.heappop(dues)
                held = self._held.get(device)
                if held is not None and held[0] == due:
                    out.append(self._held.pop(device)[1])
        return out

    def _next_held(self) -> float | None:
        dues = self._dues
        while dues:
            due, device = dues[0]
            held = self._held.get(device)
            if held is not None and held[0] == due:
                return due
            heapq.heappop(dues)  # stale: that will was followed by an online, or went to a window
        return None

    def next_wakeup(self) -> float | None:
        """When `due` next has something to hand back (None: nothing is waiting)."""
        times = [self.until] if self.until is not None else []
        if self.connected and (held := self._next_held()) is not None:
            times.append(held)
        return min(times, default=None)

    def waiting(self) -> int:
        return len(self._window) + len(self._held)
