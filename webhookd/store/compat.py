"""Old names of the SQLite store, kept while dispatch.py, tracker.py, admin.py and daemon.py switch to the
`DeliveryStore` interface; delete this module (and `SQLiteCompat` from SQLiteStore's bases, `Outcome` from
`webhookd.store`, `LegacyChange` from sqlite_writes) once nothing calls them."""

from __future__ import annotations

import functools
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

from webhookd.store import retention
from webhookd.store.api import DeliveryRow, DeliveryStore, EndpointRow, Receipt
from webhookd.store.sqlite_queries import _PENDING, _REQUEUE, IDS_CHUNK, _rows

T = TypeVar("T")


class _SQLite(DeliveryStore, Protocol):
    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T: ...

    async def write(self, fn: Callable[[sqlite3.Connection], T], rows: int = 1) -> T: ...


def _all_pending(c: sqlite3.Connection, endpoint: str | None) -> list[DeliveryRow]:
    if endpoint is None:
        return _rows(c.execute(_PENDING.format(index="", where="")))
    return _rows(c.execute(_PENDING.format(index="", where=" AND d.endpoint = ?"), (endpoint,)))


def _replay(
    c: sqlite3.Connection,
    ids: Sequence[int] | None,
    endpoint: str | None,
    status: str | None,
    held: set[str],
    now: float,
) -> tuple[list[DeliveryRow], int]:
    if ids is not None:
        rows = c.execute(
            f"SELECT id, endpoint FROM deliveries WHERE id IN ({','.join('?' * len(ids))})",  # noqa: S608
            tuple(ids),
        ).fetchall()
    else:
        rows = c.execute(
            "SELECT id, endpoint FROM deliveries WHERE endpoint=? AND status=?", (endpoint, status)
        ).fetchall()
    c.executemany(_REQUEUE, [("held" if ep in held else "pending", now, now, did) for did, ep in rows])
    queued = [did for did, ep in rows if ep not in held]
    pending: list[DeliveryRow] = []
    for i in range(0, len(queued), IDS_CHUNK):
        chunk = queued[i : i + IDS_CHUNK]
        sql = _PENDING.format(index="", where=f" AND d.id IN ({','.join('?' * len(chunk))})")
        pending += _rows(c.execute(sql, chunk))
    pending.sort(key=lambda r: r.id)
    return pending, len(rows)


class SQLiteCompat:
    async def load_pending(self: _SQLite, endpoint: str | None = None) -> list[DeliveryRow]:
        """Every pending row (of one endpoint), in id order. Unbounded: use load_pending_page."""
        return await self.read(functools.partial(_all_pending, endpoint=endpoint))

    async def save_outcomes(self: _SQLite, outcomes: Sequence[Receipt], endpoints: Sequence[EndpointRow]) -> None:
        """`await save_receipts(...)`."""
        await self.save_receipts(outcomes, endpoints)

    async def replay(
        self: _SQLite, ids: Sequence[int] | None, endpoint: str | None, status: str | None, held_endpoints: set[str]
    ) -> tuple[list[DeliveryRow], int]:
        """Loads every replayed row: use requeue. Returns the rows that became pending (in id order) and how many
        rows were replayed in all, from one transaction."""
        return await self.write(
            functools.partial(_replay, ids=ids, endpoint=endpoint, status=status, held=held_endpoints, now=time.time())
        )

    async def retention_loop(
        self: _SQLite, retention_of: Callable[[], float], interval: float = 60.0, first_delay: float = 10.0
    ) -> None:
        """`webhookd.store.retention_loop(store, ...)`."""
        await retention.retention_loop(self, retention_of, interval, first_delay)
