"""`webhookd endpoints enable` does the same on one box (SQLite) and on a hub (PostgreSQL): the failure count goes
to 0 and last_error stays until the next success. Real daemons, a real PostgreSQL, a failing receiver."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import Daemon, endpoint, eventually
from tests.test_hub import GATEWAY, hub_config, relayed_body, sign

HOOK = "flaky"


async def row(d: Daemon) -> dict[str, Any]:
    status, body = await d.admin("GET", "/v1/endpoints")
    assert status == 200, body
    (one,) = [e for e in body if e["name"] == HOOK]
    return dict(one)


async def enable_keeps_last_error(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp: Path, store: str | None
) -> None:
    at = await receiver(status=lambda _r: 500)
    d = await daemon(
        [endpoint(HOOK, at, events=["online"], concurrency=1)],  # one delivery (no gateway.online)
        tmp=tmp,
        hub=hub_config(),
        store=store,
        delivery={"retry_schedule": ["100ms"], "disable_after": 0},
    )
    body = json.dumps(relayed_body("evt_" + "cd" * 16, "dev-1"))
    headers = {
        "Content-Type": "application/json",
        "Webhookd-Gateway": GATEWAY,
        "Webhookd-Signature": sign(body.encode()),
    }
    async with aiohttp.ClientSession() as s, s.post(d.base + "/v1/relay", data=body, headers=headers) as r:
        assert r.status == 200, await r.text()

    await eventually(lambda: at.attempts >= 2, timeout=10)
    for _ in range(100):  # dead, nothing pending: the enable below makes no attempt that could race the reads
        before = await row(d)
        if before["dead"] == 1:
            break
        await asyncio.sleep(0.1)
    assert before["dead"] == 1 and before["consecutive_failures"] == 2 and before["last_error"] == "HTTP 500", before
    assert (await d.admin("POST", f"/v1/endpoints/{HOOK}/disable"))[0] == 200
    status, answer = await d.admin("POST", f"/v1/endpoints/{HOOK}/enable")
    assert status == 200, answer
    # On a hub the answer is this process's copy, which a lease loop's read from before the enable can still
    # overwrite for a moment (the enable's notice reads the row again); what every process shows is the store's.
    docs = [await row(d)] if store else [answer, await row(d)]
    await asyncio.sleep(1.5)  # a hub's lease loop reads the shared row again meanwhile
    docs.append(await row(d))
    for doc in docs:
        assert doc["enabled"] and doc["consecutive_failures"] == 0 and doc["last_error"] == "HTTP 500", doc


async def test_enable_on_one_box_resets_the_count_and_keeps_last_error(
    daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    await enable_keeps_last_error(daemon, receiver, tmp_path, None)


async def test_enable_on_a_hub_resets_the_count_and_keeps_last_error(
    pg_url: str, daemon: DaemonFactory, receiver: ReceiverFactory, tmp_path: Path
) -> None:
    await enable_keeps_last_error(daemon, receiver, tmp_path, pg_url)
