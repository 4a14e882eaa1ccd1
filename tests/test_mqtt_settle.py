"""The settle rule after a (re)connection, as a pure function of readings and `now` (milliseconds to run)."""

from __future__ import annotations

from dataclasses import dataclass

from webhookd.mqtt.settle import WILL_GRACE, Settle


@dataclass(frozen=True)
class R:
    device: str
    state: str | None


ON, OFF = "online", "offline"


def settled(settle: float = 10.0) -> Settle[R]:
    s: Settle[R] = Settle(settle)
    s.connect(0.0)
    assert s.due(settle) == []
    return s


def test_the_first_connection_collects_until_the_end_and_applies_the_last_reading_each() -> None:
    s: Settle[R] = Settle(10.0)
    s.connect(0.0)
    assert s.offer(R("a", ON), 0.1) == [] and s.offer(R("b", OFF), 0.2) == [] and s.offer(R("a", OFF), 3.0) == []
    assert s.offer(R("a", ON), 9.0) == []
    assert s.next_wakeup() == 10.0 and s.due(9.99) == []
    assert s.due(10.0) == [R("b", OFF), R("a", ON)]  # arrival order of each device's last reading
    assert s.due(20.0) == [] and s.next_wakeup() is None and not s.settling


def test_once_settled_online_applies_at_once_and_offline_after_the_grace() -> None:
    s = settled()
    assert s.offer(R("a", ON), 11.0) == [R("a", ON)]
    assert s.offer(R("a", OFF), 12.0) == []
    assert s.next_wakeup() == 12.0 + WILL_GRACE
    assert s.due(12.0 + WILL_GRACE / 2) == []
    assert s.due(12.0 + WILL_GRACE) == [R("a", OFF)]
    assert s.waiting() == 0


def test_an_online_after_a_held_will_applies_both_in_order() -> None:
    s = settled()
    assert s.offer(R("a", OFF), 11.0) == []
    assert s.offer(R("a", ON), 11.1) == [R("a", OFF), R("a", ON)]
    assert s.due(20.0) == []


def test_wills_held_when_the_connection_drops_belong_to_the_restart() -> None:
    s = settled()
    for i in range(50):  # the broker stops: every client's will, then our connection drops
        assert s.offer(R(f"d{i}", OFF), 11.0) == []
    s.disconnect()
    assert s.due(60.0) == [] and s.next_wakeup() is None  # nothing applies while disconnected
    s.connect(61.0)
    for i in range(47):  # 47 devices come back within the window (retained replays of their will first)
        assert s.offer(R(f"d{i}", OFF), 61.1) == []
        assert s.offer(R(f"d{i}", ON), 65.0) == []
    got = s.due(71.0)
    assert sorted(r.device for r in got if r.state == OFF) == ["d47", "d48", "d49"]
    assert len(got) == 50 and s.waiting() == 0


def test_a_repeated_will_keeps_the_first_due_time() -> None:
    s = settled()
    s.offer(R("a", OFF), 11.0)
    s.offer(R("a", OFF), 11.0 + WILL_GRACE / 2)
    assert s.due(11.0 + WILL_GRACE) == [R("a", OFF)]


def test_zero_settle_still_collects_the_replay_of_one_moment() -> None:
    s: Settle[R] = Settle(0.0)
    s.connect(5.0)
    assert s.offer(R("a", ON), 5.0) == []
    assert s.due(5.0) == [R("a", ON)]
    assert s.offer(R("b", ON), 5.1) == [R("b", ON)]


def test_a_will_followed_by_online_leaves_no_stale_wakeup_and_a_new_will_its_own_due() -> None:
    s = settled()
    s.offer(R("a", OFF), 11.0)
    assert s.offer(R("a", ON), 11.1) == [R("a", OFF), R("a", ON)]
    assert s.next_wakeup() is None  # the stale due is dropped
    s.offer(R("a", OFF), 12.0)
    assert s.next_wakeup() == 12.0 + WILL_GRACE
    assert s.due(11.0 + WILL_GRACE) == [] and s.due(12.0 + WILL_GRACE) == [R("a", OFF)]


def test_held_due_hands_over_only_wills_past_their_grace_and_leaves_the_window_alone() -> None:
    s = settled()
    assert s.offer(R("a", OFF), 11.0) == [] and s.offer(R("b", OFF), 11.1) == []
    assert s.held_due(11.0 + WILL_GRACE) == [R("a", OFF)]  # b's grace is not over yet
    assert s.offer(R("a", ON), 11.3) == [R("a", ON)]  # a is no longer held: its online applies alone
    assert s.next_wakeup() == 11.1 + WILL_GRACE and s.held_due(12.0) == [R("b", OFF)] and s.waiting() == 0
    s.disconnect()
    s.connect(20.0)  # a window: held_due never ends it, only due() does
    assert s.offer(R("c", OFF), 20.1) == [] and s.held_due(40.0) == [] and s.settling
    assert s.due(30.0) == [R("c", OFF)]
