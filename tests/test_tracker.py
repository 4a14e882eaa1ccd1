"""The tracker's sweep under a power cut: chunked expiry, commits behind it, order, logs, the dispatcher's yield.

In process, with a real Store (SQLite file) and a real Dispatcher whose endpoint is never called (its scheduler
is not running); the monotonic clock is injected, so silence timeouts pass without sleeping.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from webhookd import tracker as tracker_mod
from webhookd.config import parse_config
from webhookd.dispatch import Dispatcher
from webhookd.presence import DeviceDefaults, Heartbeat, PresenceEngine
from webhookd.store import Store, StoreError
from webhookd.tracker import EXPIRE_CHUNK, LOG_EACH_MAX, Tracker

TIMEOUT = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    clock: Clock
    store: Store
    dispatcher: Dispatcher
    engine: PresenceEngine
    tracker: Tracker


@pytest.fixture
async def rig(tmp_path: Path, store: Store) -> AsyncIterator[Rig]:
    cfg = parse_config(
        {
            "state_dir": str(tmp_path),
            "endpoints": [{"name": "ops", "url": "http://127.0.0.1:9/hook", "events": ["all"]}],
        },
        tmp_path,
        env={},
    )
    clock = Clock()
    dispatcher = Dispatcher(cfg, store, clock=clock)
    await dispatcher.start()
    engine = PresenceEngine(lambda _id: DeviceDefaults(TIMEOUT))
    yield Rig(clock, store, dispatcher, engine, Tracker(engine, store, dispatcher, clock=clock))
    await dispatcher.stop(0)


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def offline_order(store_path: Path) -> list[tuple[str, str]]:
    """(device, event type) of every event, in delivery-id order (= the order they were committed)."""
    with sqlite3.connect(store_path) as c:
        return c.execute("SELECT device_id, type FROM deliveries ORDER BY id").fetchall()


async def online(rig: Rig, n: int) -> list[str]:
    ids = [f"d{i:05d}" for i in range(n)]
    for start in range(0, n, 1000):
        await rig.tracker.heartbeats([Heartbeat(d) for d in ids[start : start + 1000]])
    return ids


async def test_power_cut_is_expired_in_chunks_logged_in_summaries_and_keeps_order(rig: Rig, tmp_path: Path) -> None:
    n = 4 * EXPIRE_CHUNK + 37
    ids = await online(rig, n)
    yields: list[bool] = []
    real_yield = rig.dispatcher.yield_to_sweep

    def spy(on: bool) -> None:
        yields.append(on)
        real_yield(on)

    rig.dispatcher.yield_to_sweep = spy  # type: ignore[method-assign]
    sweep = asyncio.create_task(rig.tracker.sweep_loop())
    try:
        with capture_logs() as logs:
            rig.clock.now += TIMEOUT + 1  # every device is past its deadline at once
            rig.tracker._wake.set()
            # The moment the sweep has taken the last chunk, one device comes back: its online event must follow
            # its offline one, though the offline commit may still be running.
            while rig.engine.devices[ids[-1]].state != "offline":
                await asyncio.sleep(0)
            back = await rig.tracker.heartbeats([Heartbeat(ids[-1])])
            assert back == [(ids[-1], "online", True)]

            async def all_recorded() -> bool:
                counts = await rig.store.delivery_counts()
                return sum(counts.get("ops", {}).values()) == 2 * n + 1  # online, offline, and the one back

            await until(all_recorded)
            await asyncio.sleep(0.05)  # the sweep reaps its commits
    finally:
        sweep.cancel()
        await asyncio.gather(sweep, return_exceptions=True)

    assert all(rig.engine.devices[d].state == "offline" for d in ids[:-1])
    order = [t for d, t in offline_order(tmp_path / "webhookd.db") if d == ids[-1]]
    assert order == ["device.online", "device.offline", "device.online"]
    summaries = [e for e in logs if e["event"] == "devices_offline"]
    singles = [e for e in logs if e["event"] == "device_offline"]
    assert summaries and all(s["count"] > LOG_EACH_MAX and s["reason"] == "timeout" for s in summaries)
    assert all(len(s["devices"]) == tracker_mod.LOG_SAMPLE for s in summaries)
    assert sum(s["count"] for s in summaries) + len(singles) == n  # every offline accounted for, once
    assert True in yields and yields[-1] is False  # the dispatcher held back during the sweep, then went on
    assert rig.dispatcher._yielding is False


async def test_a_failed_offline_commit_is_undone_and_expired_again(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = await online(rig, 3)
    real_record = rig.store.record
    calls = 0

    async def flaky(items):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:
            raise StoreError("disk on fire")
        return await real_record(items)

    monkeypatch.setattr(rig.store, "record", flaky)
    sweep = asyncio.create_task(rig.tracker.sweep_loop())
    try:
        with capture_logs() as logs:
            rig.clock.now += TIMEOUT + 1
            rig.tracker._wake.set()

            async def failed() -> bool:
                return any(e["event"] == "offline_not_recorded" for e in logs)

            await until(failed)
            assert all(rig.engine.devices[d].state == "online" for d in ids)  # undone
            await asyncio.sleep(0.6)  # the store is failing: no retry before SWEEP_RETRY has passed
            assert calls == 1
            rig.clock.now += tracker_mod.SWEEP_RETRY

            async def recorded() -> bool:
                counts = await rig.store.delivery_counts()
                return sum(counts.get("ops", {}).values()) == 6

            await until(recorded)
            assert calls == 2
    finally:
        sweep.cancel()
        await asyncio.gather(sweep, return_exceptions=True)
    assert all(rig.engine.devices[d].state == "offline" for d in ids)
    assert sorted(e["device"] for e in logs if e["event"] == "device_offline") == ids  # small: one line each


async def test_heartbeat_nowait_applies_liveness_at_once_and_hands_back_what_needs_a_commit(
    rig: Rig, tmp_path: Path
) -> None:
    work = rig.tracker.heartbeat_nowait(Heartbeat("a"))  # new device: an event to record
    assert not isinstance(work, tuple) and rig.engine.devices["a"].state == "online"
    assert await work == ("a", "online", True)
    rig.clock.now += 5
    assert rig.tracker.heartbeat_nowait(Heartbeat("a")) == ("a", "online", False)  # done on the spot
    assert rig.engine.devices["a"].last_mono == rig.clock.now
    # While a commit of "a" is in flight, even a liveness heartbeat of "a" waits for it (order of writes).
    unplug = rig.tracker.heartbeat_nowait(Heartbeat("a", state="unplugged"))
    assert not isinstance(unplug, tuple)
    behind = rig.tracker.heartbeat_nowait(Heartbeat("a", state="online"))
    assert not isinstance(behind, tuple) and rig.engine.devices["a"].state == "unplugged"  # not applied yet
    assert await asyncio.gather(unplug, behind) == [("a", "unplugged", True), ("a", "online", True)]
    assert rig.engine.devices["a"].state == "online"
    assert [t for d, t in offline_order(tmp_path / "webhookd.db") if d == "a"] == [
        "device.online",
        "device.unplugged",
        "device.online",
    ]


async def test_stopping_the_sweep_mid_storm_leaves_no_device_gated(rig: Rig) -> None:
    """Shutdown cancels the sweep while chunk commits are queued or running: every commit gate is opened (a
    heartbeat draining at shutdown must not hang), and a chunk that never ran is undone (not offline unrecorded)."""
    ids = await online(rig, 3 * EXPIRE_CHUNK)
    never = asyncio.Event()
    real_record = rig.store.record

    async def stuck(items):  # type: ignore[no-untyped-def]
        await never.wait()
        return await real_record(items)

    rig.store.record = stuck  # type: ignore[method-assign]
    sweep = asyncio.create_task(rig.tracker.sweep_loop())
    rig.clock.now += TIMEOUT + 1
    rig.tracker._wake.set()
    while not rig.tracker._pending:
        await asyncio.sleep(0)
    sweep.cancel()
    await asyncio.gather(sweep, return_exceptions=True)
    assert rig.tracker._pending == {}
    assert rig.dispatcher._yielding is False
    rig.store.record = real_record  # type: ignore[method-assign]
    back = await asyncio.wait_for(rig.tracker.heartbeats([Heartbeat(d) for d in ids]), 5)  # no gate to wait for
    assert {state for _, state, _ in back} == {"online"}
