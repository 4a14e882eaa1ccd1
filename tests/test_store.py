"""The outbox's status rules, on a real SQLite file."""

from __future__ import annotations

from tests.test_retention import event
from webhookd.presence import Device
from webhookd.store import EndpointRow, Outcome, Store


async def statuses(store: Store) -> dict[int, str]:
    return dict(await store.read(lambda c: c.execute("SELECT id, status FROM deliveries").fetchall()))


async def test_a_late_outcome_never_takes_a_row_out_of_held(store: Store) -> None:
    """An attempt that ends after its endpoint was disabled: a retry or a death keeps the row held (it waits for
    `enable`), a receipt still counts."""
    rows = []
    for i in range(4):
        ev = event(1000.0 + i, device=f"d{i}")
        rows += await store.record([(Device(id=ev.device_id, state="online"), ev, [("ep", "pending")])])
    held = await store.hold(EndpointRow("ep", disabled=True, disabled_reason="operator"))
    assert held == 4
    a, b, c, d = (r.id for r in rows)
    await store.save_outcomes(
        [
            Outcome(a, "pending", 1, 2000.0, 500, "HTTP 500"),
            Outcome(b, "dead", 8, None, 500, "HTTP 500"),
            Outcome(c, "delivered", 1, None, 200, None),
            Outcome(d, "held", 1, None, 410, "HTTP 410"),
        ],
        [],
    )
    assert await statuses(store) == {a: "held", b: "held", c: "delivered", d: "held"}
    released = await store.release(EndpointRow("ep"))
    assert released == 3
    assert [r.id for r in await store.load_pending("ep")] == [a, b, d]
