"""The presence engine's transitions, with a fake clock: no sleeping, no I/O."""

from __future__ import annotations

import pytest

from webhookd.presence import Applied, Device, DeviceDefaults, Heartbeat, PresenceEngine

T = 60.0  # silence timeout used below


def engine(notify_after_utilizing: bool = False, timeouts: dict[str, float] | None = None) -> PresenceEngine:
    timeouts = timeouts or {}
    return PresenceEngine(
        lambda dev: DeviceDefaults(timeouts.get(dev, T), name="default-name", owner="ops@example.com"),
        notify_after_utilizing,
    )


def hb(
    e: PresenceEngine,
    dev: str,
    now: float,
    state: str | None = None,
    address: str | None = "10.0.0.1",
    name: str | None = None,
) -> Applied:
    return e.heartbeat(Heartbeat(dev, state=state, address=address, name=name), now, 1_700_000_000 + now)


def kind(o: Applied) -> str | None:
    return o.transition.kind if o.transition else None


def test_first_heartbeat_is_online_from_unknown() -> None:
    e = engine()
    o = hb(e, "d1", 0.0)
    assert o.state == "online"
    assert o.transition is not None
    assert (o.transition.kind, o.transition.reason, o.transition.previous_state) == ("online", "heartbeat", "unknown")
    assert o.transition.device.name == "default-name"
    assert o.transition.device.owner == "ops@example.com"


def test_liveness_heartbeat_creates_nothing_and_marks_dirty() -> None:
    e = engine()
    hb(e, "d1", 0.0)
    o = hb(e, "d1", 10.0)
    assert o.transition is None and o.state == "online"
    assert [d.id for d in e.take_dirty()] == ["d1"]
    assert e.take_dirty() == []


@pytest.mark.parametrize("state", ["offline", "shutdown", "reboot"])
def test_first_seen_offline_is_recorded_without_event(state: str) -> None:
    e = engine()
    o = hb(e, "d1", 0.0, state=state)
    assert o.state == "offline"
    assert o.transition is not None and o.transition.kind is None
    assert e.next_deadline() is None


def test_explicit_first_state_is_reported() -> None:
    e = engine()
    o = hb(e, "d1", 0.0, state="utilizing")
    assert o.transition is not None
    assert (o.transition.kind, o.transition.reason) == ("utilizing", "reported")


@pytest.mark.parametrize(("state", "reason"), [("shutdown", "shutdown"), ("reboot", "reboot"), ("offline", "reported")])
def test_shutdown_reboot_offline_go_offline_at_once(state: str, reason: str) -> None:
    e = engine()
    hb(e, "d1", 0.0)
    o = hb(e, "d1", 1.0, state=state)
    assert o.transition is not None
    assert (o.state, o.transition.kind, o.transition.reason) == ("offline", "offline", reason)
    assert e.expire(1000.0, 0) == []  # no second offline from the timer


def test_silence_timeout_goes_offline_at_the_deadline_not_before() -> None:
    e = engine()
    hb(e, "d1", 0.0)
    assert e.expire(T - 0.001, 0) == []
    out = e.expire(T, 0)
    assert len(out) == 1 and out[0].transition is not None
    assert (out[0].transition.kind, out[0].transition.reason, out[0].transition.previous_state) == (
        "offline",
        "timeout",
        "online",
    )
    assert e.devices["d1"].state == "offline"
    assert e.expire(10 * T, 0) == []


def test_heartbeats_push_the_deadline_without_touching_the_heap() -> None:
    e = engine()
    hb(e, "d1", 0.0)
    heap_before = list(e._heap)
    for i in range(1, 100):
        hb(e, "d1", float(i))
    assert e._heap == heap_before  # O(1) per heartbeat
    assert e.expire(T + 50, 0) == []  # early entry re-pushed with the real deadline
    assert e.next_deadline() == pytest.approx(99 + T)
    assert len(e.expire(99 + T, 0)) == 1


def test_back_online_after_timeout_carries_offline_for() -> None:
    e = engine()
    hb(e, "d1", 0.0)
    e.expire(T, 1_700_000_000 + T)
    o = hb(e, "d1", T + 30)
    assert o.transition is not None
    assert (o.transition.kind, o.transition.reason, o.transition.previous_state) == ("online", "heartbeat", "offline")
    assert o.transition.offline_for == pytest.approx(30)


def test_heartbeat_without_state_keeps_utilizing_and_unplugged() -> None:
    e = engine()
    hb(e, "d1", 0.0, state="utilizing")
    assert hb(e, "d1", 1.0).transition is None
    assert e.devices["d1"].state == "utilizing"
    hb(e, "d1", 2.0, state="unplugged")
    assert hb(e, "d1", 3.0).transition is None
    assert e.devices["d1"].state == "unplugged"


def test_utilizing_to_online_is_silent_unless_configured() -> None:
    e = engine()
    hb(e, "d1", 0.0, state="utilizing")
    o = hb(e, "d1", 1.0, state="online")
    assert o.state == "online" and o.transition is not None and o.transition.kind is None
    e2 = engine(notify_after_utilizing=True)
    hb(e2, "d1", 0.0, state="utilizing")
    assert kind(hb(e2, "d1", 1.0, state="online")) == "online"


@pytest.mark.parametrize("state", ["utilizing", "unplugged"])
def test_reported_state_change(state: str) -> None:
    e = engine()
    hb(e, "d1", 0.0)
    o = hb(e, "d1", 1.0, state=state)
    assert o.transition is not None and (o.transition.kind, o.transition.reason) == (state, "reported")
    assert hb(e, "d1", 2.0, state=state).transition is None  # same state again: liveness only


def test_address_change_on_live_device() -> None:
    e = engine()
    hb(e, "d1", 0.0, address="10.0.0.1")
    o = hb(e, "d1", 1.0, address="10.0.0.2")
    assert o.transition is not None
    assert (o.transition.kind, o.transition.reason) == ("address_changed", "heartbeat")
    assert o.transition.device.address == "10.0.0.2"
    assert hb(e, "d1", 2.0, address="10.0.0.2").transition is None


def test_back_online_with_new_address_is_only_online() -> None:
    e = engine()
    hb(e, "d1", 0.0, address="10.0.0.1")
    hb(e, "d1", 1.0, state="shutdown")
    o = hb(e, "d1", 2.0, address="10.0.0.9")
    assert kind(o) == "online"
    assert o.transition is not None and o.transition.device.address == "10.0.0.9"


def test_per_device_timeout_override() -> None:
    e = engine(timeouts={"printer-1": 5.0})
    hb(e, "printer-1", 0.0)
    hb(e, "other", 0.0)
    out = e.expire(5.0, 0)
    assert [o.transition.device.id for o in out if o.transition] == ["printer-1"]


def test_restart_gives_every_live_device_a_full_timeout_from_start() -> None:
    e = engine()
    restored = [Device(id="a", state="online"), Device(id="b", state="offline"), Device(id="c", state="utilizing")]
    start = 5000.0
    e.load(restored, start)
    assert e.expire(start + T - 1, 0) == []  # no storm after downtime
    hb(e, "a", start + 10)  # a keeps heartbeating
    out = e.expire(start + T, 0)
    assert [o.transition.device.id for o in out if o.transition] == ["c"]  # silent c still goes offline
    assert e.devices["b"].state == "offline"


def test_undo_restores_exactly_the_failed_change() -> None:
    e = engine()
    hb(e, "d1", 0.0)
    o = hb(e, "d1", 1.0, state="unplugged")
    e.undo(o)
    assert e.devices["d1"].state == "online"
    first = hb(e, "new", 0.0)
    e.undo(first)
    assert "new" not in e.devices
    assert e.expire(10 * T, 0)[0].transition is not None  # d1 still times out; 'new' left no trace


def test_undo_of_expiry_lets_it_expire_again() -> None:
    e = engine()
    hb(e, "d1", 0.0)
    out = e.expire(T, 0)
    for o in out:
        e.undo(o)
    assert e.devices["d1"].state == "online"
    assert len(e.expire(T + 0.5, 0)) == 1


def test_reconfigure_applies_new_timeouts() -> None:
    e = engine()
    hb(e, "d1", 0.0)
    e.reconfigure(lambda _dev: DeviceDefaults(10.0), False)
    assert len(e.expire(10.0, 0)) == 1


def test_counts() -> None:
    e = engine()
    hb(e, "a", 0.0)
    hb(e, "b", 0.0, state="utilizing")
    hb(e, "c", 0.0, state="shutdown")
    assert e.counts() == {"online": 1, "utilizing": 1, "unplugged": 0, "offline": 1}


def test_many_devices_expire_in_deadline_order() -> None:
    e = engine()
    for i in range(1000):
        hb(e, f"d{i}", float(i) / 10)
    out = e.expire(T + 50, 0)
    assert len(out) == 501
    assert e.next_deadline() == pytest.approx(T + 50.1)


def test_expire_and_take_dirty_in_bounded_chunks() -> None:
    e = engine()
    for i in range(10):
        hb(e, f"d{i}", 0.0)
    for i in range(10):
        hb(e, f"d{i}", 1.0)  # liveness: all dirty
    assert len(e.take_dirty(limit=4)) == 4
    assert len(e.take_dirty(limit=4)) == 4
    assert len(e.take_dirty(limit=4)) == 2
    assert e.take_dirty() == []
    first = e.expire(2 * T, 0, limit=3)
    assert len(first) == 3
    rest = e.expire(2 * T, 0)
    assert len(rest) == 7
    assert {o.transition.device.id for o in first + rest if o.transition} == {f"d{i}" for i in range(10)}


def test_device_snapshot_copies_every_field() -> None:
    import dataclasses

    from webhookd.presence import Device

    values = {f.name: f"v-{f.name}" for f in dataclasses.fields(Device)}  # distinct per field: order shows
    dev = Device(**values)  # type: ignore[arg-type]
    copy = dev.snapshot()
    assert copy == dev and copy is not dev
    assert [getattr(copy, f.name) for f in dataclasses.fields(Device)] == list(values.values())


# --- MQTT availability: no silence timer, reasons, paused timers --------------------------------------------------


def avail(e: PresenceEngine, dev: str, now: float, state: str) -> Applied:
    reason = "connected" if state == "online" else "disconnected"
    return e.heartbeat(Heartbeat(dev, state=state, source="mqtt", reason=reason, timed=False), now, 1e9 + now)


def test_an_availability_device_has_no_silence_timer_and_its_reasons() -> None:
    e = engine()
    o = avail(e, "m", 0.0, "online")
    assert o.transition is not None and (o.transition.kind, o.transition.reason) == ("online", "connected")
    assert o.transition.device.source == "mqtt" and not o.transition.device.timed
    assert e.next_deadline() is None and e.expire(10 * T, 1e9) == []
    o = avail(e, "m", 10 * T, "offline")
    assert o.transition is not None and (o.transition.kind, o.transition.reason) == ("offline", "disconnected")
    o = avail(e, "m", 11 * T, "online")
    assert o.transition is not None and o.transition.offline_for == pytest.approx(T)
    assert avail(e, "m", 12 * T, "online").transition is None  # a retained replay: nothing


def test_a_heartbeat_gives_an_availability_device_a_timer_for_good() -> None:
    e = engine()
    avail(e, "m", 0.0, "online")
    assert hb(e, "m", 1.0).transition is None  # liveness only, but now timed
    assert e.devices["m"].timed and e.devices["m"].source == "http"
    avail(e, "m", 2.0, "online")
    assert e.devices["m"].timed and e.devices["m"].source == "mqtt"
    assert e.expire(1.0 + T, 1e9) == []  # any message is a sign of life
    [gone] = e.expire(2.0 + T, 1e9)
    assert gone.transition is not None and gone.transition.reason == "timeout"


def test_paused_timers_do_not_expire_and_resume_with_a_full_timeout() -> None:
    e = engine()
    hb(e, "a", 0.0)
    hb(e, "b", 0.0)
    e.pause(["a", "nobody"])
    assert [x.transition.device.id for x in e.expire(T, 1e9) if x.transition] == ["b"]
    assert e.expire(5 * T, 1e9) == []
    e.resume(["a"], 5 * T)
    assert e.expire(6 * T - 1, 1e9) == []
    [gone] = e.expire(6 * T, 1e9)
    assert gone.transition is not None and gone.transition.device.id == "a"


def test_a_never_timeout_has_no_deadline() -> None:
    e = engine(timeouts={"n": float("inf")})
    hb(e, "n", 0.0)
    assert e.next_deadline() is None and e.expire(1e12, 1e9) == []
    assert e.devices["n"].state == "online"


def test_an_undone_transition_restores_source_and_timer() -> None:
    e = engine()
    hb(e, "a", 0.0)
    o = avail(e, "a", 1.0, "offline")
    e.undo(o)
    assert (e.devices["a"].state, e.devices["a"].source) == ("online", "http")


# --- debounce and reminders (issue 12) -------------------------------------------------------------------------


def engine_with(debounce: float = 0.0, remind: float = 0.0) -> PresenceEngine:
    return PresenceEngine(lambda dev: DeviceDefaults(T, debounce=debounce), False, remind)


def at(e: PresenceEngine, dev: str, now: float, state: str | None = None) -> Applied:
    return e.heartbeat(Heartbeat(dev, state=state), now, 1e9 + now)


def due(e: PresenceEngine, now: float, skew: float = 0.0) -> list[tuple[str | None, str, int | None]]:
    """What expires by `now` (the wall clock is 1e9 + now + skew)."""
    applied = e.expire(now, 1e9 + now + skew)
    return [(a.transition.kind, a.transition.reason, a.transition.reminder) for a in applied if a.transition]


def test_a_reboot_back_within_the_debounce_makes_no_event_at_all() -> None:
    e = engine_with(debounce=30.0)
    at(e, "d", 0.0)
    o = at(e, "d", 10.0, "reboot")
    assert o.state == "offline" and o.transition is not None and o.transition.kind is None  # persisted, silent
    back = at(e, "d", 25.0)
    assert back.transition is not None and back.transition.kind is None and back.state == "online"
    assert due(e, 80.0) == []  # nothing left of the held offline (its silence timer runs from 25 s)


def test_an_offline_still_offline_at_the_debounce_end_is_sent_once_with_its_time() -> None:
    e = engine_with(debounce=30.0)
    at(e, "d", 0.0)
    at(e, "d", 10.0, "shutdown")
    assert due(e, 39.9) == []
    [a] = e.expire(40.0, 1e9 + 40.0)
    assert a.transition is not None and (a.transition.kind, a.transition.reason) == ("offline", "shutdown")
    assert a.transition.previous_state == "online" and a.transition.device.changed_at == 1e9 + 10.0
    assert due(e, 1000.0) == []
    assert e.devices["d"].offline_reason == "shutdown"
    o = at(e, "d", 1001.0)  # back later: an online event with the whole time offline
    assert o.transition is not None and o.transition.kind == "online" and o.transition.offline_for == 991.0


def test_a_timeout_is_never_debounced_and_back_in_another_state_is_that_event() -> None:
    e = engine_with(debounce=30.0)
    at(e, "d", 0.0)
    assert due(e, T) == [("offline", "timeout", None)]
    at(e, "u", 0.0)
    at(e, "u", 1.0, "offline")
    o = at(e, "u", 2.0, "utilizing")
    assert o.transition is not None and (o.transition.kind, o.transition.previous_state) == ("utilizing", "online")


def test_a_held_offline_survives_a_restart_without_loss_or_duplicate() -> None:
    e = engine_with(debounce=30.0)
    at(e, "d", 0.0)
    at(e, "d", 10.0, "shutdown")
    saved = e.devices["d"].snapshot()
    e2 = engine_with(debounce=30.0)
    e2.load([saved], 500.0, 1e9 + 20.0)  # restarted 10 s into the debounce (a new monotonic clock)
    assert due(e2, 519.9) == []
    assert due(e2, 520.0) == [("offline", "shutdown", None)]
    assert due(e2, 600.0) == []


def test_reminders_count_from_the_offline_and_stop_when_it_is_back() -> None:
    e = engine_with(remind=100.0)
    at(e, "d", 0.0)
    assert due(e, T) == [("offline", "timeout", None)]
    assert due(e, T + 99.0) == []
    [a] = e.expire(T + 100.0, 1e9 + T + 100.0)
    assert a.transition is not None and (a.transition.kind, a.transition.reminder) == ("still_offline", 1)
    assert a.transition.offline_for == 100.0 and a.state == "offline"
    assert due(e, T + 200.0) == [("still_offline", "timeout", 2)]
    at(e, "d", T + 250.0)
    assert e.devices["d"].reminders == 0
    assert due(e, 2 * T + 250.0) == [("offline", "timeout", None)]  # silent again: reminders count anew
    assert due(e, 2 * T + 349.0) == [] and due(e, 2 * T + 350.0) == [("still_offline", "timeout", 1)]


def test_reminders_after_a_restart_neither_reset_nor_burst() -> None:
    e = engine_with(remind=100.0)
    at(e, "d", 0.0, "shutdown")  # first seen offline: recorded, no event; reminders count from it
    assert e.devices["d"].offline_reason is None and due(e, 1000.0) == []  # no offline event: no reminders
    dev = e.devices["d"]
    dev.changed_at, dev.reminders, dev.offline_reason = 1e9, 2, "shutdown"  # as stored: 2 reminders sent
    e2 = engine_with(remind=100.0)
    e2.load([dev.snapshot()], 0.0, 1e9 + 750.0)  # down for several intervals: one reminder now, numbered 7
    assert due(e2, 0.0, skew=750.0) == [("still_offline", "shutdown", 7)]
    assert due(e2, 49.0, skew=750.0) == [] and due(e2, 50.0, skew=750.0) == [("still_offline", "shutdown", 8)]
