"""Persistence: the backend-neutral interface (`api`), the SQLite backend (`sqlite`), the PostgreSQL backend
(`postgres`, imported only when a config names one), retention.

`Store` is the SQLite backend (the embedded default); everything else is typed against `DeliveryStore`;
`store_for` picks the backend a config's `store:` key names.
"""

from __future__ import annotations

from pathlib import Path

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
from webhookd.store.chunked import PRUNE_BATCH
from webhookd.store.retention import VACUUM_PAGES, retention_loop
from webhookd.store.sqlite import MAX_BATCH, MAX_BATCH_ROWS, PROBE_INTERVAL, SQLiteStore
from webhookd.store.sqlite_schema import SCHEMA_VERSION

Store = SQLiteStore


def store_for(url: str | None, db_path: Path) -> DeliveryStore:
    """The store a config's `store:` names: None = SQLite at `db_path`, else PostgreSQL at the URL."""
    if url is None:
        return SQLiteStore(db_path)
    from webhookd.store.postgres import PostgresStore  # psycopg only for those who use it

    return PostgresStore(url)


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
    "store_for",
]
