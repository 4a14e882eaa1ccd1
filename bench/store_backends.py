"""record() throughput of transitions through the real stores: SQLite vs PostgreSQL, same workload, same run.

    python -m bench.store_backends [--url postgresql://...] [--seconds 3] [--repeats 3]

One transition = one `Change` (device row + event + one pending delivery), written with `DeliveryStore.record`
(durable when it resolves: SQLite WAL + synchronous=FULL, PostgreSQL with fsync and synchronous_commit on).
Three shapes: `serial` (one record() of one transition at a time: a commit each), `concurrent` (64 callers
each recording one transition at a time: what group commit gathers from a busy listener) and `batch` (record()
of 500 transitions: a power cut's burst). Without --url a throwaway cluster is started (tests/postgres_cluster.py:
initdb + pg_ctl on a free 127.0.0.1 port) and removed afterwards. Prints medians of --repeats runs (each on a
fresh database) and the PostgreSQL/SQLite ratio, then one `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from webhookd.payloads import EventData, new_event_id
from webhookd.presence import Device
from webhookd.store import Change, DeliveryStore, SQLiteStore
from webhookd.store.postgres import PostgresStore

DEVICES = 5000
CONCURRENCY = 64
BATCH = 500
_seq = itertools.count()


def transition() -> Change:
    i = next(_seq)
    now = time.time()
    dev = f"bench-{i % DEVICES:05d}"
    state = "offline" if (i // DEVICES) % 2 == 0 else "online"
    ev = EventData(
        id=new_event_id(),
        type=f"device.{state}",
        time=now,
        device_id=dev,
        name=None,
        owner=None,
        address="10.0.0.1",
        state=state,
        previous_state="online" if state == "offline" else "offline",
        reason="timeout" if state == "offline" else "heartbeat",
        last_seen=now,
        offline_for=None,
    )
    return Change(Device(id=dev, state=state, last_seen=now, changed_at=now), ev, [("r", "pending")])


async def _run_for(seconds: float, step: Callable[[], Awaitable[int]]) -> float:
    done = 0
    started = time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        done += await step()
    return done / elapsed


async def shape(store: DeliveryStore, name: str, seconds: float) -> float:
    if name == "serial":

        async def serial() -> int:
            await store.record([transition()])
            return 1

        return await _run_for(seconds, serial)
    if name == "concurrent":

        async def concurrent() -> int:
            await asyncio.gather(*(store.record([transition()]) for _ in range(CONCURRENCY)))
            return CONCURRENCY

        return await _run_for(seconds, concurrent)

    async def batch() -> int:
        await store.record([transition() for _ in range(BATCH)])
        return BATCH

    return await _run_for(seconds, batch)


SHAPES = ("serial", "concurrent", "batch")


async def measure(open_store: Callable[[int], Awaitable[DeliveryStore]], seconds: float, run: int) -> dict[str, float]:
    store = await open_store(run)
    try:
        return {s: await shape(store, s, seconds) for s in SHAPES}
    finally:
        await store.close()


async def main_async(url: str | None, seconds: float, repeats: int) -> dict[str, object]:
    cluster = None
    if url is None:
        from tests.postgres_cluster import Cluster

        cluster = Cluster()
        cluster.start()
    tmp = Path(tempfile.mkdtemp(prefix="webhookd-bench-store-"))
    try:

        async def sqlite(run: int) -> DeliveryStore:
            s = SQLiteStore(tmp / f"run{run}.db")
            await s.open()
            return s

        async def postgres(run: int) -> DeliveryStore:
            s = PostgresStore(url if url is not None else cluster.create_db())  # type: ignore[union-attr]
            await s.open()
            return s

        runs: dict[str, list[dict[str, float]]] = {"sqlite": [], "postgresql": []}
        for run in range(repeats):  # interleaved, so that drift on the box hits both alike
            runs["sqlite"].append(await measure(sqlite, seconds, run))
            runs["postgresql"].append(await measure(postgres, seconds, run))
        medians = {b: {s: statistics.median(r[s] for r in rs) for s in SHAPES} for b, rs in runs.items()}
        ratio = {s: medians["postgresql"][s] / medians["sqlite"][s] for s in SHAPES}
        return {"transitions_per_s": medians, "ratio_pg_to_sqlite": ratio, "runs": runs, "repeats": repeats}
    finally:
        if cluster is not None:
            cluster.remove()
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a PostgreSQL database to use (its tables must be webhookd's or none)")
    ap.add_argument("--seconds", type=float, default=3.0, help="per shape and run")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    out = asyncio.run(main_async(args.url, args.seconds, args.repeats))
    med = out["transitions_per_s"]
    ratio = out["ratio_pg_to_sqlite"]
    assert isinstance(med, dict) and isinstance(ratio, dict)
    print(f"{'shape':<12}{'sqlite/s':>12}{'postgresql/s':>14}{'pg/sqlite':>11}")
    for s in SHAPES:
        print(f"{s:<12}{med['sqlite'][s]:>12.0f}{med['postgresql'][s]:>14.0f}{ratio[s]:>10.2f}x")
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
