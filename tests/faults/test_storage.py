"""Storage faults (CONTRACT §4): the state_dir fills up or turns read-only while the daemon runs; the database
at startup is from a newer webhookd, corrupt, or someone else's.

Disk full is real: the state_dir is a small tmpfs (`mount -t tmpfs -o size=...`, root only) filled with a big
file. Read-only is attempted for real (`mount -o remount,ro`), but Linux refuses to remount a filesystem
read-only while a process holds a file on it open for writing (EBUSY, "mount point is busy"), and SQLite always
holds its database so. So the read-only case falls back to an injected failure: the daemon runs with a
`sitecustomize` that makes every store transaction fail with SQLite's own "attempt to write a readonly
database" while a flag file exists (the real rollback/health code paths run; only the statement fails). Where
mounting is impossible (not root, no CAP_SYS_ADMIN), the disk-full case is injected the same way
("database or disk is full"). Each test prints which mode ran.

Expected, while the store cannot write: a heartbeat that would create an event gets 503
`{"error": "store unavailable"}`, is not acknowledged and sends no webhook; liveness heartbeats of known devices
still get 200; /healthz is 503; an error-level `store_unavailable` line is logged; the process keeps running.
Once space returns, /healthz is 200 again within a second without any new transition (the store probes itself
every 0.2 s with a real row write while it is unhealthy), and the next transition is recorded and delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import Daemon, endpoint, free_port

RECOVERY_WITHIN = 1.5  # the store probes itself every 0.2 s while unhealthy: <= 1 s, plus slack for a loaded box

INJECT = '''\
"""Test-only fault injection for webhookd's store (tests/faults/test_storage.py)."""
import os
import sqlite3

_flag = os.environ.get("WEBHOOKD_TEST_STORE_FAULT")
if _flag:
    from webhookd.store import sqlite as _sqlite

    _orig = _sqlite.SQLiteStore._apply

    def _apply(self, conn, ops):
        # Inside the writer's transaction (after BEGIN IMMEDIATE): the real rollback and health paths run.
        try:
            with open(_flag) as f:
                message = f.read().strip()
        except FileNotFoundError:
            return _orig(self, conn, ops)
        raise sqlite3.OperationalError(message)

    _sqlite.SQLiteStore._apply = _apply
'''


def _mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs of `size` at `path`; None when it worked, else why not."""
    if os.environ.get("WEBHOOKD_TEST_NO_MOUNT"):  # to exercise the injected fallback where mounting works
        return "WEBHOOKD_TEST_NO_MOUNT is set"
    if os.geteuid() != 0:
        return "not root"
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return None if r.returncode == 0 else (r.stderr.strip() or f"mount exited {r.returncode}")


@dataclass
class StateDir:
    path: Path
    mounted: bool
    why_not: str | None


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[StateDir]:
    """tmp_path/state on its own 8 MiB tmpfs when possible (unmounted at teardown)."""
    path = tmp_path / "state"
    path.mkdir()
    why_not = _mount_tmpfs(path, "8m")
    yield StateDir(path, why_not is None, why_not)
    if why_not is None:
        subprocess.run(["mount", "-o", "remount,rw", str(path)], capture_output=True, check=False)
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def _injecting(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The flag file and the environment that make the daemon's store fail while the flag exists."""
    inject = tmp_path / "inject"
    inject.mkdir(exist_ok=True)
    (inject / "sitecustomize.py").write_text(INJECT)
    flag = tmp_path / "store-fault"
    pythonpath = os.pathsep.join(p for p in (str(inject), os.environ.get("PYTHONPATH", "")) if p)
    return flag, {"PYTHONPATH": pythonpath, "WEBHOOKD_TEST_STORE_FAULT": str(flag)}


def _fill(directory: Path) -> Path:
    """Write zeros into `directory` until the filesystem is full; returns the file."""
    big = directory / "ballast"
    fd = os.open(big, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 16, 4096, 512):  # then the last partial blocks too
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        (directory / "one-more").write_bytes(b"\0" * 4096)
    return big


async def _wait_healthz(d: Daemon, want: int, within: float) -> float:
    started = time.monotonic()
    while True:
        status, _ = await d.request("GET", "/healthz")
        if status == want:
            return time.monotonic() - started
        if time.monotonic() - started > within:
            raise AssertionError(f"/healthz still {status} after {within}s, wanted {want}:\n{d.logs_text()[-3000:]}")
        await asyncio.sleep(0.02)


Fault = Callable[[], Awaitable[None]]


async def _store_outage(
    daemon: DaemonFactory, receiver: ReceiverFactory, break_store: Fault, heal_store: Fault, env: dict[str, str]
) -> None:
    r = await receiver()
    # allow_errors: store_unavailable is an error-level line, on purpose; the rest is checked at teardown.
    d = await daemon([endpoint("r", r)], env=env, allow_errors=True, logging={"format": "json", "level": "info"})
    assert (await d.heartbeat("known-1"))["changed"] is True
    assert (await d.heartbeat("known-2", state="utilizing"))["changed"] is True
    await r.wait_for(2)
    # Their outcomes must be saved before the fault: an outcome that cannot be saved keeps the delivery at
    # its lane's head, and it is sent again later (at-least-once), which this test does not count on.
    for _ in range(100):
        _, eps = await d.admin("GET", "/v1/endpoints")
        if eps[0]["delivered"] == 2:
            break
        await asyncio.sleep(0.05)
    assert eps[0]["delivered"] == 2, eps

    await break_store()

    # Heartbeats that would create an event: 503, not acknowledged.
    unavailable = {"error": "store unavailable"}
    assert await d.request("POST", "/v1/heartbeat", json={"device": "new-1"}) == (503, unavailable)
    assert await d.request("POST", "/v1/heartbeat", json={"device": "known-1", "state": "unplugged"}) == (
        503,
        unavailable,
    )
    assert await d.request("GET", "/v1/heartbeat/new-2") == (503, unavailable)
    batch = [{"device": "known-1"}, {"device": "new-3"}]
    assert await d.request("POST", "/v1/heartbeats", json=batch) == (503, unavailable)
    assert await d.request("GET", "/healthz") == (503, {"status": "unhealthy", "error": "store unavailable"})

    # Liveness of known devices keeps working.
    for _ in range(3):
        assert await d.request("POST", "/v1/heartbeat", json={"device": "known-1"}) == (
            200,
            {"device": "known-1", "state": "online", "changed": False},
        )
        assert await d.request("GET", "/v1/heartbeat/known-2?state=utilizing") == (
            200,
            {"device": "known-2", "state": "utilizing", "changed": False},
        )
    # The admin API still answers and shows nothing of what was refused.
    status, devices = await d.admin("GET", "/v1/devices")
    assert status == 200, devices
    assert {x["id"]: x["state"] for x in devices} == {"known-1": "online", "known-2": "utilizing"}

    await asyncio.sleep(0.5)
    assert len(r.got) == 2  # no webhook for anything refused
    assert d.proc is not None and d.proc.poll() is None
    errors = [x for x in d.logs() if x.get("level") == "error"]
    assert any(x.get("event") == "store_unavailable" for x in errors), d.logs_text()[-3000:]
    assert await d.request("GET", "/healthz") == (503, {"status": "unhealthy", "error": "store unavailable"})

    await heal_store()
    took = await _wait_healthz(d, 200, RECOVERY_WITHIN)  # by itself: no heartbeat sent meanwhile
    print(f"store recovered by itself {took:.2f}s after the fault was removed")
    # One line each per outage, however many probes failed meanwhile.
    assert [x["event"] for x in d.logs() if x.get("event") in ("store_unavailable", "store_recovered")] == [
        "store_unavailable",
        "store_recovered",
    ], d.logs_text()[-3000:]

    # The refused transitions were never recorded: sent again, they are new events now.
    assert (await d.heartbeat("new-1"))["changed"] is True
    assert (await d.heartbeat("known-1", state="unplugged"))["changed"] is True
    await r.wait_for(4)
    await asyncio.sleep(0.3)
    got = [(e["device"]["id"], e["type"], e["device"]["previous_state"]) for e in r.events()]
    assert sorted(got[2:]) == [("known-1", "device.unplugged", "online"), ("new-1", "device.online", "unknown")]
    assert len(got) == 4, got
    assert "Traceback" not in d.logs_text()
    code = await d.stop()
    assert code == 0, d.logs_text()[-3000:]


async def test_disk_full_refuses_transitions_keeps_liveness_and_recovers(
    tmp_path: Path, state_dir: StateDir, daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    ballast: list[Path] = []
    if state_dir.mounted:
        print("disk full: REAL (8 MiB tmpfs filled with a ballast file)")
        env: dict[str, str] = {}

        async def break_store() -> None:
            ballast.append(await asyncio.to_thread(_fill, state_dir.path))

        async def heal_store() -> None:
            ballast.pop().unlink()

    else:
        print(f"disk full: INJECTED (cannot mount a tmpfs: {state_dir.why_not})")
        flag, env = _injecting(tmp_path)

        async def break_store() -> None:
            flag.write_text("database or disk is full")

        async def heal_store() -> None:
            flag.unlink()

    await _store_outage(daemon, receiver, break_store, heal_store, env)


async def test_read_only_state_dir_refuses_transitions_and_recovers(
    tmp_path: Path, state_dir: StateDir, daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    flag, env = _injecting(tmp_path)  # inert unless the real remount is refused (see the module docstring)
    mode: list[str] = []

    async def break_store() -> None:
        if state_dir.mounted:
            r = subprocess.run(
                ["mount", "-o", "remount,ro", str(state_dir.path)], capture_output=True, text=True, check=False
            )
            if r.returncode == 0:
                mode.append("real")
                print("read-only: REAL (mount -o remount,ro)")
                return
            why = r.stderr.strip().splitlines()[0] if r.stderr.strip() else f"exit {r.returncode}"
        else:
            why = f"cannot mount a tmpfs: {state_dir.why_not}"
        mode.append("injected")
        print(f"read-only: INJECTED (real remount refused: {why})")
        flag.write_text("attempt to write a readonly database")

    async def heal_store() -> None:
        if mode[-1] == "real":
            subprocess.run(["mount", "-o", "remount,rw", str(state_dir.path)], check=True)
        else:
            flag.unlink()

    await _store_outage(daemon, receiver, break_store, heal_store, env)


# --------------------------------------------------------------------------------------------- at startup


def _config(tmp_path: Path) -> Daemon:
    return Daemon(tmp_path, [], logging={"format": "json", "level": "info"})


def _digest(path: Path, *, change_counter: bool = True) -> str:
    data = bytearray(path.read_bytes())
    if not change_counter and data[:16] == b"SQLite format 3\0":
        # SQLite's own bookkeeping: closing a WAL-mode database bumps the header's change counter.
        data[24:28] = data[92:96] = b"\0\0\0\0"
    return hashlib.sha256(data).hexdigest()


def _run_expecting_refusal(d: Daemon, db: Path, *needles: str, change_counter: bool = True) -> str:
    before = _digest(db, change_counter=change_counter)
    others = sorted(p.name for p in db.parent.iterdir())
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "webhookd", "run", "-c", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert time.monotonic() - started < 15
    assert "Traceback" not in out, out
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    failed = [x for x in lines if x.get("event") == "startup_failed"]
    assert failed and failed[0]["level"] == "error", out
    message = failed[0]["error"]
    for needle in (str(db), *needles):
        assert needle in message, (needle, message)
    assert _digest(db, change_counter=change_counter) == before, "the database file was modified"
    assert db.stat().st_size > 0
    assert sorted(p.name for p in db.parent.iterdir()) == others, "files were created next to the database"
    assert not (d.tmp / "admin.sock").exists()
    return str(message)


def test_newer_schema_version_stops_startup_untouched(tmp_path: Path) -> None:
    d = _config(tmp_path)
    db = tmp_path / "state" / "webhookd.db"
    db.parent.mkdir()
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.execute("CREATE TABLE devices (id TEXT PRIMARY KEY, future_column TEXT)")
        c.execute("INSERT INTO devices VALUES ('d1', 'x')")
        c.execute("PRAGMA user_version=7")
        c.commit()
    msg = _run_expecting_refusal(d, db, "schema version 7", "newer")
    print("newer schema:", msg)


def test_garbage_file_stops_startup_untouched(tmp_path: Path) -> None:
    d = _config(tmp_path)
    db = tmp_path / "state" / "webhookd.db"
    db.parent.mkdir()
    db.write_bytes(b"this is not a database\n" + bytes(range(256)) * 64)
    msg = _run_expecting_refusal(d, db, "not a database")
    print("garbage:", msg)


def test_foreign_sqlite_database_stops_startup_untouched(tmp_path: Path) -> None:
    d = _config(tmp_path)
    db = tmp_path / "state" / "webhookd.db"
    db.parent.mkdir()
    with contextlib.closing(sqlite3.connect(db)) as c:
        c.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, path TEXT)")
        c.execute("INSERT INTO photos (path) VALUES ('/x.jpg')")
        c.commit()
    msg = _run_expecting_refusal(d, db, "no webhookd schema version")
    print("foreign:", msg)


async def test_corrupt_webhookd_database_stops_startup_untouched(daemon: DaemonFactory, tmp_path: Path) -> None:
    """A real webhookd database whose pages after the first were overwritten (a torn disk, a bad copy): it
    opens (page 1 holds the header and schema) and fails only when the state is loaded."""
    d = await daemon([], logging={"format": "json", "level": "info"})
    for i in range(50):
        await d.heartbeat(f"dev-{i}", name="x" * 200)
    assert await d.stop() == 0
    db = tmp_path / "state" / "webhookd.db"
    for extra in ("webhookd.db-wal", "webhookd.db-shm"):
        with contextlib.suppress(FileNotFoundError):
            (db.parent / extra).unlink()
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    assert len(data) >= 4 * page
    garbage = bytes((i * 37 + 11) % 256 for i in range(len(data)))
    data[page:] = garbage[page:]  # page 1 (header, schema) intact: the tables are torn
    db.write_bytes(bytes(data))
    msg = _run_expecting_refusal(d, db, "malformed", change_counter=False)
    print("corrupt:", msg)


async def test_store_unavailable_is_not_a_traceback_for_udp(daemon: DaemonFactory, tmp_path: Path) -> None:
    """UDP heartbeats during an outage (injected) are counted as failed, logged throttled; the daemon lives on."""
    flag, env = _injecting(tmp_path)
    udp_port = free_port()
    # check=False: it ends unhealthy (the store stays broken) on purpose; exit 0, no traceback checked below.
    d = await daemon(
        [],
        env=env,
        check=False,
        listen={"udp": f"127.0.0.1:{udp_port}"},
        logging={"format": "json", "level": "info"},
    )
    flag.write_text("database or disk is full")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for i in range(200):
            s.sendto(f"udp-{i}".encode(), ("127.0.0.1", udp_port))
    await asyncio.sleep(0.5)
    assert d.proc is not None and d.proc.poll() is None
    status, devices = await d.admin("GET", "/v1/devices")
    assert status == 200 and devices == [], devices
    assert (await d.request("GET", "/healthz"))[0] == 503
    not_recorded = [x for x in d.logs() if x.get("event") == "udp_heartbeat_not_recorded"]
    assert len(not_recorded) == 1, not_recorded  # throttled: one line per 10 s
    assert await d.stop() == 0
    assert "Traceback" not in d.logs_text()
