"""Nothing stalls silently (issue 9 §1): a part that dies takes the daemon down with exit 1, promptly, and
/healthz never says ok meanwhile; an exception inside one attempt is a failed attempt, never a crash.

In process: a real Daemon on real ports with a real SQLite file, a real receiver; the failure is injected."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from tests.harness import Receiver, free_port
from tests.test_retention import event
from webhookd.config import Config, parse_config
from webhookd.daemon import Daemon
from webhookd.dispatch import Dispatcher, Sender, Target
from webhookd.payloads import make_test_event, render
from webhookd.presence import Device
from webhookd.store import Change, Store


def config(tmp_path: Path, endpoints: list[dict[str, Any]], **extra: Any) -> Config:
    raw = {
        "state_dir": str(tmp_path),
        "listen": {"http": f"127.0.0.1:{free_port()}"},
        "admin": {"socket": str(tmp_path / "admin.sock")},
        "endpoints": endpoints,
        **extra,
    }
    return parse_config(raw, tmp_path, env={})


async def healthz(cfg: Config) -> int:
    assert cfg.listen.http is not None
    url = f"http://127.0.0.1:{cfg.listen.http.port}/healthz"
    try:
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            return r.status
    except aiohttp.ClientError:
        return -1


async def started(daemon: Daemon, cfg: Config) -> asyncio.Task[int]:
    run = asyncio.create_task(daemon.run())
    for _ in range(200):
        assert not run.done(), "the daemon stopped during startup"
        if await healthz(cfg) == 200:
            return run
        await asyncio.sleep(0.05)
    raise AssertionError("the daemon did not come up")


async def test_a_store_writer_that_dies_takes_the_daemon_down(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = config(tmp_path, [])
    daemon = Daemon(cfg)
    run = await started(daemon, cfg)
    store = daemon.store
    assert isinstance(store, Store)

    def bug(_c: sqlite3.Connection) -> None:
        raise RuntimeError("injected bug in a write operation")

    t0 = time.monotonic()
    with pytest.raises(Exception, match="injected bug"):
        await store.write(bug)
    # Every write after that fails at once instead of hanging, and /healthz stops saying ok.
    with pytest.raises(Exception):  # noqa: B017 (StoreError, or the original exception: either way not a hang)
        await asyncio.wait_for(store.write(lambda c: c.execute("SELECT 1")), 2)
    code = await asyncio.wait_for(run, 5)
    assert code == 1
    assert time.monotonic() - t0 < 5
    assert await healthz(cfg) != 200
    err = capsys.readouterr()
    text = err.out + err.err
    assert text.count("daemon_crashed") == 1, text[-3000:]
    assert "injected bug in a write operation" in text


async def test_a_delivery_worker_that_raises_takes_the_daemon_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    receiver = await Receiver().start()
    try:
        cfg = config(tmp_path, [{"name": "ops", "url": receiver.url, "events": ["all"]}])
        daemon = Daemon(cfg)
        run = await started(daemon, cfg)

        async def broken(self: Dispatcher, *args: Any) -> None:
            raise RuntimeError("injected bug in a delivery worker")

        monkeypatch.setattr(Dispatcher, "_deliver", broken)
        assert cfg.listen.http is not None
        async with aiohttp.ClientSession() as s:
            url = f"http://127.0.0.1:{cfg.listen.http.port}/v1/heartbeat/dev-1"
            async with s.post(url) as r:
                assert r.status == 200
        code = await asyncio.wait_for(run, 5)
        assert code == 1
        text = "".join(capsys.readouterr())
        assert text.count("daemon_crashed") == 1, text[-3000:]
        assert "injected bug in a delivery worker" in text
    finally:
        await receiver.stop()


def _credentials_and_authorization(cfg: Config, url: str) -> Config:
    """The combination check-config refuses (so the config is built past it): credentials in the URL and an
    Authorization header, on which aiohttp raises inside every attempt."""
    ep = msgspec.structs.replace(
        cfg.endpoints[0], url=url.replace("http://", "http://alice:pw@"), headers={"Authorization": "Bearer x"}
    )
    return msgspec.structs.replace(cfg, endpoints=(ep,))


async def test_an_exception_inside_an_attempt_is_a_failed_attempt(tmp_path: Path) -> None:
    receiver = await Receiver().start()
    sender = Sender(5.0)
    sender.open()
    try:
        cfg = _credentials_and_authorization(config(tmp_path, [{"name": "ops", "url": receiver.url}]), receiver.url)
        event = make_test_event(time.time())
        result = await sender.attempt(Target(cfg.endpoints[0]), event.id, render(event, cfg.endpoints[0]), 1)
        assert not result.ok
        assert result.error is not None and "Cannot combine AUTHORIZATION header" in result.error
        assert len(result.error) <= 200 and "\n" not in result.error
        assert receiver.got == []
    finally:
        await sender.close()
        await receiver.stop()


async def test_attempts_that_raise_are_counted_go_dead_and_disable(tmp_path: Path, store: Store) -> None:
    receiver = await Receiver().start()
    base = config(
        tmp_path,
        [{"name": "ops", "url": receiver.url, "events": ["all"]}],
        delivery={"retry_schedule": ["10ms", "10ms"], "disable_after": 4},
    )
    cfg = _credentials_and_authorization(base, receiver.url)
    dispatcher = Dispatcher(cfg, store)
    await dispatcher.start()
    run = asyncio.create_task(dispatcher.run())
    try:
        now = time.time()
        for i in range(2):
            ev = event(now, f"d{i}")
            dev = Device(f"d{i}", "online", last_seen=now, changed_at=now)
            dispatcher.enqueue(await store.record([Change(dev, ev, dispatcher.targets(ev))]))

        async def disabled() -> bool:
            rows = await store.load_endpoints()
            return "ops" in rows and rows["ops"].disabled

        for _ in range(200):
            if await disabled():
                break
            await asyncio.sleep(0.05)
        rows = await store.load_endpoints()
        assert rows["ops"].disabled and rows["ops"].disabled_reason == "4 consecutive failures"
        assert rows["ops"].consecutive_failures == 4
        assert rows["ops"].last_error is not None and "Cannot combine" in rows["ops"].last_error
        counts = (await store.delivery_counts())["ops"]
        # The first device's delivery went dead after 3 attempts, the 4th failure (the other's) disabled it.
        assert counts.get("dead", 0) + counts.get("held", 0) == 2
        assert counts.get("delivered", 0) == 0
        assert receiver.got == []
        assert not run.done()
    finally:
        await dispatcher.stop(1.0)
        await asyncio.gather(run, return_exceptions=True)
        await receiver.stop()
