"""A gateway's side of the relay to a hub (CONTRACT §14): its signed heartbeat.

The events themselves go through the gateway's own outbox as the endpoint `upstream` (config/load.py
`relay_endpoint`: durable, in order per device, retried forever). This loop tells the hub that the gateway is
alive: every `upstream.heartbeat` a ``POST <url>/v1/gateways/<gateway>/heartbeat`` with the body
``{"gateway", "time", "devices"}``, signed like the relay (``Webhookd-Signature``, ``Webhookd-Gateway``), over
the dispatcher's own HTTP session. A failure is a warning at most once a minute (the sender's words for it),
never a crash; the first success after failures is logged once. A reload may add, change or remove it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable

import msgspec

from webhookd.config import EndpointConfig
from webhookd.config.fleet import relay_endpoint
from webhookd.config.schema import UpstreamConfig
from webhookd.config.units import redact_url
from webhookd.dispatch.sender import Sender, Target
from webhookd.logs import get_logger
from webhookd.payloads import rfc3339

log = get_logger("webhookd.upstream")

HEARTBEAT_PATH = "/v1/gateways/{}/heartbeat"
WARN_EVERY = 60.0  # seconds: a hub that stays unreachable is one warning a minute, not one per heartbeat


def heartbeat_endpoint(up: UpstreamConfig) -> EndpointConfig:
    """The relay endpoint's settings (secret, headers, timeout, TLS) at the heartbeat URL."""
    return msgspec.structs.replace(relay_endpoint(up), url=up.url + HEARTBEAT_PATH.format(up.gateway))


def heartbeat_body(gateway: str, wall: float, devices: int) -> bytes:
    return json.dumps({"gateway": gateway, "time": rfc3339(wall), "devices": devices}).encode()


class Heartbeat:
    def __init__(
        self,
        cfg: UpstreamConfig | None,
        sender: Sender,
        devices: Callable[[], int],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._sender = sender
        self._devices = devices
        self._clock = clock
        self._wall = wall
        self._changed = asyncio.Event()
        self.cfg: UpstreamConfig | None = None
        self._target: Target | None = None
        self.failures = 0  # consecutive failed heartbeats
        self.last_error: str | None = None
        self._warned_at: float | None = None  # monotonic time of the last warning in this run of failures
        self.reconfigure(cfg)

    def reconfigure(self, cfg: UpstreamConfig | None) -> None:
        """Startup and reload: a new or changed `upstream:` sends a heartbeat at once; None stops them."""
        if cfg == self.cfg:
            return
        self.cfg = cfg
        self._target = None if cfg is None else Target(heartbeat_endpoint(cfg))
        self.failures, self.last_error, self._warned_at = 0, None, None
        self._changed.set()

    async def run(self) -> None:
        """Forever (the daemon cancels it): one heartbeat per interval, timed from the start of the last."""
        while True:
            self._changed.clear()
            cfg, target = self.cfg, self._target
            if cfg is None or target is None:
                await self._changed.wait()
                continue
            due = self._clock() + cfg.heartbeat
            await self.beat(cfg, target)
            delay = due - self._clock()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._changed.wait()  # a reload: the new config's heartbeat at once

    async def beat(self, cfg: UpstreamConfig, target: Target) -> bool:
        """One heartbeat; True when the hub answered 2xx."""
        try:
            body = heartbeat_body(cfg.gateway, self._wall(), self._devices())
            result = await self._sender.attempt(target, "", body, 1, ids=False)
            ok, error, detail = result.ok, result.error, result.detail
        except Exception as e:  # never a crash: the next heartbeat tries again
            ok, error, detail = False, f"{type(e).__name__}: {e}"[:200], None
        if cfg is not self.cfg:
            return ok  # reconfigured meanwhile: this outcome belongs to the old settings
        hub = redact_url(cfg.url)
        if ok:
            if self.failures:
                log.info("upstream_heartbeat_recovered", hub=hub, gateway=cfg.gateway, failures=self.failures)
            self.failures, self.last_error, self._warned_at = 0, None, None
            return True
        self.failures += 1
        self.last_error = error
        now = self._clock()
        if self._warned_at is None or now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning(
                "upstream_heartbeat_failed",
                hub=hub,
                gateway=cfg.gateway,
                error=error,
                detail=detail,
                failures=self.failures,
            )
        return False
