"""Clock faults (issue 4, item 6): the wall clock jumps hours forward and back while devices keep heartbeating.

With libfaketime (Debian's `faketime` package; `make test` installs it when missing) the daemon runs with
LD_PRELOAD=libfaketime.so.1, FAKETIME_TIMESTAMP_FILE pointing at a file the test rewrites (`+0`, `+5h`, ...),
FAKETIME_NO_CACHE=1 (every clock read looks at the file) and DONT_FAKE_MONOTONIC=1, so only the wall clock
(time.time) jumps while CLOCK_MONOTONIC runs on. Expected: no offline event (silence deadlines are monotonic),
no retry storm on a failing receiver (attempts keep the schedule's pace after a jump forward and do not stall
after a jump back), payload timestamps follow the daemon's (faked) wall clock, offline_for is never negative.

Caveat found while building this: with DONT_FAKE_MONOTONIC=1, libfaketime 0.9.10 makes a blocking
`time.sleep()` fail with EINVAL (its clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME) wrapper). webhookd never
calls time.sleep (asyncio waits in epoll with a relative timeout; threads wait on conditions), so the daemon is
unaffected; a test asserts that the package has no blocking sleep, which would otherwise need another approach.

Without libfaketime, the same properties are shown in-process with an injected wall clock (the engine, Tracker
and Dispatcher take `wall=`); that test runs everywhere, it is fast.
"""

from __future__ import annotations

import asyncio
import glob
import itertools
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.faults.servers import ScriptedReceiver
from webhookd.config import parse_config
from webhookd.dispatch import Dispatcher
from webhookd.presence import DeviceDefaults, Heartbeat, PresenceEngine
from webhookd.store import Store
from webhookd.tracker import Tracker

HOURS5 = 5 * 3600.0
STEP = 0.6  # retry_schedule step for the failing receiver (0.3 s was too close to commit latency on a loaded box)
WINDOW = 5 * STEP  # after each jump, attempts are counted over this long
# The kept-alive devices beat every BEAT seconds against a LIVE_TIMEOUT silence timeout: 25 beats of slack, so a
# loaded machine (a parallel run on 2 cores) does not time them out for real, which would look like a clock bug.
# The wait after the jump forward is LIVE_TIMEOUT + 0.5 s: a deadline kept on the wall clock would have fired.
LIVE_TIMEOUT = 5.0
BEAT = 0.2


def _libfaketime() -> str | None:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    return found[0] if found else None


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _gaps(times: list[float]) -> list[float]:
    return [round(b - a, 3) for a, b in itertools.pairwise(times)]


def test_the_package_never_blocks_in_time_sleep() -> None:
    """The libfaketime setup above relies on it (and a blocking sleep on the event loop would be a bug anyway)."""
    package = Path(__file__).parents[2] / "webhookd"
    hits = [
        f"{f.name}:{n}"
        for f in package.rglob("*.py")
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if re.search(r"\btime\.sleep\(|\bfrom time import .*\bsleep\b", line.split("#", 1)[0])
    ]
    assert not hits, hits


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs (/dev/shm) for the daemon: its commits and log lines then never wait for a disk that
    other processes keep busy, which stalled it for seconds on a loaded machine (this test is about clocks, not
    durability). Without /dev/shm, one under tmp_path."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        yield tmp_path / "daemon"
        return
    d = Path(tempfile.mkdtemp(prefix="webhookd-clock-", dir=shm))
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def test_wall_clock_jumps_under_libfaketime(
    tmp_path: Path, fast_dir: Path, daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    lib = _libfaketime()
    if lib is None:
        pytest.skip("libfaketime is not installed (make test installs Debian's faketime); see the in-process test")
    rc = tmp_path / "faketime.rc"
    rc.write_text("+0\n")
    env = {
        "LD_PRELOAD": lib,
        "FAKETIME_TIMESTAMP_FILE": str(rc),
        "FAKETIME_NO_CACHE": "1",
        "DONT_FAKE_MONOTONIC": "1",  # libfaketime <= 0.9.10
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",  # newer releases
    }
    ok = await receiver()
    failing = await receiver(ScriptedReceiver(respond=lambda _hit: web.json_response({"no": 1}, status=500)))
    d = await daemon(
        [
            {"name": "ok", "url": ok.url, "events": ["all"]},
            {"name": "failing", "url": failing.url(), "events": ["all"]},
        ],
        env=env,
        presence={"silence_timeout": f"{int(LIVE_TIMEOUT * 1000)}ms"},  # the kept-alive devices
        devices=[{"match": "ev-*", "silence_timeout": "1h"}],  # the others, which change state
        delivery={"retry_schedule": [f"{int(STEP * 1000)}ms"] * 30, "disable_after": 0},
        logging={"format": "json", "level": "info"},
        tmp=fast_dir,
    )
    live = [f"live-{i}" for i in range(5)]
    stop = asyncio.Event()
    beats: dict[str, list[tuple[float, float]]] = {dev: [] for dev in live}  # (sent, answered), monotonic
    online: list[str] = []  # the kept-alive devices brought online so far

    async def beat(s: aiohttp.ClientSession, dev: str) -> None:
        sent = time.monotonic()
        async with s.post(d.base + "/v1/heartbeat", json={"device": dev}) as r:
            assert r.status == 200, await r.text()
        beats[dev].append((sent, time.monotonic()))

    async def keep_alive() -> None:
        # Each device is kept alive from its first heartbeat on, on one keep-alive connection: the slow first
        # transitions of the others (each commits before its 2xx) do not leave it silent.
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                for dev in list(online):
                    await beat(s, dev)
                await asyncio.sleep(BEAT)

    marks: dict[str, tuple[float, float]] = {}  # name -> (real wall, monotonic) when the clock was set

    async def jump(offset: str) -> None:
        rc.write_text(offset + "\n")
        marks[offset] = (time.time(), time.monotonic())
        await asyncio.sleep(0.05)

    beating = asyncio.create_task(keep_alive())
    try:
        async with aiohttp.ClientSession() as s:
            for dev in live:
                await beat(s, dev)
                online.append(dev)
        await d.heartbeat("ev-traveller")
        await d.heartbeat("ev-traveller", state="shutdown")
        await asyncio.sleep(0.6)

        await jump("+5h")
        await d.heartbeat("ev-fwd")  # an event now: its time is 5 h ahead
        await d.heartbeat("ev-traveller")  # back online: offline for ~5 h, as the daemon's clock says
        await asyncio.sleep(LIVE_TIMEOUT + 0.5)  # > silence_timeout: a deadline on the wall clock would fire now

        await jump("+0")  # 5 h back
        await d.heartbeat("ev-traveller", state="shutdown")
        await d.heartbeat("ev-traveller")  # offline "for -5 h" by the wall clock: must not be negative
        await d.heartbeat("ev-bwd")
        await asyncio.sleep(WINDOW)  # attempts on the failing endpoint must go on (no stall of 5 h)

        await jump("-5h")  # and 5 h further back
        await d.heartbeat("ev-bwd2")
        await asyncio.sleep(0.8)
    finally:
        stop.set()
        await beating
    status, _ = await d.request("GET", "/healthz")
    assert status == 200
    assert d.proc is not None and d.proc.poll() is None
    stopping = time.monotonic()
    code = await d.stop()
    assert code == 0, d.logs_text()[-3000:]

    # The premise: no kept-alive device was really silent for its timeout (the daemon handled each heartbeat
    # between its sent and answered times; the last one is followed by the stop). A loaded machine that breaks
    # it fails here, saying so, instead of as timeouts that look like a clock bug.
    def longest_silence(dev: str) -> float:
        got = beats[dev]
        gaps = [nxt[1] - prev[0] for prev, nxt in itertools.pairwise(got)]
        return max([*gaps, stopping - got[-1][0]])

    silences = {dev: round(longest_silence(dev), 2) for dev in live}
    assert max(silences.values()) < LIVE_TIMEOUT, f"too slow to test: kept-alive devices went silent {silences}"

    events = ok.events()
    by_device: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        by_device.setdefault(e["device"]["id"], []).append(e)
    # No offline events but the reported shutdowns; no timeouts at all.
    offline = [(e["device"]["id"], e["reason"]) for e in events if e["type"] == "device.offline"]
    assert offline == [("ev-traveller", "shutdown"), ("ev-traveller", "shutdown")], offline
    assert all(len(by_device[dev]) == 1 for dev in live), {dev: len(by_device[dev]) for dev in live}

    # Payload timestamps follow the daemon's wall clock (the faked one): the proof libfaketime was in effect.
    def offset_of(dev: str, idx: int = 0) -> float:
        e = by_device[dev][idx]
        return _ts(e["time"]) - ok.got[events.index(e)].at - (time.time() - time.monotonic())

    assert abs(offset_of("ev-fwd") - HOURS5) < 30, offset_of("ev-fwd")
    assert abs(offset_of("ev-bwd")) < 30, offset_of("ev-bwd")
    assert abs(offset_of("ev-bwd2") + HOURS5) < 30, offset_of("ev-bwd2")
    trav = by_device["ev-traveller"]
    kinds = ["device.online", "device.offline", "device.online", "device.offline", "device.online"]
    assert [e["type"] for e in trav] == kinds, trav
    assert HOURS5 < trav[2]["offline_for"] < HOURS5 + 30, trav[2]  # offline ~5 h by the daemon's clock
    assert trav[4]["offline_for"] is not None and trav[4]["offline_for"] >= 0, trav[4]  # not -5 h
    for e in events:
        assert e["offline_for"] is None or e["offline_for"] >= 0, e
        assert e["time"].endswith("Z") and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", e["time"]), e

    # The failing endpoint: attempts at the schedule's pace through both jumps; no burst, no stall.
    hits = [h.at for h in failing.hits]
    gaps = _gaps(hits)
    # Arrival times are taken in this (busy) test process, so one late-recorded hit can shorten the next gap;
    # a storm would show gaps near zero, and the median must keep the schedule's pace.
    # Before the first failure comes back, events created back to back may go out together (full concurrency
    # until the endpoint is known to fail): a few short gaps are allowed, a storm is not.
    assert gaps and len([g for g in gaps if g < 0.4 * STEP]) <= 3, gaps
    assert sorted(gaps)[len(gaps) // 2] >= 0.8 * STEP - 0.05, gaps
    fwd_at = marks["+5h"][1]
    back_at = marks["+0"][1]
    after_fwd = [t for t in hits if fwd_at <= t < fwd_at + WINDOW]
    after_back = [t for t in hits if back_at <= t < back_at + WINDOW]
    assert len(after_fwd) <= WINDOW / (0.8 * STEP) + 1, _gaps(after_fwd)  # no storm after the jump forward
    assert len(after_back) >= 2, _gaps(hits)  # still retrying after the jump back
    assert max(gaps) < 3 * STEP + 0.5, gaps
    assert "Traceback" not in d.logs_text()
    bad = [r for r in d.logs() if r.get("level") in ("error", "critical")]
    assert not bad, bad[:3]
    print(
        f"\nlibfaketime: +5h, -5h, -5h jumps; {len(events)} webhooks, offline events only the 2 shutdowns; "
        f"{len(hits)} attempts on the failing receiver, gaps {min(gaps):.2f}-{max(gaps):.2f}s (step {STEP}s)"
    )


# ----------------------------------------------------------------------- in-process, injected wall clock


class Wall:
    """A wall clock that follows the real one plus a settable offset."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def test_wall_clock_jumps_in_process(tmp_path: Path, store: Store, receiver: ReceiverFactory) -> None:
    """The fallback (and a fast check everywhere): engine, Tracker and Dispatcher with an injected wall clock."""
    wall = Wall()
    failing = await receiver(ScriptedReceiver(respond=lambda _hit: web.json_response({}, status=503)))
    cfg = parse_config(
        {
            "state_dir": str(tmp_path),
            "delivery": {"retry_schedule": ["200ms"] * 20, "disable_after": 0},
            "endpoints": [{"name": "failing", "url": failing.url(), "events": ["all"]}],
        },
        tmp_path,
        env={},
    )
    engine = PresenceEngine(lambda _id: DeviceDefaults(1.0))
    dispatcher = Dispatcher(cfg, store, wall=wall)
    tracker = Tracker(engine, store, dispatcher, wall=wall)
    await dispatcher.start()
    run = asyncio.create_task(dispatcher.run())
    try:
        await tracker.heartbeats([Heartbeat("a"), Heartbeat("b")])
        await tracker.heartbeats([Heartbeat("b", state="shutdown")])
        marks = []
        for offset in (HOURS5, 0.0, -HOURS5):
            wall.offset = offset
            marks.append(time.monotonic())
            for _ in range(3):
                await tracker.heartbeats([Heartbeat("a")])
                assert engine.expire(time.monotonic(), wall()) == []  # no timeout from a wall jump
                await asyncio.sleep(0.15)
            await tracker.heartbeats([Heartbeat("b"), Heartbeat("b", state="shutdown")])
        assert engine.devices["a"].state == "online"
        rows = await store.load_pending_page("failing", 0, 10_000)
        back_online = [r.event for r in rows if r.event.device_id == "b" and r.event.previous_state == "offline"]
        got = [e.offline_for for e in back_online]
        assert len(got) == 3 and got[0] is not None and abs(got[0] - HOURS5) < 5 and got[1:] == [0.0, 0.0], got
        times = [e.time - w for e, w in zip(back_online, (HOURS5, 0.0, -HOURS5), strict=True)]
        assert max(times) - min(times) < 5  # each event's time is the injected wall clock at that moment
    finally:
        await dispatcher.stop(0)
        run.cancel()
        await asyncio.gather(run, return_exceptions=True)
    # Both lanes' first attempts go out together; from the first failure on, the endpoint paces its attempts.
    gaps = _gaps([h.at for h in failing.hits])[1:]
    assert len(failing.hits) >= 5 and min(gaps) >= 0.8 * 0.2 - 0.03, gaps  # paced through the jumps
    assert all(g < 0.2 * 3 + 0.3 for g in gaps), gaps  # and never stalled
