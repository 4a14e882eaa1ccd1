"""Webhook bodies (CONTRACT §6): exact JSON of every format for every event type."""

from __future__ import annotations

import json
import zlib
from datetime import UTC, datetime
from typing import Any

import pytest

from webhookd.config import EndpointConfig
from webhookd.payloads import (
    EVENT_TYPES,
    TEST_DEVICE_ID,
    EventData,
    kobiton_webhook_id,
    make_test_event,
    new_event_id,
    render,
    rfc3339,
)


def make_endpoint(**overrides: Any) -> EndpointConfig:
    fields: dict[str, Any] = {"name": "ops-bridge", "url": "https://hooks.example.com/devices"}
    return EndpointConfig(**{**fields, **overrides})


T = 1795323840.123  # 2026-11-22T05:04:00.123Z
T_STR = "2026-11-22T05:04:00.123Z"
EID = "evt_0123456789abcdef0123456789abcdef"


def ev(type_: str, **kw: Any) -> EventData:
    base: dict[str, Any] = {
        "id": EID,
        "type": type_,
        "time": T,
        "reason": "reported",
        "device_id": "printer-1",
        "name": "Printer 1",
        "state": type_.removeprefix("device."),
        "previous_state": "online",
        "address": "10.0.0.7",
        "owner": "ops@example.com",
        "last_seen": T,
        "offline_for": None,
    }
    base.update(kw)
    return EventData(**base)


EVENTS: dict[str, EventData] = {
    "online": ev("device.online", reason="heartbeat", previous_state="offline", offline_for=3600.25),
    "offline": ev("device.offline", reason="timeout", last_seen=T - 900),
    "utilizing": ev("device.utilizing"),
    "unplugged": ev("device.unplugged", previous_state="utilizing", name=None, owner=None),
    "address_changed": ev("device.address_changed", reason="heartbeat", state="online", address="10.0.0.8"),
    "still_offline": ev("device.still_offline", reason="timeout", state="offline", offline_for=1800.0, reminder=2),
    # a hub's gateway: the device is the gateway itself
    "gateway_online": ev(
        "gateway.online",
        reason="heartbeat",
        device_id="site-a",
        name="site-a",
        state="online",
        previous_state="offline",
        address="10.0.0.9",
        owner=None,
        offline_for=300.0,
        gateway="site-a",
    ),
    "gateway_offline": ev(
        "gateway.offline",
        reason="timeout",
        device_id="site-a",
        name="site-a",
        state="offline",
        address="10.0.0.9",
        owner=None,
        last_seen=T - 120,
        gateway="site-a",
    ),
    "test": make_test_event(T, EID),
}

WEBHOOKD: dict[str, dict[str, Any]] = {
    "online": {
        "id": EID,
        "type": "device.online",
        "time": T_STR,
        "reason": "heartbeat",
        "device": {
            "id": "printer-1",
            "name": "Printer 1",
            "state": "online",
            "previous_state": "offline",
            "address": "10.0.0.7",
            "owner": "ops@example.com",
            "last_seen": T_STR,
        },
        "offline_for": 3600.25,
        "endpoint": "ops-bridge",
    },
    "offline": {
        "id": EID,
        "type": "device.offline",
        "time": T_STR,
        "reason": "timeout",
        "device": {
            "id": "printer-1",
            "name": "Printer 1",
            "state": "offline",
            "previous_state": "online",
            "address": "10.0.0.7",
            "owner": "ops@example.com",
            "last_seen": "2026-11-22T04:49:00.123Z",
        },
        "offline_for": None,
        "endpoint": "ops-bridge",
    },
    "utilizing": {
        "id": EID,
        "type": "device.utilizing",
        "time": T_STR,
        "reason": "reported",
        "device": {
            "id": "printer-1",
            "name": "Printer 1",
            "state": "utilizing",
            "previous_state": "online",
            "address": "10.0.0.7",
            "owner": "ops@example.com",
            "last_seen": T_STR,
        },
        "offline_for": None,
        "endpoint": "ops-bridge",
    },
    "unplugged": {
        "id": EID,
        "type": "device.unplugged",
        "time": T_STR,
        "reason": "reported",
        "device": {
            "id": "printer-1",
            "name": None,
            "state": "unplugged",
            "previous_state": "utilizing",
            "address": "10.0.0.7",
            "owner": None,
            "last_seen": T_STR,
        },
        "offline_for": None,
        "endpoint": "ops-bridge",
    },
    "address_changed": {
        "id": EID,
        "type": "device.address_changed",
        "time": T_STR,
        "reason": "heartbeat",
        "device": {
            "id": "printer-1",
            "name": "Printer 1",
            "state": "online",
            "previous_state": "online",
            "address": "10.0.0.8",
            "owner": "ops@example.com",
            "last_seen": T_STR,
        },
        "offline_for": None,
        "endpoint": "ops-bridge",
    },
    "still_offline": {
        "id": EID,
        "type": "device.still_offline",
        "time": T_STR,
        "reason": "timeout",
        "device": {
            "id": "printer-1",
            "name": "Printer 1",
            "state": "offline",
            "previous_state": "online",
            "address": "10.0.0.7",
            "owner": "ops@example.com",
            "last_seen": T_STR,
        },
        "offline_for": 1800.0,
        "endpoint": "ops-bridge",
        "reminder": 2,
    },
    "gateway_online": {
        "id": EID,
        "type": "gateway.online",
        "time": T_STR,
        "reason": "heartbeat",
        "device": {
            "id": "site-a",
            "name": "site-a",
            "state": "online",
            "previous_state": "offline",
            "address": "10.0.0.9",
            "owner": None,
            "last_seen": T_STR,
        },
        "offline_for": 300.0,
        "endpoint": "ops-bridge",
        "gateway": "site-a",
    },
    "gateway_offline": {
        "id": EID,
        "type": "gateway.offline",
        "time": T_STR,
        "reason": "timeout",
        "device": {
            "id": "site-a",
            "name": "site-a",
            "state": "offline",
            "previous_state": "online",
            "address": "10.0.0.9",
            "owner": None,
            "last_seen": "2026-11-22T05:02:00.123Z",
        },
        "offline_for": None,
        "endpoint": "ops-bridge",
        "gateway": "site-a",
    },
    "test": {
        "id": EID,
        "type": "webhook.test",
        "time": T_STR,
        "reason": None,
        "device": {
            "id": "webhookd-test",
            "name": "webhookd test",
            "state": "online",
            "previous_state": "online",
            "address": None,
            "owner": None,
            "last_seen": T_STR,
        },
        "offline_for": None,
        "endpoint": "ops-bridge",
    },
}


def _remoteit(address: Any, device: str, email: Any, name: str, state: str, type_: str) -> dict[str, Any]:
    return {
        "Address": address,
        "Device": device,
        "Email": email,
        "Name": name,
        "State": state,
        "Time": T_STR,
        "Type": type_,
    }


REMOTEIT: dict[str, dict[str, Any]] = {
    "online": _remoteit("10.0.0.7", "printer-1", "ops@example.com", "Printer 1", "online", "device_state"),
    "offline": _remoteit("10.0.0.7", "printer-1", "ops@example.com", "Printer 1", "offline", "device_state"),
    "utilizing": _remoteit("10.0.0.7", "printer-1", "ops@example.com", "Printer 1", "utilizing", "device_state"),
    "unplugged": _remoteit("10.0.0.7", "printer-1", None, "printer-1", "unplugged", "device_state"),
    "address_changed": _remoteit("10.0.0.8", "printer-1", "ops@example.com", "Printer 1", "online", "address_changed"),
    "still_offline": _remoteit("10.0.0.7", "printer-1", "ops@example.com", "Printer 1", "offline", "device_state"),
    "gateway_online": _remoteit("10.0.0.9", "site-a", None, "site-a", "online", "device_state"),
    "gateway_offline": _remoteit("10.0.0.9", "site-a", None, "site-a", "offline", "device_state"),
    "test": _remoteit(None, "webhookd-test", None, "webhookd test", "online", "test"),
}

KOBITON_ID = 1741329485  # zlib.crc32(b"ops-bridge") & 0x7fffffff: must never change for a given name


def _kobiton(activity: str, description: str, udid: str, name: str) -> dict[str, Any]:
    return {
        "creationTime": T_STR,
        "eventType": "DEVICE",
        "eventActivity": activity,
        "eventDescription": description,
        "deviceUdid": udid,
        "deviceName": name,
        "orgId": None,
        "webhookId": KOBITON_ID,
        "webhookName": "ops-bridge",
    }


KOBITON: dict[str, dict[str, Any]] = {
    "online": _kobiton("device.status.online", "Online", "printer-1", "Printer 1"),
    "offline": _kobiton("device.status.offline", "Offline", "printer-1", "Printer 1"),
    "utilizing": _kobiton("device.state.utilizing", "Utilizing", "printer-1", "Printer 1"),
    "unplugged": _kobiton("device.state.unplugged", "Unplugged", "printer-1", "printer-1"),
    "address_changed": _kobiton("device.address_changed", "Address changed", "printer-1", "Printer 1"),
    "still_offline": _kobiton("device.status.offline", "Offline", "printer-1", "Printer 1"),
    "gateway_online": _kobiton("device.status.online", "Online", "site-a", "site-a"),
    "gateway_offline": _kobiton("device.status.offline", "Offline", "site-a", "site-a"),
    "test": _kobiton("webhook.test", "Test", "webhookd-test", "webhookd test"),
}

EXPECTED = {"webhookd": WEBHOOKD, "remoteit": REMOTEIT, "kobiton": KOBITON}


def _assert_exact(body: bytes, expected: dict[str, Any]) -> None:
    assert isinstance(body, bytes)
    parsed = json.loads(body)
    assert parsed == expected
    assert list(parsed) == list(expected)  # key order as documented
    # compact: no whitespace between tokens
    assert body == json.dumps(expected, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.mark.parametrize("fmt", ["webhookd", "remoteit", "kobiton"])
@pytest.mark.parametrize("kind", list(EVENTS))
def test_render_exact_shape(fmt: str, kind: str) -> None:
    body = render(EVENTS[kind], make_endpoint(format=fmt))
    _assert_exact(body, EXPECTED[fmt][kind])


def test_every_event_type_is_covered() -> None:
    assert sorted(e.type for e in EVENTS.values()) == sorted(EVENT_TYPES)


@pytest.mark.parametrize("fmt", ["webhookd", "remoteit", "kobiton"])
def test_test_event_uses_test_device_id(fmt: str) -> None:
    body = json.loads(render(make_test_event(), make_endpoint(format=fmt)))
    device = {"webhookd": lambda b: b["device"]["id"], "remoteit": lambda b: b["Device"]}.get(
        fmt, lambda b: b["deviceUdid"]
    )(body)
    assert device == TEST_DEVICE_ID == "webhookd-test"


def test_webhookd_endpoint_name_differs_per_endpoint_same_id() -> None:
    a = json.loads(render(EVENTS["online"], make_endpoint(name="a")))
    b = json.loads(render(EVENTS["online"], make_endpoint(name="b")))
    assert (a["endpoint"], b["endpoint"]) == ("a", "b")
    assert a["id"] == b["id"] == EID


def test_offline_for_rounded_to_milliseconds() -> None:
    body = json.loads(render(ev("device.online", offline_for=12.3456789), make_endpoint()))
    assert body["offline_for"] == 12.346


def test_non_ascii_is_utf8() -> None:
    body = render(ev("device.online", name="Drucker Küche ☕"), make_endpoint(format="remoteit"))
    assert "Drucker Küche ☕".encode() in body
    assert json.loads(body)["Name"] == "Drucker Küche ☕"


@pytest.mark.parametrize("fmt", ["webhookd", "remoteit", "kobiton"])
def test_secret_field(fmt: str) -> None:
    endpoint = make_endpoint(format=fmt, secrets=("s3cret-1", "s3cret-2"), secret_field="SecretKey")
    body = json.loads(render(EVENTS["online"], endpoint))
    assert body["SecretKey"] == "s3cret-1"  # the first secret, top level
    without = dict(body)
    del without["SecretKey"]
    assert without == EXPECTED[fmt]["online"]


def test_secret_field_without_secrets_or_unset() -> None:
    no_secret = make_endpoint(secret_field="SecretKey")
    assert "SecretKey" not in json.loads(render(EVENTS["online"], no_secret))
    unset = make_endpoint(secrets=("zz-secret-zz",), secret_field=None)
    assert b"zz-secret-zz" not in render(EVENTS["online"], unset)


def test_unknown_format_and_type_rejected() -> None:
    with pytest.raises(ValueError):
        render(EVENTS["online"], make_endpoint(format="xml"))
    with pytest.raises(ValueError):
        render(ev("device.exploded"), make_endpoint(format="kobiton"))
    with pytest.raises(ValueError):
        render(ev("device.exploded"), make_endpoint(format="remoteit"))


# --- rfc3339 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (T, T_STR),
        (1795323840, "2026-11-22T05:04:00.000Z"),
        (1795323840.5, "2026-11-22T05:04:00.500Z"),
        (1795323840.0004, "2026-11-22T05:04:00.000Z"),  # rounds down
        (1795323840.0006, "2026-11-22T05:04:00.001Z"),  # rounds up
        (1795323840.9996, "2026-11-22T05:04:01.000Z"),  # carries into the seconds
        (1767225599.9999, "2026-01-01T00:00:00.000Z"),  # ... and into the year
        (951782400.25, "2000-02-29T00:00:00.250Z"),  # leap day
    ],
)
def test_rfc3339(ts: float, expected: str) -> None:
    assert rfc3339(ts) == expected


def test_rfc3339_matches_datetime() -> None:
    for ts in (1.0, 86399.999, 1700000000.042, 2000000000.777, 4102444800.001):
        dt = datetime.fromtimestamp(round(ts, 3), UTC)
        assert rfc3339(ts) == dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


# --- kobiton id ------------------------------------------------------------------------------------------


def test_kobiton_webhook_id_stable() -> None:
    assert kobiton_webhook_id("ops-bridge") == KOBITON_ID
    assert kobiton_webhook_id("ops-bridge") == zlib.crc32(b"ops-bridge") & 0x7FFFFFFF
    ids = {kobiton_webhook_id(f"endpoint-{i}") for i in range(200)}
    assert len(ids) == 200
    assert all(0 <= i < 2**31 for i in ids)
    assert kobiton_webhook_id("Ops-Bridge") != kobiton_webhook_id("ops-bridge")  # names are case-sensitive


# --- EventData storage -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(EVENTS))
def test_event_json_roundtrip(kind: str) -> None:
    event = EVENTS[kind]
    raw = event.to_json()
    assert isinstance(raw, bytes)
    back = EventData.from_json(raw)
    assert back == event
    assert EventData.from_json(raw.decode()) == event
    assert render(back, make_endpoint()) == render(event, make_endpoint())


def test_event_is_frozen() -> None:
    with pytest.raises(AttributeError):
        EVENTS["online"].state = "offline"  # type: ignore[misc]


def test_new_event_id() -> None:
    a, b = new_event_id(), new_event_id()
    assert a != b
    assert a.startswith("evt_") and len(a) == 36
    int(a[4:], 16)
