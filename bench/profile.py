"""py-spy profiles of the daemon under load, and a top-functions summary of them.

`Profiler.record(pid, name)` attaches `py-spy record --nonblocking --threads --format raw` (collapsed stacks)
to the daemon for the duration of a `with` block; `summarize` turns the collapsed stacks into self and
inclusive sample shares per function. The raw files load into speedscope.app as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import LOAD_CORE, spawn

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker.startswith("lib/"):
                path = path.split("/", 1)[-1]
            break
    path = re.sub(r"^.*?/(webhookd|bench)/", r"\1/", path)
    return f"{m.group('func')} ({path})"


@dataclass
class Summary:
    name: str
    samples: int
    by_thread: Counter[str] = field(default_factory=Counter)
    self_: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)

    def render(self, top: int = 15) -> str:
        if not self.samples:
            return f"{self.name}: no samples"
        lines = [f"{self.name}: {self.samples} samples"]
        lines.append("  threads: " + ", ".join(f"{t} {n / self.samples:.0%}" for t, n in self.by_thread.most_common(4)))
        lines.append("  self (where the time is spent):")
        for fn, n in self.self_.most_common(top):
            lines.append(f"    {n / self.samples:6.1%}  {fn}")
        lines.append("  inclusive, webhookd/aiohttp/sqlite frames:")
        shown = 0
        for fn, n in self.inclusive.most_common():
            if any(k in fn for k in ("webhookd/", "aiohttp/", "sqlite", "msgspec", "structlog/", "logging/")):
                lines.append(f"    {n / self.samples:6.1%}  {fn}")
                shown += 1
                if shown >= top:
                    break
        return "\n".join(lines)


def summarize(path: Path, name: str) -> Summary:
    s = Summary(name, 0)
    if not path.exists():
        return s
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0]
        if thread.startswith("thread ("):
            thread = thread.split(": ", 1)[-1] if ": " in thread else thread
            frames = frames[1:]
        s.samples += n
        s.by_thread[thread] += n
        if frames:
            s.self_[_short(frames[-1])] += n
        for fn in {_short(f) for f in frames}:
            s.inclusive[fn] += n
    return s


class Profiler:
    def __init__(self, outdir: Path, rate: int = 200) -> None:
        self.outdir = outdir
        self.rate = rate
        self.summaries: list[Summary] = []
        self.tool = py_spy()

    @contextlib.asynccontextmanager
    async def record(self, pid: int, name: str) -> AsyncIterator[None]:
        if self.tool is None:
            print("  (py-spy not installed: no profile; pip install -e '.[bench]')", flush=True)
            yield
            return
        self.outdir.mkdir(parents=True, exist_ok=True)
        out = self.outdir / f"{name}.collapsed.txt"
        cmd = [
            self.tool,
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(self.rate),
            "--nonblocking",
            "--threads",
            "--format",
            "raw",
            "-o",
            str(out),
        ]
        child = spawn("py-spy", cmd, self.outdir / f"{name}.py-spy.log", LOAD_CORE)
        await asyncio.sleep(1.0)  # attached and sampling
        try:
            yield
        finally:
            await child.stop(signal.SIGINT, timeout=30)
            summary = summarize(out, name)
            self.summaries.append(summary)
            (self.outdir / f"{name}.top.txt").write_text(summary.render(25) + "\n")
