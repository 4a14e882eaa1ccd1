"""An endpoint's deliveries in memory: one lane per device, a ready-heap of idle lanes, and the paging window.

Only a lane's head may be in flight, which keeps per-(endpoint, device) order. Memory holds a bounded window
of an endpoint's pending deliveries (WINDOW, and LANE_MAX per lane); the rest stays in the store and is paged
in id order (= the order the events happened):

- `cursor`/`more`: every pending row with id <= cursor is in memory, done, or in a truncated lane's backlog;
  while `more` is set the store may hold pending rows above the cursor that are not here, so new rows are left
  to the next page instead of being taken (taking them would let a device's newer event overtake an older one
  still in the store).
- a *truncated* lane: the store holds pending rows of that device above `lane.last_id` that are not here; they
  come back by a lane refill once the lane has drained.
- A page or refill reads a snapshot: a delivery finished while one is in flight is remembered until it
  returns (`done_while_fetching`), so a stale copy of a finished row is not taken again.
"""

from __future__ import annotations

import fnmatch
import heapq
import re
from collections import deque
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, field

from webhookd.config import EndpointConfig
from webhookd.dispatch.retry import Health
from webhookd.dispatch.sender import Target
from webhookd.payloads import EventData
from webhookd.store import DeliveryRow, EndpointRow

WINDOW = 1024  # pending deliveries of one endpoint kept in memory
REFILL_BELOW = WINDOW // 2  # the next page is read once fewer than this are left
LANE_MAX = 32  # pending deliveries of one (endpoint, device) kept in memory


@dataclass(slots=True)
class Delivery:
    id: int
    event: EventData
    endpoint: str
    attempts: int
    due: float  # monotonic
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)  # the body's own headers (ntfy's Title, ...)
    body_for: EndpointConfig | None = None  # the endpoint config the cached body was rendered for
    inflight: bool = False
    settling: bool = False  # delivered; its receipt is waiting for its commit (the lane has not moved on)


@dataclass(slots=True, eq=False)
class Lane:
    items: deque[Delivery] = field(default_factory=deque)
    last_id: int = 0  # the highest id that entered this lane
    truncated: bool = False  # the store holds pending rows of this device above last_id that are not here
    dropped_max: int = 0  # the highest id left to the store because the lane was truncated
    refilling: bool = False


@dataclass(eq=False)
class EndpointRuntime:
    cfg: EndpointConfig
    row: EndpointRow
    target: Target = field(init=False)
    health: Health = field(default_factory=Health)
    lanes: dict[str, Lane] = field(default_factory=dict)
    ready: list[tuple[float, int, str]] = field(default_factory=list)  # (due, id, device) of idle lanes
    known: set[int] = field(default_factory=set)  # delivery ids held in lanes
    inflight: int = 0
    unsaved: int = 0  # delivered, receipt not committed yet: a crash now would send these again
    generation: int = 0  # bumped when lanes are thrown away; stale in-flight results then only persist
    more: bool = True  # the store may hold pending rows above `cursor` that are not in memory
    cursor: int = 0
    dropped_max: int = 0  # the highest id left to the store because `more` was set
    paging: bool = False  # a page read is in flight
    rescan_after: int | None = None  # a rescan asked for while a page read was in flight
    # Window slots promised to lane refills in flight: a page never takes them, so that a refill landing
    # after a page cannot push the window over WINDOW.
    reserved: int = 0
    # Reads in flight (page reads, lane refills) by the epoch they started in, and the deliveries finished
    # since the oldest of them started (id -> epoch): a read skips those, its snapshot may predate them.
    epoch: int = 0
    reads: dict[int, int] = field(default_factory=dict)  # start epoch -> reads in flight
    done_while_fetching: dict[int, int] = field(default_factory=dict)
    device_patterns: re.Pattern[str] | None = None  # None: every device
    event_kinds: frozenset[str] = frozenset()
    saved_row: EndpointRow | None = None  # the row as the last receipt saved it
    # On a hub of several processes: whether this process holds the lane's partition now (None: every lane is
    # ours). Rows of other lanes are left alone, whatever the window says.
    accept: Callable[[str, str], bool] | None = None
    probe_until: float = 0.0  # monotonic: until when this process holds the hub's single probe (hub only)
    probing: bool = False  # a compare-and-swap for the probe is in flight (hub only)

    def __post_init__(self) -> None:
        self.configure(self.cfg)
        self.health = Health(self.row.consecutive_failures)

    def configure(self, cfg: EndpointConfig) -> None:
        self.cfg = cfg
        self.device_patterns = (
            None if "*" in cfg.devices else re.compile("|".join(fnmatch.translate(p) for p in cfg.devices) or "(?!)")
        )
        self.event_kinds = frozenset(
            k.replace("_", ".", 1) if k.startswith("gateway_") else f"device.{k}" for k in cfg.events
        )
        self.target = Target(cfg)

    def wants(self, event: EventData) -> bool:
        if event.type not in self.event_kinds:
            return False
        return self.device_patterns is None or self.device_patterns.match(event.device_id) is not None

    # --- rows coming in -----------------------------------------------------------------------------------

    def offer(self, rows: Iterable[DeliveryRow], due: Due, skip: Container[int], *, force: bool = False) -> None:
        """New pending rows (just committed): taken while the window has room, else left to the next page.
        `force` takes them whatever the window says (a row that must not wait for a page: see Dispatcher)."""
        accept = self.accept
        for r in rows:
            if r.id in self.known or r.id in skip:
                continue
            if accept is not None and not accept(r.endpoint, r.event.device_id):
                continue
            if not force and (self.more or len(self.known) + self.reserved >= WINDOW):
                if not self.more:
                    self.more, self.cursor = True, r.id - 1
                self.dropped_max = max(self.dropped_max, r.id)
                continue
            lane = self.lanes.get(r.event.device_id)
            if lane is not None and r.id > lane.last_id and (lane.truncated or len(lane.items) >= LANE_MAX):
                lane.truncated = True
                lane.dropped_max = max(lane.dropped_max, r.id)
                continue
            self._insert(r, due, lane)

    def page_room(self) -> int:
        return WINDOW - len(self.known) - self.reserved

    def take_page(self, rows: list[DeliveryRow], asked: int, due: Due, skip: Container[int]) -> None:
        """The result of reading up to `asked` pending rows above the cursor."""
        for i, r in enumerate(rows):
            if self.page_room() <= 0:
                # Rows taken back or refilled while this page was read filled the window: the rest waits for
                # the next page.
                rows, self.more = rows[:i], True
                self.cursor = max(self.cursor, r.id - 1)
                self.dropped_max = max(self.dropped_max, r.id)
                break
            if r.id in self.known or r.id in skip or r.id in self.done_while_fetching:
                continue
            if self.accept is not None and not self.accept(r.endpoint, r.event.device_id):
                continue  # a partition lost while the page was read
            lane = self.lanes.get(r.event.device_id)
            if lane is not None and r.id > lane.last_id and (lane.truncated or len(lane.items) >= LANE_MAX):
                lane.truncated = True  # its refill reads it (and whatever follows) later
                continue
            self._insert(r, due, lane)
        if rows:
            self.cursor = max(self.cursor, rows[-1].id)
        if self.rescan_after is not None:  # rows below this page's snapshot came back meanwhile
            self.cursor, self.more, self.rescan_after = min(self.cursor, self.rescan_after), True, None
        elif len(rows) < asked and self.dropped_max <= self.cursor:
            self.more, self.dropped_max = False, 0

    def reserve_lane(self) -> int:
        """Rows a lane refill may read now (at least 1: the lane's delivered head just freed a slot)."""
        n = max(1, min(LANE_MAX, self.page_room()))
        self.reserved += n
        return n

    def take_lane(self, device: str, rows: list[DeliveryRow], asked: int, due: Due, skip: Container[int]) -> bool:
        """The result of a lane refill of `asked` rows (reserved by reserve_lane); True when the lane needs
        another one."""
        self.reserved = max(0, self.reserved - asked)
        lane = self.lanes.get(device)
        if lane is None:
            return False
        lane.refilling = False
        for r in rows:
            if r.id in self.known or r.id in skip or r.id in self.done_while_fetching:
                continue
            if self.accept is not None and not self.accept(r.endpoint, r.event.device_id):
                continue
            self._insert(r, due, lane)
        if rows:
            lane.last_id = max(lane.last_id, rows[-1].id)
        if len(rows) < asked and lane.dropped_max <= lane.last_id:
            lane.truncated, lane.dropped_max = False, 0
        if not lane.items:
            if lane.truncated:
                return True
            del self.lanes[device]
        return False

    def _insert(self, r: DeliveryRow, due: Due, lane: Lane | None) -> None:
        device = r.event.device_id
        d = Delivery(r.id, r.event, r.endpoint, r.attempts, due(r.next_attempt_at))
        self.known.add(r.id)
        if lane is None:
            lane = self.lanes[device] = Lane()
        items = lane.items
        if not items:
            items.append(d)
            heapq.heappush(self.ready, (d.due, d.id, device))
        elif items[-1].id < d.id:
            items.append(d)
        else:
            # Rare: rows arriving out of id order (a replay, or enable racing new events). Keep the lane sorted,
            # but never move a head that is in flight or settling.
            keep = [items.popleft()] if items[0].inflight or items[0].settling else []
            rest = sorted([*items, d], key=lambda x: x.id)
            items.clear()
            items.extend(keep + rest)
        lane.last_id = max(lane.last_id, d.id)

    # --- rows going out -----------------------------------------------------------------------------------

    def head(self, device: str) -> Delivery | None:
        lane = self.lanes.get(device)
        return lane.items[0] if lane is not None and lane.items else None

    def advance(self, d: Delivery, now: float) -> bool:
        """`d`, its lane's head, is done: the next delivery of that device becomes due. True when the lane
        is now empty with more of it in the store (a refill is due)."""
        device = d.event.device_id
        lane = self.lanes.get(device)
        if lane is None or not lane.items or lane.items[0] is not d:
            return False  # its lane was thrown away (and maybe rebuilt: d.id in `known` is then another copy's)
        self.known.discard(d.id)
        if self.reads:
            self.done_while_fetching[d.id] = self.epoch
        lane.items.popleft()
        if lane.items:
            head = lane.items[0]
            heapq.heappush(self.ready, (max(head.due, now), head.id, device))
            return False
        if lane.truncated:
            return not lane.refilling
        del self.lanes[device]
        return False

    def retry_head(self, d: Delivery, generation: int, due: float) -> bool:
        """Keep `d` at its lane's head and try it again at `due`; False if its lane is gone."""
        lane = self.lanes.get(d.event.device_id)
        if generation != self.generation or lane is None or not lane.items or lane.items[0] is not d:
            return False
        d.due = due
        heapq.heappush(self.ready, (due, d.id, d.event.device_id))
        return True

    # --- paging state -------------------------------------------------------------------------------------

    def needs_page(self) -> bool:
        return self.more and not self.paging and not self.row.disabled and len(self.known) < REFILL_BELOW

    def fetch_started(self) -> int:
        self.epoch += 1
        self.reads[self.epoch] = self.reads.get(self.epoch, 0) + 1
        return self.epoch

    def fetch_done(self, started: int) -> None:
        left = self.reads[started] - 1
        if left:
            self.reads[started] = left
            return
        del self.reads[started]
        # Forget what no read in flight can have seen as pending: finished before the oldest one started.
        oldest = min(self.reads, default=self.epoch + 1)
        if not self.reads:
            self.done_while_fetching.clear()
        elif oldest > started:
            self.done_while_fetching = {i: e for i, e in self.done_while_fetching.items() if e >= oldest}

    def poke(self) -> None:
        """Rows may have been committed above the cursor by another process: read a page for them."""
        if not self.more:
            self.more, self.dropped_max = True, 0

    def rescan(self, after_id: int) -> None:
        """Pending rows at or above after_id + 1 may have appeared in the store (release, replay)."""
        self.cursor = min(self.cursor, after_id) if self.more else after_id
        self.more = True
        if self.paging:  # the read in flight would move the cursor past them again
            self.rescan_after = after_id if self.rescan_after is None else min(self.rescan_after, after_id)

    def clear(self) -> set[int]:
        """Throw the lanes away (a disable, an enable); returns the ids still in flight or settling (their
        results arrive as stale). Paging starts over from the first pending row."""
        inflight = {
            lane.items[0].id
            for lane in self.lanes.values()
            if lane.items and (lane.items[0].inflight or lane.items[0].settling)
        }
        self.lanes.clear()
        self.ready.clear()
        self.known.clear()
        self.generation += 1
        self.more, self.cursor, self.dropped_max = True, 0, 0
        self.paging, self.rescan_after = False, None  # a read in flight belongs to the old generation
        self.reserved = 0
        return inflight


class Due:
    """Maps a stored wall-clock next_attempt_at to a monotonic due time, once per batch of rows."""

    __slots__ = ("longest", "now", "wall")

    def __init__(self, now: float, wall: float, longest: float) -> None:
        self.now, self.wall, self.longest = now, wall, longest

    def __call__(self, next_attempt_at: float | None) -> float:
        # Stored retry times are wall clock: bounded, so that a clock that jumped back cannot park a delivery.
        wait = min(max(0.0, (next_attempt_at or self.wall) - self.wall), self.longest)
        return self.now + wait
