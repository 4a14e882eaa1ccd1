"""docs/reference.md's payload fields against the payloads the code builds (issue 10, item 6: a test fails when
code and reference disagree). tests/test_reference.py checks commands, config, routes, events, headers, log
events and metrics; these are the JSON bodies of the formats whose fields are documented by name."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from webhookd.payloads import EVENT_TYPES, EventData, _kobiton, _remoteit, webhookd_object

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference.md"


def section(title: str) -> str:
    """The text of the reference's `### {title}` section, up to the next heading."""
    text = REFERENCE.read_text()
    start = text.index(f"### {title}\n")
    end = re.search(r"^#{2,3} ", text[start + 4 :], re.MULTILINE)
    return text[start : start + 4 + end.start()] if end else text[start:]


def event(kind: str, **extra: Any) -> EventData:
    fields: dict[str, Any] = {
        "id": "evt_" + "0" * 32,
        "type": kind,
        "time": 1_790_000_000.0,
        "reason": "heartbeat",
        "device_id": "printer-1",
        "name": "Printer",
        "state": "online",
        "previous_state": "offline",
        "address": "10.0.0.7",
        "owner": "ops@example.com",
        "last_seen": 1_790_000_000.0,
        "offline_for": 42.0,
    }
    return EventData(**{**fields, **extra})


# every optional field present once: a still_offline reminder relayed through a hub's gateway
EVENTS = [event(kind) for kind in EVENT_TYPES] + [event("device.still_offline", reminder=2, gateway="gw-1")]


def paths(obj: dict[str, Any], prefix: str = "") -> set[str]:
    """``{"device": {"id": ..}}`` -> ``{"device.id"}``: the dotted names the reference's table uses."""
    out: set[str] = set()
    for key, value in obj.items():
        name = prefix + key
        out |= paths(value, name + ".") if isinstance(value, dict) else {name}
    return out


def documented_webhookd_fields() -> set[str]:
    """The first column of the `format: webhookd` table: `` `device.name`, `device.owner` `` names two."""
    rows = [line for line in section("Payload, `format: webhookd`").splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([^`]+)`", row.split("|")[1])}


def test_webhookd_format_fields_are_the_documented_ones() -> None:
    built = set().union(*(paths(webhookd_object(e, "ops")) for e in EVENTS))
    documented = documented_webhookd_fields()
    assert built - documented == set(), "fields the reference does not name"
    assert documented - built == set(), "fields the reference names that no payload has"


@pytest.mark.parametrize(
    ("title", "build"),
    [
        ("Payload, `format: remoteit`", lambda e: _remoteit(e)),
        ("Payload, `format: kobiton`", lambda e: _kobiton(e, "ops")),
    ],
)
def test_every_field_of_the_other_json_formats_is_documented(title: str, build: Any) -> None:
    text = section(title)
    fields = set().union(*(build(e).keys() for e in EVENTS if e.type in _types_of(build)))
    missing = sorted(f for f in fields if f"`{f}`" not in text)
    assert missing == [], f"{title}: not in the reference"


def _types_of(build: Any) -> set[str]:
    """The event types a format renders (it refuses any other with ValueError)."""
    ok = set()
    for kind in EVENT_TYPES:
        try:
            build(event(kind))
        except ValueError:
            continue
        ok.add(kind)
    assert ok, "a format that renders no event type"
    return ok
