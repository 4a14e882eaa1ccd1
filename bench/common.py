"""Shared plumbing for the benchmark suite: processes, pinning, the daemon under test, load, measurements.

Kept free of heavy imports at module level so that the small baseline processes start fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
WRK_SCRIPT = BENCH_DIR / "heartbeat.lua"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # bench-only secret (standard-webhooks compatible)

DAEMON_CORE = 0
LOAD_CORE = 1


def quick() -> bool:
    return os.environ.get("BENCH_QUICK", "") not in ("", "0")


def no_uvloop() -> bool:
    return os.environ.get("WEBHOOKD_NO_UVLOOP", "") not in ("", "0")


def run_main(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run `main()` on the same event loop the daemon would pick (uvloop unless WEBHOOKD_NO_UVLOOP)."""
    if not no_uvloop():
        try:
            import uvloop  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            pass
        else:
            return uvloop.run(main())
    return asyncio.run(main())


def uvloop_available() -> bool:
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- CPU pinning -----------------------------------------------------------------------------------------


def pinning_enabled() -> bool:
    return (os.cpu_count() or 1) >= 2 and os.environ.get("BENCH_NO_PIN", "") in ("", "0")


def pinned(cmd: Sequence[str], core: int) -> list[str]:
    """`cmd` pinned to one core: with taskset when installed (else the caller's affinity is inherited)."""
    if pinning_enabled() and shutil.which("taskset"):
        return ["taskset", "-c", str(core), *cmd]
    return list(cmd)


def pin_self(core: int) -> None:
    if pinning_enabled() and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {core})


def pin_pid(pid: int, core: int) -> None:
    if pinning_enabled() and hasattr(os, "sched_setaffinity"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, {core})


# --- /proc ------------------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process (all its threads), from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of the whole line)
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of a process in bytes, from /proc/PID/status."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    if "VmRSS" not in out:
        raise RuntimeError(f"no VmRSS for {pid}")
    return out


@dataclass
class RssSample:
    t: float  # monotonic
    rss: int  # VmRSS, bytes
    anon: int  # RssAnon, bytes


class RssSampler:
    """Samples a process's VmRSS (and RssAnon) from outside every `interval` seconds, in this process's event
    loop, until stopped, the process is gone, or `limit` seconds have passed (every loop here is time-bound)."""

    def __init__(self, pid: int, interval: float = 0.1, limit: float = 3600.0) -> None:
        self.pid = pid
        self.interval = interval
        self.limit = limit
        self.samples: list[RssSample] = []
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> RssSample | None:
        try:
            m = proc_memory(self.pid)
        except (OSError, RuntimeError):
            return None
        s = RssSample(time.monotonic(), m["VmRSS"], m.get("RssAnon", 0))
        self.samples.append(s)
        return s

    async def _loop(self) -> None:
        deadline = time.monotonic() + self.limit
        while time.monotonic() < deadline:
            if self.sample() is None:
                return
            await asyncio.sleep(self.interval)

    def start(self) -> RssSampler:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def between(self, t0: float | None = None, t1: float | None = None) -> list[RssSample]:
        return [s for s in self.samples if (t0 is None or s.t >= t0) and (t1 is None or s.t <= t1)]

    def peak(self, t0: float | None = None, t1: float | None = None) -> int:
        """The largest VmRSS sampled between t0 and t1 (monotonic; None: open end)."""
        xs = self.between(t0, t1)
        if not xs:
            raise RuntimeError(f"no RSS sample of pid {self.pid} in that window")
        return max(s.rss for s in xs)

    def settled(self, seconds: float = 1.0) -> int:
        """The median VmRSS over the last `seconds` of samples (one reading jitters by a page or two)."""
        if not self.samples:
            raise RuntimeError(f"no RSS sample of pid {self.pid}")
        end = self.samples[-1].t
        return int(statistics.median(s.rss for s in self.samples if s.t >= end - seconds))

    async def hold(self, seconds: float) -> int:
        """Keep sampling for `seconds` more, then the settled RSS over the last second."""
        await asyncio.sleep(seconds)
        self.sample()
        return self.settled(min(1.0, seconds))


# --- child processes --------------------------------------------------------------------------------------


@dataclass
class Child:
    """A background process whose output goes to a file; stopped politely, then killed."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def spawn(name: str, cmd: Sequence[str], log_path: Path, core: int | None, env: dict[str, str] | None = None) -> Child:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    preexec = None
    if core is not None and pinning_enabled() and not shutil.which("taskset"):

        def preexec() -> None:
            pin_self(core)

    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            pinned(cmd, core) if core is not None else list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
            preexec_fn=preexec,
        )
    return Child(name, proc, log_path)


async def wait_port(port: int, child: Child | None = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.log_text()[-2000:]}")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on port {port} after {timeout:g}s")
        await asyncio.sleep(0.02)


async def wait_line(child: Child, prefix: str, timeout: float = 15.0) -> str:
    """The first line of the child's output starting with `prefix` (baselines print one JSON result line)."""
    deadline = time.monotonic() + timeout
    while True:
        for line in child.log_text().splitlines():
            if line.startswith(prefix):
                return line
        if not child.alive():
            raise RuntimeError(f"{child.name} exited with {child.proc.returncode}:\n{child.log_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name}: no {prefix!r} line after {timeout:g}s")
        await asyncio.sleep(0.05)


def python_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


# --- the daemon under test --------------------------------------------------------------------------------


def daemon_config(
    workdir: Path,
    port: int,
    endpoint_url: str | None,
    *,
    events: Sequence[str] = ("all",),
    silence_timeout: str = "1h",
    concurrency: int = 64,
    log_level: str = "info",
    udp_port: int | None = None,
) -> dict[str, Any]:
    endpoints = []
    if endpoint_url is not None:
        endpoints.append(
            {
                "name": "bench",
                "url": endpoint_url,
                "events": list(events),
                "secret": SECRET,
                "concurrency": concurrency,
                "timeout": "5s",
            }
        )
    return {
        "state_dir": str(workdir / "state"),
        "listen": {"http": f"127.0.0.1:{port}", "udp": f"127.0.0.1:{udp_port}" if udp_port else None},
        "admin": {"socket": str(workdir / "admin.sock")},
        "presence": {"silence_timeout": silence_timeout},
        "delivery": {
            "concurrency": concurrency,
            "timeout": "5s",
            "retry_schedule": ["1s", "2s", "5s", "10s"],
            "disable_after": 0,
        },
        "endpoints": endpoints,
        "logging": {"format": "json", "level": log_level},
    }


class NotifySocket:
    """A datagram socket we own, passed to the daemon as NOTIFY_SOCKET (sd_notify)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    async def wait_for(self, token: str, timeout: float, child: Child | None = None) -> float:
        """monotonic time at which a datagram containing `token` arrived."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                if child is not None and not child.alive():
                    raise RuntimeError(
                        f"daemon exited with {child.proc.returncode}:\n{child.log_text()[-3000:]}"
                    ) from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no {token} from the daemon after {timeout:g}s") from None
                await asyncio.sleep(0.002)
                continue
            if token in data.decode(errors="replace").split("\n"):
                return time.monotonic()

    def drain(self) -> None:
        """Keep reading (and dropping) what the daemon sends after READY: an unread unix datagram socket
        fills up after net.unix.max_dgram_qlen (10) messages and then blocks the daemon's next sd_notify."""
        self.messages = 0

        def read() -> None:
            while True:
                try:
                    self.sock.recv(65536)
                except (BlockingIOError, OSError):
                    return
                self.messages += 1

        asyncio.get_running_loop().add_reader(self.sock.fileno(), read)
        self._draining = True

    def close(self) -> None:
        if getattr(self, "_draining", False):
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self._draining = False
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class DaemonUnderTest:
    workdir: Path
    cfg: dict[str, Any]
    port: int
    child: Child | None = None
    started_at: float = 0.0
    ready_at: float = 0.0
    _notify: NotifySocket | None = field(default=None, repr=False)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_socket(self) -> Path:
        return Path(self.cfg["admin"]["socket"])

    @property
    def log_path(self) -> Path:
        return self.workdir / "daemon.log"

    def write_config(self) -> Path:
        import yaml

        path = self.workdir / "webhookd.yaml"
        self.workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.cfg))
        return path

    async def start(self, env: dict[str, str] | None = None, timeout: float = 60.0) -> float:
        """Start `webhookd run` pinned to the daemon core; returns seconds from spawn to READY=1."""
        path = self.write_config()
        self._notify = NotifySocket(self.workdir / "notify.sock")
        self.started_at = time.monotonic()
        self.child = spawn(
            "webhookd",
            python_cmd("webhookd", "run", "-c", str(path)),
            self.log_path,
            DAEMON_CORE,
            env={"NOTIFY_SOCKET": str(self._notify.path), **(env or {})},
        )
        self.ready_at = await self._notify.wait_for("READY=1", timeout, self.child)
        self._notify.drain()
        return self.ready_at - self.started_at

    async def stop(self) -> int:
        rc = 0
        if self.child is not None:
            rc = await self.child.stop(signal.SIGTERM, timeout=30)
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        return rc

    async def kill(self) -> None:
        if self.child is not None:
            await self.child.stop(signal.SIGKILL)
        if self._notify is not None:
            self._notify.close()
            self._notify = None

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        import aiohttp

        conn = aiohttp.UnixConnector(path=str(self.admin_socket))
        async with (
            aiohttp.ClientSession(connector=conn) as s,
            s.request(method, "http://webhookd" + path, json=body) as r,
        ):
            data = await r.json(content_type=None)
            if r.status >= 300:
                raise RuntimeError(f"admin {method} {path}: {r.status} {data}")
            return data

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.admin("GET", "/v1/status")
        return result

    def logs(self) -> list[dict[str, Any]]:
        out = []
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        for line in text.splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    @property
    def db_path(self) -> Path:
        return Path(self.cfg["state_dir"]) / "webhookd.db"


def device_ids(prefix: str, n: int) -> list[str]:
    """Ids as the wrk script makes them: prefix + zero-padded index."""
    return [f"{prefix}{i:06d}" for i in range(n)]


async def register(
    base: str,
    ids: Sequence[str],
    *,
    state: str | None = None,
    batch: int = 1000,
    concurrency: int = 4,
) -> float:
    """Send every id one heartbeat through /v1/heartbeats; returns seconds taken."""
    import aiohttp

    chunks = [ids[i : i + batch] for i in range(0, len(ids), batch)]
    queue: asyncio.Queue[Sequence[str]] = asyncio.Queue()
    for c in chunks:
        queue.put_nowait(c)
    started = time.monotonic()

    async def worker(s: aiohttp.ClientSession) -> None:
        while not queue.empty():
            chunk = queue.get_nowait()
            items = [{"device": d} if state is None else {"device": d, "state": state} for d in chunk]
            async with s.post(base + "/v1/heartbeats", json=items) as r:
                if r.status != 200:
                    raise RuntimeError(f"batch heartbeat: {r.status} {await r.text()}")
                await r.read()

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
    return time.monotonic() - started


# --- load: wrk, else the aiohttp load generator ---------------------------------------------------------


def wrk_path() -> str | None:
    if os.environ.get("BENCH_NO_WRK", "") not in ("", "0"):
        return None
    return shutil.which("wrk")


def load_tool() -> str:
    return "wrk" if wrk_path() else "aiohttp loadgen"


@dataclass
class LoadResult:
    rps: float
    requests: int
    errors: int  # non-2xx + socket errors
    p50_ms: float | None
    p99_ms: float | None
    tool: str


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> LoadResult:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    pct = dict(re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)", out, re.M))
    return LoadResult(
        rps,
        requests,
        errors,
        _ms(pct["50"]) if "50" in pct else None,
        _ms(pct["99"]) if "99" in pct else None,
        "wrk",
    )


async def closed_load(
    url: str,
    *,
    devices: int,
    prefix: str,
    mode: str,
    connections: int,
    seconds: float,
    workdir: Path,
) -> LoadResult:
    """`connections` keep-alive connections sending heartbeats back to back for `seconds`, rotating device ids
    (mode `liveness`: no state; `transition`: alternate unplugged/online per device). wrk when installed,
    else bench.loadgen in its own process; both on the load core."""
    wrk = wrk_path()
    if wrk is not None:
        cmd = pinned(
            [
                wrk,
                "-t1",
                f"-c{connections}",
                f"-d{max(seconds, 1):g}s",
                "--latency",
                "--timeout",
                "10s",
                "-s",
                str(WRK_SCRIPT),
                url,
                "--",
                str(devices),
                mode,
                prefix,
                "1",
            ],
            LOAD_CORE,
        )
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await proc.communicate()
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
        return parse_wrk(text)
    args = [
        "closed",
        "--url",
        url,
        "--devices",
        str(devices),
        "--prefix",
        prefix,
        "--mode",
        mode,
        "--connections",
        str(connections),
        "--seconds",
        str(seconds),
    ]
    return await loadgen(args, workdir)


async def loadgen(args: Sequence[str], workdir: Path, name: str = "loadgen") -> LoadResult:
    child = spawn(name, python_cmd("bench.loadgen", *args), workdir / f"{name}.log", LOAD_CORE)
    while child.alive():
        await asyncio.sleep(0.05)
    line = await wait_line(child, "RESULT ")
    r = json.loads(line.removeprefix("RESULT "))
    return LoadResult(r["rps"], r["requests"], r["errors"], r["p50_ms"], r["p99_ms"], "aiohttp loadgen")


# --- statistics ------------------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs: Sequence[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.1) -> float:
    """Poll until `check()` is true; returns the monotonic time it first was."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout:g}s")
        await asyncio.sleep(interval)


# --- other load on the machine ----------------------------------------------------------------------------


# Processes of the benchmark that are not its children (a PostgreSQL server pg_ctl daemonized, bench.fleet):
# they and their descendants are not counted as other load.
ADOPTED: set[int] = set()


class ForeignLoad:
    """CPU seconds used by processes outside this benchmark's process tree while a row runs (other sessions'
    test runs, say): sampled from /proc every second; a figure measured beside a busy neighbour is noise."""

    def __init__(self) -> None:
        self.me = os.getpid()
        self._seen: dict[int, float] = {}
        self._ours: dict[int, bool] = {}
        self.seconds = 0.0
        self._task: asyncio.Task[None] | None = None
        self.names: dict[str, float] = {}

    def _ppid_and_cpu(self, pid: int) -> tuple[int, float, str] | None:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), name

    def _is_ours(self, pid: int) -> bool:
        chain = []
        p = pid
        while p > 1 and p not in self._ours:
            if p == self.me or p in ADOPTED:
                self._ours[p] = True
                break
            chain.append(p)
            info = self._ppid_and_cpu(p)
            if info is None:
                break
            p = info[0]
        result = self._ours.get(p, False)
        for c in chain:
            self._ours[c] = result
        return result

    def sample(self, count: bool = True) -> None:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if self._is_ours(pid):
                continue
            info = self._ppid_and_cpu(pid)
            if info is None:
                continue
            _, cpu, name = info
            before = self._seen.get(pid)
            self._seen[pid] = cpu
            if count:
                delta = cpu - (before if before is not None else 0.0)
                if delta > 0:
                    self.seconds += delta
                    self.names[name] = self.names.get(name, 0.0) + delta

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.sample()

    def start(self) -> None:
        self.seconds = 0.0
        self.names = {}
        self.sample(count=False)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> float:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.sample()
        return self.seconds

    def top(self, n: int = 3) -> str:
        items = sorted(self.names.items(), key=lambda kv: -kv[1])[:n]
        return ", ".join(f"{k} {v:.1f}s" for k, v in items)
