"""The six benchmark rows of issue 5, each against the real daemon (a subprocess) and a bare baseline.

Every row returns a `Row`: the figure, the baseline measured in the same run, the ratio or limit, pass/fail.
Figures repeated `ctx.repeats` times are medians. BENCH_QUICK=1 shrinks every row for a smoke run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench import backlog, baseline_store
from bench.common import (
    DAEMON_CORE,
    LOAD_CORE,
    Child,
    DaemonUnderTest,
    RssSampler,
    closed_load,
    cpu_seconds,
    daemon_config,
    device_ids,
    eventually,
    free_port,
    median,
    percentile,
    python_cmd,
    register,
    rss_bytes,
    spawn,
    wait_line,
)
from bench.profile import Profiler

DEAD_URL = "http://127.0.0.1:9/hook"  # discard port: nothing listens; the endpoint is disabled or filtered anyway
# Row 3: delivery with every outcome persisted against the bare client (issue 5 asked 0.9x, issue 9 0.8x).
DELIVERY_RATIO = 0.8
MiB = 1024 * 1024


@dataclass
class Row:
    key: str
    title: str
    figure: str
    baseline: str
    ratio: str
    ok: bool | None
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ctx:
    workdir: Path
    loop: str  # "uvloop" | "asyncio"
    quick: bool
    repeats: int
    profiler: Profiler | None = None
    log: Callable[[str], None] = print

    def dir(self, name: str) -> Path:
        d = self.workdir / self.loop / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    @contextlib.asynccontextmanager
    async def profile(self, pid: int, name: str, repeat: int) -> AsyncIterator[None]:
        if self.profiler is None or repeat != 0:
            yield
            return
        async with self.profiler.record(pid, f"{name}-{self.loop}"):
            yield

    def seconds(self, full: float, quick: float) -> float:
        return quick if self.quick else full


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"


async def _start_daemon(wd: Path, **cfg: Any) -> DaemonUnderTest:
    port = free_port()
    endpoint_url = cfg.pop("endpoint_url", DEAD_URL)
    d = DaemonUnderTest(wd / "daemon", daemon_config(wd / "daemon", port, endpoint_url, **cfg), port)
    await d.start()
    return d


async def _start_child(name: str, module: str, wd: Path, core: int, *args: str) -> tuple[Child, int]:
    port = free_port()
    child = spawn(name, python_cmd(module, "--port", str(port), *args), wd / f"{name}.log", core)
    await wait_line(child, "LISTENING")
    return child, port


async def _held(d: DaemonUnderTest) -> int:
    st = await d.status()
    return int(st["deliveries"].get("held", 0))


# --- 1. liveness ingest -----------------------------------------------------------------------------------


async def row_liveness(ctx: Ctx) -> Row:
    n, conns = 10_000, 64
    secs = ctx.seconds(10, 2)
    wd = ctx.dir("1-liveness")
    d = await _start_daemon(wd)
    bare, bare_port = await _start_child("baseline_ingest", "bench.baseline_ingest", wd, DAEMON_CORE)
    try:
        await d.admin("POST", "/v1/endpoints/bench/disable")
        await register(d.base, device_ids("live-", n))
        bare_url = f"http://127.0.0.1:{bare_port}"
        for url in (d.base, bare_url):  # warm-up
            await closed_load(url, devices=n, prefix="live-", mode="liveness", connections=conns, seconds=1, workdir=wd)
        daemon_runs, bare_runs = [], []
        for r in range(ctx.repeats):
            async with ctx.profile(d.pid, "row1-liveness", r):
                res = await closed_load(
                    d.base, devices=n, prefix="live-", mode="liveness", connections=conns, seconds=secs, workdir=wd
                )
            if res.errors:
                raise RuntimeError(f"daemon answered {res.errors} errors under liveness load")
            daemon_runs.append(res)
            await asyncio.sleep(0.5)
            bres = await closed_load(
                bare_url, devices=n, prefix="live-", mode="liveness", connections=conns, seconds=secs, workdir=wd
            )
            bare_runs.append(bres)
            ctx.log(f"    run {r + 1}: daemon {res.rps:,.0f}/s (p99 {res.p99_ms} ms), bare {bres.rps:,.0f}/s")
    finally:
        await d.stop()
        await bare.stop()
    dm, bm = median([x.rps for x in daemon_runs]), median([x.rps for x in bare_runs])
    ratio = dm / bm
    p99 = median([x.p99_ms for x in daemon_runs if x.p99_ms is not None])
    return Row(
        "1",
        "liveness ingest",
        f"{fmt_rate(dm)} hb/s (p99 {p99:.1f} ms)",
        f"bare ingest {fmt_rate(bm)} hb/s",
        f"{ratio:.2f}x (>= 1.0x)",
        ratio >= 1.0,
        data={"daemon": [x.rps for x in daemon_runs], "bare": [x.rps for x in bare_runs], "ratio": ratio},
    )


# --- 2. transition ingest ---------------------------------------------------------------------------------


async def row_transitions(ctx: Ctx) -> Row:
    n, conns = 10_000, 64
    secs = ctx.seconds(10, 2)
    wd = ctx.dir("2-transitions")
    d = await _start_daemon(wd)
    runs: list[float] = []
    store1: list[float] = []
    store64: list[float] = []
    store64many: list[float] = []
    try:
        await d.admin("POST", "/v1/endpoints/bench/disable")  # deliveries are written (held), not sent
        for r in range(ctx.repeats):
            prefix = f"t{r}-"
            await register(d.base, device_ids(prefix, n))  # online: each heartbeat below is a change
            before = await _held(d)
            async with ctx.profile(d.pid, "row2-transitions", r):
                res = await closed_load(
                    d.base, devices=n, prefix=prefix, mode="transition", connections=conns, seconds=secs, workdir=wd
                )
            if res.errors:
                raise RuntimeError(f"daemon answered {res.errors} errors under transition load")
            recorded = await _held(d) - before
            if recorded < res.requests * 0.99:
                raise RuntimeError(f"{res.requests} transition heartbeats answered but only {recorded} events recorded")
            runs.append(res.rps)
            store = await _store_baseline(wd, ctx.seconds(3, 1))
            store1.append(store["1"])
            store64.append(store["64"])
            store64many.append(store["64-many"])
            ctx.log(
                f"    run {r + 1}: daemon {res.rps:,.0f} transitions/s (p99 {res.p99_ms} ms),"
                f" bare store {store['1']:,.0f}/s one commit each, {store['64']:,.0f}/s 64 per commit,"
                f" {store['64-many']:,.0f}/s 64 per commit with executemany"
            )
    finally:
        await d.stop()
    m = median(runs)
    return Row(
        "2",
        "transition ingest (durable)",
        f"{fmt_rate(m)} transitions/s",
        f"bare store {fmt_rate(median(store1))}/s 1/commit, {fmt_rate(median(store64))}/s 64/commit",
        f"{m / median(store64):.2f}x of 64/commit; limit >= 5,000/s",
        m >= 5000,
        notes=[
            f"bare store, 64 per commit with one executemany per table: {fmt_rate(median(store64many))}/s;"
            f" load: {conns} connections, each heartbeat a state change, 2xx after the commit"
        ],
        data={"daemon": runs, "store_1": store1, "store_64": store64, "store_64_many": store64many},
    )


async def _store_baseline(wd: Path, seconds: float, batches: tuple[int, ...] = (1, 64)) -> dict[str, float]:
    child = spawn(
        "baseline_store",
        python_cmd(
            "bench.baseline_store",
            "--dir",
            str(wd / "bare-store"),
            "--seconds",
            str(seconds),
            *(arg for b in batches for arg in ("--batch", str(b))),
        ),
        wd / "baseline_store.log",
        DAEMON_CORE,
    )
    line = await wait_line(child, "RESULT ", timeout=60 + 4 * seconds)
    await child.stop()
    result: dict[str, float] = json.loads(line.removeprefix("RESULT "))
    return result


# --- 3. delivery ------------------------------------------------------------------------------------------


async def _receiver_stats(session: aiohttp.ClientSession, port: int) -> dict[str, Any]:
    async with session.get(f"http://127.0.0.1:{port}/stats") as r:
        result: dict[str, Any] = await r.json()
        return result


async def row_delivery(ctx: Ctx) -> Row:
    n, conc = (2_000 if ctx.quick else 20_000), 64
    wd = ctx.dir("3-delivery")
    recv, recv_port = await _start_child("receiver", "bench.receiver", wd, LOAD_CORE)
    hook = f"http://127.0.0.1:{recv_port}/hook"
    level = os.environ.get("BENCH_LOG_LEVEL", "info")  # info: a delivery_succeeded line per delivery, as deployed
    d = await _start_daemon(wd, endpoint_url=hook, concurrency=conc, log_level=level)
    runs: list[float] = []
    bare_runs: list[float] = []
    busy: list[float] = []  # daemon CPU seconds per second while it delivered
    bare_busy: list[float] = []
    try:
        async with aiohttp.ClientSession() as s:
            for r in range(ctx.repeats):
                await d.admin("POST", "/v1/endpoints/bench/disable")
                await register(d.base, device_ids(f"d{r}-", n))  # n online events, held
                async with s.post(f"http://127.0.0.1:{recv_port}/reset") as resp:
                    await resp.read()
                async with ctx.profile(d.pid, "row3-delivery", r):
                    t0, c0 = time.monotonic(), cpu_seconds(d.pid)
                    await d.admin("POST", "/v1/endpoints/bench/enable")

                    async def received(s: aiohttp.ClientSession = s) -> bool:
                        return int((await _receiver_stats(s, recv_port))["count"]) >= n

                    await eventually(received, timeout=600, interval=0.1)

                    async def persisted() -> bool:
                        st = await d.status()
                        return int(st["deliveries"].get("pending", 0)) == 0

                    t1 = await eventually(persisted, timeout=120, interval=0.05)
                    busy.append((cpu_seconds(d.pid) - c0) / (t1 - t0))
                st = await d.status()
                if st["deliveries"].get("dead") or st["deliveries"].get("held"):
                    raise RuntimeError(f"deliveries not all delivered: {st['deliveries']}")
                rate = n / (t1 - t0)
                runs.append(rate)
                # the bare loop: the same body and headers (one the daemon sent), same receiver, same concurrency
                async with s.get(f"http://127.0.0.1:{recv_port}/sample") as resp:
                    (wd / "sample.json").write_bytes(await resp.read())
                async with s.post(f"http://127.0.0.1:{recv_port}/reset") as resp:
                    await resp.read()
                child = spawn(
                    "baseline_delivery",
                    python_cmd(
                        "bench.baseline_delivery",
                        "--url",
                        hook,
                        "--n",
                        str(n),
                        "--concurrency",
                        str(conc),
                        "--body",
                        str(wd / "sample.json"),
                    ),
                    wd / "baseline_delivery.log",
                    DAEMON_CORE,
                )
                line = await wait_line(child, "RESULT ", timeout=600)
                await child.stop()
                bare_result = json.loads(line.removeprefix("RESULT "))
                bare = bare_result["rate"]
                bare_runs.append(bare)
                bare_busy.append(bare_result["cpu"])
                ctx.log(f"    run {r + 1}: daemon {rate:,.0f} deliveries/s (persisted), bare {bare:,.0f}/s")
    finally:
        await d.stop()
        await recv.stop()
    m, b = median(runs), median(bare_runs)
    return Row(
        "3",
        f"delivery ({n:,} pending, c={conc})",
        f"{fmt_rate(m)} deliveries/s",
        f"bare client {fmt_rate(b)}/s",
        f"{m / b:.2f}x (>= {DELIVERY_RATIO}x)",
        m / b >= DELIVERY_RATIO,
        notes=[
            f"CPU while delivering: daemon {median(busy) * 100:.0f}% of its core (store thread included),"
            f" bare client {median(bare_busy) * 100:.0f}%"
        ],
        data={"daemon": runs, "bare": bare_runs, "ratio": m / b, "daemon_cpu": busy, "bare_cpu": bare_busy},
    )


# --- 4. scale ---------------------------------------------------------------------------------------------


def build_big_db(path: Path, devices: int, pending: int) -> float:
    """A store with `devices` online devices and `pending` pending deliveries (one online event each), written
    straight into SQLite with webhookd's own schema. Returns seconds taken."""
    from webhookd.payloads import EventData, new_event_id

    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    baseline_store.create_db(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")  # building the fixture only; the daemon opens it with its own settings
    now = time.time()
    ids = device_ids("big-", devices)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO devices (id, state, name, owner, address, last_seen, changed_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(i, "online", None, None, "10.0.0.1", now, now) for i in ids],
    )
    events = []
    deliveries = []
    for k in range(pending):
        dev = ids[k % devices]
        ev = EventData(new_event_id(), "device.online", now, "heartbeat", dev, None, "online", "unknown", "10.0.0.1",
                       None, now, None)  # fmt: skip
        events.append((ev.id, ev.type, dev, now, ev.to_json()))
        deliveries.append((ev.id, "bench", dev, ev.type, "pending", now, now, now))
    conn.executemany(baseline_store.INSERT_EVENT, events)
    conn.executemany(baseline_store.INSERT_DELIVERY, deliveries)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - started


async def row_scale(ctx: Ctx) -> list[Row]:
    n = 10_000 if ctx.quick else 100_000
    wd = ctx.dir("4-scale")
    # (a) RSS of n tracked devices over an empty daemon
    d = await _start_daemon(wd / "rss", events=["offline"])
    try:
        await asyncio.sleep(1.0)
        empty = rss_bytes(d.pid)
        took = await register(d.base, device_ids("scale-", n), concurrency=4)
        await asyncio.sleep(6.0)  # the liveness flush has run
        full = rss_bytes(d.pid)
        st = await d.status()
        if st["devices"]["total"] != n:
            raise RuntimeError(f"daemon tracks {st['devices']['total']} devices, expected {n}")
    finally:
        await d.stop()
    delta = (full - empty) / MiB
    limit = 100 * n / 100_000
    rss_row = Row(
        "4a",
        f"scale: RSS of {n:,} devices",
        f"+{delta:.1f} MiB ({full / MiB:.0f} MiB total)",
        f"empty daemon {empty / MiB:.0f} MiB",
        f"limit <= {limit:.0f} MiB",
        delta <= limit,
        notes=[f"registering {n:,} new devices in batches of 1000: {n / took:,.0f} transitions/s"],
        data={"empty": empty, "full": full, "delta_mib": delta, "register_rate": n / took},
    )
    # (b) time to READY=1 with n devices and n pending deliveries in the store
    fixture = wd / "fixture" / "webhookd.db"
    built = await asyncio.to_thread(build_big_db, fixture, n, n)
    ctx.log(f"    built a store with {n:,} devices and {n:,} pending deliveries in {built:.1f}s")
    times, empty_times = [], []
    for r in range(ctx.repeats):
        sd = wd / f"startup{r}"
        (sd / "daemon" / "state").mkdir(parents=True)
        shutil.copy(fixture, sd / "daemon" / "state" / "webhookd.db")
        port = free_port()
        d = DaemonUnderTest(sd / "daemon", daemon_config(sd / "daemon", port, DEAD_URL), port)
        try:
            times.append(await d.start(timeout=120))
            if r == 0:
                st = await d.status()
                if st["devices"]["total"] != n or st["deliveries"].get("pending", 0) < n * 0.99:
                    raise RuntimeError(f"startup fixture not loaded: {st['devices']} {st['deliveries']}")
        finally:
            await d.kill()
        shutil.rmtree(sd, ignore_errors=True)
        ed = wd / f"empty{r}"
        port = free_port()
        d = DaemonUnderTest(ed / "daemon", daemon_config(ed / "daemon", port, DEAD_URL), port)
        try:
            empty_times.append(await d.start())
        finally:
            await d.kill()
        shutil.rmtree(ed, ignore_errors=True)
        ctx.log(f"    run {r + 1}: READY after {times[-1]:.2f}s (empty store {empty_times[-1]:.2f}s)")
    shutil.rmtree(wd / "fixture", ignore_errors=True)
    t = median(times)
    start_row = Row(
        "4b",
        f"scale: startup, {n:,} dev + {n:,} pending",
        f"READY in {t:.2f} s",
        f"empty store {median(empty_times):.2f} s",
        "limit <= 3 s",
        t <= 3.0,
        data={"ready": times, "empty": empty_times},
    )
    return [rss_row, start_row]


# --- 5. power cut -----------------------------------------------------------------------------------------


def _iso(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


@dataclass
class PowerCutRun:
    """What one power cut (`_power_cut`) saw; `d` has been stopped, its store and log are still there."""

    d: DaemonUnderTest
    n: int
    timeout: float
    storm_start: float  # monotonic: the earliest silence deadline
    storm_start_wall: float
    t_done: float  # monotonic: every pending delivery persisted as delivered
    probe_result: dict[str, Any] | None
    probe_rate: float


async def _power_cut(
    ctx: Ctx,
    wd: Path,
    n: int,
    timeout: float,
    *,
    probe: bool = True,
    profile: str | None = None,
    on_started: Callable[[DaemonUnderTest], Any] | None = None,
    on_drained: Callable[[DaemonUnderTest], Any] | None = None,
) -> PowerCutRun:
    """n devices come online, heartbeat once more in a short burst, then go silent at once; waits (time-bound)
    until the receiver has every offline webhook and the store has no pending delivery. With `probe`, 400
    other devices heartbeat at 200/s throughout (latency samples in wd/probe-samples.txt). `on_started` runs
    before the first heartbeat, `on_drained` once the backlog is delivered, both while the daemon runs."""
    probe_rate, probe_devices = 200.0, 400  # every probe device heartbeats every 2 s: never times out
    recv, recv_port = await _start_child("receiver", "bench.receiver", wd, LOAD_CORE)
    d = await _start_daemon(
        wd,
        endpoint_url=f"http://127.0.0.1:{recv_port}/hook",
        events=["offline"],
        silence_timeout=f"{timeout:g}s",
    )
    prober: Child | None = None
    ids = device_ids("pc-", n)
    probe_result: dict[str, Any] | None = None
    try:
        if on_started is not None:
            await on_started(d)
        t_reg0 = time.monotonic()
        reg = await register(d.base, ids, concurrency=4)
        # One more liveness pass so that every deadline falls within one short burst.
        burst_start = time.monotonic()
        burst = await register(d.base, ids, batch=1000, concurrency=4)
        burst_end = time.monotonic()
        if burst_end - t_reg0 > timeout * 0.9:
            raise RuntimeError(
                f"registering {n:,} devices took {reg + burst:.1f}s, too close to the {timeout:g}s silence timeout"
            )
        ctx.log(f"    {n:,} devices online ({n / reg:,.0f} transitions/s), last heartbeats in {burst:.2f}s; silence")
        if probe:
            prober = spawn(
                "probe",
                python_cmd(
                    "bench.loadgen",
                    "rate",
                    "--url",
                    d.base,
                    "--devices",
                    str(probe_devices),
                    "--prefix",
                    "probe-",
                    "--rate",
                    str(probe_rate),
                    "--connections",
                    "16",
                    "--seconds",
                    "3600",
                    "--samples",
                    str(wd / "probe-samples.txt"),
                ),
                wd / "probe.log",
                LOAD_CORE,
            )
        storm_start = burst_start + timeout
        storm_start_wall = time.time() - (time.monotonic() - storm_start)

        # Poll the receiver (its own process) until everything arrived; the daemon's /v1/status (a GROUP BY on
        # the store's thread, a walk over every device) only at the very end, so as not to load the daemon.
        async with (
            ctx.profile(d.pid, profile, 0) if profile else contextlib.nullcontext(),
            aiohttp.ClientSession() as s,
        ):

            async def received() -> bool:
                return int((await _receiver_stats(s, recv_port))["count"]) >= n

            async def persisted() -> bool:
                st = await d.status()
                return int(st["deliveries"].get("pending", 0)) == 0

            await eventually(received, timeout=timeout + 900, interval=0.25)
            t_done = await eventually(persisted, timeout=120, interval=0.1)
        if on_drained is not None:
            await on_drained(d)
        if prober is not None:
            await prober.stop(timeout=30)
            probe_result = json.loads((await wait_line(prober, "RESULT ")).removeprefix("RESULT "))
    finally:
        if prober is not None:
            await prober.stop()
        await d.stop()
        await recv.stop()
    return PowerCutRun(d, n, timeout, storm_start, storm_start_wall, t_done, probe_result, probe_rate)


async def row_power_cut(ctx: Ctx) -> Row:
    n = 5_000 if ctx.quick else 100_000
    timeout = 8.0 if ctx.quick else 20.0
    wd = ctx.dir("5-power-cut")
    run = await _power_cut(ctx, wd, n, timeout, profile="row5-power-cut")
    d, storm_start, storm_start_wall, t_done = run.d, run.storm_start, run.storm_start_wall, run.t_done
    probe_result, probe_rate = run.probe_result or {}, run.probe_rate
    # Lateness: the event's time (detection) and its device_offline log line (after the commit) vs the deadline.
    conn = sqlite3.connect(d.db_path)
    deadline: dict[str, float] = {}
    detected: list[float] = []
    in_commit_order: list[float] = []  # deadlines, in the order the events were inserted (= committed)
    for created, data in conn.execute(
        "SELECT e.created_at, e.data FROM deliveries d JOIN events e ON e.id = d.event_id"
        " WHERE d.type = 'device.offline' ORDER BY d.id"  # one endpoint: one delivery per event, in insert order
    ):
        ev = json.loads(data)
        if not ev["device_id"].startswith("pc-"):
            continue
        dl = ev["last_seen"] + timeout
        deadline[ev["device_id"]] = dl
        detected.append(created - dl)
        in_commit_order.append(dl)
    last_offline = conn.execute("SELECT max(created_at) FROM events WHERE type = 'device.offline'").fetchone()[0]
    t_offline = storm_start + (last_offline - storm_start_wall)
    delivered = conn.execute(
        "SELECT count(*) FROM deliveries WHERE status = 'delivered' AND device_id LIKE 'pc-%'"
    ).fetchone()[0]
    conn.close()
    # Committed: the log line written after each commit, one per device or one per big chunk
    # (`devices_offline` with a count). Both come in commit order, like the events' rowids.
    commit_times: list[float] = []
    for rec in d.logs():
        if rec.get("event") == "device_offline" and rec.get("device") in deadline:
            commit_times.append(_iso(rec["timestamp"]))
        elif rec.get("event") == "devices_offline":
            commit_times.extend([_iso(rec["timestamp"])] * int(rec["count"]))
    logged = [at - dl for at, dl in zip(commit_times, in_commit_order, strict=False)]  # a gap fails the row
    samples = []
    for line in (wd / "probe-samples.txt").read_text().splitlines():
        t, ms, status = line.split()
        if storm_start - 0.5 <= float(t) <= t_done:
            samples.append(float(ms) if status == "200" else 10_000.0)
    p99 = percentile(samples, 99)
    worst = max(logged) if logged else float("inf")
    worst_detect = max(detected) if detected else float("inf")
    storm = t_done - storm_start
    # The floor for "committed": the same rows (device, event, delivery) written by bare SQLite on the daemon's
    # core, 2,000 per transaction with one executemany per table.
    bare = (await _store_baseline(wd, 3.0, (2000,)))["2000-many"]
    ok = len(deadline) == n and delivered == n and len(logged) == n and worst <= 1.0 and p99 < 100
    return Row(
        "5",
        f"power cut: {n:,} silent at once",
        f"offline <= {worst * 1000:.0f} ms late; {delivered:,}/{n:,} delivered in {storm:.1f}s; hb p99 {p99:.1f} ms",
        f"bare store {fmt_rate(bare)} offline/s: {n / bare:.1f}s for {n:,}; probe {probe_rate:.0f} hb/s",
        "limits 1 s / all / 100 ms",
        ok,
        notes=[
            f"offline events: {len(deadline):,} recorded, {len(logged):,} logged; detection <= "
            f"{worst_detect * 1000:.0f} ms late, logged (committed) p99 {percentile(logged, 99) * 1000:.0f} ms, "
            f"max {worst * 1000:.0f} ms late; all offline {t_offline - storm_start:.1f}s after the first deadline",
            f"probe heartbeats during the storm: {len(samples):,}, p99 {p99:.1f} ms,"
            f" max {max(samples, default=0):.0f} ms;"
            f" whole probe run p99 {probe_result['p99_ms']:.1f} ms, errors {probe_result['errors']}",
        ],
        data={
            "late_logged_max": worst,
            "late_detect_max": worst_detect,
            "delivered": delivered,
            "storm_s": storm,
            "probe_p99_ms": p99,
            "deliveries_per_s": n / storm,
            "bare_store_per_s": bare,
        },
    )


# --- 6. idle ----------------------------------------------------------------------------------------------


async def _cpu_under_trickle(
    pid: int,
    target: str,
    n: int,
    wd: Path,
    name: str,
    *,
    warm: float,
    measure: float,
    new_conn: bool = True,
    udp: bool = False,
) -> tuple[float, dict[str, Any]]:
    """CPU seconds per minute that process `pid` spends while n devices each heartbeat once a minute (evenly
    spread: n/60 per second), over `measure` seconds after `warm` seconds of warm-up."""
    args = ["rate", "--udp" if udp else "--url", target, "--devices", str(n), "--prefix", "idle-"]
    args += ["--rate", f"{n / 60.0:.3f}", "--seconds", str(warm + measure + 1)]
    if new_conn:
        args.append("--new-conn")
    gen = spawn(name, python_cmd("bench.loadgen", *args), wd / f"{name}.log", LOAD_CORE)
    await asyncio.sleep(warm)
    c0, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(measure)
    c1, t1 = cpu_seconds(pid), time.monotonic()
    line = await wait_line(gen, "RESULT ", timeout=30)
    await gen.stop()
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    if result["errors"]:
        raise RuntimeError(f"{name}: {result['errors']} heartbeats failed")
    return (c1 - c0) / (t1 - t0) * 60.0, result


async def _baseline_cpu(wd: Path, n: int, name: str, *args: str, warm: float, measure: float) -> tuple[float, float]:
    """CPU-s/min of a bare ingest process (`bench.baseline_ingest ARGS`) under the trickle: one new connection
    per heartbeat, then keep-alive."""
    child, port = await _start_child(f"baseline_{name}", "bench.baseline_ingest", wd, DAEMON_CORE, *args)
    try:
        url = f"http://127.0.0.1:{port}"
        new_conn, _ = await _cpu_under_trickle(child.pid, url, n, wd, f"trickle-{name}", warm=warm, measure=measure)
        keepalive, _ = await _cpu_under_trickle(
            child.pid, url, n, wd, f"trickle-{name}-ka", warm=warm, measure=measure, new_conn=False
        )
    finally:
        await child.stop()
    return new_conn, keepalive


async def row_idle(ctx: Ctx) -> list[Row]:
    n = 10_000
    wd = ctx.dir("6-idle")
    warm, main, side = ctx.seconds(5, 2), ctx.seconds(60, 10), ctx.seconds(20, 5)
    udp_port = free_port()
    d = await _start_daemon(wd, events=["offline"], udp_port=udp_port)
    try:
        await register(d.base, device_ids("idle-", n))
        await asyncio.sleep(6.0)  # the registration's liveness flush is done
        c0 = cpu_seconds(d.pid)
        await asyncio.sleep(side)
        quiet = (cpu_seconds(d.pid) - c0) / side * 60.0
        async with ctx.profile(d.pid, "row6-idle", 0):
            per_min, res = await _cpu_under_trickle(d.pid, d.base, n, wd, "trickle-daemon", warm=warm, measure=main)
        keepalive, _ = await _cpu_under_trickle(
            d.pid, d.base, n, wd, "trickle-daemon-ka", warm=warm, measure=side, new_conn=False
        )
        udp, _ = await _cpu_under_trickle(
            d.pid, f"127.0.0.1:{udp_port}", n, wd, "trickle-daemon-udp", warm=warm, measure=side, udp=True
        )
    finally:
        await d.stop()
    bare_min, bare_ka = await _baseline_cpu(wd, n, "bare", warm=warm, measure=side)
    raw_min, raw_ka = await _baseline_cpu(wd, n, "raw", "--raw", warm=warm, measure=side)
    pct, udp_pct = per_min / 60.0 * 100, udp / 60.0 * 100
    data = {
        "cpu_s_per_min": per_min,
        "quiet": quiet,
        "keepalive": keepalive,
        "udp": udp,
        "bare_cpu_s_per_min": bare_min,
        "bare_keepalive": bare_ka,
        "raw": raw_min,
        "raw_keepalive": raw_ka,
    }
    return [
        Row(
            "6a",
            f"idle over HTTP: {n:,} devices every 60 s",
            f"{per_min:.2f} CPU-s/min ({pct:.1f}% of a core)",
            f"bare aiohttp {bare_min:.2f} CPU-s/min",
            f"{per_min / bare_min:.2f}x bare; limit < 2% (1.2 CPU-s/min)",
            pct < 2.0,
            notes=[
                f"HTTP, one new connection per heartbeat (a device running curl), {res['rps']:.0f}/s,"
                f" p99 {res['p99_ms']:.1f} ms; daemon with no heartbeats at all: {quiet:.2f} CPU-s/min",
                f"same load over keep-alive connections: daemon {keepalive:.2f}, bare aiohttp {bare_ka:.2f} CPU-s/min",
                f"floor (bare asyncio Protocol, no aiohttp): {raw_min:.2f} CPU-s/min new connections,"
                f" {raw_ka:.2f} keep-alive",
            ],
            data=data,
        ),
        Row(
            "6b",
            f"idle over UDP: {n:,} devices every 60 s",
            f"{udp:.2f} CPU-s/min ({udp_pct:.1f}% of a core)",
            f"bare asyncio Protocol over HTTP {raw_ka:.2f}",
            "limit < 2% (1.2 CPU-s/min)",
            udp_pct < 2.0,
            notes=["one datagram per heartbeat (`echo ID | nc -u`), read in 50 ms windows"],
            data=data,
        ),
    ]


# --- 7. a big backlog for a slow endpoint (issue 9 §2) ------------------------------------------------------

SLOW_DELAY = 1.0  # seconds the slow receiver takes per answer (bench.receiver --delay, bounded there)


def _backlog_daemon(wd: Path, hook: str) -> DaemonUnderTest:
    port = free_port()
    return DaemonUnderTest(wd, daemon_config(wd, port, hook), port)


async def _settled_rss(d: DaemonUnderTest, seconds: float) -> tuple[int, int, int]:
    """Sample the daemon's RSS every 100 ms for `seconds` from now: (settled VmRSS, peak VmRSS, RssAnon)."""
    sampler = RssSampler(d.pid, 0.1, limit=seconds + 30).start()
    try:
        settled = await sampler.hold(seconds)
    finally:
        await sampler.stop()
    last = sampler.samples[-1]
    return settled, sampler.peak(), last.anon


async def row_backlog(ctx: Ctx) -> list[Row]:
    """7a: RSS of a daemon holding `n` pending deliveries for a slow endpoint, over the same daemon on an empty
    store. 7b: seconds from exec to READY=1 on that store. The store is made by the daemon (a first start on
    an empty state_dir: that start is also the first idle measurement), then filled straight through SQLite
    (bench.backlog) with `devices` devices and n pending deliveries for the endpoint; the endpoint points at a
    local receiver that answers after SLOW_DELAY s, so the backlog stays while the daemon works on it."""
    n = 20_000 if ctx.quick else 1_000_000
    devices = 100 if ctx.quick else 1_000
    hold = ctx.seconds(10, 2)  # seconds after READY before the RSS is read
    wd = ctx.dir("7-backlog")
    recv, recv_port = await _start_child("receiver", "bench.receiver", wd, LOAD_CORE, "--delay", f"{SLOW_DELAY:g}")
    hook = f"http://127.0.0.1:{recv_port}/hook"
    idle: list[int] = []
    idle_ready: list[float] = []
    full: list[int] = []
    full_peak: list[int] = []
    full_anon: list[int] = []
    ready: list[float] = []
    sent: list[int] = []
    store_wd = wd / "store"
    built = 0.0
    try:
        async with aiohttp.ClientSession() as s:
            for r in range(ctx.repeats):
                # The idle daemon: the same config on an empty store (the first one creates the fixture's schema).
                d = _backlog_daemon(store_wd if r == 0 else wd / f"idle{r}", hook)
                try:
                    idle_ready.append(await d.start())
                    rss, _, _ = await _settled_rss(d, hold)
                    idle.append(rss)
                finally:
                    rc = await d.stop()
                if rc != 0:
                    raise RuntimeError(f"the idle daemon exited with {rc}; its log: {d.log_path}")
                if r == 0:
                    built = await asyncio.to_thread(
                        backlog.fill_pending, d.db_path, pending=n, devices=devices, endpoint="bench"
                    )
                    ctx.log(f"    filled the daemon's store with {devices:,} devices, {n:,} pending in {built:.1f}s")
                else:
                    shutil.rmtree(wd / f"idle{r}", ignore_errors=True)
                # The same store with the backlog (each start finds it as the last one left it: a few hundred
                # deliveries fewer per run).
                async with s.post(f"http://127.0.0.1:{recv_port}/reset") as resp:
                    await resp.read()
                d = _backlog_daemon(store_wd, hook)
                try:
                    ready.append(await d.start(timeout=300))
                    rss, peak, anon = await _settled_rss(d, hold)
                    full.append(rss)
                    full_peak.append(peak)
                    full_anon.append(anon)
                    got = await _receiver_stats(s, recv_port)
                    sent.append(int(got["count"]) + int(got["inflight"]))
                    st = await d.status()
                    if int(st["deliveries"].get("pending", 0)) < n * 0.99:
                        raise RuntimeError(f"the backlog was not loaded: {st['deliveries']}")
                finally:
                    await d.stop()
                ctx.log(
                    f"    run {r + 1}: READY after {ready[-1]:.2f}s (empty store {idle_ready[-1]:.2f}s);"
                    f" RSS {full[-1] / MiB:.0f} MiB after {hold:g}s (peak {full_peak[-1] / MiB:.0f}), idle"
                    f" {idle[-1] / MiB:.0f} MiB; {sent[-1]} requests to the slow receiver"
                )
            final = backlog.count_rows(store_wd / "state" / "webhookd.db", "bench")
    finally:
        await recv.stop()
    shutil.rmtree(store_wd / "state", ignore_errors=True)
    base, rss_m = median(idle), median(full)
    delta = (rss_m - base) / MiB
    peak_delta = (median(full_peak) - base) / MiB
    t, t_empty = median(ready), median(idle_ready)
    data = {
        "pending": n,
        "devices": devices,
        "idle_rss": idle,
        "rss": full,
        "rss_peak": full_peak,
        "rss_anon": full_anon,
        "delta_mib": delta,
        "ready": ready,
        "ready_empty": idle_ready,
        "sent": sent,
        "fill_s": built,
        "left": final,
    }
    return [
        Row(
            "7a",
            f"backlog: RSS of {n:,} pending, slow endpoint",
            f"+{delta:.1f} MiB ({rss_m / MiB:.0f} MiB total)",
            f"idle daemon {base / MiB:.0f} MiB",
            "limit <= 60 MiB",
            delta <= 60,
            notes=[
                f"{n:,} pending deliveries over {devices:,} devices for one endpoint whose receiver answers after"
                f" {SLOW_DELAY:g} s (concurrency 64); RSS {hold:g} s after READY (median of the last second of"
                f" 100 ms samples), peak +{peak_delta:.1f} MiB, RssAnon {median(full_anon) / MiB:.0f} MiB;"
                f" {median(sent):.0f} requests reached the receiver per run; store filled in {built:.0f}s",
            ],
            data=data,
        ),
        Row(
            "7b",
            f"backlog: startup, {n:,} pending",
            f"READY in {t:.2f} s",
            f"empty store {t_empty:.2f} s",
            "limit <= 3 s",
            t <= 3.0,
            notes=[f"exec to READY=1 (NOTIFY_SOCKET), runs: {', '.join(f'{x:.2f}' for x in ready)} s"],
            data=data,
        ),
    ]


# --- 8. memory through a power cut (issue 9 §2) ----------------------------------------------------------


async def row_power_cut_memory(ctx: Ctx) -> list[Row]:
    """Row 5's power cut with the daemon's RSS sampled every 100 ms from its start: 8a the peak from the first
    silence deadline until the backlog is persisted as delivered, 8b the RSS once it is (after a few seconds'
    settling), both over the same daemon's RSS before its first heartbeat (the empty daemon)."""
    n = 5_000 if ctx.quick else 100_000
    timeout = 8.0 if ctx.quick else 20.0
    settle = ctx.seconds(5, 2)
    wd = ctx.dir("8-power-cut-memory")
    sampler: RssSampler | None = None
    empty = after = 0

    async def started(d: DaemonUnderTest) -> None:
        nonlocal sampler, empty
        sampler = RssSampler(d.pid, 0.1, limit=timeout + 1200).start()
        empty = await sampler.hold(1.0)

    async def drained(d: DaemonUnderTest) -> None:
        nonlocal after
        assert sampler is not None
        after = await sampler.hold(settle)

    try:
        run = await _power_cut(ctx, wd, n, timeout, probe=False, on_started=started, on_drained=drained)
    finally:
        if sampler is not None:
            await sampler.stop()
    assert sampler is not None
    before_cut = sampler.between(run.storm_start - 1.5, run.storm_start - 0.1)
    devices_only = int(median([x.rss for x in before_cut])) if before_cut else 0
    peak = sampler.peak(run.storm_start, run.t_done)
    peak_all = sampler.peak()
    peak_d, after_d = (peak - empty) / MiB, (after - empty) / MiB
    storm = run.t_done - run.storm_start
    data = {
        "empty": empty,
        "devices_only": devices_only,
        "peak": peak,
        "peak_all": peak_all,
        "after": after,
        "storm_s": storm,
        "samples": len(sampler.samples),
    }
    note = (
        f"empty daemon {empty / MiB:.0f} MiB; {n:,} devices online, before the cut {devices_only / MiB:.0f} MiB"
        f" (+{(devices_only - empty) / MiB:.1f}); peak during the cut {peak / MiB:.0f} MiB; backlog delivered"
        f" {storm:.1f}s after the first deadline, {settle:g}s later {after / MiB:.0f} MiB"
        f" ({len(sampler.samples):,} samples, every 100 ms)"
    )
    return [
        Row(
            "8a",
            f"power cut memory: {n:,} silent, peak",
            f"+{peak_d:.1f} MiB peak ({peak / MiB:.0f} MiB)",
            f"empty daemon {empty / MiB:.0f} MiB",
            "limit <= 100 MiB",
            peak_d <= 100,
            notes=[note],
            data=data,
        ),
        Row(
            "8b",
            f"power cut memory: {n:,}, after delivery",
            f"+{after_d:.1f} MiB ({after / MiB:.0f} MiB)",
            f"empty daemon {empty / MiB:.0f} MiB",
            "limit <= 60 MiB",
            after_d <= 60,
            data=data,
        ),
    ]


# --- 9. aiosqlite side by side (issue 9 §5) ----------------------------------------------------------------


async def row_aiosqlite(ctx: Ctx) -> list[Row]:
    """bench.aiosqlite_compare on the daemon's core: (A) the stdlib writer thread as webhookd.store uses it vs
    (C) aiosqlite written per table, transitions/s at W = 1, 8, 64 concurrent writers, in the same run."""
    wd = ctx.dir("9-aiosqlite")
    writers = (1, 8, 64)
    seconds = ctx.seconds(3, 0.5)
    runs = ctx.repeats
    child = spawn(
        "aiosqlite_compare",
        python_cmd(
            "bench.aiosqlite_compare",
            "--writers",
            ",".join(map(str, writers)),
            "--seconds",
            f"{seconds:g}",
            "--repeats",
            str(runs),
            "--dir",
            str(wd),
        ),
        wd / "aiosqlite_compare.log",
        DAEMON_CORE,
    )
    try:
        line = await wait_line(child, "RESULT ", timeout=120 + len(writers) * 2 * runs * (seconds + 3))
    finally:
        await child.stop()
    result = json.loads(line.removeprefix("RESULT "))
    out = []
    for i, w in enumerate(writers):
        r = result[str(w)]
        a, c = r["A"], r["C"]
        out.append(
            Row(
                f"9{'abc'[i]}",
                f"aiosqlite vs sqlite3, W={w}",
                f"C {fmt_rate(c['tps'])} vs A {fmt_rate(a['tps'])} tx/s",
                f"loop CPU/tx A {a['loop_us']:.0f} us, C {c['loop_us']:.0f} us",
                f"C/A {r['ratio']:.2f} (sqlite3 kept while < 1)",
                r["ratio"] < 1.0,
                notes=[
                    f"p50 A {a['p50_ms']:.2f} ms, C {c['p50_ms']:.2f} ms; loop CPU C/A {r['loop_ratio']:.2f};"
                    f" per-run C/A {', '.join(f'{x:.2f}' for x in r['ratios'])} (median {r['pair_ratio']:.2f})"
                    + ("; A = stdlib, one hop per batch; C = aiosqlite, 7 awaits per commit" if i == 0 else "")
                ],
                data=r,
            )
        )
    return out


# --- 10-12. MQTT presence (issue 11 item 6): bench.mqtt -----------------------------------------------------


async def row_mqtt_ingest(ctx: Ctx) -> Row:
    from bench import mqtt

    result: Row = await mqtt.row_ingest(ctx)
    return result


async def row_mqtt_reconcile(ctx: Ctx) -> Row:
    from bench import mqtt

    result: Row = await mqtt.row_reconcile(ctx)
    return result


async def row_mqtt_will(ctx: Ctx) -> Row:
    from bench import mqtt

    result: Row = await mqtt.row_will_latency(ctx)
    return result


# --- 13-15. a hub of several processes on PostgreSQL (issue 13 item 6): bench.fleet ------------------------


async def row_relay_ingest(ctx: Ctx) -> list[Row]:
    from bench import fleet

    result: list[Row] = await fleet.row_relay_ingest(ctx)
    return result


async def row_hub_delivery(ctx: Ctx) -> Row:
    from bench import fleet

    result: Row = await fleet.row_hub_delivery(ctx)
    return result


async def row_takeover(ctx: Ctx) -> Row:
    from bench import fleet

    result: Row = await fleet.row_takeover(ctx)
    return result


ROWS: dict[str, Callable[[Ctx], Any]] = {
    "1": row_liveness,
    "2": row_transitions,
    "3": row_delivery,
    "4": row_scale,
    "5": row_power_cut,
    "6": row_idle,
    "7": row_backlog,
    "8": row_power_cut_memory,
    "9": row_aiosqlite,
    "10": row_mqtt_ingest,
    "11": row_mqtt_reconcile,
    "12": row_mqtt_will,
    "13": row_relay_ingest,
    "14": row_hub_delivery,
    "15": row_takeover,
}
