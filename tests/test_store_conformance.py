"""The `DeliveryStore` contract (webhookd/store/api.py), run against every backend.

Every test runs against SQLite and against PostgreSQL (a fresh database in the test process's throwaway cluster:
tests/conftest.py `pg_url`). A backend is added by adding its name to the fixture's `params` and a branch in
`_open_backend` (how to open it on fresh data, and how to make its writer hit an unexpected bug). Everything else
here goes through the Protocol only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.test_retention import event
from webhookd.mutes import MuteRule
from webhookd.payloads import EventData
from webhookd.presence import Device
from webhookd.states import DeliveryStatus
from webhookd.store import (
    Change,
    DeliveryRow,
    DeliveryStore,
    EndpointRow,
    Receipt,
    SQLiteStore,
    StoreError,
    StoreUnavailable,
)

DAY = 86400.0


@dataclass
class Backend:
    store: DeliveryStore
    # Queue a write that raises `exc` inside the writer (a bug, not a database error); returns its awaitable.
    bug: Callable[[BaseException], Awaitable[Any]]
    # A second store on the same data (a restart); closed by the fixture.
    reopen: Callable[[], Awaitable[DeliveryStore]]


async def _open_backend(
    name: str, tmp_path: Path, opened: list[DeliveryStore], request: pytest.FixtureRequest
) -> Backend:
    if name == "sqlite":

        async def reopen() -> DeliveryStore:
            s = SQLiteStore(tmp_path / "webhookd.db")
            await s.open()
            opened.append(s)
            return s

        store = await reopen()
        assert isinstance(store, SQLiteStore)

        def bug(exc: BaseException) -> Awaitable[Any]:
            def op(_c: Any) -> None:
                raise exc

            return asyncio.ensure_future(store.write(op))

        return Backend(store, bug, reopen)
    if name == "postgresql":
        from webhookd.store.postgres import PostgresStore

        url = request.getfixturevalue("pg_url")

        async def reopen_pg() -> DeliveryStore:
            s = PostgresStore(url)
            await s.open()
            opened.append(s)
            return s

        pg = await reopen_pg()
        assert isinstance(pg, PostgresStore)

        def pg_bug(exc: BaseException) -> Awaitable[Any]:
            async def op(_c: Any) -> None:
                raise exc

            return asyncio.ensure_future(pg.write(op))

        return Backend(pg, pg_bug, reopen_pg)
    raise AssertionError(f"unknown backend {name}")


@pytest.fixture(params=["sqlite", "postgresql"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    opened: list[DeliveryStore] = []
    b = await _open_backend(request.param, tmp_path, opened, request)
    yield b
    for s in reversed(opened):
        await s.close()


@pytest.fixture
def store(backend: Backend) -> DeliveryStore:
    return backend.store


def change(
    device: str, targets: list[tuple[str, DeliveryStatus]], t: float | None = None, state: str = "online"
) -> Change:
    t = time.time() if t is None else t
    ev = event(t, device)
    return Change(Device(id=device, state=state, last_seen=t, changed_at=t), ev, targets)


async def add(store: DeliveryStore, device: str, *targets: tuple[str, DeliveryStatus]) -> list[DeliveryRow]:
    return await store.record([change(device, list(targets))])


async def pending_ids(store: DeliveryStore, endpoint: str) -> list[int]:
    return [r.id for r in await store.load_pending_page(endpoint, 0, 1_000_000)]


async def statuses(store: DeliveryStore, endpoint: str | None = None) -> dict[int, str]:
    return {r["id"]: r["status"] for r in await store.list_deliveries(None, endpoint, 1_000_000)}


def receipt(row: DeliveryRow | int, status: DeliveryStatus, attempts: int = 1, **kw: Any) -> Receipt:
    did = row if isinstance(row, int) else row.id
    return Receipt(did, status, attempts, kw.get("next_attempt_at"), kw.get("last_status"), kw.get("last_error"))


# --- record --------------------------------------------------------------------------------------------------


async def test_record_writes_state_event_and_deliveries_and_returns_the_pending_ones(store: DeliveryStore) -> None:
    changes = [
        change("d1", [("a", "pending"), ("b", "held")]),
        Change(Device(id="d2", state="online", last_seen=1.0), None, []),  # liveness only: no event
        change("d3", [("b", "held"), ("a", "pending")], state="utilizing"),
    ]
    rows = await store.record(changes)
    assert [(r.endpoint, r.event.device_id, r.attempts) for r in rows] == [("a", "d1", 0), ("a", "d3", 0)]
    assert rows[0].id < rows[1].id
    first_event = changes[0].event
    assert first_event is not None and rows[0].event == first_event
    assert rows[0].next_attempt_at == first_event.time
    assert {d.id: d.state for d in await store.load_devices()} == {"d1": "online", "d2": "online", "d3": "utilizing"}
    listed = sorted(await store.list_deliveries(None, None, 100), key=lambda r: r["id"])
    # ids follow the order of the changes and their targets
    assert [(r["device"], r["endpoint"], r["status"]) for r in listed] == [
        ("d1", "a", "pending"),
        ("d1", "b", "held"),
        ("d3", "b", "held"),
        ("d3", "a", "pending"),
    ]


async def test_record_relayed_takes_each_event_id_once(store: DeliveryStore) -> None:
    first = change("site-a:d1", [("a", "pending"), ("b", "held")])
    rows = await store.record_relayed(first)
    assert rows is not None and [(r.endpoint, r.event) for r in rows] == [("a", first.event)]
    # A repeat of the same event id changes nothing: no delivery, no device row update, None.
    again = Change(Device(id="site-a:d1", state="offline", last_seen=1.0), first.event, [("a", "pending")])
    assert await store.record_relayed(again) is None
    concurrent = await asyncio.gather(*(store.record_relayed(again) for _ in range(5)))
    assert concurrent == [None] * 5
    assert {d.id: d.state for d in await store.load_devices()} == {"site-a:d1": "online"}
    listed = await store.list_deliveries(None, None, 100)
    assert sorted((r["endpoint"], r["status"]) for r in listed) == [("a", "pending"), ("b", "held")]
    # Concurrent first takes of one new id: exactly one records it.
    other = change("site-a:d2", [("a", "pending")])
    results = await asyncio.gather(*(store.record_relayed(other) for _ in range(4)))
    assert sum(r is not None for r in results) == 1
    assert len(await pending_ids(store, "a")) == 2


async def test_an_older_relayed_event_arriving_late_keeps_the_newer_device_state(store: DeliveryStore) -> None:
    newer = change("site-a:d1", [("a", "pending")], t=2000.0, state="offline")
    older = change("site-a:d1", [("a", "pending")], t=1000.0, state="online")
    assert await store.record_relayed(newer) is not None
    rows = await store.record_relayed(older)
    assert rows is not None and len(rows) == 1  # recorded and delivered
    [dev] = await store.load_devices()
    assert (dev.state, dev.changed_at) == ("offline", 2000.0)


async def test_record_is_all_or_nothing(store: DeliveryStore) -> None:
    good = change("d1", [("a", "pending")])
    await store.record([good])
    assert good.event is not None
    # The same event again (a primary key violation) in a call with a new device: nothing of the call is kept.
    dup = Change(Device(id="d1", state="offline"), good.event, [("a", "pending")])
    with pytest.raises(StoreUnavailable):
        await store.record([change("d2", [("a", "pending")]), dup])
    assert {d.id: d.state for d in await store.load_devices()} == {"d1": "online"}
    assert await store.delivery_counts() == {"a": {"pending": 1}}


async def test_concurrent_records_get_their_own_rows_in_call_order(store: DeliveryStore) -> None:
    results = await asyncio.gather(*(add(store, f"d{i}", ("a", "pending"), ("b", "pending")) for i in range(60)))
    ids: list[int] = []
    for i, rows in enumerate(results):
        assert [(r.endpoint, r.event.device_id) for r in rows] == [("a", f"d{i}"), ("b", f"d{i}")]
        ids += [r.id for r in rows]
    assert ids == sorted(ids) and len(set(ids)) == 120
    assert await store.pending_count() == 120


# --- paging pending rows -------------------------------------------------------------------------------------


async def test_pending_pages_per_endpoint_in_id_order(store: DeliveryStore) -> None:
    for i in range(25):
        await add(store, f"d{i % 3}", ("a", "pending"), ("b", "pending"), ("c", "held"))
    a_ids = await pending_ids(store, "a")
    assert len(a_ids) == 25 and a_ids == sorted(a_ids)
    # a delivered and a dead row drop out of the pending set
    await store.save_receipts([receipt(a_ids[3], "delivered"), receipt(a_ids[4], "dead", 8)], [])
    expected = [i for i in a_ids if i not in (a_ids[3], a_ids[4])]
    paged: list[int] = []
    after = 0
    while page := await store.load_pending_page("a", after, 7):
        assert len(page) <= 7
        assert all(r.endpoint == "a" for r in page)
        paged += [r.id for r in page]
        after = page[-1].id
    assert paged == expected
    assert await store.load_pending_page("a", expected[-1], 10) == []
    assert await store.load_pending_page("c", 0, 10) == []  # held rows are not pending
    assert await store.load_pending_page("nope", 0, 10) == []
    assert [r.id for r in await store.load_pending_page("a", expected[4], 2)] == expected[5:7]


async def test_pending_lane_is_one_device_of_one_endpoint(store: DeliveryStore) -> None:
    for i in range(30):
        await add(store, f"d{i % 3}", ("a", "pending"), ("b", "pending"))
    lane = [r for r in await store.load_pending_page("a", 0, 100) if r.event.device_id == "d1"]
    assert len(lane) == 10
    got = await store.load_pending_lane("a", "d1", 0, 100)
    assert [r.id for r in got] == [r.id for r in lane]
    assert all(r.event.device_id == "d1" and r.endpoint == "a" for r in got)
    assert [r.id for r in await store.load_pending_lane("a", "d1", lane[2].id, 3)] == [r.id for r in lane[3:6]]
    await store.save_receipts([receipt(lane[0], "delivered")], [])
    assert [r.id for r in await store.load_pending_lane("a", "d1", 0, 1)] == [lane[1].id]
    assert await store.load_pending_lane("a", "d9", 0, 10) == []


async def test_pending_count_counts_every_endpoint(store: DeliveryStore) -> None:
    assert await store.pending_count() == 0
    rows = []
    for i in range(5):
        rows += await add(store, f"d{i}", ("a", "pending"), ("b", "pending"), ("c", "held"))
    assert await store.pending_count() == 10
    await store.save_receipts([receipt(rows[0], "delivered"), receipt(rows[1], "pending", 1)], [])
    assert await store.pending_count() == 9
    await store.hold("b")
    assert await store.pending_count() == 4


# --- receipts, hold, release ----------------------------------------------------------------------------------


async def test_save_receipts_is_queued_at_once_and_copies_endpoint_rows(store: DeliveryStore) -> None:
    (row,) = await add(store, "d1", ("a", "pending"))
    ep = EndpointRow("a", consecutive_failures=1, last_error="HTTP 500")
    fut = store.save_receipts([receipt(row, "pending", 1, next_attempt_at=123.0, last_status=500)], [ep])
    assert isinstance(fut, asyncio.Future)
    ep.consecutive_failures = 99  # after queueing: not what is saved
    assert await fut is None
    assert (await store.load_endpoints())["a"] == EndpointRow("a", consecutive_failures=1, last_error="HTTP 500")
    (pending,) = await store.load_pending_page("a", 0, 10)
    assert (pending.attempts, pending.next_attempt_at) == (1, 123.0)
    (listed,) = await store.list_deliveries("pending", "a", 10)
    assert (listed["attempts"], listed["last_status"], listed["last_error"]) == (1, 500, None)


async def test_a_late_receipt_never_takes_a_row_out_of_held(store: DeliveryStore) -> None:
    rows = []
    for i in range(4):
        rows += await add(store, f"d{i}", ("ep", "pending"))
    assert await store.hold(EndpointRow("ep", disabled=True, disabled_reason="operator")) == 4
    a, b, c, d = (r.id for r in rows)
    await store.save_receipts(
        [
            receipt(a, "pending", 1, next_attempt_at=2000.0, last_status=500, last_error="HTTP 500"),
            receipt(b, "dead", 8, last_status=500, last_error="HTTP 500"),
            receipt(c, "delivered", 1, last_status=200),
            receipt(d, "held", 1, last_status=410, last_error="HTTP 410"),
        ],
        [],
    )
    assert await statuses(store) == {a: "held", b: "held", c: "delivered", d: "held"}
    # a receipt for a row that is delivered already changes nothing
    await store.save_receipts([receipt(c, "pending", 2), receipt(c, "dead", 9)], [])
    assert (await statuses(store))[c] == "delivered"
    assert await store.release(EndpointRow("ep")) == 3
    assert await pending_ids(store, "ep") == [a, b, d]


async def test_hold_and_release_with_a_fresh_attempt_budget(store: DeliveryStore) -> None:
    rows = [r for i in range(3) for r in await add(store, f"d{i}", ("a", "pending"), ("b", "pending"))]
    a_rows = [r for r in rows if r.endpoint == "a"]
    await store.save_receipts([receipt(r, "pending", 3, next_attempt_at=time.time() + 3600) for r in a_rows], [])
    disabled = EndpointRow("a", disabled=True, disabled_reason="5 consecutive failures", consecutive_failures=5)
    assert await store.hold(disabled) == 3
    assert (await store.load_endpoints())["a"] == disabled
    assert await store.load_pending_page("a", 0, 10) == []
    assert len(await store.load_pending_page("b", 0, 10)) == 3  # other endpoints untouched
    assert await store.hold("a") == 0  # nothing pending left
    # new events for a disabled endpoint are recorded held
    await add(store, "d9", ("a", "held"))
    before = time.time()
    assert await store.release(EndpointRow("a")) == 4
    released = await store.load_pending_page("a", 0, 10)
    assert [r.id for r in released][:3] == [r.id for r in a_rows]
    assert all(r.attempts == 0 and r.next_attempt_at is not None for r in released)
    assert all(before - 1 <= (r.next_attempt_at or 0) <= time.time() + 1 for r in released)
    assert (await store.load_endpoints())["a"] == EndpointRow("a")
    assert await store.release(EndpointRow("a")) == 0


async def test_an_enable_resets_the_failure_count_and_keeps_last_error(backend: Backend) -> None:
    """`webhookd endpoints enable` saves the endpoint enabled with no failures and the last_error it had (what
    went wrong last stays readable; the next success clears it), on a hub as on one box."""
    store = backend.store
    await add(store, "d1", ("a", "pending"))
    failing = EndpointRow("a", True, "5 consecutive failures", consecutive_failures=5, last_error="HTTP 500")
    assert await store.hold(failing) == 1
    enabled = EndpointRow("a", consecutive_failures=0, last_error="HTTP 500")  # the dispatcher's row at an enable
    assert await store.release(enabled) == 1
    assert (await store.load_endpoints())["a"] == enabled
    await store.close()
    assert (await (await backend.reopen()).load_endpoints())["a"] == enabled


# --- requeue ---------------------------------------------------------------------------------------------------


async def test_requeue_by_ids(store: DeliveryStore) -> None:
    rows = [r for i in range(4) for r in await add(store, f"d{i}", ("a", "pending"), ("b", "pending"))]
    a = [r.id for r in rows if r.endpoint == "a"]
    b = [r.id for r in rows if r.endpoint == "b"]
    await store.save_receipts(
        [receipt(i, "dead", 8, last_error="HTTP 500") for i in a + b[:2]] + [receipt(b[2], "delivered")], []
    )
    missing = max(a + b) + 1000
    done = await store.requeue([a[2], a[1], b[0], b[2], missing, a[1]], None, None, {"b"})
    assert done.total == 4
    assert done.held == 2
    assert done.first_pending == {"a": a[1]}
    assert done.missing == [missing]
    st = await statuses(store)
    assert (st[a[1]], st[a[2]], st[b[0]], st[b[2]]) == ("pending", "pending", "held", "held")
    assert st[a[0]] == "dead" and st[b[1]] == "dead"
    requeued = {r.id: r for r in await store.load_pending_page("a", 0, 10)}
    assert requeued.keys() == {a[1], a[2]}
    assert all(r.attempts == 0 for r in requeued.values())
    (listed,) = [r for r in await store.list_deliveries("pending", "a", 10) if r["id"] == a[1]]
    assert listed["last_error"] is None
    nothing = await store.requeue([missing], None, None, set())
    assert (nothing.total, nothing.held, nothing.first_pending, nothing.missing) == (0, 0, {}, [missing])


async def test_requeue_by_endpoint_and_status(store: DeliveryStore) -> None:
    rows = [r for i in range(6) for r in await add(store, f"d{i}", ("a", "pending"), ("b", "pending"))]
    a = [r.id for r in rows if r.endpoint == "a"]
    await store.save_receipts([receipt(i, "dead", 8) for i in a[2:5]] + [receipt(a[5], "delivered")], [])
    done = await store.requeue(None, "a", "dead", set())
    assert (done.total, done.held, done.first_pending, done.missing) == (3, 0, {"a": a[2]}, [])
    assert await pending_ids(store, "a") == a[:5]
    assert (await statuses(store))[a[5]] == "delivered"
    # the endpoint is disabled (or gone): requeued rows become held
    await store.save_receipts([receipt(i, "dead", 8) for i in a[:2]], [])
    done = await store.requeue(None, "a", "dead", {"a"})
    assert (done.total, done.held, done.first_pending) == (2, 2, {})
    assert await store.delivery_counts() == {"a": {"pending": 3, "held": 2, "delivered": 1}, "b": {"pending": 6}}
    # no status: every row of the endpoint
    done = await store.requeue(None, "a", None, set())
    assert (done.total, done.first_pending) == (6, {"a": a[0]})
    assert await store.delivery_counts() == {"a": {"pending": 6}, "b": {"pending": 6}}


async def test_requeue_of_many_rows(store: DeliveryStore) -> None:
    n = 5000
    for chunk in range(0, n, 500):
        await store.record([change(f"d{i}", [("a", "pending")]) for i in range(chunk, chunk + 500)])
    first = (await store.load_pending_page("a", 0, 1))[0].id
    await store.hold("a")
    done = await store.requeue(None, "a", "held", set())
    assert (done.total, done.held, done.first_pending) == (n, 0, {"a": first})
    assert await store.pending_count() == n


# --- endpoints, devices, admin queries ------------------------------------------------------------------------


async def test_endpoint_rows_round_trip(backend: Backend) -> None:
    store = backend.store
    rows = [
        EndpointRow("a"),
        EndpointRow("b", disabled=True, disabled_reason="gone (HTTP 410)", consecutive_failures=3, last_error="x"),
    ]
    await store.save_receipts([], rows)
    await store.hold(EndpointRow("c", disabled=True, disabled_reason="operator"))
    await store.release(EndpointRow("a", consecutive_failures=0, last_error=None))
    expected = {r.name: r for r in [*rows, EndpointRow("c", disabled=True, disabled_reason="operator")]}
    assert await store.load_endpoints() == expected
    await add(store, "d1", ("gone", "held"))
    assert await store.endpoint_names() == {"a", "b", "c", "gone"}
    await store.close()
    again = await backend.reopen()
    assert await again.load_endpoints() == expected
    assert await again.endpoint_names() == {"a", "b", "c", "gone"}


async def test_devices_round_trip(backend: Backend) -> None:
    store = backend.store
    await store.save_devices([])
    await store.save_devices(
        [
            Device(
                id="d1", state="online", name="printer", owner="ops", address="10.0.0.1", last_seen=5.0, changed_at=1.0
            ),
            Device(id="d2", state="utilizing", last_seen=6.0),
            Device(
                id="d1", state="online", name="printer", owner="ops", address="10.0.0.2", last_seen=7.0, changed_at=1.0
            ),
        ]
    )
    got = {d.id: d for d in await store.load_devices()}
    assert (got["d1"].name, got["d1"].owner, got["d1"].address, got["d1"].last_seen) == (
        "printer",
        "ops",
        "10.0.0.2",
        7.0,
    )
    assert (got["d1"].changed_at, got["d2"].state, got["d2"].name) == (1.0, "utilizing", None)
    await store.close()
    again = await backend.reopen()
    assert {d.id: (d.state, d.address) for d in await again.load_devices()} == {
        "d1": ("online", "10.0.0.2"),
        "d2": ("utilizing", None),
    }


async def test_mutes_round_trip_replace_by_match_and_delete(backend: Backend) -> None:
    store = backend.store
    assert await store.load_mutes() == []
    await store.save_mute(MuteRule("printer-*", None, "toner", 10.0, "alice"))
    await store.save_mute(MuteRule("ap-1", 99.5, None, 11.0, None))
    await store.save_mute(MuteRule("printer-*", 50.0, "service", 12.0, "bob"))  # replaces
    assert await store.load_mutes() == [
        MuteRule("ap-1", 99.5, None, 11.0, None),
        MuteRule("printer-*", 50.0, "service", 12.0, "bob"),
    ]
    await store.close()
    again = await backend.reopen()
    assert [r.match for r in await again.load_mutes()] == ["ap-1", "printer-*"]
    assert await again.delete_mutes(["ap-1", "nothing"]) == 1
    assert await again.delete_mutes([]) == 0
    assert await again.load_mutes() == [MuteRule("printer-*", 50.0, "service", 12.0, "bob")]


async def test_forget_device_deletes_its_row_and_its_mute_but_not_its_deliveries(store: DeliveryStore) -> None:
    [row] = await add(store, "old-1", ("a", "pending"))
    await add(store, "keep", ("a", "pending"))
    await store.save_mute(MuteRule("old-1", None, None, 1.0, None))
    await store.save_mute(MuteRule("old-*", None, None, 1.0, None))
    assert await store.forget_device("old-1") is True
    assert {d.id for d in await store.load_devices()} == {"keep"}
    assert [r.match for r in await store.load_mutes()] == ["old-*"]  # a glob is not its mute
    assert row.id in await pending_ids(store, "a")  # still delivered
    assert await store.forget_device("old-1") is False
    assert await store.forget_device("never") is False


async def test_delivery_counts_and_listing_filters(store: DeliveryStore) -> None:
    rows = [r for i in range(4) for r in await add(store, f"d{i}", ("a", "pending"), ("b", "held"))]
    await store.save_receipts([receipt(rows[0], "delivered", last_status=204), receipt(rows[1], "dead", 8)], [])
    assert await store.delivery_counts() == {"a": {"delivered": 1, "dead": 1, "pending": 2}, "b": {"held": 4}}
    everything = await store.list_deliveries(None, None, 100)
    assert [r["id"] for r in everything] == sorted((r["id"] for r in everything), reverse=True)  # newest first
    assert len(everything) == 8
    assert set(everything[0]) == {
        "id",
        "event_id",
        "endpoint",
        "device",
        "type",
        "status",
        "attempts",
        "next_attempt_at",
        "last_status",
        "last_error",
        "created_at",
    }
    assert [r["id"] for r in await store.list_deliveries("pending", None, 100)] == [rows[3].id, rows[2].id]
    assert {r["endpoint"] for r in await store.list_deliveries(None, "b", 100)} == {"b"}
    (one,) = await store.list_deliveries("delivered", "a", 100)
    assert (one["id"], one["device"], one["type"], one["last_status"]) == (rows[0].id, "d0", "device.online", 204)
    assert await store.list_deliveries("dead", "b", 100) == []
    assert len(await store.list_deliveries(None, None, 3)) == 3


# --- retention -------------------------------------------------------------------------------------------------


async def test_prune_removes_old_finished_rows_and_orphaned_events(store: DeliveryStore) -> None:
    old = time.time() - 10 * DAY

    async def at(t: float, *targets: tuple[str, DeliveryStatus]) -> tuple[EventData, list[DeliveryRow]]:
        ch = change(f"d{t}", list(targets), t=t)
        rows = await store.record([ch])
        assert ch.event is not None
        return ch.event, rows

    _, (delivered,) = await at(old, ("a", "pending"))
    _, (dead,) = await at(old, ("a", "pending"))
    _, (pending,) = await at(old, ("a", "pending"))
    await at(old, ("b", "held"))
    await at(old)  # an event nobody subscribed to
    _, (recent,) = await at(time.time(), ("a", "pending"))
    await store.save_receipts(
        [receipt(delivered, "delivered"), receipt(dead, "dead", 8), receipt(recent, "delivered")], []
    )
    # A receipt stamps its row with the time it was saved (now): a cutoff before the events keeps everything,
    # a cutoff just after now removes every finished row and every event no row refers to any more.
    assert await store.prune(old - DAY) == (0, 0, 0)
    pruned = await store.prune(time.time() + 1)
    assert (pruned.deliveries, pruned.events) == (3, 4)
    assert await store.delivery_counts() == {"a": {"pending": 1}, "b": {"held": 1}}
    assert [r.id for r in await store.load_pending_page("a", 0, 10)] == [pending.id]  # its event is intact


# --- supervision and failures ---------------------------------------------------------------------------------


async def test_supervise_returns_when_the_store_is_closed(store: DeliveryStore) -> None:
    watching = asyncio.create_task(store.supervise())
    await asyncio.sleep(0.05)
    assert not watching.done()
    await add(store, "d1", ("a", "pending"))
    await store.close()
    await asyncio.wait_for(watching, 1)
    assert watching.result() is None


async def test_a_bug_in_the_writer_fails_every_write_loudly(backend: Backend) -> None:
    store = backend.store
    watching = asyncio.create_task(store.supervise())
    await add(store, "d0", ("a", "pending"))
    bug = RuntimeError("injected bug")
    broken = backend.bug(bug)
    queued = [asyncio.ensure_future(add(store, f"d{i}", ("a", "pending"))) for i in range(1, 4)]
    with pytest.raises(RuntimeError, match="injected bug"):
        await asyncio.wait_for(watching, 2)
    for fut in [broken, *queued]:
        with pytest.raises(StoreError):
            await asyncio.wait_for(fut, 2)
    assert not store.healthy
    # every later write fails at once, none hangs
    with pytest.raises(StoreError):
        await asyncio.wait_for(add(store, "d9", ("a", "pending")), 1)
    with pytest.raises(StoreError):
        await asyncio.wait_for(store.save_receipts([], [EndpointRow("a")]), 1)
    with pytest.raises(StoreError):
        await asyncio.wait_for(store.save_devices([Device(id="d9", state="online")]), 1)
    with pytest.raises(StoreError):
        await asyncio.wait_for(store.hold("a"), 1)
    assert await asyncio.wait_for(store.probe(), 1) is False
    assert not store.healthy
    # a later supervise() raises too (the daemon may start watching late)
    with pytest.raises(RuntimeError, match="injected bug"):
        await asyncio.wait_for(store.supervise(), 1)
    # what committed before the bug is still there
    assert await store.pending_count() == 1


async def test_a_failing_write_fails_alone(store: DeliveryStore) -> None:
    first = change("d0", [("a", "pending")])
    await store.record([first])
    watching = asyncio.create_task(store.supervise())
    dup = Change(Device(id="dx", state="online"), first.event, [("a", "pending")])
    calls: list[Awaitable[Any]] = [
        asyncio.ensure_future(add(store, "d1", ("a", "pending"))),
        asyncio.ensure_future(store.record([dup])),
        asyncio.ensure_future(add(store, "d2", ("a", "pending"))),
        asyncio.ensure_future(store.save_devices([Device(id="d3", state="online")])),
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[1], StoreUnavailable)
    assert [r[0].event.device_id for r in (results[0], results[2]) if isinstance(r, list)] == ["d1", "d2"]
    assert results[3] is None
    assert await store.probe() is True
    assert store.healthy
    assert {d.id for d in await store.load_devices()} == {"d0", "d1", "d2", "d3"}
    assert await store.pending_count() == 3
    assert not watching.done()
    watching.cancel()
