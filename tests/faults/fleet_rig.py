"""A fleet on one box for the fault tests of CONTRACT §14 (issue 13 item 5): gateway processes (SQLite, `upstream:`)
relaying to hub processes (`hub:`, one PostgreSQL database), real receivers, and device load.

- Gateways: `webhookd run` with many devices, each heartbeating in batches (`POST /v1/heartbeats`, up to 1000 a
  request) with a short silence timeout, random state changes, and silence waves (some devices quiet for longer
  than the timeout: offline events, then online again). Their `upstream.url` is a Balancer of their own: a TCP
  round-robin proxy in front of every hub process (a load balancer), which the tests can cut (connection
  refused: the hub unreachable from that gateway) and heal.
- Hubs: `webhookd run` with `hub:` (both gateways) and `store:` the same PostgreSQL URL, each with its own
  state_dir, ports and admin socket. Each process sends its webhooks with an extra header `X-Rig-Process: hub-N`
  (its endpoints' `headers:`, the only line in which their configs differ), so that a receiver knows which process
  made each attempt.
- Receivers: one aiohttp server per hub endpoint recording every attempt (arrival order, Webhook-Id, device id,
  type, the sending process, the answer); a receiver can be made to fail (503).

`Fleet.check()` is the pass criterion, from the databases and the receivers only: every event the hub
acknowledged (the gateway's `upstream` delivery is `delivered`, and the event is in the hub's `events` table)
reached every endpoint subscribed to it, nothing else arrived, per-(endpoint, device) order at the receiver is the
gateway's order (for the hub's own gateway.* events, the hub's), duplicates are within a bound the test gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import importlib
import inspect
import json
import os
import random
import signal
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
from aiohttp import web

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import SECRET, Daemon, free_port

GATEWAYS = {"gw-a": "gw-a-Shared-Secret-0123456789", "gw-b": "gw-b-Shared-Secret-9876543210"}  # test-only
PROCESS_HEADER = "X-Rig-Process"
EP_CONCURRENCY = 4  # each hub endpoint's concurrency (per process)
PARTITIONS = 32  # the hub's lease rows (PostgreSQL schema version 2)
PER_FAULT = 5 * EP_CONCURRENCY  # §14: duplicates at most 5 x the endpoint's concurrency per killed/stopped process
STATES = ("utilizing", "unplugged", "online")  # explicit state changes a device may report

# Hub endpoints: name -> (event kinds, device globs). ep-b takes a subset of the events (one gateway, two kinds).
ENDPOINTS: dict[str, tuple[list[str], list[str]]] = {
    "ep-all": (["all"], ["*"]),
    "ep-b": (["online", "offline"], ["gw-b:*"]),
}


class FleetDaemon(Daemon):
    """A daemon of the fleet: up to 60 s to become ready (five daemons and a PostgreSQL start at once, maybe beside
    the rest of the suite on 2 cores)."""

    async def wait_ready(self, timeout: float = 60.0) -> None:
        await super().wait_ready(timeout)


# ---------------------------------------------------------------------------------------------------------
# receivers
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Hit:
    seq: int  # arrival order at this receiver
    at: float  # time.monotonic() at arrival
    event_id: str
    device: str
    type: str
    process: str  # X-Rig-Process: which hub process made the attempt
    status: int  # what the receiver answered

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass
class RigReceiver:
    """A hub endpoint's receiver: records every attempt; answers 503 while `failing`."""

    name: str
    port: int = field(default_factory=free_port)
    hits: list[Hit] = field(default_factory=list)
    failing: bool = False
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook/{self.name}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        status = 503 if self.failing else 200
        self.hits.append(
            Hit(
                len(self.hits),
                time.monotonic(),
                request.headers.get("Webhook-Id", ""),
                str(body.get("device", {}).get("id")),
                str(body.get("type")),
                request.headers.get(PROCESS_HEADER, "?"),
                status,
            )
        )
        return web.json_response({"ok": status == 200}, status=status)

    async def start(self) -> RigReceiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def delivered(self) -> list[Hit]:
        return [h for h in self.hits if h.ok]


# ---------------------------------------------------------------------------------------------------------
# a load balancer in front of the hub processes
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Balancer:
    """A TCP round-robin proxy on 127.0.0.1 in front of `backends()` (the hub processes' heartbeat ports): each
    new connection goes to the next backend that accepts it. cut() closes it (new connections refused, open ones
    reset: the hub unreachable); heal() opens it again on the same port."""

    backends: Callable[[], list[int]]
    port: int = field(default_factory=free_port)
    connections: int = 0
    _server: asyncio.Server | None = None
    _next: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Balancer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        return self

    async def heal(self) -> None:
        if self._server is None:
            await self.start()

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()  # the pipes see it and end (a cancelled handler task upsets asyncio's streams)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), 5.0)

    stop = cut

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            ports = self.backends()
            for _ in range(len(ports)):
                port = ports[self._next % len(ports)]
                self._next += 1
                try:
                    up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
                    break
                except (OSError, TimeoutError):
                    continue
            if up_writer is None:
                return
            self._writers.add(up_writer)
            self.connections += 1
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.transport.abort()
                    self._writers.discard(w)
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()


# ---------------------------------------------------------------------------------------------------------
# device load on a gateway
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Load:
    """The devices of one gateway: every `tick`, one heartbeat for each device that is not silent (batches of up
    to 1000), a share of them (`change`) reporting another state."""

    gateway: Daemon
    devices: list[str]
    rng: random.Random
    tick: float = 0.3
    change: float = 0.02
    silent_until: dict[str, float] = field(default_factory=dict)
    batches: int = 0
    heartbeats: int = 0
    failed_batches: int = 0
    changed: int = 0  # heartbeats answered changed: true

    @property
    def timed(self) -> list[str]:
        """The devices with a silence timeout (the others have none: they never go offline by themselves)."""
        return [d for d in self.devices if "-t" in d]

    def wave(self, fraction: float, seconds: float) -> list[str]:
        """A silence wave: `fraction` of the timed devices say nothing for `seconds`."""
        timed = self.timed
        chosen = self.rng.sample(timed, int(len(timed) * fraction))
        until = time.monotonic() + seconds
        for d in chosen:
            self.silent_until[d] = until
        return chosen

    async def run(self, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            while not stop.is_set():
                started = time.monotonic()
                items: list[dict[str, Any]] = []
                for dev in self.devices:
                    if self.silent_until.get(dev, 0.0) > started:
                        continue
                    item: dict[str, Any] = {"device": dev}
                    if self.rng.random() < self.change:
                        item["state"] = self.rng.choice(STATES)
                    items.append(item)
                for i in range(0, len(items), 1000):
                    chunk = items[i : i + 1000]
                    try:
                        async with s.post(self.gateway.base + "/v1/heartbeats", json=chunk) as r:
                            if r.status == 200:
                                self.changed += sum(1 for a in await r.json() if a["changed"])
                                self.heartbeats += len(chunk)
                            else:
                                self.failed_batches += 1
                    except (aiohttp.ClientError, TimeoutError, OSError):
                        self.failed_batches += 1
                    self.batches += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.02, self.tick - (time.monotonic() - started)))


# ---------------------------------------------------------------------------------------------------------
# the fleet
# ---------------------------------------------------------------------------------------------------------


def wants(endpoints: dict[str, tuple[list[str], list[str]]], endpoint: str, event_type: str, device: str) -> bool:
    """Whether a hub endpoint of the rig is subscribed to a device event (its `events` and `devices` filters)."""
    kinds, globs = endpoints[endpoint]
    kind = event_type.split(".", 1)[1]
    return ("all" in kinds or kind in kinds) and any(fnmatch.fnmatchcase(device, g) for g in globs)


def stopped(d: Daemon) -> bool:
    """The process is SIGSTOPped (state T in /proc)."""
    if d.proc is None or d.proc.poll() is not None:
        return False
    try:
        stat = Path(f"/proc/{d.proc.pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")


@dataclass
class Fleet:
    daemon: DaemonFactory
    tmp: Path
    pg_url: str
    hubs: list[Daemon] = field(default_factory=list)
    gateways: dict[str, Daemon] = field(default_factory=dict)
    balancers: dict[str, Balancer] = field(default_factory=dict)
    receivers: dict[str, RigReceiver] = field(default_factory=dict)
    loads: dict[str, Load] = field(default_factory=dict)
    endpoints: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)
    stop_load: asyncio.Event = field(default_factory=asyncio.Event)
    load_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)  # named moments (time.monotonic()) for the figures
    known_bugs: list[str] = field(default_factory=list)  # product bugs the run ran into (see known_bug())
    wave_share: float = 0.3  # the share of a gateway's timed devices a phase's silence wave takes
    wave_s: float = 1.8  # how long a wave lasts (longer than the timed devices' silence timeout)
    started_at: float = field(default_factory=time.monotonic)

    # --- starting ---------------------------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        daemon: DaemonFactory,
        receiver: ReceiverFactory,
        tmp: Path,
        pg_url: str,
        *,
        hubs: int = 3,
        devices: int = 200,
        seed: int = 1,
        endpoints: dict[str, tuple[list[str], list[str]]] | None = None,
        hub_delivery: dict[str, Any] | None = None,
        gateway_silence: str = "30s",
        device_silence: str = "1s",
        timed_share: float = 0.33,
        wave_share: float = 0.3,
        wave_s: float = 1.8,
        tick: float = 0.3,
        change: float = 0.02,
        hub_allow_errors: bool = False,
        gateway_allow_errors: bool = False,
    ) -> Fleet:
        fleet = cls(daemon, tmp, pg_url, endpoints=dict(endpoints or ENDPOINTS), wave_share=wave_share, wave_s=wave_s)
        for name in fleet.endpoints:
            fleet.receivers[name] = await receiver(RigReceiver(name))
        hub_cfg = {
            "gateways": [
                {"name": gw, "secret": secret, "silence_timeout": gateway_silence} for gw, secret in GATEWAYS.items()
            ]
        }
        delivery = {
            "concurrency": 16,
            "timeout": "10s",  # a loaded box answers late; a timeout would resend what the receiver took
            "retry_schedule": ["100ms", "200ms", *["300ms"] * 100],  # 30 s before dead: nothing dies in a run
            "disable_after": 0,
            **(hub_delivery or {}),
        }
        made = [
            daemon(
                [
                    {
                        "name": name,
                        "url": fleet.receivers[name].url,
                        "events": kinds,
                        "devices": globs,
                        "secret": SECRET,
                        "concurrency": EP_CONCURRENCY,
                        "headers": {PROCESS_HEADER: f"hub-{i}"},
                    }
                    for name, (kinds, globs) in fleet.endpoints.items()
                ],
                tmp=tmp / f"hub-{i}",
                store=pg_url,
                hub=hub_cfg,
                delivery=delivery,
                logging={"format": "json", "level": "info"},
                allow_errors=hub_allow_errors,
                start=False,
                cls=FleetDaemon,
            )
            for i in range(hubs)
        ]
        fleet.hubs = list(await asyncio.gather(*made))
        # The first hub creates and migrates the schema alone; the others then start together.
        await fleet.hubs[0].start()
        await asyncio.gather(*(h.start() for h in fleet.hubs[1:]))
        for gw in GATEWAYS:
            fleet.balancers[gw] = await receiver(Balancer(fleet.hub_ports))
        gws = [
            daemon(
                [],
                tmp=tmp / gw,
                presence={"silence_timeout": "never"},
                devices=[{"match": "*-t*", "silence_timeout": device_silence}],
                delivery={"concurrency": 16, "retry_schedule": ["100ms", "200ms", "300ms"], "disable_after": 0},
                upstream={
                    "url": fleet.balancers[gw].url,
                    "gateway": gw,
                    "secret": secret,
                    "heartbeat": "300ms",
                    "timeout": "10s",
                    "concurrency": 8,
                },
                logging={"format": "json", "level": "info"},
                allow_errors=gateway_allow_errors,
                cls=FleetDaemon,
            )
            for gw, secret in GATEWAYS.items()
        ]
        for gw, made_gw in zip(GATEWAYS, await asyncio.gather(*gws), strict=True):
            fleet.gateways[gw] = made_gw
        rng = random.Random(seed)
        for n, (gw, d) in enumerate(fleet.gateways.items()):
            # d0-t00001: a timed device (a silence timeout of device_silence); d0-n00002: one without.
            ids = [f"d{n}-{'t' if rng.random() < timed_share else 'n'}{i:05d}" for i in range(devices)]
            fleet.loads[gw] = Load(d, ids, random.Random(rng.random()), tick=tick, change=change)
        return fleet

    def hub_ports(self) -> list[int]:
        return [h.port for h in self.hubs if h.running]

    def start_load(self) -> None:
        self.stop_load.clear()
        self.load_tasks = [asyncio.create_task(load.run(self.stop_load)) for load in self.loads.values()]

    async def end_load(self) -> None:
        self.stop_load.set()
        await asyncio.gather(*self.load_tasks)
        self.load_tasks = []

    def mark(self, name: str) -> float:
        """Note a named moment (the figures show them); also logged with the backlog in <tmp>/fleet.log."""
        self.marks[name] = time.monotonic()
        self.log(name)
        return self.marks[name]

    def known_bug(self, text: str) -> None:
        """The run met a product bug this rig knows the signature of (issue 13): the scenario goes on, everything
        else is still checked, and the test then fails naming it (fail_on_known_bugs)."""
        self.known_bugs.append(text)
        self.log("known product bug", bug=text)

    def log(self, what: str, **fields: Any) -> None:
        """A line in <tmp>/fleet.log: the run's progress, for a failure's post-mortem."""
        line = {"at_s": round(time.monotonic() - self.started_at, 2), "wall": time.time(), "what": what, **fields}
        line["delivered"] = {name: len(r.delivered()) for name, r in self.receivers.items()}
        with (self.tmp / "fleet.log").open("a") as f:
            f.write(json.dumps(line) + "\n")

    # --- faults -------------------------------------------------------------------------------------------

    def sigstop(self, d: Daemon) -> None:
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGSTOP)

    def sigcont(self, d: Daemon) -> None:
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGCONT)

    async def close(self) -> None:
        """Nothing frozen, no load running, the gateways stopped (SIGTERM) before the hubs they relay to: the
        fixtures then stop the hubs and the servers, and check every daemon's exit and output."""
        self.stop_load.set()
        await asyncio.gather(*self.load_tasks, return_exceptions=True)
        for d in [*self.hubs, *self.gateways.values()]:
            if stopped(d):
                self.sigcont(d)
        for d in self.gateways.values():
            if d.running:
                await d.stop()

    # --- what the databases say -------------------------------------------------------------------------

    def gateway_db(self, gw: str) -> sqlite3.Connection:
        path = self.gateways[gw].tmp / "state" / "webhookd.db"
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)

    def gateway_rows(self, gw: str, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        conn = self.gateway_db(gw)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    async def hub_rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with await psycopg.AsyncConnection.connect(self.pg_url, autocommit=True) as conn:
            cur = await conn.execute(sql, args)
            return list(await cur.fetchall())

    def upstream_backlog(self, gw: str) -> int:
        """The gateway's events not yet acknowledged by the hub."""
        (n,) = self.gateway_rows(
            gw, "SELECT count(*) FROM deliveries WHERE endpoint = 'upstream' AND status != 'delivered'"
        )[0]
        return int(n)

    def devices_not_offline(self, gw: str) -> int:
        """Timed devices not offline yet (once the load stops, each goes offline by its silence timeout)."""
        sql = "SELECT count(*) FROM devices WHERE state != 'offline' AND id LIKE '%-t%'"
        return int(self.gateway_rows(gw, sql)[0][0])

    async def hub_backlog(self) -> dict[str, int]:
        rows = await self.hub_rows(
            "SELECT status, count(*) FROM deliveries WHERE status IN ('pending', 'held') GROUP BY status"
        )
        return {str(s): int(n) for s, n in rows}

    async def leases(self) -> dict[int, tuple[str | None, int, float]]:
        """part -> (owner, epoch, expires_at) of the hub's lease rows."""
        rows = await self.hub_rows("SELECT part, owner, epoch, expires_at FROM leases ORDER BY part")
        return {int(p): (o, int(e), float(x)) for p, o, e, x in rows}

    async def owner_of(self, hub: Daemon, timeout: float = 10.0) -> str:
        """The hub process's member name (`host:pid:tag`, in hub_members and the lease rows)."""
        assert hub.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            for (owner,) in await self.hub_rows("SELECT owner FROM hub_members"):
                if str(owner).split(":")[1] == str(hub.proc.pid):
                    return str(owner)
            if time.monotonic() > deadline:
                raise AssertionError(f"hub process {hub.proc.pid} is not in hub_members")
            await asyncio.sleep(0.1)

    async def parts_of(self, owner: str) -> dict[int, int]:
        """part -> epoch of the leases `owner` holds (unexpired) now."""
        (now,) = (await self.hub_rows("SELECT extract(epoch FROM clock_timestamp())"))[0]
        return {p: e for p, (o, e, x) in (await self.leases()).items() if o == owner and x > float(now)}

    async def delivery_parts(self) -> dict[tuple[str, str], int]:
        """(endpoint, event id) -> the partition of its delivery row."""
        rows = await self.hub_rows("SELECT endpoint, event_id, part FROM deliveries")
        return {(str(ep), str(ev)): int(p) for ep, ev, p in rows}

    async def wait_quiet(
        self, timeout: float = 300.0, stall: float = 30.0, gateways: Iterable[str] | None = None
    ) -> float:
        """After the load: every timed device offline (no event can come any more), every gateway's upstream delivered,
        nothing pending at the hub and the receivers quiet for 0.3 s. Fails when the backlog stops shrinking for
        `stall` seconds or after `timeout`. Returns how long it took."""
        names = list(self.gateways if gateways is None else gateways)
        started = time.monotonic()
        deadline = started + timeout
        best, since = float("inf"), started
        while True:
            backlog = sum(self.devices_not_offline(g) + self.upstream_backlog(g) for g in names)
            hub = await self.hub_backlog()
            total = backlog + hub.get("pending", 0) + hub.get("held", 0)
            if total == 0:
                seen = sum(len(r.hits) for r in self.receivers.values())
                await asyncio.sleep(0.3)
                if seen == sum(len(r.hits) for r in self.receivers.values()):
                    self.log("quiet", took_s=round(time.monotonic() - started, 2))
                    return time.monotonic() - started
                continue
            now = time.monotonic()
            if total < best:
                best, since = total, now
            stuck = now - since > min(stall, 5.0) and hub.get("held") and total == hub["held"]
            if stuck and await self.held_while_enabled():
                best, since = float("inf"), time.monotonic()  # released again: draining goes on
                continue
            if now - since > stall or now > deadline:
                held = await self.hub_rows(
                    "SELECT endpoint, count(*), min(created_at), max(created_at) FROM deliveries"
                    " WHERE status = 'held' GROUP BY endpoint"
                )
                self.log("not drained", hub=hub, held=[list(map(str, r)) for r in held])
                left = [(g, self.devices_not_offline(g), self.upstream_backlog(g)) for g in names]
                raise AssertionError(
                    f"the fleet did not drain: gateways {left} (timed devices not offline, upstream not delivered),"
                    f" hub {hub}"
                )
            await asyncio.sleep(0.1)

    async def held_while_enabled(self) -> bool:
        """Known product bug: rows left `held` for an endpoint that is enabled. A hub process whose copy of the
        endpoint still says disabled (it syncs the shared row about once a second) records new deliveries as held
        after another process's `endpoints enable` released the held ones; nothing releases them again. The rig
        names it and releases them the way an operator would (`endpoints enable` again), so the run goes on."""
        rows = await self.hub_rows(
            "SELECT d.endpoint, count(*) FROM deliveries d JOIN endpoints e ON e.name = d.endpoint"
            " WHERE d.status = 'held' AND NOT e.disabled GROUP BY d.endpoint"
        )
        hub = next((h for h in self.hubs if h.running and not stopped(h)), None)
        if not rows or hub is None:
            return False
        for endpoint, n in rows:
            self.known_bug(f"{n} deliveries of {endpoint} left held after it was enabled")
            out = await hub.cli("endpoints", "enable", str(endpoint))
            assert out.returncode == 0, out.stdout + out.stderr
        return True

    # --- logs ----------------------------------------------------------------------------------------------

    def hub_log_events(self, name: str) -> list[tuple[int, dict[str, Any]]]:
        """(hub index, line) of every hub log line with event `name`."""
        return [(i, e) for i, h in enumerate(self.hubs) for e in h.logs() if e.get("event") == name]

    # --- the check -----------------------------------------------------------------------------------------

    async def check(self, *, duplicates_allowed: int = 0, hub_gateways: Iterable[str] | None = None) -> dict[str, Any]:
        """The pass criterion (see the module doc). `duplicates_allowed`: per endpoint. Returns the figures."""
        problems: list[str] = []
        # What each gateway made, in its order per device (its outbox's upstream rows), and what the hub acked.
        gw_order: dict[str, list[str]] = defaultdict(list)  # hub device id -> event ids in the gateway's order
        gw_events: dict[str, str] = {}  # event id -> hub device id
        acked: set[str] = set()
        for gw in self.gateways:
            for event_id, device, status in self.gateway_rows(
                gw, "SELECT event_id, device_id, status FROM deliveries WHERE endpoint = 'upstream' ORDER BY id"
            ):
                hub_dev = f"{gw}:{device}"
                gw_order[hub_dev].append(event_id)
                gw_events[event_id] = hub_dev
                if status == "delivered":
                    acked.add(event_id)
        hub_events = {
            str(i): (str(t), str(d), float(c))
            for i, t, d, c in await self.hub_rows("SELECT id, type, device_id, created_at FROM events")
        }
        hub_deliveries = await self.hub_rows("SELECT event_id, endpoint, device_id, status FROM deliveries ORDER BY id")
        not_recorded = sorted(acked - hub_events.keys())
        if not_recorded:
            problems.append(
                f"{len(not_recorded)} events acked by the hub are not in its events table: {not_recorded[:5]}"
            )
        invented = [i for i, (_, d, _) in hub_events.items() if ":" in d and gw_events.get(i) != d]
        if invented:
            problems.append(f"{len(invented)} hub events for relayed devices no gateway made: {invented[:5]}")
        # Expected per (endpoint, device): the gateway's order for relayed devices, the hub's for its own events.
        hub_order: dict[tuple[str, str], list[str]] = defaultdict(list)
        rows_of: dict[str, set[str]] = defaultdict(set)
        for event_id, endpoint, device, status in hub_deliveries:
            hub_order[(endpoint, device)].append(event_id)
            rows_of[event_id].add(endpoint)
            if status != "delivered":
                problems.append(f"hub delivery {endpoint}/{event_id} is {status}")
        expected: dict[tuple[str, str], list[str]] = {}
        for event_id, (etype, device, _) in hub_events.items():
            if ":" in device:
                subs = {ep for ep in self.endpoints if wants(self.endpoints, ep, etype, device)}
                if rows_of[event_id] != subs:
                    problems.append(
                        f"{event_id} ({etype} {device}): deliveries for {rows_of[event_id]}, expected {subs}"
                    )
            else:
                subs = rows_of[event_id]  # the hub's own gateway.* events: the endpoints it chose
            for ep in subs:
                key = (ep, device)
                if key not in expected:
                    order = gw_order[device] if ":" in device else hub_order[key]
                    expected[key] = [e for e in order if e in hub_events and ep in rows_of[e]]
        figures: dict[str, Any] = {
            "gateway_events": len(gw_events),
            "acked_by_hub": len(acked),
            "hub_events": len(hub_events),
            "hub_deliveries": len(hub_deliveries),
            "duplicates": {},
            "attempts_by_process": {},
        }
        samples: list[str] = []  # duplicates: which processes sent them, when (seconds since the fleet started)
        for ep, recv in self.receivers.items():
            got: dict[str, list[Hit]] = defaultdict(list)
            for h in recv.delivered():
                got[h.device].append(h)
            dups = 0
            for (e, device), want in expected.items():
                if e != ep:
                    continue
                hits = got.pop(device, [])
                ids = [h.event_id for h in hits]
                first = list(dict.fromkeys(ids))
                if first != want:
                    missing = [x for x in want if x not in set(ids)]
                    extra = [x for x in first if x not in set(want)]
                    problems.append(
                        f"{ep}/{device}: got {len(first)} events, expected {len(want)}; missing {missing[:3]},"
                        f" extra {extra[:3]}, in order: {not missing and not extra}"
                    )
                    continue
                index = {x: n for n, x in enumerate(want)}
                positions = [index[x] for x in ids]
                if positions != sorted(positions):
                    back = next(n for n in range(1, len(positions)) if positions[n] < positions[n - 1])
                    late = hits[back]
                    problems.append(
                        f"{ep}/{device}: an earlier event came again after a later one: {late.event_id} from"
                        f" {late.process} at +{late.at - self.started_at:.2f}s"
                    )
                dups += len(ids) - len(first)
                for x, n in Counter(ids).items():
                    if n > 1 and len(samples) < 10:
                        copies = [h for h in hits if h.event_id == x]
                        samples.append(
                            f"{ep} {x} {device}: "
                            + ", ".join(f"{h.process}@{h.at - self.started_at:.2f}s" for h in copies)
                        )
            for device, hits in got.items():
                problems.append(f"{ep}/{device}: {len(hits)} webhooks for events the hub has no delivery of")
            figures["duplicates"][ep] = dups
            figures["attempts_by_process"][ep] = dict(Counter(h.process for h in recv.hits))
            if dups > duplicates_allowed:
                problems.append(f"{ep}: {dups} duplicates, more than {duplicates_allowed}")
        figures["duplicate_samples"] = samples
        self.log("checked", problems=problems[:30], figures=figures)
        assert not problems, "\n".join([*problems[:30], "duplicates:", *samples])
        return figures


def fail_on_known_bugs(fleet: Fleet) -> None:
    """At the end of a test that passed every other check: fail when it met one of the product bugs this rig
    knows the signature of (fixed in 503f25d; kept as named checks so that a return of one says what it is)."""
    if fleet.known_bugs:
        pytest.fail("product bug (issue 13): " + "; ".join(dict.fromkeys(fleet.known_bugs)))


def print_figures(name: str, figures: dict[str, Any], fleet: Fleet) -> None:
    marks = {k: round(v - fleet.started_at, 2) for k, v in fleet.marks.items()}
    loads = {
        gw: {"heartbeats": ld.heartbeats, "changed": ld.changed, "failed_batches": ld.failed_batches}
        for gw, ld in fleet.loads.items()
    }
    print(f"\nfleet {name}: {json.dumps({**figures, 'marks_s': marks, 'load': loads})}")


# ---------------------------------------------------------------------------------------------------------
# the scenarios, as phases of a run (the quick and the long tests chain them on one fleet)
# ---------------------------------------------------------------------------------------------------------

PostCheck = Callable[[], Awaitable[None]]


async def until(what: str, check: Callable[[], Any], timeout: float) -> float:
    """Wait for `check()` (sync, or returning an awaitable) to be true; returns the seconds it took."""
    started = time.monotonic()
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.05)


async def waited(fleet: Fleet, what: str, check: Callable[[], Any], timeout: float) -> float:
    """until(), logged in the fleet's log when it is met."""
    took = await until(what, check, timeout)
    fleet.log(what, took_s=round(took, 2))
    return took


async def healthz(d: Daemon) -> int | None:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s,
            s.get(d.base + "/healthz") as r,
        ):
            return r.status
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


def delivered(fleet: Fleet) -> int:
    return sum(len(r.delivered()) for r in fleet.receivers.values())


def acked(fleet: Fleet, gw: str) -> int:
    sql = "SELECT count(*) FROM deliveries WHERE endpoint = 'upstream' AND status = 'delivered'"
    return int(fleet.gateway_rows(gw, sql)[0][0])


async def hub_unreachable(fleet: Fleet, gw: str, seconds: float, backlog_at_least: int) -> dict[str, Any]:
    """a. The hub unreachable from gateway `gw` (its balancer cut: connection refused) for `seconds` under load,
    with a silence wave meanwhile: it buffers in its outbox, nothing of it is acknowledged, then (healed) its
    backlog goes out."""
    d = fleet.gateways[gw]
    await fleet.balancers[gw].cut()
    cut = fleet.mark(f"{gw}_cut")
    before = acked(fleet, gw)
    fleet.loads[gw].wave(fleet.wave_share, fleet.wave_s)  # offline events (timeouts) while the hub is unreachable
    await waited(fleet, f"{gw} buffers", lambda: fleet.upstream_backlog(gw) >= backlog_at_least, 30 + seconds)
    await asyncio.sleep(max(0.0, cut + seconds - time.monotonic()))  # the outage lasts `seconds`
    refused = [
        e
        for e in d.logs()
        if e.get("event") == "delivery_failed"
        and e.get("endpoint") == "upstream"
        and str(e.get("error", "")).startswith("connection refused")
    ]
    assert refused, f"{gw}'s relays did not fail while the hub was unreachable"
    # Only relays in flight at the cut (the hub may have taken them; their answers were lost) may count.
    assert acked(fleet, gw) - before <= 5 * 8, f"{gw}'s events were acknowledged with the hub unreachable"
    backlog = fleet.upstream_backlog(gw)
    await fleet.balancers[gw].heal()
    fleet.mark(f"{gw}_healed")
    # A relay is one event per request, `upstream.concurrency` (8) at a time: at least 10 a second.
    took = await waited(fleet, f"{gw}'s backlog delivered", lambda: fleet.upstream_backlog(gw) < 10, 120 + backlog / 10)
    return {"a_backlog_at_heal": backlog, "a_backlog_delivered_s": round(took, 2)}


async def postgres_restart(fleet: Fleet, cluster: Any, seconds: float) -> dict[str, Any]:
    """b. PostgreSQL stopped (`pg_ctl stop -m fast`) under load for `seconds`, then started again: every hub
    process answers /healthz 503 and the gateways' relays 503 meanwhile; then they recover by themselves."""
    await asyncio.to_thread(cluster.stop)
    stopped_at = fleet.mark("pg_stopped")
    fleet.loads["gw-b"].wave(fleet.wave_share, fleet.wave_s)

    async def all_503() -> bool:
        return all([await healthz(h) == 503 for h in fleet.hubs if h.running])

    await waited(fleet, "every hub's /healthz answers 503", all_503, 15)

    def relays_503() -> bool:
        return any(
            e.get("event") == "delivery_failed" and e.get("error") == "HTTP 503"
            for g in fleet.gateways.values()
            for e in g.logs()
        )

    await waited(fleet, "relays answered 503", relays_503, 15)
    await asyncio.sleep(max(0.0, stopped_at + seconds - time.monotonic()))
    await asyncio.to_thread(cluster.start)
    fleet.mark("pg_started")

    async def all_200() -> bool:
        return all([await healthz(h) == 200 for h in fleet.hubs if h.running])

    recovered = await waited(fleet, "every hub recovers by itself", all_200, 30)
    for i, h in enumerate(fleet.hubs):
        events = {e.get("event") for e in h.logs()}
        assert {"store_unavailable", "store_recovered"} <= events, (f"hub-{i}", sorted(map(str, events)))
    return {"b_recovered_s": round(recovered, 2), "b_down_s": round(time.monotonic() - stopped_at - recovered, 2)}


async def receiver_disabled(fleet: Fleet, endpoint: str, cli_from: Daemon) -> tuple[dict[str, Any], PostCheck]:
    """c. The receiver of `endpoint` fails (503) until the endpoint is disabled: held rows pile up; then it
    heals and `webhookd endpoints enable` through `cli_from`. After the run (the post-check): exactly one
    `endpoint_disabled` in all the hub processes' logs, and every process shows it enabled with nothing held."""
    recv = fleet.receivers[endpoint]
    recv.failing = True
    began = len(fleet.hub_log_events("endpoint_disabled"))
    flipped: list[float] = []  # when the shared row was first seen disabled

    async def disabled() -> bool:
        if len(fleet.hub_log_events("endpoint_disabled")) > began:
            return True
        if not flipped:
            row = await fleet.hub_rows("SELECT disabled FROM endpoints WHERE name = %s", (endpoint,))
            if row and row[0][0]:
                flipped.append(time.monotonic())
        return bool(flipped) and time.monotonic() - flipped[0] > 5.0

    took = await waited(fleet, f"{endpoint} disabled", disabled, 60)
    no_log = len(fleet.hub_log_events("endpoint_disabled")) == began
    if no_log:
        # The process that won the compare-and-swap logs endpoint_disabled only if its own copy of the row was
        # not disabled yet; its claims loop's sync_endpoints may copy the shared row in first (while the held
        # receipt is being saved): then no process logs it (dispatcher.py: disable_once, _persist, disable).
        fleet.known_bug(f"{endpoint} disabled in the shared row but no hub process logged endpoint_disabled")
    disabled_at = fleet.mark(f"{endpoint}_disabled")

    async def held() -> bool:
        return (await fleet.hub_backlog()).get("held", 0) >= 10

    await waited(fleet, f"{endpoint}'s deliveries held", held, 30)
    fleet.loads["gw-a"].wave(fleet.wave_share, fleet.wave_s)
    await asyncio.sleep(1.5)  # every process has seen the disable by now; held rows pile up
    attempts = len(recv.hits)
    after_disable = sum(1 for h in recv.hits if h.at > disabled_at + 0.5)
    recv.failing = False
    out = await cli_from.cli("endpoints", "enable", endpoint)
    assert out.returncode == 0, out.stdout + out.stderr
    fleet.mark(f"{endpoint}_enabled")
    # Attempts stopped at the disable (a moment for the processes to hear of it).
    assert after_disable == 0, f"{after_disable} attempts to {endpoint} went on after it was disabled"

    async def post() -> None:
        disabled = [(i, e) for i, e in fleet.hub_log_events("endpoint_disabled") if e.get("endpoint") == endpoint]
        assert len(disabled) == (0 if no_log else 1), disabled
        for hub in fleet.hubs:
            if not hub.running:
                continue
            out = await hub.cli("endpoints", "--json")
            assert out.returncode == 0, out.stderr
            (ep,) = [e for e in json.loads(out.stdout) if e["name"] == endpoint]
            assert ep["enabled"] is True and ep["held"] == 0 and ep["pending"] == 0, ep

    return {"c_disabled_after_s": round(took, 2), "c_failed_attempts": attempts}, post


async def hold_leases(fleet: Fleet, hub: Daemon, timeout: float = 20.0) -> tuple[str, dict[int, int]]:
    """Wait until `hub` holds its fair share of the partitions; its owner name and leases (part -> epoch)."""
    owner = await fleet.owner_of(hub)
    live = sum(1 for h in fleet.hubs if h.running and not stopped(h))
    parts: dict[int, int] = {}

    async def holds() -> bool:
        nonlocal parts
        parts = await fleet.parts_of(owner)
        return len(parts) >= PARTITIONS // live - 1

    await waited(fleet, f"{owner} holds its share of the partitions", holds, timeout)
    return owner, parts


async def taken_over(fleet: Fleet, owner: str, parts: dict[int, int], timeout: float) -> float:
    """Wait until every partition in `parts` has another owner with a newer epoch; returns the seconds it took."""

    async def done() -> bool:
        now = await fleet.leases()
        return all(now[p][0] not in (None, owner) and now[p][1] > e for p, e in parts.items())

    return await waited(fleet, f"{owner}'s partitions taken over", done, timeout)


def lease_ttl() -> float:
    """How long a lease lasts after each renew (webhookd.leases.TTL; 5 s when that module is not there)."""
    try:
        leases = importlib.import_module("webhookd.leases")
    except ImportError:
        return 5.0
    return float(getattr(leases, "TTL", 5.0))


def attempts_of(fleet: Fleet, process: str) -> int:
    return sum(1 for r in fleet.receivers.values() for h in r.hits if h.process == process)


async def hub_killed(fleet: Fleet, index: int) -> tuple[dict[str, Any], PostCheck]:
    """d. SIGKILL hub process `index` while it delivers: the others hold its partitions within 10 s (§14) and
    deliver its lanes; it made no attempt after its death."""
    victim, name = fleet.hubs[index], f"hub-{index}"
    owner, parts = await hold_leases(fleet, victim)
    seen = attempts_of(fleet, name)
    await waited(fleet, f"{name} delivers", lambda: attempts_of(fleet, name) >= seen + 10, 60)
    await victim.kill()
    killed = fleet.mark(f"{name}_killed")
    fleet.loads["gw-a"].wave(fleet.wave_share, fleet.wave_s)
    takeover = await taken_over(fleet, owner, parts, 10)
    fleet.mark(f"{name}_taken_over")

    async def post() -> None:
        late = [h for r in fleet.receivers.values() for h in r.hits if h.process == name and h.at > killed + 0.5]
        assert not late, f"attempts of the killed {name} after its death: {late[:3]}"
        lanes = await fleet.delivery_parts()
        after = {lanes.get((ep, h.event_id)) for ep, r in fleet.receivers.items() for h in r.hits if h.at > killed}
        assert set(parts) & after, f"none of the killed {name}'s partitions was delivered after the kill"

    return {"d_takeover_s": round(takeover, 2), "d_partitions": len(parts)}, post


async def hub_stopped(fleet: Fleet, index: int, seconds: float = 5.0) -> tuple[dict[str, Any], PostCheck]:
    """e. SIGSTOP hub process `index` while it delivers, for `seconds` and until the others hold its partitions
    (§14: within 10 s), then SIGCONT. The post-check: after resuming it made no attempt on a partition it lost
    unless it first held that partition again under a newer lease; it logged the loss."""
    victim, name = fleet.hubs[index], f"hub-{index}"
    owner, parts = await hold_leases(fleet, victim)
    seen = attempts_of(fleet, name)
    await waited(fleet, f"{name} delivers", lambda: attempts_of(fleet, name) >= seen + 10, 60)
    fleet.sigstop(victim)
    stopped_at = fleet.mark(f"{name}_stopped")
    fleet.loads["gw-b"].wave(fleet.wave_share, fleet.wave_s)
    before = delivered(fleet)
    try:
        takeover = await taken_over(fleet, owner, parts, 10)
    except AssertionError as e:
        waits = await fleet.hub_rows(
            "SELECT pid, state, wait_event_type, wait_event, left(query, 100) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if not waits:
            raise AssertionError(f"{e}: {delivered(fleet) - before} webhooks delivered meanwhile") from None
        # The frozen process's connection sits inside a transaction holding the delivery-id advisory lock and
        # FOR SHARE locks on its lease rows: every other process's writes and lease renews/claims wait for it.
        fleet.known_bug(
            f"a SIGSTOPped hub process froze the whole hub: {delivered(fleet) - before} webhooks in 10 s, its"
            f" partitions not taken over; {len(waits)} sessions waiting on its locks ({waits[0][3]})"
        )
        takeover = float("nan")
    else:
        # ... and the others deliver its lanes while it is still stopped: what was pending in its partitions when
        # they were taken over goes out.
        (top,) = (await fleet.hub_rows("SELECT coalesce(max(id), 0) FROM deliveries"))[0]

        async def its_lanes_delivered() -> bool:
            rows = await fleet.hub_rows(
                "SELECT count(*) FROM deliveries WHERE status = 'pending' AND part = ANY(%s) AND id <= %s",
                (list(parts), top),
            )
            return int(rows[0][0]) == 0

        base = delivered(fleet)
        try:
            await waited(fleet, "its lanes delivered without it", its_lanes_delivered, 10)
        except AssertionError:
            waits = await fleet.hub_rows(
                "SELECT pid, wait_event FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if not waits:
                raise
            fleet.known_bug(
                f"a SIGSTOPped hub process froze the whole hub: {delivered(fleet) - base} webhooks in the 10 s after"
                f" its partitions were taken over; {len(waits)} sessions waiting on its locks ({waits[0][1]})"
            )
    lost = {p: e for p, (o, e, _) in (await fleet.leases()).items() if p in parts and o != owner}
    await asyncio.sleep(max(0.0, stopped_at + seconds - time.monotonic()))
    fleet.sigcont(victim)
    resumed = fleet.mark(f"{name}_resumed")
    resumed_wall = time.time()
    regained: dict[int, float] = {}  # part -> when the resumed process held it again (a fresh lease), monotonic
    ttl = lease_ttl()

    async def watch() -> bool:
        sent = time.monotonic()  # db_now is a little later than this: the regain times below err early (lenient)
        rows = await fleet.hub_rows(
            "SELECT part, owner, epoch, expires_at, extract(epoch FROM clock_timestamp()) FROM leases"
        )
        mono = time.monotonic()
        for p, o, e, x, db_now in rows:
            if p in lost and o == owner and e > lost[p] and p not in regained:
                # Its claim (or, at worst, its first renew since) was at expires_at - TTL, database time.
                regained[p] = sent - (float(db_now) - (float(x) - ttl))
        watched[0] = mono
        return mono - resumed > 3.0

    watched = [resumed]  # the regains are known up to this moment: attempts after it are not judged
    await waited(fleet, "3 s after the resume", watch, 15)

    async def post() -> None:
        lanes = await fleet.delivery_parts()
        bad = []
        for ep, r in fleet.receivers.items():
            for h in r.hits:
                part = lanes.get((ep, h.event_id))
                judged = resumed < h.at <= watched[0]
                # 0.1 s of slack: the two clocks are compared through a query's round trip
                if h.process == name and judged and part in lost and h.at < regained.get(part, float("inf")) - 0.1:
                    bad.append((ep, h.event_id, part, round(h.at - resumed, 3)))
        assert not bad, f"attempts of the resumed {name} on partitions it had lost: {bad[:5]}"
        # It knows: its leases ran out locally (hub_partitions_lost) or its renew came back without them.
        logged = [
            e
            for e in victim.logs()
            if e.get("event") == "hub_partitions_lost" or (e.get("event") == "hub_partitions" and e.get("lost"))
            if datetime.fromisoformat(str(e["timestamp"])).timestamp() > resumed_wall - 1.0
        ]
        assert logged or not lost, f"the resumed {name} did not log the partitions it lost"

    return {"e_takeover_s": round(takeover, 2), "e_partitions_lost": len(lost), "e_regained": len(regained)}, post


def liveness(fleet: Fleet, gw: str, etype: str) -> list[Hit]:
    """The gateway.* webhooks of `gw` delivered to ep-all (which takes every event)."""
    return [h for h in fleet.receivers["ep-all"].delivered() if h.device == gw and h.type == etype]


async def gateway_killed(fleet: Fleet, gw: str, hold: float = 2.0) -> tuple[dict[str, Any], PostCheck]:
    """f. SIGKILL gateway `gw`: one gateway.offline for the whole hub (made by whichever process notices), every
    process's `webhookd gateways` says offline, its devices are stale and none gets an offline; restarted, one
    gateway.online and its buffered events arrive."""
    d = fleet.gateways[gw]
    await waited(fleet, f"{gw} online at the hub", lambda: liveness(fleet, gw, "gateway.online"), 30)
    onlines = len(liveness(fleet, gw, "gateway.online"))
    await d.kill()
    killed = fleet.mark(f"{gw}_killed")
    offline_in = await waited(
        fleet,
        f"{gw}'s gateway.offline",
        lambda: [h for h in liveness(fleet, gw, "gateway.offline") if h.at > killed],
        30,
    )
    await asyncio.sleep(hold)  # every hub process has checked the deadline a few times since
    for i, hub in enumerate(fleet.hubs):
        if not hub.running:
            continue
        out = await hub.cli("gateways", "--json")
        assert out.returncode == 0, out.stderr
        states = {g["name"]: g["state"] for g in json.loads(out.stdout)}
        assert states[gw] == "offline" and all(s == "online" for g, s in states.items() if g != gw), (i, states)
    out = await next(h for h in fleet.hubs if h.running).cli("devices", "--json")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    rows = listed if isinstance(listed, list) else listed.get("devices", [])
    stale = {str(r["id"]).split(":")[0] for r in rows if r.get("stale")}
    assert stale == {gw}, stale
    await d.start()
    fleet.mark(f"{gw}_restarted")
    await waited(
        fleet, f"{gw}'s gateway.online again", lambda: len(liveness(fleet, gw, "gateway.online")) > onlines, 30
    )

    async def post() -> None:
        offline = [h for h in liveness(fleet, gw, "gateway.offline") if h.at > killed]
        assert len(offline) == 1, offline
        assert len(liveness(fleet, gw, "gateway.online")) == onlines + 1
        for other in fleet.gateways:
            if other != gw:
                assert not [h for h in liveness(fleet, other, "gateway.offline") if h.at > killed], other
        # No offline of its devices made by the hub: Fleet.check() proves that every hub event of a relayed device
        # is one its gateway made (and the gateway was dead meanwhile).

    return {"f_offline_after_s": round(offline_in, 2), "f_killed_at_s": round(killed - fleet.started_at, 2)}, post
