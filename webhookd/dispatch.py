"""Delivery: scheduling, attempts, retries, per-endpoint failure counters and disabling (CONTRACT §7).

Memory holds every pending delivery, grouped per endpoint into *lanes*, one lane per device: only a lane's
head may be in flight, which keeps per-(endpoint, device) order. Each idle lane has one entry in its
endpoint's ready-heap, keyed by when its head is due. Due heads go to a fixed pool of worker tasks, within the
global and per-endpoint concurrency: handed out by one scheduler task (timers, wake-ups) and by each worker as
it finishes. A failing endpoint pauses for its retry-schedule step and then gets a single probe; only a success
reopens it. A lane moves on only once the outcome of its head is persisted, so a crash can repeat a delivery
but never reorder one. A worker does not wait for a receipt's commit: the head stays in its lane, *settling*,
until the batch it went into is saved (at most UNSAVED_FACTOR x concurrency per endpoint).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import heapq
import ipaddress
import random
import re
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict
from yarl import URL

from webhookd import __version__
from webhookd.config import Config, EndpointConfig
from webhookd.logs import get_logger
from webhookd.payloads import EventData, make_test_event, render
from webhookd.signing import signature_headers
from webhookd.store import DeliveryRow, EndpointRow, Outcome, Store, StoreError

log = get_logger("webhookd.dispatch")

USER_AGENT = f"webhookd/{__version__}"
RESAVE_DELAY = 2.0  # seconds before a lane head whose outcome could not be saved is tried again
MAX_RESPONSE_READ = 64 * 1024  # read at most this much of a response body, whatever its size
# Receipts an endpoint may have waiting for their commit, per unit of its concurrency. Workers do not wait for
# the commit (an fsync), so this bounds what a crash can send twice: (1 + UNSAVED_FACTOR) x concurrency. Four
# covers one commit's worth of deliveries at full speed on a small box.
UNSAVED_FACTOR = 4


@dataclass(slots=True)
class Delivery:
    id: int
    event: EventData
    endpoint: str
    attempts: int
    due: float  # monotonic
    body: bytes = b""
    body_for: EndpointConfig | None = None  # the endpoint config the cached body was rendered for
    inflight: bool = False
    settling: bool = False  # delivered; its receipt is waiting for its commit (the lane has not moved on)


@dataclass(frozen=True, slots=True)
class Result:
    ok: bool
    status: int | None
    error: str | None
    latency: float
    retry_after: float | None = None


@dataclass(eq=False)
class EndpointRuntime:
    cfg: EndpointConfig
    row: EndpointRow
    lanes: dict[str, deque[Delivery]] = field(default_factory=dict)
    ready: list[tuple[float, int, str]] = field(default_factory=list)  # (due, seq, device) of idle lanes
    known: set[int] = field(default_factory=set)  # delivery ids held in lanes
    inflight: int = 0
    unsaved: int = 0  # delivered, receipt not committed yet: a crash now would send these again
    paused_until: float = 0.0
    pause_step: int = 0
    last_failure_mono: float = -1.0
    generation: int = 0  # bumped when lanes are thrown away; stale in-flight results then only persist
    device_patterns: re.Pattern[str] | None = None  # None: every device
    event_kinds: frozenset[str] = frozenset()
    ssl: ssl.SSLContext | bool = True
    client_timeout: aiohttp.ClientTimeout | None = None
    url: URL = field(default_factory=URL)  # set by configure()
    blocked_literal: bool = False
    base_headers: CIMultiDict[str] = field(default_factory=CIMultiDict)

    def configure(self, cfg: EndpointConfig) -> None:
        self.cfg = cfg
        self.device_patterns = (
            None if "*" in cfg.devices else re.compile("|".join(fnmatch.translate(p) for p in cfg.devices) or "(?!)")
        )
        self.event_kinds = frozenset(f"device.{kind}" for kind in cfg.events)
        if not cfg.tls_verify:
            self.ssl = False
        elif cfg.ca_file is not None:
            self.ssl = ssl.create_default_context(cafile=str(cfg.ca_file))
        else:
            self.ssl = True  # aiohttp's default verification
        # Per-attempt constants, worked out once per config.
        self.client_timeout = aiohttp.ClientTimeout(total=cfg.timeout)
        # Case-insensitive: standard-webhooks' own `webhook-id` must replace ours, not be sent twice.
        self.base_headers = CIMultiDict(cfg.headers)
        self.base_headers["Content-Type"] = "application/json"
        self.url = URL(cfg.url)
        host = (urlsplit(cfg.url).hostname or "").strip("[]")
        self.blocked_literal = not cfg.allow_link_local and _blocked(host)

    def wants(self, event: EventData) -> bool:
        if event.type not in self.event_kinds:
            return False
        return self.device_patterns is None or self.device_patterns.match(event.device_id) is not None

    def clear(self) -> set[int]:
        """Throw the lanes away; returns the ids still in flight or settling (their results arrive as stale)."""
        inflight = {lane[0].id for lane in self.lanes.values() if lane and (lane[0].inflight or lane[0].settling)}
        self.lanes.clear()
        self.ready.clear()
        self.known.clear()
        self.generation += 1
        return inflight


def _blocked(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_link_local


class GuardedResolver(AbstractResolver):
    """Drops link-local answers (cloud metadata lives there) unless the host belongs to an opted-in endpoint."""

    def __init__(self) -> None:
        self._inner = aiohttp.ThreadedResolver()
        self.allowed_hosts: set[str] = set()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host.lower() in self.allowed_hosts:
            return results
        kept = [r for r in results if not _blocked(r["host"])]
        if not kept:
            # With an errno, so that aiohttp's "Cannot connect to host ... [strerror]" carries the reason.
            raise OSError(
                errno.EACCES, f"{host} resolves only to link-local addresses (blocked; allow_link_local: true)"
            )
        return kept

    async def close(self) -> None:
        await self._inner.close()


class Dispatcher:
    def __init__(
        self,
        cfg: Config,
        store: Store,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self._clock = clock
        self._wall = wall
        self._rng = rng
        self.endpoints: dict[str, EndpointRuntime] = {}
        self.inflight = 0
        self._jobs: asyncio.Queue[tuple[EndpointRuntime, int, Delivery]] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = False
        self._yielding = False
        self._session: aiohttp.ClientSession | None = None
        self._resolver = GuardedResolver()
        self._workers: list[asyncio.Task[None]] = []
        self.on_result: Callable[[str, Result], None] | None = None  # metrics hook
        # in flight or settling while their lanes were thrown away (disable/enable/removal): _add skips them
        self._stale: set[int] = set()
        self._hold_retries: set[asyncio.Task[None]] = set()
        self._batch: list[tuple[Outcome, Callable[[bool], None]]] = []
        self._batch_rows: dict[str, EndpointRow] = {}  # endpoint rows to save with the batch (copied at save)
        self._saving: asyncio.Task[None] | None = None
        # metrics hook: (endpoint, persisted status after an attempt: delivered|pending|dead|held)
        self.on_outcome: Callable[[str, str], None] | None = None

    # --- startup and config ------------------------------------------------------------------------------

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, resolver=self._resolver, ttl_dns_cache=60, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.cfg.delivery.timeout),
            headers={"User-Agent": USER_AGENT},
            auto_decompress=False,
            trust_env=False,
        )
        rows = await self.store.load_endpoints()
        await self._apply_endpoints(self.cfg, rows)

    async def _apply_endpoints(self, cfg: Config, rows: dict[str, EndpointRow]) -> None:
        """Reconcile runtime and store with the endpoints of `cfg` (startup and reload)."""
        self.cfg = cfg
        self._resolver.allowed_hosts = {
            (urlsplit(e.url).hostname or "").lower() for e in cfg.endpoints if e.allow_link_local
        }
        wanted = {e.name: e for e in cfg.endpoints}
        removed = [name for name in self.endpoints if name not in wanted]
        for name in removed:
            rt = self.endpoints.pop(name)
            self._stale |= rt.clear()
            held = await self.store.hold(name)
            log.info("endpoint_removed", endpoint=name, held=held)
        for name, ecfg in wanted.items():
            existing = self.endpoints.get(name)
            if existing is not None:
                if existing.cfg != ecfg:
                    existing.configure(ecfg)
                continue
            row = rows.get(name) or EndpointRow(name)
            rt = EndpointRuntime(cfg=ecfg, row=row)
            rt.configure(ecfg)
            self.endpoints[name] = rt
            if row.disabled:
                await self.store.hold(row)
            else:
                # Rows held while the endpoint was absent from the config resume with it.
                await self.store.release(row)
                self._add(rt, await self.store.load_pending(name))
        for name in rows.keys() - wanted.keys() - set(removed):  # absent before: their rows stay held
            await self.store.hold(name)
        if self._workers:
            self._ensure_workers()  # delivery.concurrency may have grown
        self._wake.set()

    async def reconfigure(self, cfg: Config) -> None:
        await self._apply_endpoints(cfg, await self.store.load_endpoints())

    # --- the outbox side ---------------------------------------------------------------------------------

    def targets(self, event: EventData) -> list[tuple[str, str]]:
        """(endpoint, initial status) for every endpoint subscribed to `event`."""
        return [
            (name, "held" if rt.row.disabled else "pending") for name, rt in self.endpoints.items() if rt.wants(event)
        ]

    def enqueue(self, rows: Iterable[DeliveryRow]) -> None:
        by_endpoint: dict[str, list[DeliveryRow]] = {}
        for r in rows:
            by_endpoint.setdefault(r.endpoint, []).append(r)
        for name, group in by_endpoint.items():
            rt = self.endpoints.get(name)
            if rt is not None and not rt.row.disabled:
                self._add(rt, group)
        self._wake.set()

    def _add(self, rt: EndpointRuntime, rows: Sequence[DeliveryRow]) -> None:
        now, wall = self._clock(), self._wall()
        # Stored retry times are wall clock: bound them so a clock that jumped back cannot park a delivery for
        # hours.
        longest_wait = 2 * max(self.cfg.delivery.retry_schedule)
        for r in rows:
            if r.id in rt.known or r.id in self._stale:
                continue
            rt.known.add(r.id)
            wait = min(max(0.0, (r.next_attempt_at or wall) - wall), longest_wait)
            due = now + wait
            d = Delivery(r.id, r.event, r.endpoint, r.attempts, due)
            lane = rt.lanes.get(r.event.device_id)
            if lane is None:
                rt.lanes[r.event.device_id] = deque((d,))
                heapq.heappush(rt.ready, (due, d.id, r.event.device_id))
            elif lane[-1].id < d.id:
                lane.append(d)
            else:
                # Rare: rows arriving out of id order (enable racing new events). Keep the lane sorted, but
                # never move a head that is in flight.
                keep = [lane.popleft()] if lane[0].inflight or lane[0].settling else []
                items = sorted([*lane, d], key=lambda x: x.id)
                lane.clear()
                lane.extend(keep + items)

    # --- scheduling --------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Scheduler loop; returns when stop() is called. Workers are started here."""
        self._ensure_workers()
        while not self._stopping:
            self._wake.clear()
            delay = self._dispatch_due()
            if self._stopping:
                break
            if delay is None:
                await self._wake.wait()
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()

    def _ensure_workers(self) -> None:
        loop = asyncio.get_running_loop()
        while len(self._workers) < self.cfg.delivery.concurrency:
            self._workers.append(loop.create_task(self._worker(), name=f"delivery-worker-{len(self._workers)}"))

    def yield_to_sweep(self, on: bool) -> None:
        """While on, start no new attempts (those in flight go on): a power cut's offline events are being
        recorded, and recording them on time matters more than delivering the first of them early."""
        if self._yielding and not on:
            self._wake.set()
        self._yielding = on

    def _dispatch_due(self) -> float | None:
        now = self._clock()
        if self._yielding:
            return None  # yield_to_sweep(False) wakes us
        next_due = float("inf")
        limit = self.cfg.delivery.concurrency
        for rt in list(self.endpoints.values()):
            if rt.row.disabled or not rt.ready:
                continue
            while rt.ready and self.inflight < limit:
                cap = rt.cfg.concurrency
                if rt.row.consecutive_failures > 0:
                    if now < rt.paused_until:
                        next_due = min(next_due, rt.paused_until)
                        break
                    cap = 1  # one probe at a time until a success
                if rt.inflight >= cap or rt.unsaved >= UNSAVED_FACTOR * rt.cfg.concurrency:
                    break
                due, _, device = rt.ready[0]
                if due > now:
                    next_due = min(next_due, due)
                    break
                heapq.heappop(rt.ready)
                lane = rt.lanes.get(device)
                if not lane:
                    continue
                rt.inflight += 1
                self.inflight += 1
                self._idle.clear()
                lane[0].inflight = True
                self._jobs.put_nowait((rt, rt.generation, lane[0]))
        if next_due == float("inf"):
            return None
        return max(0.0, next_due - now)

    async def _worker(self) -> None:
        while True:
            rt, generation, d = await self._jobs.get()
            try:
                await self._deliver(rt, generation, d)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("delivery_worker_error", endpoint=rt.cfg.name, delivery_id=d.id)
                self._retry_head(rt, generation, d, RESAVE_DELAY)
            finally:
                d.inflight = False
                rt.inflight -= 1
                self.inflight -= 1
                if self.inflight == 0:
                    self._idle.set()
                # Hand out the next due job right here: this worker's next get() then finds it without a trip
                # through the scheduler task. Only a future due time needs the scheduler's timer.
                if not self._stopping and self._dispatch_due() is not None:
                    self._wake.set()

    # --- one attempt -------------------------------------------------------------------------------------

    def _body(self, cfg: EndpointConfig, d: Delivery) -> bytes:
        if d.body_for is not cfg:
            d.body = render(d.event, cfg)
            d.body_for = cfg
        return d.body

    async def attempt(self, rt: EndpointRuntime, event_id: str, body: bytes, n: int) -> Result:
        assert self._session is not None
        if rt.blocked_literal:
            return Result(False, None, "link-local address blocked (allow_link_local: false)", 0.0)
        cfg = rt.cfg
        headers = rt.base_headers.copy()
        headers["Webhook-Id"] = event_id
        headers["Webhook-Attempt"] = str(n)
        headers.update(signature_headers(cfg, event_id, body, int(self._wall())))
        started = time.perf_counter()
        try:
            async with self._session.post(
                rt.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=rt.client_timeout,
                ssl=rt.ssl,
            ) as resp:
                status = resp.status
                retry_after = (
                    None if 200 <= status < 300 else _retry_after(resp.headers.get("Retry-After"), self._wall())
                )
                if resp.content_length is None or resp.content_length <= MAX_RESPONSE_READ:
                    # The answer counts once its body is complete (within the timeout; a reset fails it), and
                    # draining a small body lets the connection be reused. A large one is dropped unread.
                    remaining = MAX_RESPONSE_READ
                    while remaining > 0 and (chunk := await resp.content.read(remaining)):
                        remaining -= len(chunk)
        except TimeoutError:
            return Result(False, None, f"timeout after {cfg.timeout:g}s", time.perf_counter() - started)
        except aiohttp.ClientSSLError as e:
            return Result(False, None, f"tls error: {_short(e)}", time.perf_counter() - started)
        except (aiohttp.ClientError, OSError) as e:
            return Result(False, None, _short(e) or type(e).__name__, time.perf_counter() - started)
        latency = time.perf_counter() - started
        if 200 <= status < 300:
            return Result(True, status, None, latency)
        return Result(False, status, f"HTTP {status}", latency, retry_after)

    async def _deliver(self, rt: EndpointRuntime, generation: int, d: Delivery) -> None:
        cfg = rt.cfg
        started_mono = self._clock()
        result = await self.attempt(rt, d.event.id, self._body(cfg, d), d.attempts + 1)
        d.inflight = False  # the request is over: dropping its lane from here on makes it no stale attempt
        if self.on_result is not None:
            self.on_result(cfg.name, result)
        d.attempts += 1
        now = self._clock()
        stale = generation != rt.generation or self.endpoints.get(rt.cfg.name) is not rt
        ctx = {
            "endpoint": cfg.name,
            "delivery_id": d.id,
            "device": d.event.device_id,
            "attempt": d.attempts,
            "status": result.status,
            "duration_ms": round(result.latency * 1000, 1),
        }
        if result.ok:
            log.info("delivery_succeeded", **ctx)
            outcome = Outcome(d.id, "delivered", d.attempts, None, result.status, None)
            if not stale:
                rt.row.consecutive_failures = 0
                rt.pause_step = 0
                rt.paused_until = 0.0

            # The worker goes back to the pool at once; the lane moves on when the receipt is saved. Waiting
            # here for the commit (an fsync) would bound throughput by concurrency / commit latency.
            d.settling = True
            rt.unsaved += 1

            def saved(ok: bool) -> None:
                rt.unsaved -= 1
                d.settling = False
                dropped = d.id in self._stale  # its lane was thrown away while it was in flight or settling
                self._stale.discard(d.id)
                self._wake.set()
                if ok:
                    self._advance(rt, d, now)
                elif not (dropped or stale):
                    self._retry_head(rt, generation, d, RESAVE_DELAY)
                else:
                    # Not saved, and its lane is gone: the row is still pending (or held) in the store. An
                    # enabled endpoint takes it again now (an enable skipped it while it settled).
                    current = self.endpoints.get(d.endpoint)
                    if current is not None and not current.row.disabled:
                        self._add(current, [DeliveryRow(d.id, d.event, d.endpoint, 0, self._wall())])

            self._settle(outcome, rt, saved)
            return

        schedule = self.cfg.delivery.retry_schedule
        row = rt.row
        if stale:
            self._stale.discard(d.id)
            current = self.endpoints.get(cfg.name)
            if current is not None and not current.row.disabled:
                # Enabled again while this attempt was in flight: the release made the row pending with a
                # fresh budget, and _add skipped it while it was in flight. Queue it now.
                log.warning("delivery_failed", error=result.error, next="retry", **ctx)
                wall = self._wall()
                await self._persist(Outcome(d.id, "pending", 0, wall, result.status, result.error), current)
                if not current.row.disabled and self.endpoints.get(cfg.name) is current:
                    self._add(current, [DeliveryRow(d.id, d.event, d.endpoint, 0, wall)])
                    self._wake.set()
                return
            # Disabled or removed while this attempt was in flight: it stays held.
            log.warning("delivery_failed", error=result.error, next="held", **ctx)
            await self._persist(Outcome(d.id, "held", d.attempts, None, result.status, result.error), rt)
            return
        row.consecutive_failures += 1
        row.last_error = result.error
        # Attempts that were already in flight when the endpoint started failing do not lengthen its pause:
        # the pause steps forward once per probe, i.e. at the retry pace.
        if rt.pause_step == 0 or started_mono >= rt.last_failure_mono:
            rt.pause_step += 1
            step = schedule[min(rt.pause_step, len(schedule)) - 1]
            rt.paused_until = max(rt.paused_until, now + step)
        rt.last_failure_mono = now

        disable_after = self.cfg.delivery.disable_after
        if result.status == 410 or (disable_after and row.consecutive_failures >= disable_after):
            reason = "gone (HTTP 410)" if result.status == 410 else f"{row.consecutive_failures} consecutive failures"
            log.warning("delivery_failed", error=result.error, next="held", **ctx)
            await self._persist(Outcome(d.id, "held", d.attempts, None, result.status, result.error), rt)
            await self.disable(cfg.name, reason)
            return
        if d.attempts > len(schedule):
            log.warning("delivery_dead", error=result.error, **ctx)
            if await self._persist(Outcome(d.id, "dead", d.attempts, None, result.status, result.error), rt):
                self._advance(rt, d, now)
            else:
                self._retry_head(rt, generation, d, RESAVE_DELAY)
            return
        step = schedule[d.attempts - 1]
        delay = step * (0.8 + 0.4 * self._rng())
        if result.retry_after is not None and result.status in (429, 503):
            delay = min(max(result.retry_after, step), 2 * step)
            rt.paused_until = max(rt.paused_until, now + delay)
        d.due = now + delay
        log.warning("delivery_failed", error=result.error, retry_in_s=round(delay, 3), **ctx)
        await self._persist(Outcome(d.id, "pending", d.attempts, self._wall() + delay, result.status, result.error), rt)
        if generation == rt.generation and self.endpoints.get(cfg.name) is rt:
            heapq.heappush(rt.ready, (d.due, d.id, d.event.device_id))

    def _retry_head(self, rt: EndpointRuntime, generation: int, d: Delivery, delay: float) -> None:
        """Keep `d` at its lane's head and try it again later (its outcome could not be saved, or its attempt
        failed unexpectedly): the lane must not move on, or a restart would deliver out of order."""
        lane = rt.lanes.get(d.event.device_id)
        if generation == rt.generation and lane and lane[0] is d:
            d.due = self._clock() + delay
            heapq.heappush(rt.ready, (d.due, d.id, d.event.device_id))
            self._wake.set()

    def _advance(self, rt: EndpointRuntime, d: Delivery, now: float) -> None:
        """The lane's head is done: the next delivery of that device becomes due."""
        device = d.event.device_id
        lane = rt.lanes.get(device)
        if not lane or lane[0] is not d:
            return  # its lane was thrown away (and maybe rebuilt: d.id in `known` is then another copy's)
        rt.known.discard(d.id)
        lane.popleft()
        if lane:
            head = lane[0]
            heapq.heappush(rt.ready, (max(head.due, now), head.id, device))
        else:
            del rt.lanes[device]

    async def _persist(self, outcome: Outcome, rt: EndpointRuntime) -> bool:
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._settle(outcome, rt, done.set_result)
        return await asyncio.shield(done)

    def _settle(self, outcome: Outcome, rt: EndpointRuntime, then: Callable[[bool], None]) -> None:
        """Save `outcome`, then call `then(saved)`. Outcomes that finish while a save is running go together
        in the next one: one statement batch for many deliveries (the store's own group commit then merges
        these with heartbeat writes)."""
        self._batch.append((outcome, then))
        self._batch_rows[rt.row.name] = rt.row
        if self._saving is None:
            self._save_batch()
        if self.on_outcome is not None:
            try:
                self.on_outcome(rt.cfg.name, outcome.status)
            except Exception:  # a metrics hook must not strand the outcome's continuation
                log.exception("outcome_hook_failed", endpoint=rt.cfg.name)

    def _save_batch(self) -> None:
        batch, rows = self._batch, [replace(row) for row in self._batch_rows.values()]
        self._batch, self._batch_rows = [], {}
        self._saving = asyncio.get_running_loop().create_task(
            self.store.save_outcomes([o for o, _ in batch], rows), name="save-outcomes"
        )

        def finished(task: asyncio.Task[None]) -> None:
            self._saving = None
            ok = not task.cancelled() and task.exception() is None
            if not ok:
                # The rows stay pending in the store: a restart would deliver them again (at-least-once).
                error = "cancelled" if task.cancelled() else str(task.exception())
                log.error("delivery_outcome_not_saved", deliveries=[o.delivery_id for o, _ in batch], error=error)
            for _, then in batch:
                try:
                    then(ok)
                except Exception:  # one broken continuation must not strand the others' lanes
                    log.exception("delivery_outcome_callback_failed")
            if self._batch:
                self._save_batch()

        self._saving.add_done_callback(finished)

    # --- operator actions --------------------------------------------------------------------------------

    async def disable(self, name: str, reason: str) -> EndpointRuntime | None:
        rt = self.endpoints.get(name)
        if rt is None:
            return None
        already = rt.row.disabled
        rt.row.disabled = True
        rt.row.disabled_reason = reason
        self._stale |= rt.clear()
        try:
            held = await self.store.hold(replace(rt.row))
        except StoreError as e:
            # Disabled in memory at once; the store learns it as soon as it can write again, so the disabled
            # state still survives a restart.
            log.error("endpoint_disable_not_saved", endpoint=name, error=str(e))
            task = asyncio.get_running_loop().create_task(self._hold_when_possible(rt))
            self._hold_retries.add(task)
            task.add_done_callback(self._hold_retries.discard)
            held = 0
        if not already:
            log.warning(
                "endpoint_disabled",
                endpoint=name,
                reason=reason,
                held=held,
                consecutive_failures=rt.row.consecutive_failures,
            )
        return rt

    async def _hold_when_possible(self, rt: EndpointRuntime) -> None:
        while rt.row.disabled and self.endpoints.get(rt.row.name) is rt:
            await asyncio.sleep(RESAVE_DELAY)
            try:
                await self.store.hold(replace(rt.row))
            except StoreError:
                continue
            return

    async def enable(self, name: str) -> EndpointRuntime | None:
        rt = self.endpoints.get(name)
        if rt is None:
            return None
        rt.row.disabled = False
        rt.row.disabled_reason = None
        rt.row.consecutive_failures = 0
        rt.pause_step = 0
        rt.paused_until = 0.0
        self._stale |= rt.clear()
        released = await self.store.release(replace(rt.row))
        self._add(rt, await self.store.load_pending(name))
        log.info("endpoint_enabled", endpoint=name, released=released)
        self._wake.set()
        return rt

    async def replay(self, ids: Sequence[int] | None, endpoint: str | None, status: str | None) -> int:
        """Queue deliveries again with a fresh budget; those of disabled or removed endpoints become held."""
        unavailable = {n for n in await self.store.endpoint_names() if n not in self.endpoints}
        unavailable |= {n for n, rt in self.endpoints.items() if rt.row.disabled}
        rows, total = await self.store.replay(ids, endpoint, status, unavailable)
        fresh = {r.id for r in rows}
        for rt in self.endpoints.values():
            # A replayed row may still sit in a lane (e.g. waiting for a retry): give it the fresh budget.
            for lane in rt.lanes.values():
                for d in lane:
                    if d.id in fresh:
                        d.attempts = 0
        self.enqueue(rows)
        return total

    async def test(self, name: str) -> Result | None:
        rt = self.endpoints.get(name)
        if rt is None:
            return None
        event = make_test_event(self._wall())
        body = render(event, rt.cfg)
        result = await self.attempt(rt, event.id, body, 1)
        log.info(
            "endpoint_tested",
            endpoint=name,
            status=result.status,
            error=result.error,
            duration_ms=round(result.latency * 1000, 1),
        )
        return result

    # --- shutdown ----------------------------------------------------------------------------------------

    async def stop(self, drain_timeout: float) -> None:
        """Stop scheduling; give in-flight attempts `drain_timeout` seconds; cancel the rest (they stay pending)."""
        self._stopping = True
        self._wake.set()
        if self.inflight:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_timeout):
                    await self._idle.wait()
        for w in [*self._workers, *self._hold_retries]:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        while self._saving is not None:  # outcomes already known are worth saving: fewer repeats after restart
            await asyncio.gather(self._saving, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


def _retry_after(value: str | None, wall: float) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - wall)
