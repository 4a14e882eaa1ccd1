"""What only the PostgreSQL store has: its schema versions and refusals, a server that stops and comes back, and
the whole daemon on `store: postgresql://...`. (The `DeliveryStore` contract itself is
tests/test_store_conformance.py, run on both backends.) Every server here is a throwaway cluster the test started
(tests/conftest.py `pg_cluster`/`pg_url`, `postgres`)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import psycopg
import pytest

from tests.conftest import DaemonFactory, PostgresFactory, ReceiverFactory
from tests.harness import endpoint
from tests.test_store_conformance import add, change
from webhookd.config import load_config
from webhookd.store import StoreError, StoreUnavailable, store_for
from webhookd.store.postgres import PostgresStore
from webhookd.store.postgres_schema import SCHEMA_VERSION


def tables(url: str) -> set[str]:
    with psycopg.connect(url) as c:
        rows = c.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {r[0] for r in rows}


def sql(url: str, statement: str) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        c.execute(statement)  # type: ignore[arg-type]


async def test_migration_from_an_empty_database(pg_url: str) -> None:
    assert tables(pg_url) == set()
    s = PostgresStore(pg_url)
    await s.open()
    try:
        assert tables(pg_url) == {
            "webhookd_meta",
            "devices",
            "events",
            "deliveries",
            "endpoints",
            "mutes",
            "leases",
            "hub_members",
            "gateways",
        }
        with psycopg.connect(pg_url) as c:
            (version,) = c.execute("SELECT value FROM webhookd_meta WHERE key = 'schema_version'").fetchone() or ()
            indexes = {r[0] for r in c.execute("SELECT indexname FROM pg_indexes WHERE tablename = 'deliveries'")}
            (partial,) = c.execute(
                "SELECT indexdef FROM pg_indexes WHERE indexname = 'deliveries_pending_lane'"
            ).fetchone() or ("",)
        assert version == str(SCHEMA_VERSION)
        assert {"deliveries_pending", "deliveries_pending_lane", "deliveries_by_status"} <= indexes
        assert "WHERE (status = 'pending'::text)" in partial
        await add(s, "d1", ("a", "pending"))
    finally:
        await s.close()
    # Opening again migrates nothing and keeps the data; several processes opening at once migrate once.
    again = [PostgresStore(pg_url) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in again))
    try:
        assert [await s.pending_count() for s in again] == [1, 1, 1]
    finally:
        for s in again:
            await s.close()


async def test_several_processes_migrate_a_fresh_database_once(pg_url: str) -> None:
    stores = [PostgresStore(pg_url) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        with psycopg.connect(pg_url) as c:
            assert c.execute("SELECT value FROM webhookd_meta WHERE key = 'schema_version'").fetchall() == [
                (str(SCHEMA_VERSION),)
            ]
    finally:
        for s in stores:
            await s.close()


async def test_a_newer_schema_is_refused_before_anything_is_written(pg_url: str) -> None:
    s = PostgresStore(pg_url)
    await s.open()
    await s.close()
    sql(pg_url, "UPDATE webhookd_meta SET value = '99' WHERE key = 'schema_version'")
    sql(pg_url, "DELETE FROM webhookd_meta WHERE key = 'probe'")
    with pytest.raises(StoreError, match=r"schema version 99, newer than this webhookd \(2\); refusing to start"):
        await PostgresStore(pg_url).open()
    with psycopg.connect(pg_url) as c:
        assert c.execute("SELECT key, value FROM webhookd_meta").fetchall() == [("schema_version", "99")]


async def test_a_database_holding_someone_elses_tables_is_refused(pg_url: str) -> None:
    sql(pg_url, "CREATE TABLE invoices (id int PRIMARY KEY, total numeric)")
    with pytest.raises(StoreError, match=r"holds 1 tables but no webhookd schema.*give webhookd a database of its own"):
        await PostgresStore(pg_url).open()
    assert tables(pg_url) == {"invoices"}  # untouched


async def test_credentials_never_appear_in_messages(pg_url: str) -> None:
    host_port = pg_url.split("@", 1)[1].split("/", 1)[0]
    url = f"postgresql://postgres:s3cret-pw@{host_port}/no_such_db"
    s = PostgresStore(url)
    assert "s3cret" not in s.location and s.location.startswith("postgresql://127.0.0.1:")
    with pytest.raises(StoreError) as err:
        await s.open()
    assert "no_such_db" in str(err.value) and "s3cret" not in str(err.value)


async def test_the_store_fails_while_postgresql_is_stopped_and_recovers_by_itself(postgres: PostgresFactory) -> None:
    cluster = await postgres()
    url = cluster.create_db()
    s = PostgresStore(url)
    await s.open()
    watching = asyncio.create_task(s.supervise())
    try:
        (row,) = await add(s, "d0", ("a", "pending"))
        cluster.stop()
        with pytest.raises(StoreUnavailable):
            await add(s, "d1", ("a", "pending"))
        assert not s.healthy and s.last_error
        with pytest.raises(StoreUnavailable):
            await s.save_devices([change("d2", []).device])
        with pytest.raises(StoreError):
            await s.pending_count()
        assert await s.probe() is False
        assert not watching.done()  # an outage is not a broken store
        cluster.start()  # the same port
        started = time.monotonic()
        while not s.healthy:  # the store's own probe notices, without any write of ours
            assert time.monotonic() - started < 5, s.last_error
            await asyncio.sleep(0.05)
        assert time.monotonic() - started < 2
        await add(s, "d3", ("a", "pending"))
        assert [r.event.device_id for r in await s.load_pending_page("a", 0, 10)] == ["d0", "d3"]
        assert (await s.load_pending_page("a", 0, 10))[0].id == row.id
        assert {d.id for d in await s.load_devices()} == {"d0", "d3"}  # nothing of the failed writes
        assert not watching.done()
    finally:
        await s.close()
    await asyncio.wait_for(watching, 2)


async def test_an_idle_store_notices_a_server_gone_away(postgres: PostgresFactory) -> None:
    cluster = await postgres()
    s = PostgresStore(cluster.create_db(), idle_probe=0.3)
    await s.open()
    try:
        await asyncio.sleep(0.5)
        assert s.healthy
        cluster.stop()
        started = time.monotonic()
        while s.healthy:
            assert time.monotonic() - started < 3
            await asyncio.sleep(0.05)
        cluster.start()
        while not s.healthy:
            assert time.monotonic() - started < 8
            await asyncio.sleep(0.05)
    finally:
        await s.close()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("mysql://root:hunter2@db/x", "store: must be null (SQLite in state_dir) or a postgresql:// URL"),
        ("db.example.com/webhookd", "store: must be null (SQLite in state_dir) or a postgresql:// URL"),
        ("postgresql://u:hunter2@db:99999/x", "store: invalid URL (bad port)"),
        ("postgresql://u:hunter2@db/x y", "store: must not contain whitespace or control characters"),
        (5432, "store: expected a string"),
    ],
)
def test_a_store_that_is_not_a_postgresql_url_is_refused_without_echoing_it(value: object, problem: str) -> None:
    from tests.test_config import problems_of

    (got,) = problems_of({"admin": {"socket": "./a.sock"}, "store": value})
    assert got.startswith(problem), got
    assert "hunter2" not in got


def test_check_config_names_the_store_without_its_password() -> None:
    from tests.test_config import parse
    from webhookd.config.load import summary

    cfg = parse({"admin": {"socket": "./a.sock"}, "store": "postgres://webhookd:${PW}@db:5432/wh"}, env={"PW": "x"})
    assert cfg.store == "postgres://webhookd:x@db:5432/wh"
    assert summary(cfg).endswith("store postgres://db:5432/wh")


def test_the_store_key_picks_the_backend(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("admin: {socket: ./a.sock}\nstore: postgresql://webhookd:pw@db.example.com/webhookd\n")
    loaded = load_config(cfg)
    store = store_for(loaded.store, loaded.db_path)
    assert isinstance(store, PostgresStore) and store.location == "postgresql://db.example.com/webhookd"
    cfg.write_text("admin: {socket: ./a.sock}\nstore: null\n")
    loaded = load_config(cfg)
    assert loaded.store is None and not isinstance(store_for(loaded.store, loaded.db_path), PostgresStore)


@pytest.mark.slow
async def test_the_daemon_on_postgresql_delivers_and_keeps_its_state_across_a_restart(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    # pg_url first: its database is dropped only after the daemon has stopped (fixtures end in reverse order)
    r = await receiver()
    d = await daemon([endpoint("r", r)], store=pg_url)
    assert (await d.heartbeat("pg-dev", name="Lab printer"))["changed"] is True
    (got,) = await r.wait_for(1)
    assert got.json["type"] == "device.online" and got.json["device"]["id"] == "pg-dev"
    assert not (d.tmp / "state" / "webhookd.db").exists()  # nothing in SQLite
    assert await d.stop() == 0
    await d.start()
    # The device is known (online) after the restart: a heartbeat changes nothing, no second webhook.
    assert (await d.heartbeat("pg-dev"))["changed"] is False
    status, body = await d.admin("GET", "/v1/devices")
    assert status == 200
    assert [(x["id"], x["state"]) for x in (body if isinstance(body, list) else body["devices"])] == [
        ("pg-dev", "online")
    ]
    assert (await d.cli("deliveries", "--json")).returncode == 0
    await asyncio.sleep(0.3)
    assert len(r.got) == 1
    with psycopg.connect(pg_url) as c:
        assert c.execute("SELECT endpoint, status FROM deliveries").fetchall() == [("r", "delivered")]


@pytest.mark.slow
async def test_the_daemon_answers_503_while_postgresql_is_down_and_recovers_by_itself(
    postgres: PostgresFactory, daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    cluster = await postgres()
    r = await receiver()
    d = await daemon([endpoint("r", r)], store=cluster.create_db(), allow_errors=True)
    await d.heartbeat("dev-a")
    await r.wait_for(1)
    cluster.stop()
    status, body = await d.request("POST", "/v1/heartbeat", json={"device": "dev-b"})
    assert status == 503, body
    started = time.monotonic()
    while await d.probe_healthz() != 503:
        assert time.monotonic() - started < 10
        await asyncio.sleep(0.1)
    cluster.start()
    started = time.monotonic()
    while await d.probe_healthz() != 200:  # by itself: nothing is sent meanwhile
        assert time.monotonic() - started < 5
        await asyncio.sleep(0.1)
    await d.heartbeat("dev-b")
    got = await r.wait_for(2)
    assert [g.json["device"]["id"] for g in got] == ["dev-a", "dev-b"]
    assert [e["event"] for e in d.logs() if e.get("event", "").startswith("store_")] == [
        "store_unavailable",
        "store_recovered",
    ]


async def test_a_server_restart_between_writes_fails_none_of_them(postgres: PostgresFactory) -> None:
    cluster = await postgres()
    s = PostgresStore(cluster.create_db())
    await s.open()
    try:
        await add(s, "d0", ("a", "pending"))
        assert await s.pending_count() == 1
        cluster.stop()
        cluster.start()
        await add(s, "d1", ("a", "pending"))  # the writer's connection was dropped: replaced before BEGIN
        assert s.healthy
        assert await s.pending_count() == 2  # so were the pool's
    finally:
        await s.close()
