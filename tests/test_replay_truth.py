"""`deliveries replay` against the real daemon says what it did: rows that went to held and what releases them,
ids that no delivery has (exit 1), endpoints that do not exist (issue 10, item 3)."""

from __future__ import annotations

import json
import signal

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import Daemon, endpoint, eventually
from tests.test_daemon import eventually_admin


async def dead_delivery(d: Daemon, name: str) -> int:
    """The id of the one dead delivery of endpoint `name`, once there is one."""
    await eventually_admin(d, lambda eps: any(e["name"] == name and e["dead"] == 1 for e in eps))
    status, rows = await d.admin("GET", f"/v1/deliveries?endpoint={name}&status=dead")
    assert status == 200 and len(rows) == 1
    return int(rows[0]["id"])


async def test_replay_on_a_disabled_endpoint_says_held_and_unknown_ids_exit_1(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    ok = False
    r = await receiver(status=lambda _req: 200 if ok else 500)
    d = await daemon([endpoint("sink2", r)], delivery={"retry_schedule": ["100ms"]})
    await d.heartbeat("a")
    did = await dead_delivery(d, "sink2")
    assert (await d.cli("endpoints", "disable", "sink2")).returncode == 0

    out = await d.cli("deliveries", "replay", "--endpoint", "sink2", "--status", "dead")
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout == "replayed 1 delivery, held until 'webhookd endpoints enable sink2'\n"
    _, rows = await d.admin("GET", "/v1/deliveries?endpoint=sink2")
    assert [(row["id"], row["status"]) for row in rows] == [(did, "held")]

    out = await d.cli("deliveries", "replay", str(did), "--json")
    assert (out.returncode, out.stderr) == (0, "")
    assert json.loads(out.stdout) == {"replayed": 1, "held": 1, "held_endpoints": {"sink2": "disabled"}, "missing": []}

    out = await d.cli("deliveries", "replay", "99999")
    assert (out.returncode, out.stdout, out.stderr) == (1, "", "no delivery 99999\n")
    out = await d.cli("deliveries", "replay", str(did), "99999")
    assert out.returncode == 1 and out.stderr == "no delivery 99999\n"
    assert out.stdout == "replayed 1 delivery, held until 'webhookd endpoints enable sink2'\n"
    out = await d.cli("deliveries", "replay", "--endpoint", "nope")
    assert (out.returncode, out.stdout, out.stderr) == (1, "", "unknown endpoint 'nope'\n")

    ok = True
    assert (await d.cli("endpoints", "enable", "sink2")).returncode == 0
    await r.wait_for(1)  # the delivery the enable released (the two that failed are not in `got`)
    await eventually_admin(d, lambda eps: eps[0]["delivered"] == 1 and eps[0]["held"] == 0)
    out = await d.cli("deliveries", "replay", str(did))
    assert (out.returncode, out.stdout, out.stderr) == (0, "replayed 1 delivery\n", "")


async def test_replay_of_a_removed_endpoints_rows_says_so(daemon: DaemonFactory, receiver: ReceiverFactory) -> None:
    gone, kept = await receiver(status=lambda _req: 500), await receiver()
    d = await daemon([endpoint("old", gone), endpoint("new", kept)], delivery={"retry_schedule": ["100ms"]})
    await d.heartbeat("a")
    did = await dead_delivery(d, "old")
    d.cfg["endpoints"] = [e for e in d.cfg["endpoints"] if e["name"] != "old"]
    d.write_config()
    d.signal(signal.SIGHUP)
    await eventually(lambda: any(line.get("event") == "config_reloaded" for line in d.logs()))

    out = await d.cli("deliveries", "replay", str(did))
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout == "replayed 1 delivery, held until endpoint 'old' is configured again\n"
    out = await d.cli("deliveries", "replay", "--endpoint", "old", "--status", "held", "--json")
    assert out.returncode == 0
    assert json.loads(out.stdout) == {
        "replayed": 1,
        "held": 1,
        "held_endpoints": {"old": "not configured"},
        "missing": [],
    }
