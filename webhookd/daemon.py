"""The composition root: wires store, presence, dispatcher and listeners; owns signals and the lifecycle.

startup (store open, state loaded, listeners bound, READY=1) -> main loop (a TaskGroup holding every
long-lived task, the store's writer watch and the dispatcher's own TaskGroup included: any of them that
crashes takes the daemon down with exit 1 within moments, /healthz says 503 meanwhile, and systemd restarts
it) -> shutdown (STOPPING=1, listeners closed, a timed drain of in-flight deliveries, then cancel; what did not
finish stays queued in the store), all of it within one STOP_BUDGET below the unit's TimeoutStopSec.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from webhookd import __version__, sdnotify
from webhookd.admin import AdminAPI
from webhookd.config import Config, ConfigError, load_config
from webhookd.dispatch import Dispatcher
from webhookd.hub import Hub
from webhookd.lifecycle import changes, keep_bound, restart_required, socket_answers, socket_path_is_ours, tune_gc
from webhookd.listener import HeartbeatAPI
from webhookd.logs import batch_logs, configure_logging, get_logger, lean_records
from webhookd.metrics import Metrics
from webhookd.mutes import Mutes, sync
from webhookd.presence import DeviceDefaults, PresenceEngine
from webhookd.store import StoreError, retention_loop, store_for
from webhookd.tracker import Tracker
from webhookd.udp import UDPListener
from webhookd.upstream import Heartbeat

if TYPE_CHECKING:
    from webhookd.dispatch.claims import HubClaims
    from webhookd.mqtt.client import MqttPresence

log = get_logger("webhookd.daemon")

STOP_BUDGET = 25.0  # seconds the whole shutdown may take: below the unit's TimeoutStopSec=30s
DRAIN_MAX = 10.0  # seconds in-flight deliveries get at shutdown (within the budget)
CLOSE_MAX = 5.0  # seconds each step of the final close may take (the store's last commit, a socket)
FLUSH_INTERVAL = 5.0
STATUS_INTERVAL = 10.0
HTTP_KEEPALIVE = 75.0  # seconds an idle (or slowloris) heartbeat API connection is kept
HTTP_SHUTDOWN = 3.0  # seconds requests in progress get when the listeners close (aiohttp's default: 60)
UDP_GRACE = 5.0  # seconds UDP heartbeats being applied get at shutdown
MQTT_GRACE = 3.0  # seconds the MQTT side gets at shutdown (its status "offline", readings in flight)
RELOAD_WAIT = 5.0  # seconds a running reload gets to finish when a stop is asked for


def _prune_interval() -> float:
    """Seconds between retention prunes; WEBHOOKD_PRUNE_INTERVAL (undocumented) shortens it for tests."""
    try:
        return max(float(os.environ.get("WEBHOOKD_PRUNE_INTERVAL", "60")), 0.05)
    except ValueError:
        return 60.0


def defaults_for(cfg: Config) -> Callable[[str], DeviceDefaults]:
    def lookup(device_id: str) -> DeviceDefaults:
        rule = cfg.device_rule(device_id)
        timeout = cfg.silence_timeout_under(rule)
        debounce = rule.debounce if rule is not None and rule.debounce is not None else cfg.presence.debounce
        if rule is None:
            return DeviceDefaults(timeout, debounce=debounce)
        return DeviceDefaults(timeout, rule.name, rule.owner, debounce)

    return lookup


class StartupError(Exception):
    pass


class Daemon:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.started_mono = time.monotonic()
        self.started_wall = time.time()
        self.store = store_for(cfg.store, cfg.db_path)  # SQLite unless `store:` names a PostgreSQL
        self.engine = PresenceEngine(
            defaults_for(cfg), cfg.presence.notify_online_after_utilizing, cfg.presence.remind_every
        )
        self.dispatcher = Dispatcher(cfg, self.store)
        self.tracker = Tracker(self.engine, self.store, self.dispatcher)
        # upstream: the gateway's heartbeat to its hub (its relay is the endpoint `upstream`)
        self.heartbeat = Heartbeat(cfg.upstream, self.dispatcher.sender, lambda: len(self.engine.devices))
        self.api = HeartbeatAPI(self.tracker, cfg.listen.tokens, cfg.listen.max_body, self._healthy)
        # hub: the relay routes of the gateways (the device routes answer 404); a restart adds or removes it
        self.hub = None if cfg.hub is None else Hub(cfg.hub, self.engine, self.store, self.dispatcher)
        # several hub processes on one PostgreSQL share the deliveries by partition leases
        self.claims: HubClaims | None = None
        if cfg.hub is not None and cfg.store is not None:
            from webhookd.dispatch.claims import HubClaims  # psycopg only for those who use it
            from webhookd.store.postgres import PostgresStore

            assert isinstance(self.store, PostgresStore)
            self.claims = HubClaims(self.store, self.dispatcher)
            self.claims.on_mutes = self._sync_mutes  # a mute made through any process applies to the whole hub
            self.store.fence = self.claims
            self.dispatcher.attach_hub(self.claims)
        self.api.hub = self.hub
        self.metrics = Metrics(self.engine, self.store, self.dispatcher, self.started_mono)
        self.metrics.attach(self.tracker, self.api)
        if self.hub is not None:
            self.hub.on_event = self.metrics.on_event  # relayed events count like the hub's own
            self.hub.on_suppressed = self.metrics.on_suppressed
            # The tracker's set, looked up at each relay (a reload of the mutes replaces it)
            self.hub.muted = lambda device_id, wall: self.tracker.mutes.covering(device_id, wall)
        self.metrics.udp = lambda: self.udp
        self.metrics.mqtt = lambda: self.mqtt
        self.admin = AdminAPI(
            self.engine,
            self.store,
            self.dispatcher,
            tracker=self.tracker,
            started_wall=self.started_wall,
            started_mono=self.started_mono,
            metrics=self.metrics.render,
        )
        self.admin.mqtt_status = lambda: self.mqtt.status() if self.mqtt is not None else None
        self.admin.hub = self.hub  # GET /v1/gateways, and `stale` on the devices of an offline gateway
        self._runners: list[web.BaseRunner] = []
        self.udp: UDPListener | None = None
        self.mqtt: MqttPresence | None = None
        self._mqtt_task: asyncio.Task[None] | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._reloading: asyncio.Task[None] | None = None
        self._failed = False  # a supervised task died: /healthz says so until the daemon has exited
        self._pending = 0  # pending deliveries in the store, refreshed by the status loop

    def _healthy(self) -> bool:
        return self.store.healthy and not self._failed

    # --- startup -----------------------------------------------------------------------------------------

    async def _start(self) -> None:
        try:
            await self.store.open()
        except StoreError as e:
            raise StartupError(str(e)) from e
        except OSError as e:
            raise StartupError(f"cannot open the store in {self.cfg.state_dir}: {e.strerror or e}") from e
        try:
            self.engine.load(await self.store.load_devices(), time.monotonic(), time.time())
            await self._load_mutes()
            if self.claims is not None:
                await self.claims.join()  # a first share of the partitions, before the first page
            await self.dispatcher.start()
            self._pending = await self.store.pending_count()
        except (StoreError, sqlite3.DatabaseError) as e:  # a torn database, or a disk full at startup
            raise StartupError(f"cannot load the state from {self.store.location}: {e}") from e
        listen = self.cfg.listen
        if listen.http is not None:
            server = self.api.server(access_log=None, keepalive_timeout=HTTP_KEEPALIVE)
            await self._serve_tcp(
                web.ServerRunner(server, handle_signals=False, shutdown_timeout=HTTP_SHUTDOWN),
                listen.http.host,
                listen.http.port,
                "heartbeat API",
            )
        if listen.udp is not None:
            self.udp = UDPListener(self.tracker, listen.max_body)
            try:
                await self.udp.start(listen.udp.host, listen.udp.port, unauthenticated_warning=bool(listen.tokens))
            except OSError as e:
                raise StartupError(f"cannot listen on {listen.udp} for UDP heartbeats: {e.strerror or e}") from e
        await self._serve_admin()
        log.info(
            "daemon_started",
            version=__version__,
            pid=os.getpid(),
            devices=len(self.engine.devices),
            mutes=len(self.tracker.mutes),
            endpoints=len(self.dispatcher.endpoints),
            pending=self._pending,
            http=str(listen.http) if listen.http else None,
            admin_socket=str(self.cfg.admin.socket),
        )

    async def _load_mutes(self) -> None:
        """Mutes survive restarts; those that expired while the daemon was down are deleted."""
        self.tracker.mutes = Mutes(await self.store.load_mutes())
        expired = self.tracker.mutes.prune(time.time())
        if expired:
            await self.store.delete_mutes([r.match for r in expired])

    async def _sync_mutes(self) -> None:
        """On a hub, after a mutes notice (and as a backstop): the store's rules, which any process may have
        changed, become this process's. Expired ones are left to the store's next mute write (every process
        deleting them would only notify the others again)."""
        before = self.tracker.mutes.generation
        stored = await self.store.load_mutes()
        if self.tracker.mutes.generation != before:
            # A mute or unmute through this process committed while we read: the read may predate it. Its own
            # notice reaches our listener after its commit and reads again.
            return
        change = sync(self.tracker.mutes, stored, time.time())
        if change:
            self.tracker.mutes.reset(change.rules)
            log.info("mutes_synced", added=list(change.added), removed=list(change.removed), mutes=len(change.rules))

    async def _serve_tcp(self, runner: web.BaseRunner, host: str, port: int, what: str) -> None:
        # aiohttp has no header-read timeout: it closes a connection that has not completed a request head
        # keepalive_timeout after it connected (or after its last response). Its default is 3630 s.
        await runner.setup()
        self._runners.append(runner)
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as e:
            raise StartupError(f"cannot listen on {host}:{port} for the {what}: {e.strerror or e}") from e

    async def _serve_admin(self) -> None:
        path = self.cfg.admin.socket
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            if socket_answers(path):
                raise StartupError(f"another webhookd is running (admin socket {path} answers)")
            path.unlink()
        runner = web.AppRunner(self.admin.app(), handle_signals=False, access_log=None, shutdown_timeout=HTTP_SHUTDOWN)
        await runner.setup()
        self._runners.append(runner)
        try:
            await web.UnixSite(runner, str(path)).start()
        except OSError as e:
            raise StartupError(f"cannot create the admin socket {path}: {e.strerror or e}") from e
        os.chmod(path, 0o660)

    # --- the main loop -----------------------------------------------------------------------------------

    async def run(self) -> int:
        batch_logs(asyncio.get_running_loop())
        try:
            return await self._run()
        finally:
            batch_logs(None)  # what the last turns logged is written before we return

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            await self._start()
        except StartupError as e:
            log.error("startup_failed", error=str(e))
            await self._close()
            return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        tune_gc()
        sdnotify.ready(self._status_line())
        crashed = False
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.store.supervise(), name="store"),
                    tg.create_task(self.dispatcher.run(), name="dispatcher"),
                    tg.create_task(self.tracker.sweep_loop(), name="presence-sweep"),
                    tg.create_task(self.tracker.flush_loop(FLUSH_INTERVAL), name="liveness-flush"),
                    tg.create_task(self._status_loop(), name="sd-status"),
                    tg.create_task(self.heartbeat.run(), name="upstream-heartbeat"),
                    *([tg.create_task(self.hub.liveness_loop(), name="gateway-liveness")] if self.hub else []),
                    tg.create_task(
                        retention_loop(self.store, lambda: self.cfg.delivery.retention, _prune_interval()),
                        name="retention",
                    ),
                ]
                if self.claims is not None:
                    tasks.append(tg.create_task(self.claims.run(), name="hub-claims"))
                interval = sdnotify.watchdog_interval()
                if interval is not None:
                    tasks.append(tg.create_task(self._watchdog_loop(interval), name="sd-watchdog"))
                for t in tasks:
                    t.add_done_callback(self._watch)
                self._tg = tg
                self._start_mqtt(self.cfg)
                await self._stop.wait()
                await self._shutdown(tasks)
        except* Exception as eg:
            self._failed = True
            for exc in eg.exceptions:
                log.critical("daemon_crashed", error=repr(exc), exc_info=exc)
            crashed = True
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        await self._close()
        if crashed:
            return 1
        log.info("daemon_stopped")
        return 0

    def _watch(self, task: asyncio.Task[None]) -> None:
        """A supervised task ended: if with an exception, /healthz answers 503 until the TaskGroup has taken
        the daemon down (moments later)."""
        if not task.cancelled() and task.exception() is not None:
            self._failed = True

    async def _shutdown(self, tasks: list[asyncio.Task[None]]) -> None:
        deadline = time.monotonic() + STOP_BUDGET

        def left(cap: float) -> float:
            return max(0.0, min(cap, deadline - time.monotonic()))

        reloading = self._reloading
        if reloading is not None and not reloading.done():
            # A reload still running finishes first: nothing is torn down under it, and no READY=1 follows
            # STOPPING=1.
            _done, pending = await asyncio.wait({reloading}, timeout=left(RELOAD_WAIT))
            for t in pending:
                t.cancel()
        sdnotify.stopping()
        log.info("daemon_stopping", inflight=self.dispatcher.inflight)
        if self.udp is not None:
            await self.udp.close(left(UDP_GRACE))  # no new UDP heartbeats; those in flight get recorded
        await self._stop_mqtt(left(MQTT_GRACE))  # "offline" on its status topic; readings in flight recorded
        for runner in self._runners:
            # No new heartbeats, no admin calls; requests in progress get HTTP_SHUTDOWN seconds.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left(HTTP_SHUTDOWN + 1)):
                    await runner.cleanup()
        self._runners.clear()
        for t in tasks:
            if t.get_name() not in ("dispatcher", "store", "hub-claims"):  # leases held until the drain is over
                t.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(left(CLOSE_MAX)):
                await self.tracker.flush()
        drain = min(DRAIN_MAX, max((e.timeout for e in self.cfg.endpoints), default=self.cfg.delivery.timeout))
        # What is left of the budget, less a margin for the receipts' commit and the store's close.
        await self.dispatcher.stop(max(0.0, left(drain + CLOSE_MAX) - CLOSE_MAX))
        for t in tasks:
            t.cancel()

    async def _close(self) -> None:
        """Release everything, each step bounded: also the way out after a crash, when a part may be dead."""

        async def step(what: Callable[[], Awaitable[object]]) -> None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_MAX):
                    await what()

        udp = self.udp
        if udp is not None:
            await step(lambda: udp.close(0))
        for runner in self._runners:
            await step(runner.cleanup)
        self._runners.clear()
        await step(lambda: self.dispatcher.stop(0))
        await step(self.store.close)
        with contextlib.suppress(OSError):
            if socket_path_is_ours(self.cfg.admin.socket):
                self.cfg.admin.socket.unlink()

    def _status_line(self) -> str:
        c = self.engine.counts()
        return (
            f"{c['online']} online, {c['utilizing']} utilizing, {c['unplugged']} unplugged, "
            f"{c['offline']} offline; {self._pending:,} {'delivery' if self._pending == 1 else 'deliveries'} pending"
        )

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            with contextlib.suppress(StoreError):  # the last count stands while the store cannot answer
                self._pending = await self.store.pending_count()
            sdnotify.status(self._status_line())

    async def _watchdog_loop(self, interval: float) -> None:
        # Pinged from inside the event loop: a blocked loop stops the pings and systemd notices.
        while True:
            sdnotify.watchdog()
            await asyncio.sleep(interval)

    # --- reload ------------------------------------------------------------------------------------------

    def _on_sighup(self) -> None:
        if self._stop.is_set():
            log.warning("config_reload_skipped", reason="the daemon is stopping")
            return
        if self._reloading is not None and not self._reloading.done():
            log.warning("config_reload_skipped", reason="a reload is already running")
            return
        self._reloading = asyncio.get_running_loop().create_task(self.reload(), name="reload")

    # --- MQTT presence (optional; a reload may add, change or remove it) ----------------------------------

    def _start_mqtt(self, cfg: Config) -> None:
        if cfg.mqtt is None or self._tg is None:
            return
        from webhookd.mqtt.client import MqttPresence  # aiomqtt is imported only by a daemon that uses it

        self.mqtt = MqttPresence(cfg.mqtt, self.tracker)
        self._mqtt_task = self._tg.create_task(self.mqtt.run(), name="mqtt")
        self._mqtt_task.add_done_callback(self._watch)

    async def _stop_mqtt(self, grace: float) -> None:
        task, self._mqtt_task = self._mqtt_task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task}, timeout=max(grace, 0.1))
        self.mqtt = None

    async def _reload_mqtt(self, new: Config) -> None:
        if new.mqtt is None:
            if self.mqtt is not None:
                log.info("mqtt_stopped", broker=self.mqtt.cfg.broker, reason="mqtt removed from the config")
                await self._stop_mqtt(MQTT_GRACE)
        elif self.mqtt is None:
            self._start_mqtt(new)
        else:
            self.mqtt.reconfigure(new.mqtt)

    async def reload(self) -> None:
        sdnotify.reloading()
        try:
            path = self.cfg.path
            if path is None:
                raise ConfigError(["config: the daemon was started without a config file"])
            try:
                new = await asyncio.to_thread(load_config, path)
            except ConfigError as e:
                log.error("config_reload_failed", problems=e.problems)
                return
            restart = restart_required(self.cfg, new)
            if restart:
                log.warning(
                    "config_restart_required",
                    keys=restart,
                    detail="these keys take effect at the next restart",
                )
            new = keep_bound(self.cfg, new)
            await self.dispatcher.reconfigure(new)  # first: it writes to the store, which may fail
            configure_logging(new.logging.format, new.logging.level)
            self.engine.reconfigure(
                defaults_for(new),
                new.presence.notify_online_after_utilizing,
                new.presence.remind_every,
                time.monotonic(),
                time.time(),
            )
            self.api.configure(new.listen.tokens)  # max_body is bound at startup, like the rest of listen
            await self._reload_mqtt(new)
            self.heartbeat.reconfigure(new.upstream)
            if self.hub is not None and new.hub is not None:
                self.hub.configure(new.hub)  # the gateways and their secrets
            old, self.cfg = self.cfg, new
            log.info(
                "config_reloaded",
                endpoints=[e.name for e in new.endpoints],
                devices_rules=len(new.devices),
                **changes(old, new),
            )
        except Exception as e:
            log.exception("config_reload_failed", error=str(e))
        finally:
            if not self._stop.is_set():
                sdnotify.ready(self._status_line())


def run(config_path: str | Path) -> int:
    """`webhookd run`: load the config, run until SIGTERM/SIGINT; the process exit code."""
    lean_records()
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        configure_logging("auto", "info")
        log.error("config_invalid", problems=e.problems)
        return 1
    configure_logging(cfg.logging.format, cfg.logging.level)

    async def main() -> int:
        return await Daemon(cfg).run()

    if not os.environ.get("WEBHOOKD_NO_UVLOOP"):
        try:
            uvloop = importlib.import_module("uvloop")  # the optional extra webhookd[speed]
        except ImportError:
            pass
        else:
            return int(uvloop.run(main()))
    return asyncio.run(main())
