"""Log lines from the event loop's thread go out once per turn of the loop, in order, and nothing is lost at
the end (webhookd/logwrite.py)."""

from __future__ import annotations

import asyncio
import io
import threading

from webhookd import logwrite


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


async def test_lines_of_one_turn_are_written_together_and_in_order() -> None:
    out = CountingStream()
    logwrite.batch(asyncio.get_running_loop(), out)
    try:
        for i in range(5):
            logwrite.write_line(out, f"line {i}")
        assert out.getvalue() == ""  # held until the end of this turn
        await asyncio.sleep(0)
        assert out.getvalue() == "".join(f"line {i}\n" for i in range(5))
        assert out.writes == 1
        # Another thread's line flushes what the loop held first, then goes out at once.
        logwrite.write_line(out, "loop")
        t = threading.Thread(target=logwrite.write_line, args=(out, "thread"))
        t.start()
        t.join()
        assert out.getvalue().endswith("loop\nthread\n")
    finally:
        logwrite.batch(None, out)


async def test_a_long_turn_writes_as_it_goes_and_batch_none_flushes() -> None:
    out = CountingStream()
    logwrite.batch(asyncio.get_running_loop(), out)
    for i in range(logwrite._Batch.MAX + 3):
        logwrite.write_line(out, str(i))
    assert out.getvalue().count("\n") == logwrite._Batch.MAX
    logwrite.batch(None, out)  # e.g. the daemon returning: the rest is written before it goes
    assert out.getvalue().count("\n") == logwrite._Batch.MAX + 3
    logwrite.write_line(out, "after")
    assert out.getvalue().endswith("after\n")


async def test_retarget_sends_what_follows_to_the_new_stream() -> None:
    old, new = io.StringIO(), io.StringIO()
    logwrite.batch(asyncio.get_running_loop(), old)
    try:
        logwrite.write_line(old, "a")
        logwrite.retarget(new)
        assert old.getvalue() == "a\n"
        logwrite.write_line(new, "b")
        await asyncio.sleep(0)
        assert new.getvalue() == "b\n"
    finally:
        logwrite.batch(None, new)
