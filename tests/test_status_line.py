"""systemd's STATUS= line says its counts in words a person reads, plurals right (issue 10, item 9): a daemon
restarted on one pending delivery reports `1 delivery pending`, not `1 deliveries pending`."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import DaemonFactory
from tests.harness import SECRET, NotifySocket, free_port
from tests.test_daemon import eventually_admin

CLEAN_ENV = {"WATCHDOG_USEC": "", "WATCHDOG_PID": ""}  # nothing inherited from a CI that runs under systemd


async def test_status_line_says_1_delivery_pending(daemon: DaemonFactory, tmp_path: Path) -> None:
    # nothing listens there: the delivery fails once and waits an hour for its next attempt
    down = {"name": "down", "url": f"http://127.0.0.1:{free_port()}/hook", "events": ["all"], "secret": SECRET}
    d = await daemon([down], delivery={"retry_schedule": ["1h"]})
    await d.heartbeat("a")
    await eventually_admin(d, lambda eps: eps[0]["pending"] == 1 and eps[0]["consecutive_failures"] == 1)
    assert await d.stop() == 0

    async with NotifySocket(tmp_path) as ns:
        await d.start(env=ns.env(**CLEAN_ENV))
        ready = await ns.wait_for("READY", "1")
        assert ready.fields["STATUS"] == "1 online, 0 utilizing, 0 unplugged, 0 offline; 1 delivery pending"
        out = await d.cli("endpoints", "disable", "down")
        assert (out.returncode, out.stdout) == (0, "endpoint 'down' disabled (1 delivery held)\n")
