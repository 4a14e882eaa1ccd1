"""format: template across SIGHUP (issue 12 item 5, CONTRACT §3 and §13): a reload that breaks a template is refused
with its key path and the template's line while the old template keeps rendering; a good one (inline or a changed
template_file) renders the next deliveries, also those still pending from before the reload."""

from __future__ import annotations

import signal
from typing import Any

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import Daemon, endpoint, eventually


def logged(d: Daemon, name: str) -> list[dict[str, Any]]:
    return [line for line in d.logs() if line.get("event") == name]


async def reload(d: Daemon, event: str) -> dict[str, Any]:
    before = len(logged(d, event))
    d.signal(signal.SIGHUP)
    await eventually(lambda: len(logged(d, event)) > before, timeout=10)
    return logged(d, event)[-1]


async def test_a_reload_refuses_a_broken_template_and_applies_a_good_one(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    failing = [False]
    r = await receiver(status=lambda _r: 503 if failing[0] else 200)
    f = await receiver()
    d = await daemon(
        [
            endpoint("inline", r, format="template", secret=None, content_type="text/plain", template="v1 {{ text }}"),
            endpoint("file", f, format="template", secret=None, content_type="text/plain", template_file="body.j2"),
        ],
        start=False,
        allow_errors=True,  # the refused reload's config_reload_failed is an error-level line, on purpose
        delivery={"retry_schedule": ["300ms"] * 30},
    )
    (d.tmp / "body.j2").write_text("f1 {{ event.type }}\n")
    await d.start()
    await d.heartbeat("lamp-1")
    await r.wait_for(1)
    await f.wait_for(1)
    assert r.got[0].body == b"v1 lamp-1 is online: heartbeat received"
    assert f.got[0].body == b"f1 device.online\n"

    # Broken: an undefined name on line 2. Refused, named by key path and template line; v1 goes on.
    d.cfg["endpoints"][0]["template"] = "v2\n{{ evnt.type }}"
    d.write_config()
    failed = await reload(d, "config_reload_failed")
    assert any(
        p.startswith("endpoints[0].template: line 2 of the template: 'evnt' is undefined") for p in failed["problems"]
    ), failed
    await d.heartbeat("lamp-1", "shutdown")
    await r.wait_for(2)
    assert r.got[1].body == b"v1 lamp-1 is offline: it reported a shutdown"

    # Good: a delivery pending across the reload is rendered with the new template, and so is a changed file.
    failing[0] = True
    await d.heartbeat("lamp-1")
    await eventually(lambda: r.attempts >= 3)
    d.cfg["endpoints"][0]["template"] = "v3 {{ event.device.id }} {{ event.type }}"
    d.write_config()
    (d.tmp / "body.j2").write_text("f2 {{ event.device.state }}\n")
    reloaded = await reload(d, "config_reloaded")
    assert sorted(reloaded["endpoints_changed"]) == ["file", "inline"], reloaded
    failing[0] = False
    await r.wait_for(3)
    assert r.got[2].body == b"v3 lamp-1 device.online"
    await d.heartbeat("lamp-1", "shutdown")
    await r.wait_for(4)
    await f.wait_for(4)
    assert r.got[3].body == b"v3 lamp-1 device.offline"
    assert [x.body for x in f.got[1:]] == [b"f1 device.offline\n", b"f1 device.online\n", b"f2 offline\n"]
