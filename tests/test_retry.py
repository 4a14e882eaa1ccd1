"""The retry, pause and disable policy (CONTRACT §7), in process and in milliseconds."""

from __future__ import annotations

import pytest

from webhookd.dispatch.retry import Decision, Health, capacity, decide

SCHEDULE = (1.0, 5.0, 30.0)
FRESH = Health()


def fail(
    health: Health = FRESH,
    *,
    attempts: int = 1,
    status: int | None = 500,
    retry_after: float | None = None,
    started: float = 100.0,
    now: float = 100.0,
    disable_after: int = 0,
    jitter: float = 0.5,
    forever: bool = False,
) -> Decision:
    return decide(
        ok=False,
        http_status=status,
        retry_after=retry_after,
        attempts=attempts,
        started=started,
        now=now,
        health=health,
        schedule=SCHEDULE,
        disable_after=disable_after,
        jitter=jitter,
        forever=forever,
    )


def test_success_delivers_and_resets_the_endpoint() -> None:
    d = decide(
        ok=True,
        http_status=204,
        retry_after=None,
        attempts=3,
        started=0.0,
        now=1.0,
        health=Health(7, 3, 50.0, 0.5),
        schedule=SCHEDULE,
        disable_after=10,
        jitter=0.0,
    )
    assert d.status == "delivered"
    assert d.health == Health()
    assert d.retry_in is None and d.disable is None


@pytest.mark.parametrize(("attempts", "step"), [(1, 1.0), (2, 5.0), (3, 30.0)])
@pytest.mark.parametrize("jitter", [0.0, 0.5, 0.999999])
def test_retries_follow_the_schedule_within_twenty_percent(attempts: int, step: float, jitter: float) -> None:
    d = fail(attempts=attempts, jitter=jitter)
    assert d.status == "pending"
    assert d.retry_in is not None
    assert step * 0.8 <= d.retry_in <= step * 1.2
    assert d.retry_in == pytest.approx(step * (0.8 + 0.4 * jitter))


def test_dead_after_the_schedule_plus_one_attempts() -> None:
    assert fail(attempts=len(SCHEDULE)).status == "pending"
    d = fail(attempts=len(SCHEDULE) + 1)
    assert d.status == "dead"
    assert d.retry_in is None
    assert d.health.consecutive_failures == 1


def test_each_failure_counts_and_the_pause_steps_through_the_schedule() -> None:
    h = Health()
    now = 0.0
    pauses = []
    for _ in range(5):
        d = fail(h, started=now, now=now)
        h = d.health
        pauses.append(h.paused_until - now)
        now = h.paused_until  # the probe goes out when the pause ends
    assert h.consecutive_failures == 5
    assert pauses == [1.0, 5.0, 30.0, 30.0, 30.0]  # retry_schedule[min(n, len) - 1]


def test_attempts_already_in_flight_do_not_lengthen_the_pause() -> None:
    first = fail(Health(), started=10.0, now=11.0).health
    assert (first.pause_step, first.paused_until) == (1, 12.0)
    # Started before the first failure was seen: counted, but the pause stays at its step.
    second = fail(first, started=10.5, now=11.2).health
    assert second.consecutive_failures == 2
    assert (second.pause_step, second.paused_until) == (1, 12.0)
    # The probe after the pause started after the last failure: the pause steps forward.
    third = fail(second, started=12.0, now=12.1).health
    assert (third.pause_step, third.paused_until) == (2, 12.1 + 5.0)


def test_capacity_pause_then_one_probe_then_full() -> None:
    assert capacity(Health(), 8, 0.0) == 8
    paused = Health(1, 1, 10.0, 9.0)
    assert capacity(paused, 8, 9.5) == 0
    assert capacity(paused, 8, 10.0) == 1  # one probe at a time until a success
    assert capacity(paused, 8, 99.0) == 1


def test_disable_after_consecutive_failures() -> None:
    h = Health(2, 2, 0.0, 0.0)
    d = fail(h, disable_after=3, started=5.0, now=5.0)
    assert d.status == "held"
    assert d.disable == "3 consecutive failures"
    assert d.health.consecutive_failures == 3
    assert fail(Health(1), disable_after=3).disable is None
    assert fail(Health(50), disable_after=0).disable is None  # 0 = never


def test_gone_disables_at_once_whatever_disable_after_says() -> None:
    for disable_after in (0, 1, 100):
        d = fail(status=410, disable_after=disable_after)
        assert d.status == "held"
        assert d.disable == "gone (HTTP 410)"


def test_disable_wins_over_dead() -> None:
    d = fail(Health(9), attempts=len(SCHEDULE) + 1, disable_after=10)
    assert d.status == "held" and d.disable is not None


@pytest.mark.parametrize("status", [429, 503])
@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [(0.0, 5.0), (7.0, 7.0), (9.99, 9.99), (60.0, 10.0), (3600.0, 10.0)],
)
def test_retry_after_is_bounded_by_step_and_twice_it(status: int, retry_after: float, expected: float) -> None:
    d = fail(attempts=2, status=status, retry_after=retry_after, now=50.0)
    assert d.status == "pending"
    assert d.retry_in == pytest.approx(expected)
    # The whole endpoint waits that long, not only this delivery.
    assert d.health.paused_until >= 50.0 + expected - 1e-9


@pytest.mark.parametrize("status", [500, 502, 404, None])
def test_retry_after_is_ignored_for_other_failures(status: int | None) -> None:
    d = fail(attempts=2, status=status, retry_after=60.0, jitter=0.5)
    assert d.retry_in == pytest.approx(5.0)


def test_a_failure_never_shortens_an_existing_pause() -> None:
    h = Health(3, 3, 500.0, 100.0)
    d = fail(h, started=100.0, now=101.0)
    assert d.health.paused_until == 500.0


# --- the relay to a hub (CONTRACT §14): forever at the last step, never disabled, never dead -----------------


@pytest.mark.parametrize("attempts", [3, 4, 10, 1000])
@pytest.mark.parametrize("status", [500, 503, 404, 401, 302, 410, None])
def test_relay_retries_forever_at_the_last_step(attempts: int, status: int | None) -> None:
    d = fail(attempts=attempts, status=status, forever=True, jitter=0.5)
    assert d.status == "pending" and d.disable is None
    assert d.retry_in == pytest.approx(SCHEDULE[-1])


@pytest.mark.parametrize(("attempts", "step"), [(1, 1.0), (2, 5.0), (3, 30.0)])
def test_relay_follows_the_schedule_first(attempts: int, step: float) -> None:
    d = fail(attempts=attempts, forever=True, jitter=0.0)
    assert d.status == "pending"
    assert d.retry_in == pytest.approx(step * 0.8)


def test_relay_is_never_disabled_past_disable_after() -> None:
    health = FRESH
    now = 100.0
    for n in range(1, 60):
        d = fail(health, attempts=n, forever=True, disable_after=5, started=now, now=now)
        assert d.status == "pending" and d.disable is None, n
        assert d.health.consecutive_failures == n
        health = d.health
        now = health.paused_until
    # the pause steps at most to the schedule's last step: one probe every 30 s, forever
    assert health.pause_step >= len(SCHEDULE)
    assert capacity(health, 8, health.paused_until - 0.001) == 0
    assert capacity(health, 8, health.paused_until) == 1


def test_relay_gone_is_retried_not_disabled() -> None:
    d = fail(status=410, forever=True, disable_after=1)
    assert d.status == "pending" and d.disable is None


def test_relay_retry_after_is_honoured_within_the_last_step() -> None:
    d = fail(attempts=50, status=503, retry_after=45.0, forever=True)
    assert d.status == "pending" and d.retry_in == 45.0
    d = fail(attempts=50, status=503, retry_after=3600.0, forever=True)
    assert d.retry_in == 2 * SCHEDULE[-1]


def test_an_ordinary_endpoint_still_dies_and_is_disabled() -> None:
    assert fail(attempts=4).status == "dead"
    assert fail(status=410).disable == "gone (HTTP 410)"
    assert fail(Health(4, 1, 0.0, 0.0), disable_after=5).disable == "5 consecutive failures"
