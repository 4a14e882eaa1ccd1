"""Tracker.forget and mutes in process (issue 12): the commit in flight is waited for, a failed delete keeps the
device, a muted device's events are recorded without deliveries and counted."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from tests.test_tracker import Rig, rig  # noqa: F401  (the fixture)
from webhookd.mutes import MuteRule
from webhookd.presence import Heartbeat
from webhookd.store import StoreError


def rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as c:
        return c.execute(sql).fetchall()


async def test_forget_waits_for_the_device_s_commit_in_flight(rig: Rig, tmp_path: Path) -> None:  # noqa: F811
    first = asyncio.create_task(rig.tracker.heartbeats([Heartbeat("x")]))
    await asyncio.sleep(0)  # applied, its commit in flight
    assert "x" in rig.tracker._pending
    assert await rig.tracker.forget("x") is True
    assert first.done() and first.result()[0].changed
    assert "x" not in rig.engine.devices and not rig.tracker._pending
    assert [d.id for d in await rig.store.load_devices()] == []
    db = tmp_path / "webhookd.db"
    assert rows(db, "SELECT device_id, type FROM events") == [("x", "device.online")]  # its past stays
    assert rows(db, "SELECT device_id, status FROM deliveries") == [("x", "pending")]
    # A later heartbeat makes it a new device.
    [answer] = await rig.tracker.heartbeats([Heartbeat("x")])
    assert answer.changed
    assert await rig.tracker.forget("nobody") is False


async def test_a_failed_delete_keeps_the_device(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    await rig.tracker.heartbeats([Heartbeat("x")])
    rig.tracker.mutes.add(MuteRule("x", None))

    async def broken(_device_id: str) -> bool:
        raise StoreError("disk full")

    monkeypatch.setattr(rig.store, "forget_device", broken)
    with pytest.raises(StoreError):
        await rig.tracker.forget("x")
    assert rig.engine.devices["x"].state == "online" and rig.tracker.mutes.get("x") is not None
    assert not rig.tracker._pending
    [answer] = await rig.tracker.heartbeats([Heartbeat("x")])
    assert not answer.changed  # the same device, not a new one


async def test_a_muted_device_s_events_are_recorded_without_deliveries(rig: Rig, tmp_path: Path) -> None:  # noqa: F811
    suppressed: list[str] = []
    rig.tracker.on_suppressed = suppressed.append
    rig.tracker.mutes.add(MuteRule("m-*", None))
    await rig.tracker.heartbeats([Heartbeat("m-1"), Heartbeat("n-1"), Heartbeat("m-2", "shutdown")])
    db = tmp_path / "webhookd.db"
    assert sorted(rows(db, "SELECT device_id, type FROM events")) == [
        ("m-1", "device.online"),
        ("n-1", "device.online"),
    ]
    assert rows(db, "SELECT device_id FROM deliveries") == [("n-1",)]
    assert suppressed == ["muted"]
    assert await rig.tracker.forget("m-1")
    assert rig.tracker.mutes.get("m-*") is not None  # a glob is not the device's own mute
