"""The MQTT rows of issue 11 (item 6), each against the real daemon (`webhookd run`, a subprocess) and a throwaway
Mosquitto (tests/mqtt_broker.py `Broker`, on the load core with the publishers):

10  availability ingest: N esphome `dev-K/status` messages, each a state change (online/offline alternating over
    D devices, QoS 1, retained, as ESPHome publishes), written back to back on one raw MQTT connection; messages/s
    until the daemon has made every event durable (counted in its SQLite file by a read-only connection; its endpoint is
    disabled, so each transition writes its event and a held delivery, as row 2) against a bare aiomqtt
    subscriber (same broker, same QoS 1 persistent session, same core) counting the same stream of messages on
    `bare/dev-K/status`, in the same run. Target >= 0.8x.
11  10,000 retained availabilities reconciled at startup: the daemon stored every device online once, is stopped
    and started again (settle 0.2 s): seconds from `mqtt_connected` to the later of `mqtt_settled` and the
    10,000th message routed, with 0 events (the `mqtt_settled` line and webhookd_events_total). Target <= 2 s.
12  will-to-webhook latency: 1,000 devices (tests/mqtt_devices.py, one process, keep-alive 2 s) SIGKILLed at once
    (the broker publishes every will at once); a subscriber (tests/mqtt_broker.py `Watcher`) timestamps each
    will, bench.receiver --record each `device.offline` webhook; p50/p99 of webhook arrival - will seen.
    Target (CONTRACT §11): p99 <= 1 s (the settle's 0.25 s will grace included).

The module is also the rows' helper processes:

    python -m bench.mqtt pub --port P --template '{id}/status' --devices D --n N [--round R] [--online-only]
    python -m bench.mqtt bare --port P --topic 'bare/+/status' --n N
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import (
    DAEMON_CORE,
    LOAD_CORE,
    Child,
    DaemonUnderTest,
    cpu_seconds,
    daemon_config,
    free_port,
    median,
    percentile,
    pin_pid,
    python_cmd,
    run_main,
    spawn,
    wait_line,
)

INGEST_RATIO = 0.8
RECONCILE_LIMIT = 2.0
WILL_P99_LIMIT = 1.0
RETAINED_N = 10_000
LOSSES = 1_000
RETAINED = ("--retained", "--timeout", "60")  # bare: count what the broker replays on subscribe


# --- helper processes ------------------------------------------------------------------------------------------


def _payload(k: int, devices: int, round0: int, online_only: bool) -> tuple[int, bytes]:
    """Message k: device k % devices; offline on even rounds, online on odd ones (each one a change for a
    device that starts online), or always online."""
    dev = k % devices
    if online_only:
        return dev, b"online"
    return dev, b"offline" if (round0 + k // devices) % 2 == 0 else b"online"


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


def publish(port: int, template: str, devices: int, n: int, round0: int, online_only: bool, qos: int) -> None:
    """n PUBLISH packets (retained, QoS 1 unless told 0) built up front and written back to back on one MQTT 3.1.1
    connection (a raw socket: no client library between us and the broker, so the publisher is not what bounds a
    consumer's rate), then every PUBACK read. Prints `START t` (monotonic, just before the first byte) and
    `RESULT {...}`."""
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    client_id = f"bench-pub-{os.getpid()}".encode()
    body = _str(b"MQTT") + b"\x04\x02\x00\x3c" + _str(client_id)  # level 4, clean session, keep-alive 60
    sock.sendall(b"\x10" + _remaining(len(body)) + body)
    connack = sock.recv(4)
    if len(connack) < 4 or connack[0] != 0x20 or connack[3] != 0:
        raise SystemExit(f"CONNACK {connack!r}")
    topics = [_str(template.format(id=f"dev-{i}").encode()) for i in range(devices)]
    packets = bytearray()
    for k in range(n):
        dev, payload = _payload(k, devices, round0, online_only)
        if qos:
            pid = k % 65535 + 1
            var = topics[dev] + pid.to_bytes(2, "big") + payload
            packets += b"\x33" + _remaining(len(var)) + var
        else:
            var = topics[dev] + payload
            packets += b"\x31" + _remaining(len(var)) + var
    t0 = time.monotonic()
    print(f"START {t0}", flush=True)
    sock.sendall(packets)
    sent = time.monotonic()
    acked = 0
    buf = b""
    deadline = sent + 120
    while qos and acked < n and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        whole = len(buf) // 4  # a PUBACK is 4 bytes (0x40 0x02 id id), the only packet the broker sends us
        acked += whole
        buf = buf[whole * 4 :]
    end = time.monotonic()
    sock.sendall(b"\xe0\x00")  # DISCONNECT
    sock.close()
    result = {"start": t0, "sent": sent, "acked": acked if qos else n, "end": end, "rate": n / (end - t0)}
    print("RESULT " + json.dumps(result), flush=True)


async def bare(port: int, topic: str, n: int, timeout: float, retained: bool = False) -> None:
    """The bare subscriber: aiomqtt with the daemon's settings (fixed client id, persistent session, QoS 1, a
    bounded queue), counting live (not retained) messages until n (retained=True: only the retained ones the
    broker replays on subscribe). Prints `READY` once subscribed, then `RESULT {"connected": t, "first": t,
    "last": t, "count": c, "cpu": s}` (monotonic; connected = CONNACK; CPU seconds after READY)."""
    import aiomqtt

    count = 0
    first = last = 0.0
    async with aiomqtt.Client(
        "127.0.0.1",
        port,
        identifier=f"bench-bare-{os.getpid()}",
        clean_session=False,
        keepalive=30,
        max_queued_incoming_messages=100_000,
        timeout=10.0,
    ) as client:
        connected = time.monotonic()
        await client.subscribe(topic, qos=1)
        print("READY", flush=True)
        cpu0 = time.process_time()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                async for m in client.messages:
                    if bool(m.retain) != retained:
                        continue
                    last = time.monotonic()
                    if count == 0:
                        first = last
                    count += 1
                    if count >= n:
                        break
        cpu = time.process_time() - cpu0
    result = {"connected": connected, "first": first, "last": last, "count": count, "cpu": cpu}
    print("RESULT " + json.dumps(result), flush=True)


# --- plumbing ---------------------------------------------------------------------------------------------------


async def _broker(wd: Path) -> Any:
    from tests.mqtt_broker import Broker, missing_tools

    missing = missing_tools()
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not installed (make mosquitto-tools)")
    # Debian's defaults, except no cap on the QoS 1 queue of a subscriber that falls behind (1,000 by default:
    # beyond it Mosquitto drops messages, and a rate would then count fewer than were published).
    b = Broker(wd / "broker", extra="max_queued_messages 0")
    await b.start()
    assert b.pid is not None
    pin_pid(b.pid, LOAD_CORE)
    return b


def _mqtt_cfg(port: int, settle: str) -> dict[str, Any]:
    return {
        "url": f"mqtt://127.0.0.1:{port}",
        "client_id": "webhookd-bench",
        "keepalive": "30s",
        "settle": settle,
        "status_topic": None,
        "sources": [{"preset": "esphome"}],
    }


async def _daemon(wd: Path, broker_port: int, settle: str, endpoint_url: str | None, **cfg: Any) -> DaemonUnderTest:
    port = free_port()
    level = os.environ.get("BENCH_LOG_LEVEL", "info")
    c = daemon_config(wd / "daemon", port, endpoint_url, log_level=level, **cfg)
    c["mqtt"] = _mqtt_cfg(broker_port, settle)
    d = DaemonUnderTest(wd / "daemon", c, port)
    await d.start()
    return d


async def metrics(d: DaemonUnderTest) -> dict[str, float]:
    """The daemon's /metrics (admin socket): {sample name with labels: value}."""
    conn = aiohttp.UnixConnector(path=str(d.admin_socket))
    async with aiohttp.ClientSession(connector=conn) as s, s.get("http://webhookd/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def _sum(m: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in m.items() if k == prefix or k.startswith(prefix + "{"))


async def events(d: DaemonUnderTest) -> int:
    return int(_sum(await metrics(d), "webhookd_events_total"))


async def routed(d: DaemonUnderTest) -> int:
    return int(_sum(await metrics(d), "webhookd_mqtt_messages_total"))


class StoredEvents:
    """Counts the events the daemon has committed, read from its SQLite file by a read-only connection of ours
    (WAL: a reader never blocks the writer): costs the daemon nothing, where a /metrics scrape costs it a
    delivery_counts query that grows with the held deliveries."""

    def __init__(self, d: DaemonUnderTest) -> None:
        import sqlite3

        self.conn = sqlite3.connect(f"file:{d.db_path}?mode=ro", uri=True, check_same_thread=False)

    async def __call__(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM events").fetchone()[0])

    def close(self) -> None:
        self.conn.close()


async def _wait_count(get: Any, want: int, timeout: float, interval: float = 0.02) -> float:
    """Poll `get()` until >= want; the monotonic time it first was."""
    deadline = time.monotonic() + timeout
    last = -1
    while True:
        last = await get()
        if last >= want:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {last} of {want} within {timeout:g}s")
        await asyncio.sleep(interval)


def _pub_cmd(port: int, template: str, devices: int, n: int, *extra: str) -> list[str]:
    args = ["pub", "--port", str(port), "--template", template, "--devices", str(devices), "--n", str(n), *extra]
    return python_cmd("bench.mqtt", *args)


async def _publish_started(wd: Path, port: int, template: str, devices: int, n: int, *extra: str) -> Child:
    child = spawn("mqtt-pub", _pub_cmd(port, template, devices, n, *extra), wd / "mqtt-pub.log", LOAD_CORE)
    await wait_line(child, "START ", timeout=30)
    return child


async def _publish(wd: Path, port: int, template: str, devices: int, n: int, *extra: str) -> dict[str, Any]:
    result = await _pub_result(await _publish_started(wd, port, template, devices, n, *extra))
    if result["acked"] < n:
        raise RuntimeError(f"publisher: {result['acked']} of {n} acknowledged")
    return result


async def _pub_result(child: Child) -> dict[str, Any]:
    try:
        line = await wait_line(child, "RESULT ", timeout=180)
    finally:
        await child.stop()
    result: dict[str, Any] = json.loads(line.removeprefix("RESULT "))
    return result


def _rate(x: float) -> str:
    return f"{x:,.0f}"


# --- 10. availability ingest ------------------------------------------------------------------------------------


async def row_ingest(ctx: Any) -> Any:
    from bench.rows import DEAD_URL, Row

    devices = 200 if ctx.quick else 1_000
    n = 4_000 if ctx.quick else 40_000  # n / devices even: every device ends online
    wd = ctx.dir("10-mqtt-ingest")
    b = await _broker(wd)
    d: DaemonUnderTest | None = None
    daemon_runs: list[float] = []
    bare_runs: list[float] = []
    pub_runs: list[float] = []
    daemon_cpu: list[float] = []  # CPU microseconds per message (all threads, one core)
    bare_cpu: list[float] = []
    try:
        d = await _daemon(wd, b.port, "0s", DEAD_URL)
        await d.admin("POST", "/v1/endpoints/bench/disable")  # events and held deliveries written, none sent
        await _wait_count(lambda: _connected(d), 1, 30)
        # every device online first (its first message), on both topic trees
        await _publish(wd, b.port, "{id}/status", devices, devices, "--online-only")
        await _wait_count(lambda: routed(d), devices, 60)
        await asyncio.sleep(0.5)
        await _publish(wd, b.port, "bare/{id}/status", devices, devices, "--online-only")
        for r in range(ctx.repeats):
            # the daemon
            stored = StoredEvents(d)
            before = await stored()
            async with ctx.profile(d.pid, "row10-mqtt-ingest", r):
                c0 = cpu_seconds(d.pid)
                pub = await _publish_started(wd, b.port, "{id}/status", devices, n)
                t_done = await _wait_count(stored, before + n, 300, 0.02)
                daemon_cpu.append((cpu_seconds(d.pid) - c0) / n * 1e6)
            stored.close()
            pr = await _pub_result(pub)
            rate = n / (t_done - pr["start"])
            daemon_runs.append(rate)
            pub_runs.append(pr["rate"])
            await asyncio.sleep(0.5)
            # the bare subscriber: same broker, same stream, another topic tree the daemon does not subscribe to
            child = spawn(
                "mqtt-bare",
                python_cmd("bench.mqtt", "bare", "--port", str(b.port), "--topic", "bare/+/status", "--n", str(n)),
                wd / "mqtt-bare.log",
                DAEMON_CORE,
            )
            try:
                await wait_line(child, "READY", timeout=30)
                pub = await _publish_started(wd, b.port, "bare/{id}/status", devices, n)
                line = await wait_line(child, "RESULT ", timeout=300)
                pr2 = await _pub_result(pub)
            finally:
                await child.stop()
            br = json.loads(line.removeprefix("RESULT "))
            if br["count"] < n:
                raise RuntimeError(f"bare subscriber counted {br['count']} of {n}")
            bare_rate = n / (br["last"] - pr2["start"])
            bare_runs.append(bare_rate)
            bare_cpu.append(br["cpu"] / n * 1e6)
            pub_runs.append(pr2["rate"])
            ctx.log(
                f"    run {r + 1}: daemon {rate:,.0f} msg/s (events durable, {daemon_cpu[-1]:.0f} us CPU/msg),"
                f" bare {bare_rate:,.0f} msg/s ({bare_cpu[-1]:.0f} us CPU/msg),"
                f" publisher {pr['rate']:,.0f} / {pr2['rate']:,.0f} msg/s acked"
            )
        m = await metrics(d)
        dropped = _sum(m, "webhookd_mqtt_dropped_total")
    finally:
        if d is not None:
            await d.stop()
        await b.stop()
    dm, bm = median(daemon_runs), median(bare_runs)
    ratio = dm / bm
    return Row(
        "10",
        f"mqtt ingest ({n:,} changes, {devices:,} dev)",
        f"{_rate(dm)} msg/s applied (events durable)",
        f"bare aiomqtt {_rate(bm)} msg/s",
        f"{ratio:.2f}x (>= {INGEST_RATIO}x)",
        ratio >= INGEST_RATIO,
        notes=[
            f"per run daemon {', '.join(_rate(x) for x in daemon_runs)};"
            f" bare {', '.join(_rate(x) for x in bare_runs)};"
            f" publisher (raw socket, QoS 1, acked) median {_rate(median(pub_runs))} msg/s;"
            f" CPU per message: daemon {median(daemon_cpu):.0f} us (all threads), bare {median(bare_cpu):.0f} us;"
            " endpoint disabled (event + held delivery written per change);"
            f" dropped by the daemon's inbox {dropped:.0f}"
        ],
        data={
            "daemon": daemon_runs,
            "bare": bare_runs,
            "publisher": pub_runs,
            "ratio": ratio,
            "daemon_cpu_us": daemon_cpu,
            "bare_cpu_us": bare_cpu,
        },
    )


async def _connected(d: DaemonUnderTest) -> int:
    st = await d.status()
    return int(bool((st.get("mqtt") or {}).get("connected")))


# --- 11. retained availabilities reconciled at startup ------------------------------------------------------------


def _log_after(d: DaemonUnderTest, event: str, offset: int) -> dict[str, Any] | None:
    text = d.log_path.read_text(errors="replace") if d.log_path.exists() else ""
    for line in text[offset:].splitlines():
        if f'"{event}"' in line:
            with contextlib.suppress(json.JSONDecodeError):
                rec: dict[str, Any] = json.loads(line)
                if rec.get("event") == event:
                    return rec
    return None


async def _wait_log(d: DaemonUnderTest, event: str, timeout: float) -> tuple[float, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        rec = _log_after(d, event, 0)
        if rec is not None:
            return time.monotonic(), rec
        if d.child is not None and not d.child.alive():
            raise RuntimeError(f"daemon exited:\n{d.child.log_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {event} line within {timeout:g}s")
        await asyncio.sleep(0.01)


def _iso(ts: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


async def row_reconcile(ctx: Any) -> Any:
    from bench.rows import Row

    n = 1_000 if ctx.quick else RETAINED_N
    wd = ctx.dir("11-mqtt-reconcile")
    b = await _broker(wd)
    d: DaemonUnderTest | None = None
    figures: list[float] = []
    to_settled: list[float] = []
    from_start: list[float] = []
    ready: list[float] = []
    bare_s: list[float] = []
    bad: list[str] = []
    try:
        # the store learns every device online once (no endpoint: only the state matters here)
        d = await _daemon(wd, b.port, "0.2s", None)
        await _wait_count(lambda: _connected(d), 1, 30)
        await _publish(wd, b.port, "{id}/status", n, n, "--online-only")
        await _wait_count(lambda: routed(d), n, 120)
        await _wait_count(lambda: events(d), n, 60)
        await d.stop()
        for r in range(ctx.repeats):
            (d.log_path).unlink(missing_ok=True)
            wall0 = time.time()
            ready.append(await d.start())
            async with ctx.profile(d.pid, "row11-mqtt-reconcile", r):
                _, conn = await _wait_log(d, "mqtt_connected", 30)
                t_routed = await _wait_count(lambda: routed(d), n, 60, 0.05)
                _, settled = await _wait_log(d, "mqtt_settled", 30)
            await asyncio.sleep(0.3)
            ev = await events(d)
            # routed is polled (every 50 ms: a scrape costs the daemon a delivery_counts query); the log lines
            # carry the daemon's own wall-clock timestamps
            t_conn = _iso(conn["timestamp"])
            t_settled = _iso(settled["timestamp"])
            t_all = max(t_settled, wall0 + (t_routed - d.started_at))
            figures.append(t_all - t_conn)
            to_settled.append(t_settled - t_conn)
            from_start.append(t_all - wall0)
            if ev or settled.get("events"):
                bad.append(f"run {r + 1}: {ev} events (mqtt_settled events={settled.get('events')})")
            await d.stop()
            # the bare subscriber: the same retained messages from the same broker, on the daemon's core
            child = spawn(
                "mqtt-bare",
                python_cmd(
                    "bench.mqtt", "bare", "--port", str(b.port), "--topic", "+/status", "--n", str(n), *RETAINED
                ),
                wd / "mqtt-bare.log",
                DAEMON_CORE,
            )
            try:
                line = await wait_line(child, "RESULT ", timeout=90)
            finally:
                await child.stop()
            br = json.loads(line.removeprefix("RESULT "))
            if br["count"] < n:
                raise RuntimeError(f"bare subscriber got {br['count']} of {n} retained")
            bare_s.append(br["last"] - br["connected"])
            ctx.log(
                f"    run {r + 1}: connected -> all {n:,} reconciled {t_all - t_conn:.2f}s (mqtt_settled after"
                f" {t_settled - t_conn:.2f}s, devices={settled.get('devices')}, events={settled.get('events')});"
                f" start -> READY {ready[-1]:.2f}s, start -> all {t_all - wall0:.2f}s; events_total {ev};"
                f" bare aiomqtt CONNACK -> {n:,} retained {bare_s[-1]:.2f}s"
            )
    finally:
        if d is not None:
            await d.stop()
        await b.stop()
    fig = median(figures)
    ok = fig <= RECONCILE_LIMIT and not bad
    return Row(
        "11",
        f"mqtt {n:,} retained at startup",
        f"{fig:.2f}s connected -> reconciled, 0 events" if not bad else f"{fig:.2f}s; EVENTS: {bad[0]}",
        f"bare aiomqtt {median(bare_s):.2f}s CONNACK -> {n:,} retained",
        f"<= {RECONCILE_LIMIT:g}s ({fig / median(bare_s):.2f}x bare)",
        ok,
        notes=[
            f"per run {', '.join(f'{x:.2f}' for x in figures)}s (bare {', '.join(f'{x:.2f}' for x in bare_s)}s);"
            f" start -> READY {median(ready):.2f}s, start -> reconciled {median(from_start):.2f}s;"
            f" mqtt_settled (settle 0.2s) after"
            f" {median(to_settled):.2f}s; reconciled = the later of mqtt_settled and the {n:,}th message routed"
            + (f"; {'; '.join(bad)}" if bad else "")
        ],
        data={
            "figure": figures,
            "to_settled": to_settled,
            "from_start": from_start,
            "ready": ready,
            "bare": bare_s,
            "bad": bad,
        },
    )


# --- 12. will-to-webhook latency ----------------------------------------------------------------------------------


async def row_will_latency(ctx: Any) -> Any:
    from bench.rows import Row, _start_child
    from tests.mqtt_broker import Watcher
    from tests.mqtt_devices import Devices

    n = 100 if ctx.quick else LOSSES
    wd = ctx.dir("12-mqtt-will")
    b = await _broker(wd)
    recv, recv_port = await _start_child("receiver", "bench.receiver", wd, LOAD_CORE, "--record")
    d: DaemonUnderTest | None = None
    lat: list[float] = []
    p50s: list[float] = []
    p99s: list[float] = []
    spreads: list[float] = []
    try:
        d = await _daemon(wd, b.port, "0.2s", f"http://127.0.0.1:{recv_port}/hook")
        await _wait_count(lambda: _connected(d), 1, 30)
        await asyncio.sleep(0.5)  # past the settle window of our connect
        async with aiohttp.ClientSession() as s, Watcher(b, ["+/status"]) as w:

            async def records() -> list[Any]:
                async with s.get(f"http://127.0.0.1:{recv_port}/records") as resp:
                    out: list[Any] = await resp.json()
                    return out

            for r in range(ctx.repeats):
                t_start = time.monotonic()
                devs = Devices(b.url, n, preset="esphome", keepalive=2)
                await devs.start(timeout=120)
                assert devs.pid is not None
                pin_pid(devs.pid, LOAD_CORE)

                async def online(t0: float = t_start) -> int:
                    return sum(1 for at, typ, _ in await records() if at >= t0 and typ == "device.online")

                await _wait_count(online, n, 120, 0.1)
                await asyncio.sleep(1.0)
                t_kill = time.monotonic()
                async with ctx.profile(d.pid, "row12-mqtt-will", r):
                    await devs.kill()

                    async def offline(t0: float = t_kill) -> int:
                        return sum(1 for at, typ, _ in await records() if at >= t0 and typ == "device.offline")

                    await _wait_count(offline, n, 60, 0.1)
                wills: dict[str, float] = {}
                for m in w.messages:
                    if m.at >= t_kill and m.text == "offline":
                        wills.setdefault(m.topic.rsplit("/", 1)[0], m.at)
                hooks: dict[str, float] = {}
                for at, typ, dev in await records():
                    if at >= t_kill and typ == "device.offline":
                        hooks.setdefault(dev, at)
                run = [hooks[dev] - at for dev, at in wills.items() if dev in hooks]
                if len(run) < n:
                    raise RuntimeError(f"{len(wills)} wills seen, {len(hooks)} offline webhooks, {len(run)} paired")
                lat.extend(run)
                p50s.append(percentile(run, 50))
                p99s.append(percentile(run, 99))
                spreads.append(max(wills.values()) - min(wills.values()))
                ctx.log(
                    f"    run {r + 1}: will -> webhook p50 {p50s[-1] * 1000:.0f} ms, p99 {p99s[-1] * 1000:.0f} ms,"
                    f" max {max(run) * 1000:.0f} ms; kill -> first will {(min(wills.values()) - t_kill) * 1000:.0f} ms,"
                    f" wills spread over {spreads[-1] * 1000:.0f} ms"
                )
                w.messages.clear()
    finally:
        if d is not None:
            await d.stop()
        await recv.stop()
        await b.stop()
    p50, p99 = median(p50s), median(p99s)
    return Row(
        "12",
        f"mqtt will -> webhook ({n:,} losses)",
        f"p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms",
        f"{n:,} wills at once (SIGKILL), spread {median(spreads) * 1000:.0f} ms",
        f"p99 <= {WILL_P99_LIMIT * 1000:.0f} ms",
        p99 <= WILL_P99_LIMIT,
        notes=[
            f"per run p50 {', '.join(f'{x * 1000:.0f}' for x in p50s)} ms,"
            f" p99 {', '.join(f'{x * 1000:.0f}' for x in p99s)} ms; all {len(lat):,} losses pooled:"
            f" p50 {percentile(lat, 50) * 1000:.0f} ms, p99 {percentile(lat, 99) * 1000:.0f} ms;"
            " includes the settle's 0.25 s will grace (webhookd.mqtt.settle)"
        ],
        data={"p50": p50s, "p99": p99s, "spread": spreads},
    )


# --- helper process entry ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.mqtt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("pub")
    pp.add_argument("--port", type=int, required=True)
    pp.add_argument("--template", default="{id}/status")
    pp.add_argument("--devices", type=int, required=True)
    pp.add_argument("--n", type=int, required=True)
    pp.add_argument("--round", type=int, default=0)
    pp.add_argument("--online-only", action="store_true")
    pp.add_argument("--qos", type=int, default=1, choices=(0, 1))
    bp = sub.add_parser("bare")
    bp.add_argument("--port", type=int, required=True)
    bp.add_argument("--topic", required=True)
    bp.add_argument("--n", type=int, required=True)
    bp.add_argument("--timeout", type=float, default=300.0)
    bp.add_argument("--retained", action="store_true", help="count the retained messages replayed on subscribe")
    args = p.parse_args(argv)
    if args.cmd == "pub":
        publish(args.port, args.template, args.devices, args.n, args.round, args.online_only, args.qos)
    else:
        run_main(lambda: bare(args.port, args.topic, args.n, args.timeout, args.retained))


if __name__ == "__main__":
    main(sys.argv[1:])
