"""The in-memory window of an endpoint's deliveries (dispatch/lanes.py), in process and without a store: what is
taken, what is left to the next page or lane refill, and that order per device survives paging."""

from __future__ import annotations

import heapq
import time
from pathlib import Path

from tests.test_retention import event
from webhookd.config import parse_config
from webhookd.dispatch.lanes import LANE_MAX, REFILL_BELOW, WINDOW, Due, EndpointRuntime
from webhookd.payloads import EventData
from webhookd.store import DeliveryRow, EndpointRow

NOW = 1000.0
EVENTS: dict[str, EventData] = {}


def runtime() -> EndpointRuntime:
    cfg = parse_config(
        {"state_dir": "/tmp", "endpoints": [{"name": "ops", "url": "http://127.0.0.1:9/"}]}, Path("/tmp"), env={}
    )
    return EndpointRuntime(cfg=cfg.endpoints[0], row=EndpointRow("ops"))


def row(i: int, device: str) -> DeliveryRow:
    ev = EVENTS.get(device) or EVENTS.setdefault(device, event(time.time(), device))
    return DeliveryRow(i, ev, "ops", 0, None)


def due() -> Due:
    return Due(NOW, time.time(), 60.0)


def lane_ids(rt: EndpointRuntime, device: str) -> list[int]:
    lane = rt.lanes.get(device)
    return [d.id for d in lane.items] if lane else []


def test_a_fresh_runtime_pages_from_the_first_row() -> None:
    rt = runtime()
    assert rt.more and rt.cursor == 0 and rt.needs_page()
    # New rows before the first page are left to it: the store may hold older ones of the same device.
    rt.offer([row(10, "a")], due(), ())
    assert rt.known == set() and rt.dropped_max == 10


def test_caught_up_rows_are_taken_until_the_window_is_full() -> None:
    rt = runtime()
    rt.take_page([], WINDOW, due(), ())
    assert not rt.more
    rt.offer([row(i, f"d{i}") for i in range(1, WINDOW + 1)], due(), ())
    assert len(rt.known) == WINDOW and not rt.more
    rt.offer([row(WINDOW + 1, "x"), row(WINDOW + 2, "y")], due(), ())
    assert len(rt.known) == WINDOW
    assert rt.more and rt.cursor == WINDOW and rt.dropped_max == WINDOW + 2


def test_a_page_that_comes_back_short_catches_up_unless_rows_were_left_meanwhile() -> None:
    rt = runtime()
    rt.offer([row(7, "a")], due(), ())  # left to the page: dropped_max 7
    rt.take_page([row(3, "a"), row(5, "b")], WINDOW, due(), ())
    # Short, but row 7 was left while the page was being read (after its snapshot): read again.
    assert rt.more and rt.cursor == 5
    rt.take_page([row(7, "a")], WINDOW - 2, due(), ())
    assert not rt.more
    assert lane_ids(rt, "a") == [3, 7] and lane_ids(rt, "b") == [5]


def test_a_long_lane_is_truncated_and_refilled_in_order() -> None:
    rt = runtime()
    rows = [row(i, "busy") for i in range(1, 3 * LANE_MAX + 1)] + [row(1000, "quiet")]
    rt.take_page(rows, WINDOW, due(), ())
    assert lane_ids(rt, "busy") == list(range(1, LANE_MAX + 1))
    assert rt.lanes["busy"].truncated
    assert lane_ids(rt, "quiet") == [1000]  # not stuck behind the busy device
    assert not rt.more  # the page was short: what is left belongs to the lane's refill
    # A new row of the truncated device is left to the refill too.
    rt.offer([row(2000, "busy")], due(), ())
    assert 2000 not in rt.known
    # Drain the lane: the last advance asks for a refill.
    needs = False
    for _ in range(LANE_MAX):
        d = rt.lanes["busy"].items[0]
        needs = rt.advance(d, NOW)
    assert needs
    rt.lanes["busy"].refilling = True
    again = rt.take_lane("busy", [row(i, "busy") for i in range(LANE_MAX + 1, 2 * LANE_MAX + 1)], LANE_MAX, due(), ())
    assert not again and rt.lanes["busy"].truncated
    assert lane_ids(rt, "busy") == list(range(LANE_MAX + 1, 2 * LANE_MAX + 1))
    for _ in range(LANE_MAX):
        rt.advance(rt.lanes["busy"].items[0], NOW)
    rest = [row(i, "busy") for i in range(2 * LANE_MAX + 1, 3 * LANE_MAX + 1)] + [row(2000, "busy")]
    rt.take_lane("busy", rest, LANE_MAX + 5, due(), ())
    assert not rt.lanes["busy"].truncated
    assert lane_ids(rt, "busy") == [*range(2 * LANE_MAX + 1, 3 * LANE_MAX + 1), 2000]


def test_a_row_finished_while_a_page_was_read_is_not_taken_again() -> None:
    rt = runtime()
    rt.take_page([row(1, "a"), row(2, "a")], 2, due(), ())
    started = rt.fetch_started()
    rt.advance(rt.lanes["a"].items[0], NOW)  # row 1 delivered and committed while the page is in flight
    rt.rescan(0)
    rt.take_page([row(1, "a"), row(2, "a"), row(3, "a")], WINDOW, due(), ())  # the page's snapshot had it
    rt.fetch_done(started)
    assert lane_ids(rt, "a") == [2, 3]
    assert rt.done_while_fetching == {}


def test_a_replayed_older_row_goes_before_its_lane_head_unless_that_is_in_flight() -> None:
    rt = runtime()
    rt.take_page([row(10, "a"), row(11, "a")], WINDOW, due(), ())
    rt.lanes["a"].items[0].inflight = True
    rt.rescan(4)
    rt.take_page([row(5, "a")], WINDOW, due(), ())
    assert lane_ids(rt, "a") == [10, 5, 11]


def test_ready_heap_has_one_entry_per_idle_lane() -> None:
    rt = runtime()
    rt.take_page([row(1, "a"), row(2, "b"), row(3, "a")], WINDOW, due(), ())
    assert sorted(device for _, _, device in rt.ready) == ["a", "b"]
    _, _, device = heapq.heappop(rt.ready)
    head = rt.head(device)
    assert head is not None
    rt.advance(head, NOW)
    assert sorted(d for _, _, d in rt.ready) == ["a", "b"] if device == "a" else ["a"]


def test_clear_starts_paging_over_and_reports_what_is_in_flight() -> None:
    rt = runtime()
    rt.take_page([row(1, "a"), row(2, "b")], WINDOW, due(), ())
    rt.lanes["a"].items[0].inflight = True
    gen = rt.generation
    assert rt.clear() == {1}
    assert rt.generation == gen + 1 and rt.more and rt.cursor == 0 and not rt.known
    assert rt.needs_page() and REFILL_BELOW <= WINDOW


def test_what_reads_in_flight_remember_is_forgotten_once_no_older_read_is_left() -> None:
    rt = runtime()
    rt.take_page([row(i, f"d{i}") for i in range(1, 6)], 5, due(), ())
    old = rt.fetch_started()
    rt.advance(rt.lanes["d1"].items[0], NOW)
    new = rt.fetch_started()
    rt.advance(rt.lanes["d2"].items[0], NOW)
    assert set(rt.done_while_fetching) == {1, 2}
    rt.fetch_done(old)  # only the newer read is left: it started after row 1 was done
    assert set(rt.done_while_fetching) == {2}
    rt.fetch_done(new)
    assert rt.done_while_fetching == {} and rt.reads == {}


def test_a_rescan_while_a_page_is_read_is_not_lost_when_the_page_returns() -> None:
    rt = runtime()
    rt.take_page([row(i, f"d{i}") for i in range(1, 4)], 3, due(), ())
    rt.paging = True  # a read of the rows above 3 is in flight
    rt.rescan(0)  # meanwhile a replay made rows 1.. pending again
    rt.take_page([row(100, "x")], WINDOW, due(), ())  # the read returns: short, but the rescan stands
    assert rt.more and rt.cursor == 0 and rt.rescan_after is None


def test_clear_while_a_page_is_read_lets_the_new_generation_page() -> None:
    rt = runtime()
    rt.paging = True
    rt.clear()
    assert not rt.paging and rt.needs_page()


def test_a_page_never_fills_the_window_past_rows_that_came_in_or_are_promised_meanwhile() -> None:
    rt = runtime()
    asked = rt.page_room()
    assert asked == WINDOW
    # While the page was read: two rows taken back by force, and a lane refill promised its slots.
    rt.offer([row(5000, "back1"), row(5001, "back2")], due(), (), force=True)
    promised = rt.reserve_lane()
    assert promised == LANE_MAX
    rt.take_page([row(i, f"d{i}") for i in range(1, asked + 1)], asked, due(), ())
    assert len(rt.known) + rt.reserved == WINDOW
    # The rows it could not take are read by the next page, from where this one stopped.
    cut = WINDOW - 2 - LANE_MAX
    assert rt.more and rt.cursor == cut and rt.dropped_max == cut + 1
    # The refill lands inside the window and gives its reservation back.
    rt.take_lane("back1", [row(5002 + i, "back1") for i in range(LANE_MAX)], promised, due(), ())
    assert rt.reserved == 0 and len(rt.known) <= WINDOW


def test_a_lane_refill_asks_for_at_least_one_row() -> None:
    rt = runtime()
    rt.take_page([row(i, f"d{i}") for i in range(1, WINDOW + 1)], WINDOW, due(), ())
    assert rt.page_room() == 0 and rt.reserve_lane() == 1
