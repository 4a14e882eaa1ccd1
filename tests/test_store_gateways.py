"""The store's side of a hub's gateway liveness (DeliveryStore.touch_gateway, expire_gateways, restart_gateways,
gateway_rejected, load_gateways), on SQLite and PostgreSQL alike (the conformance suite's `backend` fixture):
one transaction per touch, the event and its deliveries as record() makes them, and each flip to offline made
exactly once, also by concurrent callers on two stores sharing one PostgreSQL database."""

from __future__ import annotations

import asyncio
import time

from tests.test_store_conformance import Backend, backend, change, pending_ids, store
from webhookd.gateways import Seen
from webhookd.store import DeliveryStore

__all__ = ["backend", "store"]  # the fixtures, imported for pytest

T0 = 1_790_000_000.0
TIMEOUT = 60.0
ONLINE_TARGETS = [("a", "pending"), ("b", "held")]
OFFLINE_TARGETS = {"site-a": [("a", "pending")], "site-b": [("a", "pending")]}


async def test_a_first_touch_records_gateway_online_like_record(store: DeliveryStore) -> None:
    done = await store.touch_gateway("site-a", T0, TIMEOUT, Seen("10.0.0.9", devices=3), list(ONLINE_TARGETS))
    assert done.event is not None and done.event.type == "gateway.online"
    assert [(r.endpoint, r.event.id) for r in done.rows] == [("a", done.event.id)]
    assert (done.row.state, done.row.deadline, done.row.devices) == ("online", T0 + TIMEOUT, 3)
    listed = await store.list_deliveries(None, None, 100)
    assert sorted((r["endpoint"], r["status"], r["type"], r["device"]) for r in listed) == [
        ("a", "pending", "gateway.online", "site-a"),
        ("b", "held", "gateway.online", "site-a"),
    ]
    assert await pending_ids(store, "a") == [done.rows[0].id]
    assert await store.load_devices() == []  # a gateway is no device
    again = await store.touch_gateway("site-a", T0 + 5, TIMEOUT, Seen("10.0.0.9", relayed=1), list(ONLINE_TARGETS))
    assert again.event is None and again.rows == []
    [row] = await store.load_gateways()
    assert (row.name, row.state, row.last_seen, row.deadline, row.relayed, row.devices) == (
        "site-a",
        "online",
        T0 + 5,
        T0 + 5 + TIMEOUT,
        1,
        3,
    )
    assert len(await store.list_deliveries(None, None, 100)) == 2


async def test_a_device_with_the_gateway_s_id_keeps_its_row(store: DeliveryStore) -> None:
    await store.record([change("site-a", [])])
    await store.touch_gateway("site-a", T0, TIMEOUT, Seen(None), [("a", "pending")])
    [dev] = await store.load_devices()
    assert (dev.id, dev.state) == ("site-a", "online") and dev.name is None


async def test_concurrent_first_touches_make_one_online(store: DeliveryStore) -> None:
    done = await asyncio.gather(
        *(store.touch_gateway("site-a", T0 + i * 0.001, TIMEOUT, Seen(None), [("a", "pending")]) for i in range(6))
    )
    assert sum(d.event is not None for d in done) == 1
    assert len(await pending_ids(store, "a")) == 1


async def test_expiry_flips_each_silent_gateway_once(store: DeliveryStore) -> None:
    await store.touch_gateway("site-a", T0, TIMEOUT, Seen("10.0.0.9"), [])
    await store.touch_gateway("site-b", T0 + 30, TIMEOUT, Seen("10.0.0.8"), [])
    await store.gateway_rejected("site-c", "401 invalid Webhookd-Signature")  # never online: never offline
    assert await store.expire_gateways(T0 + TIMEOUT - 0.5, OFFLINE_TARGETS) == []
    results = await asyncio.gather(*(store.expire_gateways(T0 + TIMEOUT, OFFLINE_TARGETS) for _ in range(5)))
    flips = [w for ws in results for w in ws]
    assert [(w.row.name, w.row.state) for w in flips] == [("site-a", "offline")]
    [w] = flips
    assert w.event is not None and (w.event.type, w.event.reason, w.event.last_seen) == (
        "gateway.offline",
        "timeout",
        T0,
    )
    assert [r.event.id for r in w.rows] == [w.event.id]
    assert await store.expire_gateways(T0 + 1000, {}) == []  # not configured: left alone
    rows = {r.name: r for r in await store.load_gateways()}
    assert {n: r.state for n, r in rows.items()} == {"site-a": "offline", "site-b": "online", "site-c": "unknown"}
    assert rows["site-c"].last_error == "401 invalid Webhookd-Signature"
    # back: online with offline_for
    back = await store.touch_gateway("site-a", T0 + 200, TIMEOUT, Seen("10.0.0.9"), [("a", "pending")])
    assert back.event is not None and back.event.previous_state == "offline"
    assert back.event.offline_for == 200 - TIMEOUT


async def test_a_restart_gives_online_gateways_a_full_timeout(store: DeliveryStore) -> None:
    await store.touch_gateway("site-a", T0, TIMEOUT, Seen(None), [])
    now = T0 + 1000  # the hub was down past the deadline
    assert await store.restart_gateways(now, {"site-a": TIMEOUT}, now) == 1
    assert await store.expire_gateways(now + TIMEOUT - 1, OFFLINE_TARGETS) == []
    [row] = await store.load_gateways()
    assert row.deadline == now + TIMEOUT
    assert len(await store.expire_gateways(now + TIMEOUT, OFFLINE_TARGETS)) == 1


async def test_postgresql_two_stores_flip_once_and_a_live_older_member_keeps_deadlines(backend: Backend) -> None:
    store = backend.store
    if type(store).__name__ != "PostgresStore":
        return  # one process per SQLite file
    other = await backend.reopen()
    for i in range(20):
        name = f"gw-{i}"
        await store.touch_gateway(name, T0, TIMEOUT, Seen(None), [])
    targets = {f"gw-{i}": [("a", "pending")] for i in range(20)}
    results = await asyncio.gather(*(s.expire_gateways(T0 + TIMEOUT, targets) for s in (store, other, store, other)))
    names = sorted(w.row.name for ws in results for w in ws)
    assert names == sorted(targets)  # each gateway once, whichever store flipped it
    assert len(await pending_ids(store, "a")) == 20
    # A hub process that started before us and is alive: our start leaves the deadlines alone.
    await store.touch_gateway("gw-0", T0 + 2000, TIMEOUT, Seen(None), [])
    now = time.time()

    async def member(c: object) -> None:
        await c.execute(  # type: ignore[attr-defined]
            "INSERT INTO hub_members (owner, started_at, seen_at) VALUES ('older', %s, %s)", (now - 60, now - 1)
        )

    await store.write(member)  # type: ignore[attr-defined]
    assert await other.restart_gateways(T0 + 5000, {"gw-0": TIMEOUT}, now) == 0
    assert await other.restart_gateways(T0 + 5000, {"gw-0": TIMEOUT}, now - 120) == 1  # it is younger than us


async def test_a_relay_and_its_gateway_s_row_in_one_transaction(store: DeliveryStore) -> None:
    relayed = change("site-a:d1", [("a", "pending")])
    done = await store.touch_gateway("site-a", T0, TIMEOUT, Seen("10.0.0.9"), [("a", "pending")], relayed)
    assert done.relayed is not None and [r.event for r in done.relayed] == [relayed.event]
    assert done.event is not None and done.event.type == "gateway.online"  # the first relay brings it online
    again = await store.touch_gateway("site-a", T0 + 1, TIMEOUT, Seen("10.0.0.9"), [("a", "pending")], relayed)
    assert again.relayed is None and again.event is None  # the same event id: taken once, not counted again
    [row] = await store.load_gateways()
    assert (row.relayed, row.last_seen) == (1, T0 + 1)
    assert {d.id for d in await store.load_devices()} == {"site-a:d1"}
    assert len(await pending_ids(store, "a")) == 2


async def test_relays_touching_at_once_are_taken_as_one_after_the_other(store: DeliveryStore) -> None:
    """Concurrent touches share a group commit (on PostgreSQL one merged run of statements): the same results
    as one after the other: an id repeated is taken once, the device keeps its newest state."""
    new = change("site-a:d1", [("a", "pending")], t=T0 + 10, state="utilizing")
    late = change("site-a:d1", [("a", "pending")], t=T0 + 5, state="online")  # older, relayed after it
    other = change("site-b:d2", [("a", "pending")], t=T0 + 6)
    done = await asyncio.gather(
        store.touch_gateway("site-a", T0 + 20, TIMEOUT, Seen("10.0.0.9"), [("a", "pending")], new),
        store.touch_gateway("site-a", T0 + 20.1, TIMEOUT, Seen("10.0.0.9"), [("a", "pending")], new),
        store.touch_gateway("site-a", T0 + 20.2, TIMEOUT, Seen("10.0.0.9"), [("a", "pending")], late),
        store.touch_gateway("site-b", T0 + 20.3, TIMEOUT, Seen("10.0.0.8"), [("a", "pending")], other),
    )
    assert [d.relayed is None for d in done] == [False, True, False, False]
    assert sum(d.event is not None for d in done) == 2  # one gateway.online for each gateway
    devices = {d.id: d.state for d in await store.load_devices()}
    assert devices == {"site-a:d1": "utilizing", "site-b:d2": "online"}  # the late, older event did not win
    rows = {r.name: r for r in await store.load_gateways()}
    assert (rows["site-a"].relayed, rows["site-a"].last_seen, rows["site-b"].relayed) == (2, T0 + 20.2, 1)
    # every relayed event and both gateway.online have their delivery
    assert len(await pending_ids(store, "a")) == 5
