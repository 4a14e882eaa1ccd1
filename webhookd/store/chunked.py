"""Long store operations in small write transactions, the same for every backend: each step is the backend's
own function of its connection, queued with `store.write` like any other write, so that heartbeats' group
commits wait for one chunk at most and a million rows never come into memory."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from webhookd.store.api import Requeued

REQUEUE_CHUNK = 2000  # rows per write transaction of a requeue (heartbeats' commits wait for one chunk at most)
IDS_CHUNK = 500  # ids per statement
PRUNE_BATCH = 500  # rows deleted per write transaction by the retention pruner

# The keys of one row of `list_deliveries`, in the order both backends select them.
LIST_KEYS = (
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
)

Write = Callable[..., Awaitable[Any]]  # the backend's `store.write(fn, rows)`


async def requeue(
    write: Write,
    step_ids: Callable[..., Any],
    step_where: Callable[..., Any],
    ids: Sequence[int] | None,
    endpoint: str | None,
    status: str | None,
    held_endpoints: set[str],
) -> Requeued:
    """`DeliveryStore.requeue` in chunks (IDS_CHUNK ids, or REQUEUE_CHUNK rows of an endpoint), each its own
    write transaction. `step_ids(c, ids, held_endpoints, now) -> Requeued` and `step_where(c, endpoint, status,
    target, after_id, now) -> [ids]` are the backend's. Rows that match the filter above the last chunk while it
    runs are requeued too."""
    now = time.time()
    out = Requeued(total=0, held=0, first_pending={}, missing=[])
    if ids is not None:
        unique = list(dict.fromkeys(ids))
        for i in range(0, len(unique), IDS_CHUNK):
            chunk = unique[i : i + IDS_CHUNK]
            part = await write(
                functools.partial(step_ids, ids=chunk, held_endpoints=held_endpoints, now=now), len(chunk)
            )
            out.total += part.total
            out.held += part.held
            out.missing += part.missing
            for ep, first in part.first_pending.items():
                out.first_pending[ep] = min(first, out.first_pending.get(ep, first))
        return out
    if endpoint is None:
        raise ValueError("requeue needs ids or an endpoint")
    target = "held" if endpoint in held_endpoints else "pending"
    after = 0
    while done := await write(
        functools.partial(step_where, endpoint=endpoint, status=status, target=target, after_id=after, now=now),
        REQUEUE_CHUNK,
    ):
        if target == "pending":
            out.first_pending.setdefault(endpoint, done[0])
        out.total += len(done)
        after = done[-1]
    if target == "held":
        out.held = out.total
    return out


async def prune_rows(
    write: Write,
    step_deliveries: Callable[..., Any],
    step_events: Callable[..., Any],
    older_than: float,
    batch: int = PRUNE_BATCH,
) -> tuple[int, int]:
    """Delete delivered and dead deliveries last updated before `older_than`, then events older than that no
    delivery refers to, `batch` rows a transaction: `step_deliveries(c, cutoff, limit) -> n` and
    `step_events(c, cutoff, after, limit) -> (n, next key or None)` are the backend's. Returns the counts."""
    deliveries = events = 0
    while True:
        n = await write(functools.partial(step_deliveries, cutoff=older_than, limit=batch))
        deliveries += n
        if n < batch:
            break
        await asyncio.sleep(0)
    key: tuple[float, str] | None = (float("-inf"), "")
    while key is not None:
        n, key = await write(functools.partial(step_events, cutoff=older_than, after=key, limit=batch))
        events += n
        await asyncio.sleep(0)
    return deliveries, events
