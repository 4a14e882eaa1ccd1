"""The retry, pause and disable policy of CONTRACT §7, as pure functions of their inputs and `now`.

No I/O, no clock and no randomness of its own: the dispatcher passes the attempt's result, the delivery's
attempt count, the endpoint's failure state, the monotonic `now` and a jitter draw in [0, 1), and applies the
Decision it gets back. Every rule is unit-tested in milliseconds (tests/test_retry.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from webhookd.states import DeliveryStatus

JITTER = 0.2  # retry delays are the schedule step +-20%


@dataclass(frozen=True, slots=True)
class Health:
    """An endpoint's failure state. `consecutive_failures` is persisted (the endpoints table); the pause is
    kept in memory only (a restart probes at once)."""

    consecutive_failures: int = 0
    pause_step: int = 0  # how far into the retry schedule the endpoint's pause has stepped
    paused_until: float = 0.0  # monotonic: no attempt starts before this
    last_failure: float = -1.0  # monotonic time of the last failed attempt


@dataclass(frozen=True, slots=True)
class Decision:
    status: DeliveryStatus  # what the delivery becomes
    health: Health  # the endpoint's failure state after this attempt
    retry_in: float | None = None  # seconds until the next attempt (status pending)
    disable: str | None = None  # the endpoint is disabled, for this reason (status held)


def capacity(health: Health, concurrency: int, now: float) -> int:
    """How many attempts an endpoint may have in flight now: none while paused, one probe after a pause,
    its full concurrency once a success reopened it."""
    if health.consecutive_failures == 0:
        return concurrency
    return 0 if now < health.paused_until else 1


def decide(
    *,
    ok: bool,
    http_status: int | None,
    retry_after: float | None,
    attempts: int,
    started: float,
    now: float,
    health: Health,
    schedule: Sequence[float],
    disable_after: int,
    jitter: float,
    forever: bool = False,
) -> Decision:
    """The outcome of one attempt. `attempts` counts the attempts made, this one included; `started` is the
    monotonic time the attempt began; `jitter` is a uniform draw in [0, 1).

    `forever` (the relay to a hub, CONTRACT §14): never disabled (not by `disable_after`, not by a 410) and
    never dead; past the schedule it retries at its last step, whatever the answer."""
    if ok:
        return Decision("delivered", Health())
    failures = health.consecutive_failures + 1
    pause_step, paused_until = health.pause_step, health.paused_until
    # Attempts already in flight when the endpoint started failing do not lengthen its pause: the pause steps
    # forward once per probe, i.e. at the retry pace.
    if pause_step == 0 or started >= health.last_failure:
        pause_step += 1
        paused_until = max(paused_until, now + schedule[min(pause_step, len(schedule)) - 1])
    after = Health(failures, pause_step, paused_until, now)
    if forever:
        step = schedule[min(attempts, len(schedule)) - 1]
    elif http_status == 410:
        return Decision("held", after, disable="gone (HTTP 410)")
    elif disable_after and failures >= disable_after:
        return Decision("held", after, disable=f"{failures} consecutive failures")
    elif attempts > len(schedule):
        return Decision("dead", after)
    else:
        step = schedule[attempts - 1]
    delay = step * (1 - JITTER + 2 * JITTER * jitter)
    if retry_after is not None and http_status in (429, 503):
        # The receiver said when: honoured within [step, 2 x step], and the whole endpoint waits that long.
        delay = min(max(retry_after, step), 2 * step)
        after = Health(failures, pause_step, max(paused_until, now + delay), now)
    return Decision("pending", after, retry_in=delay)
