"""The admin API on the unix socket (CONTRACT §8); the CLI is its thin client."""

from __future__ import annotations

import os
import pwd
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

import msgspec
from aiohttp import web

from webhookd import __version__
from webhookd.api_types import NOT_A_HUB, TOTAL_HEADER
from webhookd.config import parse_duration, redact_url
from webhookd.listener import error_response, json_response
from webhookd.logs import get_logger
from webhookd.mutes import MuteRule
from webhookd.payloads import rfc3339, rfc3339_opt
from webhookd.presence import Device
from webhookd.states import DELIVERY_STATUSES, DeliveryStatus
from webhookd.store.api import StoreError

if TYPE_CHECKING:
    from webhookd.dispatch import Dispatcher, EndpointRuntime
    from webhookd.hub import Hub
    from webhookd.presence import PresenceEngine
    from webhookd.store import DeliveryStore, EndpointRow
    from webhookd.tracker import Tracker

log = get_logger("webhookd.admin")

MATCH_MAX = 256  # characters of a mute's match
REASON_MAX = 500  # characters of a mute's reason


def peer_user(request: web.Request) -> str | None:
    """Who is on the other end of the admin socket: the user name of its SO_PEERCRED uid (`uid 1234` when
    the uid has no name), or None when the transport cannot tell (not a unix socket)."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    peercred = getattr(socket, "SO_PEERCRED", None)
    if sock is None or peercred is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, peercred, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", raw)
    except (OSError, struct.error):
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


_REPLAY_FIELDS = frozenset({"ids", "endpoint", "status"})


async def _object(request: web.Request, allowed: frozenset[str]) -> dict[str, Any] | web.Response:
    """The request's JSON object, or the 400 answer saying what is wrong with it."""
    try:
        body = msgspec.json.decode(await request.read())
    except msgspec.DecodeError:
        return error_response(400, "malformed JSON")
    if not isinstance(body, dict):
        return error_response(400, "expected a JSON object")
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        return error_response(400, f"unknown field {unknown[0]!r} (expected {', '.join(sorted(allowed))})")
    return body


def _match(body: dict[str, Any]) -> str | web.Response:
    match = body.get("match")
    if not isinstance(match, str) or not match.strip():
        return error_response(400, "match must be a device id or a glob (printer-*)", "match")
    if len(match) > MATCH_MAX or any(c in match for c in "\n\r\t\0"):
        return error_response(400, f"match must be one line of at most {MATCH_MAX} characters", "match")
    return match


def _stale(device_id: str, offline_gateways: set[str]) -> bool:
    """Is the device relayed by one of these gateways (`<gateway>:<id>`; a gateway's name may hold `:` too)?"""
    if not offline_gateways:
        return False
    at = device_id.find(":")
    while at > 0:
        if device_id[:at] in offline_gateways:
            return True
        at = device_id.find(":", at + 1)
    return False


class AdminAPI:
    """The parts it answers from: the presence engine (devices), the store (counts, listings) and the
    dispatcher (endpoints and what operators do to them)."""

    def __init__(
        self,
        engine: PresenceEngine,
        store: DeliveryStore,
        dispatcher: Dispatcher,
        *,
        tracker: Tracker,
        started_wall: float,
        started_mono: float,
        metrics: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        # `status` of the MQTT connection (None: no `mqtt:` in the config); the daemon sets it.
        self.mqtt_status: Callable[[], dict[str, Any] | None] = lambda: None
        self.hub: Hub | None = None  # a hub (the daemon sets it): its gateways, and `stale` on their devices
        self.engine = engine
        self.tracker = tracker
        self.store = store
        self.dispatcher = dispatcher
        self.started_wall = started_wall
        self.started_mono = started_mono
        self.metrics_text = metrics

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors], client_max_size=1024 * 1024)
        r = app.router
        r.add_get("/v1/status", self.status)
        r.add_get("/v1/devices", self.devices)
        r.add_post("/v1/devices/mute", self.mute)
        r.add_post("/v1/devices/unmute", self.unmute)
        r.add_get("/v1/devices/{id:.+}", self.device)  # MQTT ids may hold '/' (URL-encoded or not)
        r.add_delete("/v1/devices/{id:.+}", self.forget)
        r.add_get("/v1/endpoints", self.endpoints)
        r.add_post("/v1/endpoints/{name}/enable", self.enable)
        r.add_post("/v1/endpoints/{name}/disable", self.disable)
        r.add_post("/v1/endpoints/{name}/test", self.test)
        r.add_get("/v1/deliveries", self.deliveries)
        r.add_post("/v1/deliveries/replay", self.replay)
        r.add_get("/v1/gateways", self.gateways)
        r.add_get("/metrics", self.metrics)
        return app

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:
            return error_response(e.status, "not found" if e.status == 404 else e.reason)
        except Exception:
            log.exception("admin_request_failed", path=request.path)
            return error_response(500, "internal error")

    async def status(self, request: web.Request) -> web.Response:
        counts = await self.store.delivery_counts()
        totals: dict[str, int] = dict.fromkeys(DELIVERY_STATUSES, 0)
        for per in counts.values():
            for status, n in per.items():
                totals[status] = totals.get(status, 0) + n
        devices = self.engine.counts()
        devices["total"] = sum(devices.values())
        eps = self.dispatcher.endpoints.values()
        return json_response(
            200,
            {
                "version": __version__,
                "pid": os.getpid(),
                "started_at": rfc3339(self.started_wall),
                "uptime_s": round(time.monotonic() - self.started_mono, 3),
                "devices": devices,
                "endpoints": {
                    "enabled": sum(1 for rt in eps if not rt.row.disabled),
                    "disabled": sum(1 for rt in eps if rt.row.disabled),
                },
                "deliveries": totals,
                "store": {"healthy": self.store.healthy},
                "mqtt": self._mqtt(),
            },
        )

    def _mqtt(self) -> dict[str, Any] | None:
        mqtt = self.mqtt_status()
        if mqtt is None:
            return None
        return {**mqtt, "since": rfc3339_opt(mqtt["since"])}

    def _device(
        self,
        dev_id: str,
        rules: list[MuteRule] | None = None,
        wall: float = 0.0,
        offline_gateways: set[str] | None = None,
        devices: Mapping[str, Device] | None = None,
    ) -> dict[str, Any] | None:
        """The device document; `rules`: the mutes in force at `wall` (None: looked up now); on a hub,
        `offline_gateways` says which devices are stale (`<gateway>:<id>` of an offline gateway)."""
        dev = (self.engine.devices if devices is None else devices).get(dev_id)
        if dev is None:
            return None
        if rules is None:
            wall = time.time()
            rules = self.tracker.mutes.active(wall)
        covering = [r for r in rules if r.covers(dev_id, wall)]
        until: float | None = None
        if covering and all(r.until is not None for r in covering):
            until = max(r.until for r in covering if r.until is not None)
        return {
            "id": dev.id,
            "name": dev.name,
            "state": dev.state,
            "address": dev.address,
            "owner": dev.owner,
            "last_seen": rfc3339_opt(dev.last_seen),
            "muted": bool(covering),
            "muted_until": rfc3339_opt(until),
            "source": dev.source,
            **({} if offline_gateways is None else {"stale": _stale(dev.id, offline_gateways)}),
        }

    async def _offline_gateways(self) -> set[str] | None:
        """On a hub, the gateways offline now (None elsewhere; none while the store cannot say)."""
        if self.hub is None:
            return None
        try:
            return await self.hub.offline()
        except StoreError:
            return set()

    async def devices(self, request: web.Request) -> web.Response:
        state = request.query.get("state")
        devices = await self._known()
        ids = sorted(i for i, dev in devices.items() if state is None or dev.state == state)
        wall = time.time()
        rules = self.tracker.mutes.active(wall)
        offline = await self._offline_gateways()
        return json_response(200, [self._device(i, rules, wall, offline, devices) for i in ids])

    async def _known(self) -> Mapping[str, Device]:
        """This process's devices; on a hub of several processes the store's, so that every process lists the
        whole hub (each took only the relays that reached it)."""
        if self.dispatcher.hub is None:
            return self.engine.devices
        return {d.id: d for d in await self.store.load_devices()}

    async def device(self, request: web.Request) -> web.Response:
        wall = time.time()
        dev = self._device(
            request.match_info["id"],
            self.tracker.mutes.active(wall),
            wall,
            await self._offline_gateways(),
            await self._known(),
        )
        if dev is None:
            return error_response(404, "unknown device")
        return json_response(200, dev)

    # --- operators' controls (mute, unmute, forget) ------------------------------------------------------

    def _covered(self, rule: MuteRule, wall: float) -> list[str]:
        return sorted(i for i in self.engine.devices if rule.covers(i, wall))

    @staticmethod
    def _rule(rule: MuteRule, devices: list[str]) -> dict[str, Any]:
        return {
            "match": rule.match,
            "until": rfc3339_opt(rule.until),
            "reason": rule.reason,
            "created_at": rfc3339(rule.created_at),
            "created_by": rule.created_by,
            "devices": devices,
        }

    async def _prune_mutes(self, wall: float) -> None:
        """Expired mutes leave the store too (they are ignored already; this keeps the table small)."""
        gone = self.tracker.mutes.prune(wall)
        if gone:
            await self.store.delete_mutes([r.match for r in gone])

    async def mute(self, request: web.Request) -> web.Response:
        """``{"match", "for"?, "reason"?}`` -> the rule and the devices it covers now."""
        body = await _object(request, frozenset({"match", "for", "reason"}))
        if isinstance(body, web.Response):
            return body
        match = _match(body)
        if isinstance(match, web.Response):
            return match
        wall = time.time()
        until: float | None = None
        if body.get("for") is not None:
            try:
                seconds = parse_duration(body["for"])
            except ValueError as e:
                return error_response(400, f"for: {e} (a duration: 30m, 2h, 1d)", "for")
            if seconds <= 0:
                return error_response(400, "for must be longer than 0s (leave it out to mute until unmute)", "for")
            until = wall + seconds
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            return error_response(400, "reason must be a string", "reason")
        if isinstance(reason, str) and len(reason) > REASON_MAX:
            return error_response(400, f"reason must be at most {REASON_MAX} characters", "reason")
        if isinstance(reason, str) and any(ord(ch) < 32 or ord(ch) == 127 for ch in reason):
            # The CLI prints it and the log keeps it: no line breaks or terminal escapes in an operator's words.
            return error_response(400, "reason must be one line without control characters", "reason")
        who = peer_user(request)
        rule = MuteRule(match, until, reason or None, wall, who)
        try:
            await self._prune_mutes(wall)
            await self.store.save_mute(rule)
        except StoreError as e:
            return error_response(503, f"the mute was not saved: {e}")
        replaced = self.tracker.mutes.add(rule)
        covered = self._covered(rule, wall)
        log.info(
            "device_muted",
            match=match,
            devices=len(covered),
            until=rfc3339_opt(until),
            reason=rule.reason,
            by=who,
            replaced=replaced is not None and replaced.live(wall),
        )
        return json_response(200, self._rule(rule, covered))

    async def unmute(self, request: web.Request) -> web.Response:
        """``{"match"}``: removes the rule with exactly that match -> the rule and the devices it covered."""
        body = await _object(request, frozenset({"match"}))
        if isinstance(body, web.Response):
            return body
        match = _match(body)
        if isinstance(match, web.Response):
            return match
        wall = time.time()
        mutes = self.tracker.mutes
        rule = mutes.get(match)
        if rule is None or not rule.live(wall):
            by = [r.match for r in mutes.covering_all(match, wall)]
            if by:
                named = ", ".join(repr(m) for m in by)
                those = "that" if len(by) == 1 else "those"
                return error_response(409, f"{match} is muted by {named}: unmute {those}")
            return error_response(404, f"no mute for {match!r}")
        try:
            await self.store.delete_mutes([match])
        except StoreError as e:
            return error_response(503, f"the mute was not removed: {e}")
        if mutes.get(match) is rule:
            mutes.remove(match)
        covered = self._covered(rule, wall)
        log.info("device_unmuted", match=match, devices=len(covered), reason=rule.reason, by=peer_user(request))
        return json_response(200, self._rule(rule, covered))

    async def forget(self, request: web.Request) -> web.Response:
        """Drop a device (its state, timer and the mute of its id) -> the device as it was."""
        dev_id = request.match_info["id"]
        # On a hub of several processes the store says what is known (the listings show it): a device whose
        # relays reached other processes only is not in this one's memory, and one forgotten through another
        # process may still be.
        doc = self._device(dev_id, devices=await self._known())
        elsewhere = self.dispatcher.hub is not None and dev_id not in self.engine.devices
        if doc is None:
            return error_response(404, f"unknown device {dev_id!r}")
        had_mute = self.tracker.mutes.get(dev_id) is not None
        try:
            if elsewhere:
                # The store drops its row and mute and tells the other processes (their mutes follow); none
                # of them times a relayed device, so nothing else of it runs anywhere.
                known = await self.store.forget_device(dev_id)
                self.tracker.mutes.remove(dev_id)
            else:
                known = await self.tracker.forget(dev_id)
        except StoreError as e:
            return error_response(503, f"the device was not forgotten: {e}")
        if not known:  # forgotten meanwhile by another call
            return error_response(404, f"unknown device {dev_id!r}")
        log.info("device_forgotten", device=dev_id, state=doc["state"], mute_removed=had_mute, by=peer_user(request))
        return json_response(200, doc)

    @staticmethod
    def _entry(name: str, rt: EndpointRuntime | None, row: EndpointRow | None, per: dict[str, int]) -> dict[str, Any]:
        """One endpoint as the API shows it; `rt` None: known to the store only (not in the config)."""
        reason = row.disabled_reason if row is not None and row.disabled else None
        if rt is None:
            reason = "not in config"
        return {
            "name": name,
            "url": redact_url(rt.cfg.url) if rt is not None else "",
            "enabled": rt is not None and not (row.disabled if row is not None else rt.row.disabled),
            "disabled_reason": reason,
            "consecutive_failures": row.consecutive_failures if row is not None else 0,
            **{s: per.get(s, 0) for s in DELIVERY_STATUSES},
            "last_error": row.last_error if row is not None else None,
        }

    async def endpoints(self, request: web.Request) -> web.Response:
        counts = await self.store.delivery_counts()
        rows = await self.store.load_endpoints()
        live = self.dispatcher.endpoints
        # On a hub the endpoint row is shared: the store's copy, the same through every process.
        shared = self.dispatcher.hub is not None
        out = [
            self._entry(name, rt, rows.get(name, rt.row) if shared else rt.row, counts.get(name, {}))
            for name, rt in live.items()
        ]
        for name in sorted(n for n in set(rows) | set(counts) if n not in live):
            out.append(self._entry(name, None, rows.get(name), counts.get(name, {})))
        return json_response(200, out)

    async def _one_endpoint(self, rt: EndpointRuntime) -> web.Response:
        counts = await self.store.delivery_counts()
        return json_response(200, self._entry(rt.cfg.name, rt, rt.row, counts.get(rt.cfg.name, {})))

    async def enable(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        rt = await self.dispatcher.enable(name)
        if rt is None:
            return error_response(404, f"unknown endpoint {name!r}")
        return await self._one_endpoint(rt)

    async def disable(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        live = self.dispatcher.endpoints.get(name)
        if live is not None and live.cfg.relay:  # the relay to a hub holds nothing back (remove upstream: instead)
            return error_response(409, f"{name!r} is the relay to the hub: it is never disabled")
        rt = await self.dispatcher.disable(name, "operator")
        if rt is None:
            return error_response(404, f"unknown endpoint {name!r}")
        return await self._one_endpoint(rt)

    async def test(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        result = await self.dispatcher.test(name)
        if result is None:
            return error_response(404, f"unknown endpoint {name!r}")
        return json_response(
            200,
            {
                "endpoint": name,
                "ok": result.ok,
                "status": result.status,
                "latency_ms": round(result.latency * 1000, 3),
                "error": result.error,
            },
        )

    async def deliveries(self, request: web.Request) -> web.Response:
        status = request.query.get("status") or None
        if status is not None and status not in DELIVERY_STATUSES:
            return error_response(400, "status must be one of " + ", ".join(DELIVERY_STATUSES))
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return error_response(400, "limit must be an integer")
        if not 1 <= limit <= 100_000:
            return error_response(400, "limit must be between 1 and 100000")
        endpoint = request.query.get("endpoint") or None
        rows = await self.store.list_deliveries(status, endpoint, limit)
        for row in rows:
            row["next_attempt_at"] = rfc3339_opt(row["next_attempt_at"]) if row["status"] == "pending" else None
            row["created_at"] = rfc3339_opt(row["created_at"])
        # The body stays the list the API promises; how many matched rides in a header, counted only when the
        # list was cut (one GROUP BY over the table, not paid by every listing).
        total = len(rows) if len(rows) < limit else await self._count(status, endpoint)
        response = json_response(200, rows)
        response.headers[TOTAL_HEADER] = str(total)
        return response

    async def _count(self, status: str | None, endpoint: str | None) -> int:
        counts = await self.store.delivery_counts()
        return sum(
            n
            for name, by_status in counts.items()
            if endpoint is None or name == endpoint
            for st, n in by_status.items()
            if status is None or st == status
        )

    async def replay(self, request: web.Request) -> web.Response:
        """``{"replayed": n, "held": h, "held_endpoints": {name: "disabled" | "not configured"}, "missing": [id]}``:
        ``replayed`` counts every row queued again, ``held`` those of them that wait for their endpoint."""
        body = await _object(request, _REPLAY_FIELDS)
        if isinstance(body, web.Response):
            return body
        ids = body.get("ids")
        if ids is not None:
            if not isinstance(ids, list) or not ids or not all(type(i) is int for i in ids):
                return error_response(400, "ids must be a non-empty list of integers")
            endpoint: str | None = None
            done = await self.dispatcher.replay(ids, None, None)
        else:
            endpoint, status = body.get("endpoint"), body.get("status", "dead")
            if not isinstance(endpoint, str) or not endpoint:
                return error_response(400, "give ids, or an endpoint (and a status)")
            if status not in DELIVERY_STATUSES:
                return error_response(400, "status must be one of " + ", ".join(DELIVERY_STATUSES))
            if endpoint not in self.dispatcher.endpoints and endpoint not in await self.store.endpoint_names():
                return error_response(404, f"unknown endpoint {endpoint!r}")
            done = await self.dispatcher.replay(None, endpoint, cast(DeliveryStatus, status))
        held_endpoints: dict[str, str] = {}  # name -> why its rows wait: "disabled" or "not configured"
        if done.held:
            # Whose rows they are: the endpoint asked for; by ids, the one endpoint that is disabled or removed
            # (with several of those the store does not say which rows were whose, and none is named).
            eps = self.dispatcher.endpoints
            waiting = [endpoint] if endpoint is not None else sorted(await self.store.endpoint_names() | set(eps))
            waiting = [n for n in waiting if n not in eps or eps[n].row.disabled]
            if len(waiting) == 1:
                held_endpoints[waiting[0]] = "disabled" if waiting[0] in eps else "not configured"
        log.info("deliveries_replayed", count=done.total, held=done.held, missing=len(done.missing))
        return json_response(
            200,
            {"replayed": done.total, "held": done.held, "held_endpoints": held_endpoints, "missing": done.missing},
        )

    async def gateways(self, request: web.Request) -> web.Response:
        """A hub's gateways (every configured one; never heard from: state unknown); 404 elsewhere."""
        if self.hub is None:
            return error_response(404, NOT_A_HUB)
        return json_response(
            200,
            [
                {
                    "name": g.name,
                    "state": g.state,
                    "last_seen": rfc3339_opt(g.last_seen),
                    "address": g.address,
                    "devices": g.devices,
                    "relayed": g.relayed,
                    "last_error": g.last_error,
                }
                for g in await self.hub.listing()
            ],
        )

    async def metrics(self, request: web.Request) -> web.Response:
        if self.metrics_text is None:
            return error_response(404, "metrics are not enabled")
        # aiohttp refuses content_type= together with a Content-Type header: the header alone carries version=.
        return web.Response(
            body=await self.metrics_text(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )
