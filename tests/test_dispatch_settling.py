"""Receipts waiting for their commit ("settling" lane heads) across disable/enable, in process: a real Store, a
real Dispatcher and a real local receiver; the store's outcome saves are held back on demand."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Receiver, eventually
from tests.test_retention import event
from webhookd.config import parse_config
from webhookd.dispatch import Dispatcher
from webhookd.presence import Device
from webhookd.store import Change, EndpointRow, Receipt, Store, StoreUnavailable


class HeldSaves:
    """Wraps Store.save_receipts: while `hold` is clear, saves wait; `fail` makes the next saves fail."""

    def __init__(self, store: Store) -> None:
        self.real = store.save_receipts
        self.hold = asyncio.Event()
        self.hold.set()
        self.fail = 0
        self.waiting = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, receipts: Sequence[Receipt], endpoints: Sequence[EndpointRow]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        rows = [replace(e) for e in endpoints]  # copied when queued, as the store does

        async def later() -> None:
            self.waiting += 1
            try:
                await self.hold.wait()
            finally:
                self.waiting -= 1
            if self.fail:
                self.fail -= 1
                fut.set_exception(StoreUnavailable("store unavailable: injected"))
                return
            try:
                await self.real(receipts, rows)
            except Exception as e:
                fut.set_exception(e)
            else:
                fut.set_result(None)

        task = asyncio.get_running_loop().create_task(later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fut


@pytest.fixture
async def rig(tmp_path: Path, store: Store) -> AsyncIterator[tuple[Dispatcher, Store, Receiver, HeldSaves]]:
    receiver = await Receiver().start()
    cfg = parse_config(
        {"state_dir": str(tmp_path), "endpoints": [{"name": "ops", "url": receiver.url, "events": ["all"]}]},
        tmp_path,
        env={},
    )
    saves = HeldSaves(store)
    store.save_receipts = saves  # type: ignore[method-assign]
    dispatcher = Dispatcher(cfg, store)
    await dispatcher.start()
    run = asyncio.create_task(dispatcher.run())
    yield dispatcher, store, receiver, saves
    saves.hold.set()
    await dispatcher.stop(1.0)
    run.cancel()
    await asyncio.gather(run, return_exceptions=True)
    await receiver.stop()


async def one_event(dispatcher: Dispatcher, store: Store, device: str = "d1") -> None:
    ev = event(time.time(), device)
    dev = Device(device, "online", last_seen=ev.time, changed_at=ev.time)
    dispatcher.enqueue(await store.record([Change(dev, ev, dispatcher.targets(ev))]))


async def statuses(store: Store) -> dict[str, Any]:
    return (await store.delivery_counts()).get("ops", {})


async def test_disable_enable_while_a_receipt_settles_sends_nothing_twice(rig: Any) -> None:
    dispatcher, store, receiver, saves = rig
    saves.hold.clear()
    await one_event(dispatcher, store)
    await eventually(lambda: len(receiver.got) == 1 and saves.waiting == 1, timeout=5)
    await dispatcher.disable("ops", "operator")
    enabling = asyncio.create_task(dispatcher.enable("ops"))  # its release waits behind the held save
    await asyncio.sleep(0.3)
    saves.hold.set()
    await enabling
    await asyncio.sleep(0.5)
    assert len(receiver.got) == 1  # the settling head was skipped by enable's reload, not sent again
    assert await statuses(store) == {"delivered": 1}
    assert not dispatcher.endpoints["ops"].lanes and dispatcher.endpoints["ops"].unsaved == 0


async def test_a_receipt_that_cannot_be_saved_after_its_lane_was_dropped_is_queued_again(rig: Any) -> None:
    dispatcher, store, receiver, saves = rig
    saves.hold.clear()
    saves.fail = 1
    await one_event(dispatcher, store)
    await eventually(lambda: len(receiver.got) == 1 and saves.waiting == 1, timeout=5)
    await dispatcher.disable("ops", "operator")
    enabling = asyncio.create_task(dispatcher.enable("ops"))
    await asyncio.sleep(0.3)
    saves.hold.set()  # the receipt's save fails: the row is still pending in the store
    await enabling

    async def delivered() -> bool:
        return await statuses(store) == {"delivered": 1}

    for _ in range(100):
        if await delivered():
            break
        await asyncio.sleep(0.05)
    assert await delivered()  # sent again (at-least-once), not stranded until a restart
    assert len(receiver.got) == 2
    assert not dispatcher.endpoints["ops"].lanes


async def test_a_settling_head_keeps_its_place_when_an_older_row_is_added(rig: Any) -> None:
    """A replayed older delivery of the same device arrives while the head's receipt settles: the head stays
    first, its lane moves on when the receipt is saved, and the older one is delivered after it."""
    dispatcher, store, receiver, saves = rig
    await one_event(dispatcher, store)
    await eventually(lambda: len(receiver.got) == 1, timeout=5)
    await eventually(lambda: not dispatcher.endpoints["ops"].lanes, timeout=5)
    first_id = next(iter(await store.read(lambda c: [r[0] for r in c.execute("SELECT id FROM deliveries")])))
    await store.write(lambda c: c.execute("UPDATE deliveries SET status='dead' WHERE id=?", (first_id,)))
    saves.hold.clear()
    await one_event(dispatcher, store)  # the second event of d1: delivered, its receipt held
    await eventually(lambda: len(receiver.got) == 2 and saves.waiting == 1, timeout=5)
    assert (await dispatcher.replay([first_id], None, None)).total == 1  # the older row, while the head settles
    saves.hold.set()
    await eventually(lambda: len(receiver.got) == 3, timeout=5)
    await eventually(lambda: not dispatcher.endpoints["ops"].lanes, timeout=5)
    assert await statuses(store) == {"delivered": 2}
