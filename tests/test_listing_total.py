"""A listing cut by its limit says how many matched: `2 of 3 shown` (issue 10, item 9), from the total the daemon
sends beside the rows (X-Total-Count), counted under the same filter."""

from __future__ import annotations

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import endpoint
from tests.test_daemon import eventually_admin


async def test_a_cut_listing_names_the_total(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    r = await receiver()
    d = await daemon([endpoint("sink", r)])
    for device in ("a", "b", "c"):
        await d.heartbeat(device)
    await r.wait_for(3)
    await eventually_admin(d, lambda eps: eps[0]["delivered"] == 3)

    out = await d.cli("deliveries", "--limit", "2")
    assert out.returncode == 0 and len(out.stdout.splitlines()) == 3  # header + 2 rows
    assert out.stderr == "2 of 3 shown (--limit N for more)\n"
    out = await d.cli("deliveries", "--limit", "3")
    assert (out.returncode, out.stderr) == (0, "")
    out = await d.cli("deliveries", "--status", "delivered", "--endpoint", "sink", "--limit", "1")
    assert out.stderr == "1 of 3 shown (--limit N for more)\n"
    out = await d.cli("deliveries", "--status", "dead", "--limit", "1")
    assert (out.stdout, out.stderr) == ("no deliveries\n", "")
