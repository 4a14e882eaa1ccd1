"""Retention: the SQLite backend's prune (old delivered/dead rows, orphaned events, incremental vacuum) and the
backend-neutral loop that runs a store's `prune` every minute."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from webhookd.logs import get_logger
from webhookd.store.api import DeliveryStore, Pruned, StoreError
from webhookd.store.chunked import PRUNE_BATCH, prune_rows

if TYPE_CHECKING:
    from webhookd.store.sqlite import SQLiteStore

log = get_logger("webhookd.store")

VACUUM_PAGES = 512  # pages released per write transaction by the incremental vacuum


def _prune_deliveries(c: sqlite3.Connection, cutoff: float, limit: int) -> int:
    cur = c.execute(
        "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries"
        " WHERE status IN ('delivered', 'dead') AND updated_at < ? LIMIT ?)",
        (cutoff, limit),
    )
    return cur.rowcount


def _prune_events(
    c: sqlite3.Connection, cutoff: float, after: tuple[float, str], limit: int
) -> tuple[int, tuple[float, str] | None]:
    """Look at the next `limit` events older than `cutoff` after the key `after` (created_at, id) and delete
    those no delivery refers to. Returns (deleted, key of the last event looked at or None when there are no
    more); events still referenced (held or pending for long) are stepped over, not rescanned in every batch."""
    window = c.execute(
        "SELECT created_at, id FROM events WHERE created_at < ? AND (created_at, id) > (?, ?)"
        " ORDER BY created_at, id LIMIT ?",
        (cutoff, after[0], after[1], limit),
    ).fetchall()
    if not window:
        return 0, None
    cur = c.executemany(
        "DELETE FROM events WHERE id = ? AND NOT EXISTS (SELECT 1 FROM deliveries WHERE event_id = ?)",
        [(eid, eid) for _, eid in window],
    )
    last: tuple[float, str] = (window[-1][0], window[-1][1])
    return cur.rowcount, (last if len(window) == limit else None)


def _freelist(c: sqlite3.Connection) -> int:
    return int(c.execute("PRAGMA freelist_count").fetchone()[0])


def _vacuum_step(c: sqlite3.Connection, pages: int) -> int:
    free = _freelist(c)
    # Python's sqlite3 steps a PRAGMA that returns no columns only once, and incremental_vacuum frees one page
    # per step: so one execute per page (a cached statement; ~20 us each).
    for _ in range(min(free, pages)):
        c.execute("PRAGMA incremental_vacuum(1)")
    return _freelist(c)


async def prune(
    store: SQLiteStore, older_than: float, batch: int = PRUNE_BATCH, vacuum_pages: int = VACUUM_PAGES
) -> Pruned:
    """Delete delivered and dead deliveries last updated before `older_than` (unix seconds), then events older
    than that which no delivery refers to, then give the freed pages back to the file system (databases with
    auto_vacuum=INCREMENTAL). Each step is its own small write transaction queued like any other write, so
    heartbeats' group commits wait for one batch at most, never for the whole prune."""
    deliveries, events = await prune_rows(store.write, _prune_deliveries, _prune_events, older_than, batch)
    pages = 0
    if (deliveries or events) and store.auto_vacuum == 2:
        free = await store.read(_freelist)
        for _ in range(free // max(vacuum_pages, 1) + 1):  # bounded, even if others free pages meanwhile
            if free == 0:
                break
            left = await store.write(functools.partial(_vacuum_step, pages=vacuum_pages))
            pages += max(free - left, 0)
            free = left
            await asyncio.sleep(0)
    return Pruned(deliveries, events, pages)


async def retention_loop(
    store: DeliveryStore, retention: Callable[[], float], interval: float = 60.0, first_delay: float = 10.0
) -> None:
    """Prune every `interval` seconds (the first time after `first_delay`) what is older than `retention()`
    seconds (a callable, so that a config reload takes effect). A store error is logged and the next round
    tries again; this loop never takes the daemon down."""
    await asyncio.sleep(min(first_delay, interval))
    while True:
        started = time.perf_counter()
        try:
            deliveries, events, pages = await store.prune(time.time() - retention())
        except StoreError as e:
            log.warning("prune_failed", error=str(e))
        except Exception as e:  # a bug here must not stop the heartbeats
            log.exception("prune_failed", error=repr(e))
        else:
            if deliveries or events:
                log.info(
                    "deliveries_pruned",
                    count=deliveries,
                    events=events,
                    vacuumed_pages=pages,
                    duration_ms=round((time.perf_counter() - started) * 1000, 1),
                )
        await asyncio.sleep(interval)
