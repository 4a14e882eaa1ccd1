"""The stdlib sqlite3 writer webhookd uses, side by side with aiosqlite, in one run (issue 9 §5).

    python -m bench.aiosqlite_compare                          # W = 1, 8, 64; 3 repeats of 3 s; medians
    python -m bench.aiosqlite_compare --writers 1,64 --seconds 5 --repeats 5
    WEBHOOKD_NO_UVLOOP=1 python -m bench.aiosqlite_compare     # plain asyncio instead of uvloop
    python -m bench.aiosqlite_compare --synchronous OFF        # no fsync: the hops' cost without the disk's
    python -m bench --rows 9                                   # the same as bench row 9 (pinned, both loops)

One transition = one device upsert + one event + two deliveries (two endpoints), committed. W coroutines each
submit a transition and wait for its commit, back to back, for --seconds after a short warm-up. Both
variants group-commit the same way webhookd.store does: everything queued when the writer comes round (at
most 512) is one BEGIN IMMEDIATE ... COMMIT, with one executemany per table, the new delivery ids read back
by range (max(id) before, `id > ?` after), and the same schema (created by webhookd.store) and PRAGMAs
(WAL, synchronous=FULL, busy_timeout, foreign_keys=OFF), each measurement on a fresh copy of one empty store.

  A  stdlib sqlite3 on one writer thread: the whole batch in one hop to that thread (event JSON encoded
     there), what webhookd does.
  C  aiosqlite, written per table: the same statements, each one await on aiosqlite's thread (BEGIN,
     3 executemany, 2 id queries, COMMIT: 7 awaits per commit), rows built on the loop.

Loop CPU is the CPU time of the event-loop thread (time.thread_time) per committed transition; process CPU
includes the SQLite thread. Variants alternate within each repeat (A, C, A, C...) so that a noisy neighbour
hits both. Prints a table and one `RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.baseline_store import INSERT_EVENT, UPSERT_DEVICE, create_db
from bench.common import ROOT, no_uvloop, percentile, run_main

INSERT_DELIVERY = (
    "INSERT INTO deliveries (event_id, endpoint, device_id, type, status, attempts,"
    " next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?)"
)
MAX_ID = "SELECT coalesce(max(id), 0) FROM deliveries"
NEW_IDS = "SELECT id FROM deliveries WHERE id > ? ORDER BY id"
ENDPOINTS = ("bench-a", "bench-b")
MAX_BATCH = 512  # as webhookd.store
SYNCHRONOUS = ["FULL"]  # webhookd's; --synchronous NORMAL/OFF only to take the disk out of the comparison


def pragmas() -> tuple[str, ...]:
    return (
        "PRAGMA journal_mode=WAL",
        f"PRAGMA synchronous={SYNCHRONOUS[0]}",
        "PRAGMA busy_timeout=5000",
        "PRAGMA foreign_keys=OFF",
    )


VARIANTS = {
    "A": "stdlib sqlite3, one writer thread, one hop per batch",
    "C": "aiosqlite, executemany per table (7 awaits/commit)",
}

Item = tuple[tuple[object, ...], Any]  # (device row, EventData)


def transition(k: int, devices: int = 10_000) -> Item:
    from webhookd.payloads import EventData, new_event_id

    now = time.time()
    dev = f"cmp-{k % devices:06d}"
    state = "unplugged" if (k // devices) % 2 == 0 else "online"
    ev = EventData(new_event_id(), f"device.{state}", now, "reported", dev, None, state,
                   "online" if state == "unplugged" else "unplugged", "127.0.0.1", None, now, None)  # fmt: skip
    return (dev, state, None, None, "127.0.0.1", now, now), ev


def event_row(ev: Any) -> tuple[object, ...]:
    return (ev.id, ev.type, ev.device_id, ev.time, ev.to_json())


def delivery_rows(items: Sequence[Item]) -> list[tuple[object, ...]]:
    return [
        (ev.id, ep, ev.device_id, ev.type, "pending", ev.time, ev.time, ev.time) for _, ev in items for ep in ENDPOINTS
    ]


def split_ids(ids: list[int], n: int) -> list[list[int]]:
    per = len(ENDPOINTS)
    if len(ids) != n * per:
        raise sqlite3.DatabaseError(f"expected {n * per} new deliveries, found {len(ids)}")
    return [ids[i * per : (i + 1) * per] for i in range(n)]


class GroupCommit:
    """The writer queue both variants share: `record(item)` resolves with the item's delivery ids once the
    transaction holding it has committed."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[Item, asyncio.Future[list[int]]]] = asyncio.Queue()
        self.commits = 0
        self._task: asyncio.Task[None] | None = None

    async def record(self, item: Item) -> list[int]:
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((item, fut))
        return await fut

    async def commit(self, items: list[Item]) -> list[list[int]]:
        raise NotImplementedError

    async def _loop(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < MAX_BATCH and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                results = await self.commit([item for item, _ in batch])
            except Exception as e:  # every waiter learns it; the run fails loudly
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.commits += 1
            for (_, fut), ids in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(ids)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class Stdlib(GroupCommit):
    """A: one sqlite3 connection on one dedicated thread; a whole batch is one hop (webhookd.store)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="store")
        self.conn: sqlite3.Connection | None = None

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _open(self) -> None:
        self.conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for p in pragmas():
            self.conn.execute(p)

    async def open(self) -> None:
        await self._run(self._open)

    def _commit(self, items: list[Item]) -> list[list[int]]:
        c = self.conn
        assert c is not None
        try:
            c.execute("BEGIN IMMEDIATE")
            c.executemany(UPSERT_DEVICE, [dev for dev, _ in items])
            c.executemany(INSERT_EVENT, [event_row(ev) for _, ev in items])
            (before,) = c.execute(MAX_ID).fetchone()
            c.executemany(INSERT_DELIVERY, delivery_rows(items))
            ids = [r[0] for r in c.execute(NEW_IDS, (before,))]
            c.execute("COMMIT")
        except sqlite3.Error:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        return split_ids(ids, len(items))

    async def commit(self, items: list[Item]) -> list[list[int]]:
        result: list[list[int]] = await self._run(self._commit, items)
        return result

    async def close(self) -> None:
        if self.conn is not None:
            await self._run(self.conn.close)
        self.executor.shutdown(wait=True)


class Aiosqlite(GroupCommit):
    """C: aiosqlite, the same statements per table, one await each."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.db: Any = None

    async def open(self) -> None:
        import aiosqlite

        self.db = await aiosqlite.connect(self.path, isolation_level=None)
        for p in pragmas():
            await self.db.execute(p)

    async def commit(self, items: list[Item]) -> list[list[int]]:
        db = self.db
        devices = [dev for dev, _ in items]
        events = [event_row(ev) for _, ev in items]
        deliveries = delivery_rows(items)
        try:
            await db.execute("BEGIN IMMEDIATE")
            await db.executemany(UPSERT_DEVICE, devices)
            await db.executemany(INSERT_EVENT, events)
            ((before,),) = await db.execute_fetchall(MAX_ID)
            await db.executemany(INSERT_DELIVERY, deliveries)
            ids = [r[0] for r in await db.execute_fetchall(NEW_IDS, (before,))]
            await db.execute("COMMIT")
        except sqlite3.Error:
            if db.in_transaction:
                await db.execute("ROLLBACK")
            raise
        return split_ids(ids, len(items))

    async def close(self) -> None:
        if self.db is not None:
            await self.db.close()


async def measure(variant: str, path: Path, writers: int, seconds: float, warm: float) -> dict[str, float]:
    """Transitions/s committed by `writers` concurrent writers over `seconds` (after `warm`), p50/p99
    latency, loop-thread and process CPU per transition, transitions per commit."""
    w: Stdlib | Aiosqlite = Stdlib(path) if variant == "A" else Aiosqlite(path)
    await w.open()
    w.start()
    stop = False
    done = 0
    window: list[float] | None = None
    latencies: list[float] = []

    async def writer(i: int) -> None:
        nonlocal done
        k = i
        while not stop:
            item = transition(k)
            t0 = time.perf_counter()
            await w.record(item)
            if window is not None:
                latencies.append(time.perf_counter() - t0)
            done += 1
            k += writers

    tasks = [asyncio.create_task(writer(i)) for i in range(writers)]
    try:
        await asyncio.sleep(warm)
        window = latencies
        n0, c0, p0, k0, t0 = done, time.thread_time(), time.process_time(), w.commits, time.perf_counter()
        await asyncio.sleep(seconds)
        n1, c1, p1, k1, t1 = done, time.thread_time(), time.process_time(), w.commits, time.perf_counter()
        stop = True
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    finally:
        stop = True
        for t in tasks:
            t.cancel()
        await w.stop()
        await w.close()
    n = max(n1 - n0, 1)
    return {
        "tps": n / (t1 - t0),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "loop_us": (c1 - c0) / n * 1e6,
        "cpu_us": (p1 - p0) / n * 1e6,
        "per_commit": n / max(k1 - k0, 1),
    }


def med(runs: list[dict[str, float]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


async def compare(workdir: Path, writers: Sequence[int], seconds: float, repeats: int, warm: float) -> dict[str, Any]:
    workdir.mkdir(parents=True, exist_ok=True)
    template = workdir / "template.db"
    for suffix in ("", "-wal", "-shm"):
        Path(str(template) + suffix).unlink(missing_ok=True)
    await asyncio.to_thread(create_db, template)  # webhookd.store's own schema and user_version
    runs: dict[int, dict[str, list[dict[str, float]]]] = {w: {v: [] for v in VARIANTS} for w in writers}
    for r in range(repeats):
        for w in writers:
            for v in VARIANTS:
                db = workdir / f"{v}-{w}.db"
                for suffix in ("", "-wal", "-shm"):
                    Path(str(db) + suffix).unlink(missing_ok=True)
                shutil.copy(template, db)
                res = await measure(v, db, w, seconds, warm)
                runs[w][v].append(res)
                print(
                    f"  run {r + 1} W={w:<3} {v}: {res['tps']:8,.0f} tx/s  p50 {res['p50_ms']:6.2f} ms"
                    f"  loop CPU {res['loop_us']:6.1f} us/tx  {res['per_commit']:5.1f} tx/commit",
                    flush=True,
                )
                for suffix in ("", "-wal", "-shm"):
                    Path(str(db) + suffix).unlink(missing_ok=True)
    out: dict[str, Any] = {
        "loop": "asyncio" if no_uvloop() else _loop_name(),
        "seconds": seconds,
        "repeats": repeats,
        "synchronous": SYNCHRONOUS[0],
    }
    for w in writers:
        a, c = runs[w]["A"], runs[w]["C"]
        out[str(w)] = {
            "A": {k: med(a, k) for k in a[0]},
            "C": {k: med(c, k) for k in c[0]},
            "ratio": med(c, "tps") / med(a, "tps"),
            "ratios": [y["tps"] / x["tps"] for x, y in zip(a, c, strict=True)],
            "pair_ratio": float(statistics.median(y["tps"] / x["tps"] for x, y in zip(a, c, strict=True))),
            "loop_ratio": med(c, "loop_us") / med(a, "loop_us"),
            "runs": {"A": a, "C": c},
        }
    return out


def _loop_name() -> str:
    loop = type(asyncio.get_running_loop()).__module__
    return "uvloop" if loop.startswith("uvloop") else "asyncio"


def table(result: dict[str, Any], writers: Sequence[int]) -> str:
    lines = [
        f"loop: {result['loop']}; synchronous={result['synchronous']}; medians of {result['repeats']} runs of"
        f" {result['seconds']:g} s",
        "  A = " + VARIANTS["A"],
        "  C = " + VARIANTS["C"],
        "",
        f"{'W':>3}  {'A tx/s (p50)':>20}  {'C tx/s (p50)':>20}  {'C/A':>5}  {'loop CPU/tx A':>13}  {'C':>8}"
        f"  {'C/A':>5}  {'tx/commit A / C':>15}",
    ]
    for w in writers:
        r = result[str(w)]
        a, c = r["A"], r["C"]
        lines.append(
            f"{w:>3}  {a['tps']:>10,.0f} ({a['p50_ms']:5.2f} ms)  {c['tps']:>10,.0f} ({c['p50_ms']:5.2f} ms)"
            f"  {r['ratio']:5.2f}  {a['loop_us']:>10.1f} us  {c['loop_us']:>5.1f} us  {r['loop_ratio']:5.2f}"
            f"  {a['per_commit']:>6.1f} / {c['per_commit']:<6.1f}"
        )
        lines.append(
            f"     per-run C/A (A and C back to back): {', '.join(f'{x:.2f}' for x in r['ratios'])};"
            f" median {r['pair_ratio']:.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.aiosqlite_compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--writers", default="1,8,64", help="comma-separated concurrent writers (default 1,8,64)")
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per run (default 3)")
    p.add_argument("--warm", type=float, default=0.5, help="warm-up seconds before each measurement")
    p.add_argument("--repeats", type=int, default=3, help="runs per variant and W (default 3; medians)")
    p.add_argument("--dir", type=Path, default=None, help="where the databases go (default var/bench/aiosqlite)")
    p.add_argument("--synchronous", default="FULL", choices=["FULL", "NORMAL", "OFF"],
                   help="PRAGMA synchronous for both variants (default FULL, as webhookd)")  # fmt: skip
    args = p.parse_args()
    SYNCHRONOUS[0] = args.synchronous
    writers = [int(x) for x in args.writers.split(",") if x.strip()]
    try:
        import aiosqlite  # noqa: F401
    except ImportError:
        raise SystemExit("aiosqlite is not installed: pip install -e '.[bench]'") from None
    workdir = args.dir or ROOT / "var" / "bench" / "aiosqlite"
    if not workdir.is_absolute():
        workdir = Path.cwd() / workdir
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="cmp-", dir=workdir))  # on the same disk (fsync matters), our own
    try:

        async def go() -> dict[str, Any]:
            return await compare(scratch, writers, args.seconds, args.repeats, args.warm)

        result = run_main(go)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(table(result, writers))
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
