"""Persistence: the backend-neutral interface (`api`), the SQLite backend (`sqlite`), retention.

`Store` is the SQLite backend (the embedded default); everything else is typed against `DeliveryStore`.
"""

from __future__ import annotations

from webhookd.store.api import (
    Change,
    DeliveryRow,
    DeliveryStore,
    EndpointRow,
    Pruned,
    Receipt,
    Requeued,
    StoreError,
    StoreUnavailable,
)
from webhookd.store.retention import PRUNE_BATCH, VACUUM_PAGES, retention_loop
from webhookd.store.sqlite import MAX_BATCH, MAX_BATCH_ROWS, PROBE_INTERVAL, SQLiteStore
from webhookd.store.sqlite_schema import SCHEMA_VERSION

Store = SQLiteStore

__all__ = [
    "MAX_BATCH",
    "MAX_BATCH_ROWS",
    "PROBE_INTERVAL",
    "PRUNE_BATCH",
    "SCHEMA_VERSION",
    "VACUUM_PAGES",
    "Change",
    "DeliveryRow",
    "DeliveryStore",
    "EndpointRow",
    "Pruned",
    "Receipt",
    "Requeued",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "retention_loop",
]
