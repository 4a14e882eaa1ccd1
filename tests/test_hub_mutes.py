"""Mutes on a hub of several processes (CONTRACT §12, §14): a mute, unmute or forget made through one process
applies to the relays every process records, within about a second (a NOTIFY in the transaction that wrote it),
and a notice that never came is made up for by the periodic read. Real hub daemons, a real PostgreSQL, real
receivers; events come in as signed relays."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import psycopg

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import Daemon, Receiver, eventually
from tests.test_hub import GATEWAY
from tests.test_hub_partitions import Relay, balanced, hubs
from webhookd.mutes import MuteRule, Mutes, sync

# --- the decision (pure) ---------------------------------------------------------------------------------


def test_sync_takes_the_store_s_rules_and_names_what_changed() -> None:
    held = Mutes([MuteRule("a-*", None), MuteRule("b", 200.0), MuteRule("gone", None), MuteRule("old", 50.0)])
    stored = [MuteRule("a-*", None), MuteRule("b", 300.0, "longer"), MuteRule("new-*", None), MuteRule("exp", 90.0)]
    change = sync(held, stored, 100.0)
    assert [r.match for r in change.rules] == ["a-*", "b", "new-*"]  # expired ones are not held
    assert change.added == ("b", "new-*")  # "b" was muted again with another end
    assert change.removed == ("gone",)  # "old" merely expired: nothing to say about it
    assert len(held) == 4  # the decision changes nothing; the caller applies it
    held.reset(change.rules)
    assert held.covering("new-1", 100.0) is not None and held.covering("gone", 100.0) is None


def test_sync_of_the_same_rules_is_no_change() -> None:
    rules = [MuteRule("a-*", None, "x", 1.0, "ops"), MuteRule("b", 200.0)]
    assert not sync(Mutes(rules), list(rules), 100.0)


# --- real hub processes ------------------------------------------------------------------------------------


async def relay(hub: Daemon, relays: Relay, device: str) -> str:
    """One event of `device` relayed through `hub`; its id."""
    async with aiohttp.ClientSession() as session:
        await relays.send(hub, device, session)
    return relays.sent[f"{GATEWAY}:{device}"][-1]


def got(receiver: Receiver) -> set[str]:
    return {r.headers["Webhook-Id"] for r in receiver.got}


def synced(d: Daemon, since: int = 0) -> list[dict[str, Any]]:
    return [e for e in d.logs()[since:] if e.get("event") == "mutes_synced"]


async def learns(d: Daemon, since: int, key: str, match: str, timeout: float = 3.0) -> float:
    """Seconds until `d` logs a mutes_synced with `match` in `key` (added, removed)."""
    started = time.monotonic()
    await eventually(lambda: any(match in e[key] for e in synced(d, since)), timeout=timeout)
    return time.monotonic() - started


async def recorded(d: Daemon, event_id: str) -> dict[str, Any]:
    """The relay_recorded line of `event_id` (written after the answer, at the end of the loop's turn)."""

    def lines() -> list[dict[str, Any]]:
        return [e for e in d.logs() if e.get("event") == "relay_recorded" and e.get("event_id") == event_id]

    await eventually(lambda: bool(lines()))
    (line,) = lines()
    return line


async def test_a_glob_muted_through_one_process_mutes_the_relays_of_another(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    at = await receiver()
    a, b = await hubs(daemon, tmp_path, pg_url, at, 2)
    await balanced(pg_url, [a, b])
    relays = Relay()
    first = await relay(b, relays, "printer-1")
    await eventually(lambda: first in got(at))

    mark = len(b.logs())
    status, body = await a.admin("POST", "/v1/devices/mute", {"match": f"{GATEWAY}:printer-*", "reason": "toner"})
    assert status == 200, body
    took = await learns(b, mark, "added", f"{GATEWAY}:printer-*")
    assert took < 1.5, took
    muted = [await relay(b, relays, "printer-1"), await relay(b, relays, "printer-2")]
    loud = await relay(b, relays, "scanner-1")  # not covered: delivered, and once it is the others had their turn
    await eventually(lambda: loud in got(at))
    await asyncio.sleep(0.5)
    assert not set(muted) & got(at)
    for ev in muted:
        line = await recorded(b, ev)
        assert line["muted_by"] == f"{GATEWAY}:printer-*" and line["deliveries"] == 0, line
    status, devices = await b.admin("GET", "/v1/devices")
    assert status == 200
    assert {d["id"]: d["muted"] for d in devices}[f"{GATEWAY}:printer-2"] is True  # recorded, shown muted

    mark = len(b.logs())
    status, body = await a.admin("POST", "/v1/devices/unmute", {"match": f"{GATEWAY}:printer-*"})
    assert status == 200, body
    took = await learns(b, mark, "removed", f"{GATEWAY}:printer-*")
    assert took < 1.5, took
    again = await relay(b, relays, "printer-2")
    await eventually(lambda: again in got(at))
    assert not set(muted) & got(at)  # nothing is sent for what happened while muted
    assert "muted_by" not in await recorded(b, again)


async def two_hubs(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path, pg_url: str
) -> tuple[Receiver, Daemon, Daemon, Relay]:
    at = await receiver()
    a, b = await hubs(daemon, tmp_path, pg_url, at, 2)
    await balanced(pg_url, [a, b])
    return at, a, b, Relay()


async def seen_then_muted(via: Daemon, muter: Daemon, relays: Relay, at: Receiver, device: str) -> None:
    """`device` relayed through `via` and delivered, then muted through `muter`."""
    first = await relay(via, relays, device)
    await eventually(lambda: first in got(at))
    status, body = await muter.admin("POST", "/v1/devices/mute", {"match": f"{GATEWAY}:{device}"})
    assert status == 200, body


async def test_forget_through_one_process_ends_the_device_s_mute_on_another(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    at, a, b, relays = await two_hubs(daemon, receiver, tmp_path, pg_url)
    dev = f"{GATEWAY}:sensor-9"
    mark = len(b.logs())
    await seen_then_muted(a, a, relays, at, "sensor-9")  # relayed through A, so that A knows what it forgets
    await learns(b, mark, "added", dev)
    muted = await relay(b, relays, "sensor-9")
    assert (await recorded(b, muted))["deliveries"] == 0

    mark = len(b.logs())
    status, body = await a.admin("DELETE", f"/v1/devices/{dev}")
    assert status == 200, body
    took = await learns(b, mark, "removed", dev)
    assert took < 1.5, took
    after = await relay(b, relays, "sensor-9")
    await eventually(lambda: after in got(at))
    assert muted not in got(at)


async def test_forget_through_a_process_that_never_saw_the_device(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    at, a, b, relays = await two_hubs(daemon, receiver, tmp_path, pg_url)
    dev = f"{GATEWAY}:sensor-7"
    mark = len(b.logs())
    await seen_then_muted(b, a, relays, at, "sensor-7")  # relayed through B only: A never holds it in memory
    await learns(b, mark, "added", dev)  # else B may read the mute and its end together: no change to log
    mark = len(b.logs())
    status, body = await a.admin("DELETE", f"/v1/devices/{dev}")
    assert status == 200, body
    assert body["id"] == dev and body["muted"] is True  # the device as it was
    await learns(b, mark, "removed", dev)
    for d in (a, b):  # gone from every process's listing, and a second forget knows nothing of it
        status, listed = await d.admin("GET", "/v1/devices")
        assert status == 200 and dev not in {x["id"] for x in listed}
    status, body = await b.admin("DELETE", f"/v1/devices/{dev}")
    assert status == 404, body
    after = await relay(b, relays, "sensor-7")  # no mute left anywhere: delivered
    await eventually(lambda: after in got(at))


async def test_a_mute_whose_notice_never_came_is_read_by_the_backstop(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    at = await receiver()
    (b,) = await hubs(daemon, tmp_path, pg_url, at, 1)
    mark = len(b.logs())
    # Written behind the hub's back, with no NOTIFY: as if the notice was sent while B was not listening.
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute(
            "INSERT INTO mutes (match, until, reason, created_at, created_by) VALUES (%s, NULL, NULL, %s, NULL)",
            (f"{GATEWAY}:lost-*", time.time()),
        )
    await learns(b, mark, "added", f"{GATEWAY}:lost-*", timeout=15.0)  # the read every 10 lease loops
    relays = Relay()
    ev = await relay(b, relays, "lost-1")
    assert (await recorded(b, ev))["muted_by"] == f"{GATEWAY}:lost-*"
