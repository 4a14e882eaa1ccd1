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
import json
import os
import random
import signal
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
from aiohttp import web

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import SECRET, Daemon, free_port

GATEWAYS = {"gw-a": "gw-a-Shared-Secret-0123456789", "gw-b": "gw-b-Shared-Secret-9876543210"}  # test-only
PROCESS_HEADER = "X-Rig-Process"
EP_CONCURRENCY = 4  # each hub endpoint's concurrency (per process)
PER_FAULT = 5 * EP_CONCURRENCY  # §14: duplicates at most 5 x the endpoint's concurrency per killed/stopped process
STATES = ("utilizing", "unplugged", "online")  # explicit state changes a device may report

# Hub endpoints: name -> (event kinds, device globs). ep-b takes a subset of the events (one gateway, two kinds).
ENDPOINTS: dict[str, tuple[list[str], list[str]]] = {
    "ep-all": (["all"], ["*"]),
    "ep-b": (["online", "offline"], ["gw-b:*"]),
}


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
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

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
        tick: float = 0.3,
        change: float = 0.02,
        hub_allow_errors: bool = False,
        gateway_allow_errors: bool = False,
    ) -> Fleet:
        fleet = cls(daemon, tmp, pg_url, endpoints=dict(endpoints or ENDPOINTS))
        for name in fleet.endpoints:
            fleet.receivers[name] = await receiver(RigReceiver(name))
        hub_cfg = {
            "gateways": [
                {"name": gw, "secret": secret, "silence_timeout": gateway_silence} for gw, secret in GATEWAYS.items()
            ]
        }
        delivery = {
            "concurrency": 16,
            "timeout": "2s",
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
                    "timeout": "2s",
                    "concurrency": 8,
                },
                logging={"format": "json", "level": "info"},
                allow_errors=gateway_allow_errors,
            )
            for gw, secret in GATEWAYS.items()
        ]
        for gw, d in zip(GATEWAYS, await asyncio.gather(*gws), strict=True):
            fleet.gateways[gw] = d
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
        self.marks[name] = time.monotonic()
        return self.marks[name]

    # --- faults -------------------------------------------------------------------------------------------

    def sigstop(self, d: Daemon) -> None:
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGSTOP)

    def sigcont(self, d: Daemon) -> None:
        assert d.proc is not None
        os.kill(d.proc.pid, signal.SIGCONT)

    async def close(self) -> None:
        """Nothing frozen, no load running (the fixtures then stop the daemons and servers)."""
        self.stop_load.set()
        await asyncio.gather(*self.load_tasks, return_exceptions=True)
        for d in [*self.hubs, *self.gateways.values()]:
            if stopped(d):
                self.sigcont(d)

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
        self, timeout: float = 60.0, stall: float = 20.0, gateways: Iterable[str] | None = None
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
                    return time.monotonic() - started
                continue
            now = time.monotonic()
            if total < best:
                best, since = total, now
            if now - since > stall or now > deadline:
                left = [(g, self.devices_not_offline(g), self.upstream_backlog(g)) for g in names]
                raise AssertionError(
                    f"the fleet did not drain: gateways {left} (timed devices not offline, upstream not delivered),"
                    f" hub {hub}"
                )
            await asyncio.sleep(0.1)

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
            for device, hits in got.items():
                problems.append(f"{ep}/{device}: {len(hits)} webhooks for events the hub has no delivery of")
            figures["duplicates"][ep] = dups
            figures["attempts_by_process"][ep] = dict(Counter(h.process for h in recv.hits))
            if dups > duplicates_allowed:
                problems.append(f"{ep}: {dups} duplicates, more than {duplicates_allowed}")
        assert not problems, "\n".join(problems[:30])
        return figures


def print_figures(name: str, figures: dict[str, Any], fleet: Fleet) -> None:
    marks = {k: round(v - fleet.started_at, 2) for k, v in fleet.marks.items()}
    loads = {
        gw: {"heartbeats": ld.heartbeats, "changed": ld.changed, "failed_batches": ld.failed_batches}
        for gw, ld in fleet.loads.items()
    }
    print(f"\nfleet {name}: {json.dumps({**figures, 'marks_s': marks, 'load': loads})}")
