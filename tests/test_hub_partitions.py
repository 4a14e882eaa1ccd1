"""Several hub processes on one PostgreSQL (CONTRACT §14): deliveries shared by partition leases, per-(endpoint,
device) order across the hub, a killed process's partitions taken over within 10 s, a stopped one fenced off,
exactly one `endpoint_disabled` for the whole hub. Real hub daemons, a real PostgreSQL the fixture started, real
receivers; events come in as signed relays (a gateway's requests)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import Daemon, Receiver, endpoint, eventually
from tests.test_hub import GATEWAY, hub_config, relayed_body, sign
from webhookd.leases import PARTITIONS, partition_of
from webhookd.presence import Device
from webhookd.store import Change, Receipt
from webhookd.store.postgres import PostgresStore

HOOK = "hub-hook"
DEVICE_EVENTS = ["online", "utilizing"]


def leases(url: str) -> list[tuple[int, str | None, int]]:
    with psycopg.connect(url, autocommit=True) as c:
        return [(r[0], r[1], r[2]) for r in c.execute("SELECT part, owner, epoch FROM leases ORDER BY part")]


def owner_of(d: Daemon, url: str) -> set[int]:
    assert d.proc is not None
    return {p for p, owner, _ in leases(url) if owner and owner.split(":")[1] == str(d.proc.pid)}


async def hubs(
    daemon: DaemonFactory, tmp_path: Path, url: str, receiver: Receiver, n: int, **extra: Any
) -> list[Daemon]:
    out = [
        await daemon(
            [endpoint(HOOK, receiver, events=DEVICE_EVENTS, concurrency=4)],
            tmp=tmp_path / f"hub{i}",
            hub=hub_config(),
            store=url,
            start=False,
            **extra,
        )
        for i in range(n)
    ]
    # The first process creates and migrates the schema alone; the others then start together.
    await out[0].start()
    await asyncio.gather(*(d.start() for d in out[1:]))
    return out


async def balanced(url: str, procs: Sequence[Daemon], timeout: float = 20.0) -> None:
    share = PARTITIONS // len(procs)

    def check() -> bool:
        return all(len(owner_of(d, url)) >= share for d in procs)

    await eventually(check, timeout=timeout, interval=0.2)


class Relay:
    """A gateway's side: numbered events per device, each relayed to the hub process chosen."""

    def __init__(self) -> None:
        self.sent: dict[str, list[str]] = {}
        self.n = 0

    async def send(self, hub: Daemon, device: str, session: aiohttp.ClientSession) -> None:
        self.n += 1
        ev_id = f"evt_{self.n:08d}_{device}"
        key = f"{GATEWAY}:{device}"
        kind = "device.online" if len(self.sent.get(key, ())) % 2 == 0 else "device.utilizing"
        body = json.dumps(relayed_body(ev_id, device, type=kind, time=f"2026-12-03T15:00:00.{self.n % 1000:03d}Z"))
        headers = {
            "Content-Type": "application/json",
            "Webhookd-Gateway": GATEWAY,
            "Webhookd-Signature": sign(body.encode()),
        }
        async with session.post(hub.base + "/v1/relay", data=body, headers=headers) as r:
            assert r.status in (200, 201, 202), (r.status, await r.text())
        self.sent.setdefault(key, []).append(ev_id)

    async def rounds(self, procs: Sequence[Daemon], devices: Sequence[str], rounds: int) -> None:
        """Every device gets `rounds` events in order; the devices of a round go at once, each to another
        process."""
        async with aiohttp.ClientSession() as session:
            for r in range(rounds):
                await asyncio.gather(
                    *(self.send(procs[(i + r) % len(procs)], d, session) for i, d in enumerate(devices))
                )


def by_device(receiver: Receiver) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in receiver.got:
        out.setdefault(r.json["device"]["id"], []).append(r.headers["Webhook-Id"])
    return out


def in_order_once(got: dict[str, list[str]], sent: dict[str, list[str]], dup_allowed: int = 0) -> None:
    dups = 0
    for dev, ids in sent.items():
        seen = got.get(dev, [])
        # duplicates (an attempt in flight at a kill) may repeat an id; the first arrivals keep the order
        firsts = list(dict.fromkeys(seen))
        assert firsts == ids, (dev, seen, ids)
        dups += len(seen) - len(firsts)
    assert dups <= dup_allowed, dups


async def delivered(receiver: Receiver, relay: Relay, timeout: float) -> float:
    started = time.monotonic()
    want = {i for ids in relay.sent.values() for i in ids}
    await eventually(lambda: want <= {r.headers["Webhook-Id"] for r in receiver.got}, timeout=timeout)
    return time.monotonic() - started


async def scrape(d: Daemon) -> str:
    conn = aiohttp.UnixConnector(path=str(d.tmp / "admin.sock"))
    async with aiohttp.ClientSession(connector=conn) as s, s.get("http://webhookd/metrics") as r:
        assert r.status == 200
        return await r.text()


def succeeded(d: Daemon) -> int:
    return sum(1 for e in d.logs() if e.get("event") == "delivery_succeeded")


async def test_three_processes_share_the_deliveries_once_and_in_order(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    at = await receiver()
    procs = await hubs(daemon, tmp_path, pg_url, at, 3)
    await balanced(pg_url, procs)
    rows = leases(pg_url)
    assert len({owner for _, owner, _ in rows}) == 3 and all(owner for _, owner, _ in rows)
    relay = Relay()
    await relay.rounds(procs, [f"dev-{i}" for i in range(40)], 5)
    await delivered(at, relay, timeout=20)
    await asyncio.sleep(0.5)
    in_order_once(by_device(at), relay.sent)
    assert len(at.got) == 200
    assert all(succeeded(d) > 0 for d in procs)  # each delivered its partitions' share
    held = []
    for d in procs:
        text = await scrape(d)
        held += [float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("webhookd_hub_partitions ")]
    assert sum(held) == PARTITIONS and min(held) >= PARTITIONS // 3, held
    # every process lists the whole hub
    for d in procs:
        status, body = await d.admin("GET", "/v1/endpoints")
        assert status == 200
        (row,) = [e for e in body if e["name"] == HOOK]
        assert row["delivered"] == 200 and row["pending"] == 0
        status, devices = await d.admin("GET", "/v1/devices")
        assert status == 200 and len(devices) == 40  # each process took a third of the relays


async def test_a_killed_process_s_partitions_are_taken_over_within_10_s(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    at = await receiver()
    procs = await hubs(daemon, tmp_path, pg_url, at, 2)
    await balanced(pg_url, procs)
    victim, survivor = procs
    theirs = owner_of(victim, pg_url)
    devices = [d for d in (f"dev-{i}" for i in range(400)) if partition_of(HOOK, f"{GATEWAY}:{d}") in theirs][:30]
    relay = Relay()
    await relay.rounds([survivor], devices, 1)  # recorded by the survivor, to be delivered by the victim
    await delivered(at, relay, timeout=10)
    await victim.kill()
    killed = time.monotonic()
    await relay.rounds([survivor], devices, 2)
    await delivered(at, relay, timeout=15)
    takeover = time.monotonic() - killed
    assert takeover < 10, takeover
    assert theirs <= owner_of(survivor, pg_url)
    in_order_once(by_device(at), relay.sent, dup_allowed=5 * 4)  # in flight or settling at the kill
    print(f"takeover after SIGKILL: {takeover:.2f} s")


async def test_a_stopped_process_makes_no_attempt_for_partitions_it_lost(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    at = await receiver()
    procs = await hubs(daemon, tmp_path, pg_url, at, 2)
    await balanced(pg_url, procs)
    paused, other = procs
    assert paused.proc is not None
    theirs = owner_of(paused, pg_url)
    epochs = {p: e for p, _, e in leases(pg_url)}
    devices = [d for d in (f"dev-{i}" for i in range(400)) if partition_of(HOOK, f"{GATEWAY}:{d}") in theirs][:20]
    os.kill(paused.proc.pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        relay = Relay()
        await relay.rounds([other], devices, 2)
        await delivered(at, relay, timeout=12)  # by the other process, once the leases expired
        assert time.monotonic() - stopped < 10
        assert theirs <= owner_of(other, pg_url)
        assert all(e > epochs[p] for p, _, e in leases(pg_url) if p in theirs)  # a new epoch: fenced
        before = succeeded(paused)
    finally:
        os.kill(paused.proc.pid, signal.SIGCONT)
    await asyncio.sleep(2.5)  # it resumes, finds its leases gone, rejoins
    assert succeeded(paused) == before  # no attempt for rows the other process took
    assert any(e.get("event") in ("hub_partitions_lost", "hub_partitions") for e in paused.logs())
    in_order_once(by_device(at), relay.sent, dup_allowed=5 * 4)  # in flight or settling at the stop
    await balanced(pg_url, procs)  # and it gets a share again


async def test_exactly_one_process_disables_a_failing_endpoint_then_enable_delivers_in_order(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    at = await receiver()
    failing = True
    at.status = lambda _r: 500 if failing else 200
    procs = await hubs(
        daemon,
        tmp_path,
        pg_url,
        at,
        3,
        delivery={"retry_schedule": ["100ms", "200ms", "300ms"], "disable_after": 6},
    )
    await balanced(pg_url, procs)
    relay = Relay()
    await relay.rounds(procs, [f"dev-{i}" for i in range(30)], 2)

    def disabled_lines() -> list[dict[str, Any]]:
        return [e for d in procs for e in d.logs() if e.get("event") == "endpoint_disabled"]

    await eventually(lambda: disabled_lines(), timeout=20)
    await asyncio.sleep(2.0)  # every process has seen the shared row by now
    assert len(disabled_lines()) == 1
    for d in procs:
        status, body = await d.admin("GET", "/v1/endpoints")
        (row,) = [e for e in body if e["name"] == HOOK]
        assert status == 200 and not row["enabled"] and row["held"] > 0, row
    failing = False
    status, _ = await procs[2].admin("POST", f"/v1/endpoints/{HOOK}/enable")
    assert status == 200
    await delivered(at, relay, timeout=20)
    await asyncio.sleep(0.5)
    in_order_once(by_device(at), relay.sent)


async def test_a_failing_endpoint_gets_one_probe_at_a_time_for_the_whole_hub(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    at = await receiver()
    attempts: list[float] = []

    def fail(r: Any) -> int:
        attempts.append(r.at)
        return 503

    at.status = fail
    procs = await hubs(
        daemon, tmp_path, pg_url, at, 3, delivery={"retry_schedule": ["1s", "1s", "1s"], "disable_after": 0}
    )
    await balanced(pg_url, procs)
    relay = Relay()
    await relay.rounds(procs, [f"dev-{i}" for i in range(30)], 1)
    await eventually(lambda: attempts, timeout=10)
    first = attempts[0]
    await asyncio.sleep(6.0)
    # after the first failures the endpoint is paused for the whole hub; then one probe at a time, hub-wide
    probes = [t for t in attempts if t > first + 1.5]
    assert probes, attempts
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert all(g > 0.5 for g in gaps), gaps
    assert len(probes) <= 6, probes  # about one a second (the schedule's step, +-20%), not one per process


async def test_replay_and_disable_through_one_process_act_on_the_whole_hub(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    at = await receiver()
    dead = True
    at.status = lambda _r: 500 if dead else 200
    procs = await hubs(daemon, tmp_path, pg_url, at, 2, delivery={"retry_schedule": ["100ms"], "disable_after": 0})
    await balanced(pg_url, procs)
    relay = Relay()
    await relay.rounds(procs, [f"dev-{i}" for i in range(20)], 1)

    async def counts(d: Daemon) -> dict[str, Any]:
        status, body = await d.admin("GET", "/v1/endpoints")
        assert status == 200
        (row,) = [e for e in body if e["name"] == HOOK]
        return dict(row)

    async def all_dead() -> bool:
        return (await counts(procs[0]))["dead"] == 20

    deadline = time.monotonic() + 15
    while not await all_dead():
        assert time.monotonic() < deadline, await counts(procs[0])
        await asyncio.sleep(0.2)
    dead = False
    # replayed through the second process: the rows of the first one's partitions too
    status, body = await procs[1].admin("POST", "/v1/deliveries/replay", {"endpoint": HOOK, "status": "dead"})
    assert status == 200, body
    await delivered(at, relay, timeout=10)
    # disabled through the first process: the second stops sending too; held rows wait for the enable
    status, _ = await procs[0].admin("POST", f"/v1/endpoints/{HOOK}/disable")
    assert status == 200
    await asyncio.sleep(1.5)  # the other process has read the shared row
    before = len(at.got)
    await relay.rounds(procs[1:], [f"dev-{i}" for i in range(20)], 1)
    await asyncio.sleep(1.0)
    assert len(at.got) == before
    assert (await counts(procs[1]))["enabled"] is False
    status, _ = await procs[1].admin("POST", f"/v1/endpoints/{HOOK}/enable")
    assert status == 200
    await delivered(at, relay, timeout=10)
    in_order_once(by_device(at), relay.sent)


# --- the store's fence, in process --------------------------------------------------------------------


class StubFence:
    def __init__(self, owner: str, held: dict[int, int]) -> None:
        self.owner, self.held = owner, held

    def fence(self) -> tuple[list[int], list[int]]:
        parts = sorted(self.held)
        return parts, [self.held[p] for p in parts]


async def test_receipts_of_a_lease_lost_change_nothing(pg_url: str, tmp_path: Path) -> None:
    from tests.test_retention import event

    store = PostgresStore(pg_url)
    await store.open()
    try:
        ev = event(time.time(), "dev-1")
        (row,) = await store.record(
            [Change(Device("dev-1", "online", last_seen=ev.time, changed_at=ev.time), ev, [("ops", "pending")])]
        )
        part = partition_of("ops", "dev-1")
        with psycopg.connect(pg_url, autocommit=True) as c:
            c.execute("UPDATE leases SET owner = 'b', epoch = 7, expires_at = 1e12 WHERE part = %s", (part,))
        store.fence = StubFence("a", {(part + 1) % PARTITIONS: 1})
        assert await store.load_pending_page("ops", 0, 10) == []  # pages read only the partitions held
        store.fence = StubFence("a", {part: 6})  # we think we hold it, but b took it over at epoch 7
        await store.save_receipts([Receipt(row.id, "delivered", 1, None, 200, None)], [])
        with psycopg.connect(pg_url, autocommit=True) as c:
            assert c.execute("SELECT status FROM deliveries WHERE id = %s", (row.id,)).fetchone() == ("pending",)
        store.fence = StubFence("b", {part: 7})
        assert [r.id for r in await store.load_pending_page("ops", 0, 10)] == [row.id]
        await store.save_receipts([Receipt(row.id, "delivered", 1, None, 200, None)], [])
        with psycopg.connect(pg_url, autocommit=True) as c:
            assert c.execute("SELECT status FROM deliveries WHERE id = %s", (row.id,)).fetchone() == ("delivered",)
    finally:
        await store.close()
