"""Keeps bench/ from rotting: every module imports, one baseline really runs (~1 s), the parsers still parse.

The benchmarks themselves run with `make bench`, never in `make test`.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCH_MODULES = [
    "bench",
    "bench.__main__",
    "bench.common",
    "bench.rows",
    "bench.profile",
    "bench.loadgen",
    "bench.receiver",
    "bench.baseline_ingest",
    "bench.baseline_store",
    "bench.baseline_delivery",
    "bench.backlog",
    "bench.aiosqlite_compare",
    "bench.mqtt",
    "bench.fleet",
    "bench.relay_load",
]

WRK_OUTPUT = """Running 2s test @ http://127.0.0.1:8470/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     6.10ms    1.01ms  21.03ms   91.12%
    Req/Sec    10.52k   312.37    10.91k    85.00%
  Latency Distribution
     50%    5.93ms
     75%    6.21ms
     90%    6.80ms
     99%   10.41ms
  20940 requests in 2.00s, 3.53MB read
  Non-2xx or 3xx responses: 3
Requests/sec:  10469.57
Transfer/sec:      1.77MB
"""


@pytest.mark.parametrize("name", BENCH_MODULES)
def test_bench_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_every_row_is_registered() -> None:
    from bench.rows import ROWS

    assert sorted(ROWS, key=int) == [str(i) for i in range(1, 16)]


def test_backlog_fixture_fills_a_daemon_store(tmp_path: Path) -> None:
    from bench import backlog, baseline_store

    db = tmp_path / "webhookd.db"
    baseline_store.create_db(db)
    backlog.fill_pending(db, pending=300, devices=7, endpoint="bench", chunk=128)
    assert backlog.count_rows(db, "bench") == {"pending": 300, "devices": 7}


def test_backlog_fixture_refuses_an_unknown_required_column(tmp_path: Path) -> None:
    import sqlite3

    from bench import backlog

    db = tmp_path / "other.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE devices (id TEXT PRIMARY KEY, state TEXT NOT NULL, shiny TEXT NOT NULL)")
    conn.close()
    with pytest.raises(RuntimeError, match="shiny"):
        backlog.fill_pending(db, pending=1, devices=1, endpoint="bench")


async def test_rss_sampler_reads_proc() -> None:
    import os

    from bench.common import RssSampler

    sampler = RssSampler(os.getpid(), 0.02, limit=5).start()
    settled = await sampler.hold(0.2)
    await sampler.stop()
    assert len(sampler.samples) >= 3
    assert 0 < settled <= sampler.peak()
    assert all(s.anon <= s.rss for s in sampler.samples)


async def test_aiosqlite_compare_runs(tmp_path: Path) -> None:
    pytest.importorskip("aiosqlite")  # the bench extra only
    from bench.aiosqlite_compare import compare, table

    result = await compare(tmp_path, [1, 4], 0.2, 1, 0.05)
    for w in ("1", "4"):
        assert result[w]["A"]["tps"] > 0 and result[w]["C"]["tps"] > 0
        assert result[w]["ratio"] > 0
    assert "C/A" in table(result, [1, 4])


def test_bare_store_baseline_runs(tmp_path: Path) -> None:
    from bench import baseline_store

    rates = {}
    for batch in (1, 16):
        db = tmp_path / f"b{batch}.db"
        baseline_store.create_db(db)
        rates[batch] = baseline_store.run(db, 0.4, batch, devices=100)
    assert rates[1] > 0 and rates[16] > 0


def test_wrk_output_parses() -> None:
    from bench.common import parse_wrk

    r = parse_wrk(WRK_OUTPUT)
    assert r.rps == pytest.approx(10469.57)
    assert r.requests == 20940
    assert r.errors == 3
    assert r.p50_ms == pytest.approx(5.93)
    assert r.p99_ms == pytest.approx(10.41)


def test_profile_summary_parses_collapsed_stacks(tmp_path: Path) -> None:
    from bench.profile import summarize

    raw = tmp_path / "p.txt"
    raw.write_text(
        "thread (1): MainThread;run (asyncio/runners.py:118);single (webhookd/listener.py:230) 3\n"
        "thread (1): MainThread;run (asyncio/runners.py:118);_commit (webhookd/tracker.py:90) 1\n"
    )
    s = summarize(raw, "x")
    assert s.samples == 4
    assert s.self_.most_common(1)[0] == ("single (webhookd/listener.py)", 3)
    assert "x: 4 samples" in s.render()


def test_mqtt_ingest_messages_are_each_a_change() -> None:
    from bench.mqtt import _payload

    devices, n = 5, 20  # n / devices even: every device ends online
    last = dict.fromkeys(range(devices), b"online")
    for k in range(n):
        dev, payload = _payload(k, devices, 0, False)
        assert payload != last[dev]
        last[dev] = payload
    assert set(last.values()) == {b"online"}


def test_mqtt_metrics_sum() -> None:
    from bench.mqtt import _sum

    m = {'webhookd_events_total{type="device.online"}': 3.0, 'webhookd_events_total{type="device.offline"}': 2.0}
    assert _sum(m, "webhookd_events_total") == 5.0
    assert _sum(m, "webhookd_mqtt_messages_total") == 0.0


async def test_mqtt_publisher_and_bare_subscriber_run(tmp_path: Path) -> None:
    """Row 10's raw-socket publisher and bare aiomqtt subscriber against a throwaway mosquitto (~1 s)."""
    import asyncio
    import json
    import sys

    from tests.mqtt_broker import Broker, missing_tools

    if missing_tools():
        pytest.skip(f"{', '.join(missing_tools())} missing (make mosquitto-tools)")
    b = Broker(tmp_path / "broker", extra="max_queued_messages 0")
    await b.start()
    try:
        bare = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.mqtt", "bare", "--port", str(b.port), "--topic", "bare/+/status",
            "--n", "200", "--timeout", "20", stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert bare.stdout is not None
        assert (await asyncio.wait_for(bare.stdout.readline(), 20)).strip() == b"READY"
        pub = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.mqtt", "pub", "--port", str(b.port), "--template", "bare/{id}/status",
            "--devices", "10", "--n", "200", stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(pub.communicate(), 30)
        result = json.loads(out.decode().splitlines()[-1].removeprefix("RESULT "))
        assert result["acked"] == 200 and result["rate"] > 0
        line = (await asyncio.wait_for(bare.stdout.readline(), 20)).decode()
        counted = json.loads(line.removeprefix("RESULT "))
        assert counted["count"] == 200 and counted["last"] >= counted["first"] > 0
        await asyncio.wait_for(bare.wait(), 10)
    finally:
        await b.stop()
