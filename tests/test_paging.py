"""Memory bounded by the work in flight (issue 9 §2), in process: a real Store with a backlog, a real Dispatcher
with a small window, a real receiver. Every delivery arrives once, in order per device, and the window is
never exceeded, whether the rows were in the store at start, arrive while it pages, or are replayed."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Receiver
from tests.test_retention import event
from webhookd.config import parse_config
from webhookd.dispatch import Dispatcher, lanes, paging
from webhookd.presence import Device
from webhookd.store import Change, Store

WINDOW, LANE_MAX = 64, 8


@pytest.fixture
def small_window(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Shrinks the window and records len(known) after every row taken into memory."""
    for mod in (lanes, paging):
        monkeypatch.setattr(mod, "WINDOW", WINDOW)
    monkeypatch.setattr(lanes, "LANE_MAX", LANE_MAX)
    monkeypatch.setattr(lanes, "REFILL_BELOW", WINDOW // 2)
    sizes: list[int] = []
    real = lanes.EndpointRuntime._insert

    def insert(self: lanes.EndpointRuntime, *args: Any) -> None:
        real(self, *args)
        sizes.append(len(self.known))

    monkeypatch.setattr(lanes.EndpointRuntime, "_insert", insert)
    return sizes


async def record(store: Store, d: Dispatcher, devices: list[str]) -> None:
    changes = []
    for dev_id in devices:
        ev = event(time.time(), dev_id)
        changes.append(Change(Device(dev_id, "online", last_seen=ev.time, changed_at=ev.time), ev, d.targets(ev)))
    d.enqueue(await store.record(changes))


@pytest.fixture
async def rig(tmp_path: Path, store: Store) -> AsyncIterator[tuple[Dispatcher, Receiver]]:
    receiver = await Receiver().start()
    cfg = parse_config(
        {
            "state_dir": str(tmp_path),
            "endpoints": [{"name": "ops", "url": receiver.url, "events": ["all"], "concurrency": 4}],
        },
        tmp_path,
        env={},
    )
    yield Dispatcher(cfg, store), receiver
    await receiver.stop()


async def arrived(receiver: Receiver, n: int) -> None:
    """Wait (at most 20 s) until `n` webhooks arrived, then a moment for any that would arrive twice."""
    for _ in range(400):
        if len(receiver.got) >= n:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)


def order_by_device(receiver: Receiver) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in receiver.got:
        out.setdefault(r.json["device"]["id"], []).append(r.json["id"])
    return out


async def test_a_backlog_is_paged_in_order_within_the_window(
    small_window: list[int], store: Store, rig: tuple[Dispatcher, Receiver]
) -> None:
    d, receiver = rig
    await d.start()
    # 600 rows before the dispatcher runs: a busy device with 200, 40 others with 10, interleaved.
    devices = ["busy"] * 200 + [f"d{i}" for i in range(40)] * 10
    random.Random(1).shuffle(devices)
    sent: dict[str, list[str]] = {}
    for i in range(0, len(devices), 50):
        chunk = devices[i : i + 50]
        await record(store, d, chunk)
    for ev_id, dev in await store.read(
        lambda c: c.execute("SELECT event_id, device_id FROM deliveries ORDER BY id").fetchall()
    ):
        sent.setdefault(dev, []).append(ev_id)
    run = asyncio.create_task(d.run())
    try:
        # More while it pages: left to the pages, never overtaking the device's older rows.
        await record(store, d, ["busy"] * 30 + ["late"] * 5)
        for ev_id, dev in await store.read(
            lambda c: c.execute("SELECT event_id, device_id FROM deliveries WHERE id > 600 ORDER BY id").fetchall()
        ):
            sent.setdefault(dev, []).append(ev_id)
        total = sum(len(v) for v in sent.values())
        await arrived(receiver, total)
        assert len(receiver.got) == total == 635
        assert order_by_device(receiver) == sent
        assert max(small_window) <= WINDOW
        counts = (await store.delivery_counts())["ops"]
        assert counts == {"delivered": 635}
        rt = d.endpoints["ops"]
        assert not rt.known and not rt.lanes and not rt.more
    finally:
        await d.stop(1.0)
        await asyncio.gather(run, return_exceptions=True)


async def test_replayed_rows_beyond_the_window_come_back_in_order(
    small_window: list[int], store: Store, rig: tuple[Dispatcher, Receiver]
) -> None:
    d, receiver = rig
    await d.start()
    run = asyncio.create_task(d.run())
    try:
        await record(store, d, [f"d{i % 5}" for i in range(200)])
        await arrived(receiver, 200)
        first = order_by_device(receiver)
        receiver.got.clear()
        done = await d.replay(None, "ops", "delivered")
        assert done.total == 200 and done.first_pending == {"ops": 1} and done.held == 0
        await arrived(receiver, 200)
        assert order_by_device(receiver) == first
        assert max(small_window) <= WINDOW
    finally:
        await d.stop(1.0)
        await asyncio.gather(run, return_exceptions=True)


async def test_an_enable_delivers_a_held_backlog_bigger_than_the_window_in_order(
    small_window: list[int], store: Store, rig: tuple[Dispatcher, Receiver]
) -> None:
    d, receiver = rig
    await d.start()
    run = asyncio.create_task(d.run())
    try:
        await d.disable("ops", "operator")
        devices = [f"d{i % 7}" for i in range(300)]
        for i in range(0, 300, 60):
            await record(store, d, devices[i : i + 60])  # recorded as held: the endpoint is disabled
        assert (await store.delivery_counts())["ops"] == {"held": 300}
        sent: dict[str, list[str]] = {}
        for ev_id, dev in await store.read(
            lambda c: c.execute("SELECT event_id, device_id FROM deliveries ORDER BY id").fetchall()
        ):
            sent.setdefault(dev, []).append(ev_id)
        await d.enable("ops")
        await arrived(receiver, 300)
        assert order_by_device(receiver) == sent
        assert max(small_window) <= WINDOW
        assert (await store.delivery_counts())["ops"] == {"delivered": 300}
    finally:
        await d.stop(1.0)
        await asyncio.gather(run, return_exceptions=True)
