"""Where every log line is written: one line at a time, or, from the event loop's thread, one write per turn of
the loop (logs.py renders; this writes)."""

from __future__ import annotations

import asyncio
import atexit
import threading
from typing import TextIO

# One line at a time on the stream, from either path. Reentrant: a finalizer that logs (asyncio's "Task
# exception was never retrieved", run by a collection) may fire while this thread holds it.
_write_lock = threading.RLock()


def write_line(stream: TextIO, line: str) -> None:
    with _write_lock:
        b = _batch
        if b is not None and b.stream is stream and threading.get_ident() == b.thread:
            b.add(line)
            return
        if b is not None and b.lines:
            b.flush()  # what the loop wrote first goes out first
        stream.write(line + "\n")
        stream.flush()


class _Batch:
    """Lines logged from the event loop's thread during one turn of the loop, written at its end in one write:
    a write and a flush per line cost ~5 us of syscalls, and a busy daemon logs a line per delivery. A SIGKILL
    loses what one turn logged; every other exit flushes (`flush_logs`, atexit)."""

    MAX = 512  # lines held at most; a turn that logs more writes them out as it goes

    def __init__(self, stream: TextIO, loop: asyncio.AbstractEventLoop) -> None:
        self.stream = stream
        self.loop = loop
        self.thread = threading.get_ident()
        self.lines: list[str] = []

    def add(self, line: str) -> None:
        if not self.lines:
            try:
                self.loop.call_soon(self.flush_locked)
            except RuntimeError:  # the loop is closed: write at once
                self.stream.write(line + "\n")
                self.stream.flush()
                return
        self.lines.append(line)
        if len(self.lines) >= self.MAX:
            self.flush()

    def flush_locked(self) -> None:
        with _write_lock:
            self.flush()

    def flush(self) -> None:
        lines, self.lines = self.lines, []
        if lines:
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # a closed or broken stream must not take the loop down
                pass


_batch: _Batch | None = None


def batch(loop: asyncio.AbstractEventLoop | None, stream: TextIO) -> None:
    """Write the lines `stream` gets from the loop's thread once per turn of `loop` (None: each at once)."""
    global _batch
    with _write_lock:
        if _batch is not None:
            _batch.flush()
        _batch = None if loop is None else _Batch(stream, loop)


def retarget(stream: TextIO) -> None:
    """The log stream changed (a reload): what is held goes to the old one, what follows is batched for the new."""
    with _write_lock:
        if _batch is not None:
            _batch.flush()
            _batch.stream = stream


def flush() -> None:
    with _write_lock:
        if _batch is not None:
            _batch.flush()


atexit.register(flush)
