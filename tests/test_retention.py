"""Retention: pruning delivered/dead deliveries and orphaned events, incremental vacuum, the background loop."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from tests.harness import Daemon, Receiver, endpoint, eventually
from webhookd.payloads import EventData, new_event_id
from webhookd.presence import Device
from webhookd.states import DeliveryStatus
from webhookd.store import Change, Store, StoreUnavailable, retention_loop

DAY = 86400.0
RETENTION = 7 * DAY


def event(t: float, device: str = "dev-1") -> EventData:
    return EventData(
        id=new_event_id(),
        type="device.online",
        time=t,
        reason="heartbeat",
        device_id=device,
        name=None,
        state="online",
        previous_state="unknown",
        address="10.0.0.1",
        owner=None,
        last_seen=t,
        offline_for=None,
    )


async def add(
    store: Store, t: float, targets: Sequence[tuple[str, DeliveryStatus]], device: str = "dev-1"
) -> EventData:
    """One event at wall time `t` (created_at = updated_at = t) with one delivery per (endpoint, status)."""
    ev = event(t, device)
    await store.record([Change(Device(id=device, state="online", last_seen=t, changed_at=t), ev, list(targets))])
    return ev


async def finish(store: Store, event_id: str, status: str, updated_at: float) -> None:
    """What the dispatcher's receipt does, at a chosen time."""

    def op(c: sqlite3.Connection) -> None:
        c.execute("UPDATE deliveries SET status=?, updated_at=? WHERE event_id=?", (status, updated_at, event_id))

    await store.write(op)


async def rows(store: Store) -> list[tuple[str, str, str]]:
    return await store.read(
        lambda c: c.execute("SELECT event_id, endpoint, status FROM deliveries ORDER BY id").fetchall()
    )


async def event_ids(store: Store) -> set[str]:
    return {r[0] for r in await store.read(lambda c: c.execute("SELECT id FROM events").fetchall())}


async def pragma(store: Store, name: str) -> int:
    return int(await store.read(lambda c: c.execute(f"PRAGMA {name}").fetchone()[0]))


async def test_new_database_uses_incremental_auto_vacuum(store: Store, tmp_path: Path) -> None:
    assert store.auto_vacuum == 2
    with sqlite3.connect(tmp_path / "webhookd.db") as c:
        assert c.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        indexes = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"deliveries_by_age", "events_by_time"} <= indexes


async def test_prune_removes_only_old_delivered_and_dead(store: Store) -> None:
    now = time.time()
    old = now - 10 * DAY
    delivered = await add(store, old, [("a", "pending"), ("b", "pending")])
    await finish(store, delivered.id, "delivered", old)
    dead = await add(store, old, [("a", "pending")])
    await finish(store, dead.id, "dead", old)
    pending = await add(store, old, [("a", "pending")])  # retrying for 10 days: kept, whatever its age
    held = await add(store, old, [("b", "held")])  # endpoint disabled: kept until re-enabled
    recent = await add(store, now - 60, [("a", "pending")])
    await finish(store, recent.id, "delivered", now - 60)
    # delivered long ago, then replayed and delivered again just now: updated_at counts, not created_at
    replayed = await add(store, old, [("a", "pending")])
    await finish(store, replayed.id, "delivered", now - 5)
    orphan_old = await add(store, old, [])  # no endpoint subscribed
    orphan_recent = await add(store, now - 60, [])

    deliveries, events, _pages = await store.prune(now - RETENTION)
    assert (deliveries, events) == (3, 3)
    assert await rows(store) == [
        (pending.id, "a", "pending"),
        (held.id, "b", "held"),
        (recent.id, "a", "delivered"),
        (replayed.id, "a", "delivered"),
    ]
    assert await event_ids(store) == {pending.id, held.id, recent.id, replayed.id, orphan_recent.id}
    assert orphan_old.id not in await event_ids(store)
    assert await store.prune(now - RETENTION) == (0, 0, 0)  # nothing left to do
    # the pending one is still deliverable (its event row is intact)
    assert [r.event.id for r in await store.load_pending_page("a", 0, 100)] == [pending.id]


async def test_prune_counts(store: Store) -> None:
    now = time.time()
    old = now - 10 * DAY
    for status in ("delivered", "dead"):
        ev = await add(store, old, [("a", "pending"), ("b", "pending")])
        await finish(store, ev.id, status, old)
    await add(store, old, [])
    deliveries, events, _pages = await store.prune(now - RETENTION)
    assert (deliveries, events) == (4, 3)


async def test_prune_runs_in_small_transactions_and_lets_other_writes_through(store: Store) -> None:
    old = time.time() - 10 * DAY

    def bulk(c: sqlite3.Connection) -> None:
        c.executemany(
            "INSERT INTO events (id, type, device_id, created_at, data) VALUES (?, 'device.online', 'd', ?, x'7b7d')",
            [(f"evt_{i:032x}", old) for i in range(1200)],
        )
        c.executemany(
            "INSERT INTO deliveries (event_id, endpoint, device_id, type, status, created_at, updated_at)"
            " VALUES (?, 'a', 'd', 'device.online', 'delivered', ?, ?)",
            [(f"evt_{i:032x}", old, old) for i in range(1200)],
        )

    await store.write(bulk)
    sizes: list[int] = []
    real_write = store.write

    async def counting_write(op: Any, rows: int = 1) -> Any:
        result = await real_write(op, rows)
        if result is not None:  # prune steps, not the heartbeat's write
            sizes.append(result[0] if isinstance(result, tuple) else result)
        return result

    store.write = counting_write  # type: ignore[method-assign]
    pruning = asyncio.create_task(store.prune(time.time() - RETENTION, batch=500))
    await asyncio.sleep(0)  # the prune's first batch is queued
    # a heartbeat's write queued while the prune runs commits long before the prune is done
    await store.save_devices([Device(id="hb", state="online", last_seen=time.time())])
    assert not pruning.done()
    deliveries, events, _ = await pruning
    assert (deliveries, events) == (1200, 1200)
    assert sizes[:3] == [500, 500, 200]  # deliveries: 3 transactions
    assert sizes[3:6] == [500, 500, 200]  # events: 3 more
    assert len(await store.load_devices()) == 1


async def test_old_events_still_referenced_do_not_stall_the_event_sweep(store: Store) -> None:
    old = time.time() - 10 * DAY
    held = [await add(store, old - i, [("b", "held")]) for i in range(7)]  # the oldest: at the front
    gone = [await add(store, old + i, []) for i in range(5)]
    _, events, _ = await store.prune(time.time() - RETENTION, batch=3)
    assert events == 5
    assert await event_ids(store) == {e.id for e in held}
    assert not {e.id for e in gone} & await event_ids(store)


async def test_incremental_vacuum_gives_space_back(store: Store, tmp_path: Path) -> None:
    old = time.time() - 10 * DAY
    blob = b'{"pad": "' + b"x" * 400 + b'"}'

    def bulk(c: sqlite3.Connection) -> None:
        c.executemany(
            "INSERT INTO events (id, type, device_id, created_at, data) VALUES (?, 'device.online', 'd', ?, ?)",
            [(f"evt_{i:032x}", old, blob) for i in range(6000)],
        )
        c.executemany(
            "INSERT INTO deliveries (event_id, endpoint, device_id, type, status, last_error, created_at,"
            " updated_at) VALUES (?, 'a', 'd', 'device.online', 'dead', ?, ?, ?)",
            [(f"evt_{i:032x}", "HTTP 500 " + "e" * 200, old, old) for i in range(6000)],
        )

    await store.write(bulk)
    keep = await add(store, time.time(), [("a", "pending")])
    await store.read(lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
    db = tmp_path / "webhookd.db"
    pages_before, size_before = await pragma(store, "page_count"), db.stat().st_size
    assert pages_before > 1000

    deliveries, events, vacuumed = await store.prune(time.time() - RETENTION, vacuum_pages=256)
    assert (deliveries, events) == (6000, 6000)
    assert vacuumed > 1000
    assert await pragma(store, "freelist_count") == 0
    pages_after = await pragma(store, "page_count")
    assert pages_after < pages_before / 10
    await store.read(lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())
    assert db.stat().st_size < size_before / 10
    assert await event_ids(store) == {keep.id}
    assert await store.read(lambda c: c.execute("PRAGMA integrity_check").fetchone()[0]) == "ok"


async def test_database_without_auto_vacuum_is_left_alone_and_logged(tmp_path: Path) -> None:
    path = tmp_path / "webhookd.db"
    s = Store(path)
    await s.open()
    await s.close()
    with sqlite3.connect(path, isolation_level=None) as c:  # as a build without auto_vacuum created it
        c.execute("PRAGMA auto_vacuum=NONE")
        c.execute("VACUUM")
        assert c.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    s = Store(path)
    with capture_logs() as cap:
        await s.open()
    try:
        assert [e["event"] for e in cap] == ["store_vacuum_needed"]
        assert "VACUUM" in cap[0]["detail"]
        assert s.auto_vacuum == 0
        old = time.time() - 10 * DAY
        for _ in range(50):
            ev = await add(s, old, [("a", "pending")])
            await finish(s, ev.id, "delivered", old)
        assert await s.prune(time.time() - RETENTION) == (50, 50, 0)
        assert await rows(s) == []
        assert await pragma(s, "auto_vacuum") == 0  # not converted behind the operator's back
    finally:
        await s.close()


async def test_retention_loop_prunes_logs_and_survives_store_errors(store: Store) -> None:
    calls: list[float] = []
    results: list[Any] = [StoreUnavailable("store unavailable: disk I/O error"), (0, 0, 0), (3, 2, 10)]

    async def fake_prune(older_than: float, *_a: Any, **_k: Any) -> tuple[int, int, int]:
        calls.append(older_than)
        r = results.pop(0) if results else (0, 0, 0)
        if isinstance(r, Exception):
            raise r
        assert isinstance(r, tuple)
        return r

    store.prune = fake_prune  # type: ignore[method-assign]
    with capture_logs() as cap:
        loop = asyncio.create_task(retention_loop(store, lambda: 3600.0, interval=0.01))
        try:
            await eventually(lambda: len(calls) >= 4, timeout=5)
        finally:
            loop.cancel()
            with pytest.raises(asyncio.CancelledError):
                await loop
    events = [e for e in cap if e["event"] in ("prune_failed", "deliveries_pruned")]
    assert [e["event"] for e in events] == ["prune_failed", "deliveries_pruned"]
    assert events[0]["log_level"] == "warning"
    assert events[1]["log_level"] == "info"
    assert (events[1]["count"], events[1]["events"], events[1]["vacuumed_pages"]) == (3, 2, 10)
    assert all(abs(t - (time.time() - 3600)) < 60 for t in calls)


async def test_retention_loop_on_a_real_store(store: Store) -> None:
    now = time.time()
    ev = await add(store, now - 30, [("a", "pending")])
    await finish(store, ev.id, "delivered", now - 30)
    keep = await add(store, now, [("a", "pending")])
    retention = [3600.0]
    loop = asyncio.create_task(retention_loop(store, lambda: retention[0], interval=0.02))
    try:
        await asyncio.sleep(0.1)
        assert len(await rows(store)) == 2  # 30 s old is within an hour
        retention[0] = 10.0  # a config reload shortens it

        async def pruned() -> bool:
            return await rows(store) == [(keep.id, "a", "pending")]

        deadline = time.monotonic() + 5
        while not await pruned():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop


async def test_daemon_prunes_delivered_rows(tmp_path: Path) -> None:
    ok, down = await Receiver().start(), await Receiver(status=lambda _r: 503).start()
    d = Daemon(
        tmp_path,
        [endpoint("ok", ok), endpoint("down", down)],
        delivery={"retention": "1s", "retry_schedule": ["1h"]},
    )
    await d.start(env={"WEBHOOKD_PRUNE_INTERVAL": "0.2"})
    try:
        assert (await d.heartbeat("dev-1"))["changed"]
        await ok.wait_for(1)
        await eventually(lambda: down.attempts >= 1)

        async def statuses() -> list[tuple[str, str]]:
            code, body = await d.admin("GET", "/v1/deliveries")
            assert code == 200
            return sorted((r["endpoint"], r["status"]) for r in body)

        async def only_retrying_left() -> bool:
            return await statuses() == [("down", "pending")]

        deadline = time.monotonic() + 15
        while not await only_retrying_left():
            assert time.monotonic() < deadline, (await statuses(), d.logs_text())
            await asyncio.sleep(0.1)
        # logged once the whole prune (events, vacuum) is done, a little after the rows are gone
        await eventually(lambda: any(r["event"] == "deliveries_pruned" and r["count"] >= 1 for r in d.logs()))
        await asyncio.sleep(1.5)  # well past retention: the pending retry and its event stay
        assert await statuses() == [("down", "pending")]
        assert await d.stop() == 0
    finally:
        await d.stop()
        await ok.stop()
        await down.stop()
