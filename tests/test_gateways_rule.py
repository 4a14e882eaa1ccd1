"""The gateway liveness rules (webhookd/gateways.py, CONTRACT §14), pure: a stored row (or none) and `now` in, the
new row and the event (or none) out."""

from __future__ import annotations

import dataclasses

from webhookd import gateways
from webhookd.gateways import GatewayRow, Seen

T0 = 1_790_000_000.0
TIMEOUT = 120.0


def test_the_first_heartbeat_makes_gateway_online_from_unknown() -> None:
    row, event = gateways.seen(None, "site-a", T0, TIMEOUT, Seen("10.0.0.9", devices=4))
    assert row == GatewayRow(
        "site-a", "online", last_seen=T0, deadline=T0 + TIMEOUT, changed_at=T0, address="10.0.0.9", devices=4
    )
    assert event is not None
    assert (event.type, event.reason, event.state, event.previous_state) == (
        "gateway.online",
        "heartbeat",
        "online",
        "unknown",
    )
    assert (event.device_id, event.name, event.address, event.gateway) == ("site-a", "site-a", "10.0.0.9", "site-a")
    assert event.time == T0 and event.offline_for is None and event.id.startswith("evt_")


def test_a_row_in_state_unknown_is_a_first_heartbeat_too() -> None:
    # a gateway whose requests were refused so far has a row (its last_error) but was never online
    stored = GatewayRow("site-a", last_error="401 invalid Webhookd-Signature")
    row, event = gateways.seen(stored, "site-a", T0, TIMEOUT, Seen("10.0.0.9"))
    assert event is not None and event.previous_state == "unknown"
    assert row.last_error == "401 invalid Webhookd-Signature"  # kept: the last refusal


def test_heartbeats_while_online_only_move_the_deadline() -> None:
    row, _ = gateways.seen(None, "site-a", T0, TIMEOUT, Seen("10.0.0.9", devices=4))
    later, event = gateways.seen(row, "site-a", T0 + 30, TIMEOUT, Seen("10.0.0.10", relayed=1))
    assert event is None
    assert later == dataclasses.replace(
        row, last_seen=T0 + 30, deadline=T0 + 30 + TIMEOUT, address="10.0.0.10", relayed=1
    )
    assert later.devices == 4 and later.changed_at == T0  # a relay says no count: the heartbeat's stays


def test_the_deadline_check_makes_exactly_one_offline() -> None:
    row, _ = gateways.seen(None, "site-a", T0, TIMEOUT, Seen("10.0.0.9"))
    assert gateways.check(row, T0 + TIMEOUT - 0.001) is None
    flip = gateways.check(row, T0 + TIMEOUT)
    assert flip is not None
    off, event = flip
    assert (off.state, off.changed_at, off.deadline) == ("offline", T0 + TIMEOUT, None)
    assert (event.type, event.reason, event.state, event.previous_state) == (
        "gateway.offline",
        "timeout",
        "offline",
        "online",
    )
    assert event.last_seen == T0 and event.address == "10.0.0.9" and event.device_id == "site-a"
    # checked again (by this process or another one that read the new row): nothing more
    assert gateways.check(off, T0 + TIMEOUT + 5) is None


def test_unknown_gateways_never_time_out() -> None:
    assert gateways.check(GatewayRow("site-a"), T0 + 10 * TIMEOUT) is None
    assert gateways.check(GatewayRow("site-a", last_error="401 x"), T0) is None


def test_back_after_offline_is_online_with_offline_for() -> None:
    row, _ = gateways.seen(None, "site-a", T0, TIMEOUT, Seen("10.0.0.9"))
    flip = gateways.check(row, T0 + TIMEOUT + 0.2)
    assert flip is not None
    back, event = gateways.seen(flip[0], "site-a", T0 + 500, TIMEOUT, Seen("10.0.0.11"))
    assert event is not None
    assert (event.type, event.reason, event.previous_state) == ("gateway.online", "heartbeat", "offline")
    assert event.offline_for is not None and abs(event.offline_for - (500 - TIMEOUT - 0.2)) < 1e-6
    assert (back.state, back.changed_at, back.deadline, back.address) == (
        "online",
        T0 + 500,
        T0 + 500 + TIMEOUT,
        "10.0.0.11",
    )


def test_a_restart_gives_online_gateways_a_full_timeout() -> None:
    row, _ = gateways.seen(None, "site-a", T0, TIMEOUT, Seen(None))
    # the hub was down for longer than the timeout: the deadline has passed, but nobody was there to see it
    later = gateways.restart(row, T0 + 1000, TIMEOUT)
    assert later is not None and later.deadline == T0 + 1000 + TIMEOUT and later.state == "online"
    assert gateways.check(later, T0 + 1000 + TIMEOUT - 1) is None
    # a deadline later than that already, an offline or an unknown gateway: nothing to do
    assert gateways.restart(row, T0, TIMEOUT / 2) is None
    assert gateways.restart(GatewayRow("site-a", "offline", changed_at=T0), T0 + 1, TIMEOUT) is None
    assert gateways.restart(GatewayRow("site-a"), T0 + 1, TIMEOUT) is None


def test_probe_event_and_short_error() -> None:
    probe = gateways.probe_event("site-a", gateways.OFFLINE_TYPE)
    assert (probe.type, probe.device_id) == ("gateway.offline", "site-a")
    assert gateways.short_error(401, "invalid\nsignature") == "401 invalid signature"
    long = gateways.short_error(400, "x" * 500)
    assert len(long) == gateways.ERROR_MAX and long.endswith("…")


def test_a_device_is_stale_while_the_gateway_that_relays_it_is_offline() -> None:
    from webhookd.admin import _stale

    assert _stale("site-a:printer-1", {"site-a"}) and not _stale("site-a:printer-1", {"site-b"})
    assert _stale("eu:site-a:printer-1", {"eu:site-a"})  # a gateway name may hold ':'
    assert not _stale("site-a", {"site-a"}) and not _stale("site-ab:x", {"site-a"}) and not _stale("x:y", set())
