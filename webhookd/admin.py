"""The admin API on the unix socket (CONTRACT §8); the CLI is its thin client."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import msgspec
from aiohttp import web

from webhookd import __version__
from webhookd.api_types import TOTAL_HEADER
from webhookd.config import redact_url
from webhookd.listener import error_response, json_response
from webhookd.logs import get_logger
from webhookd.payloads import rfc3339, rfc3339_opt
from webhookd.states import DELIVERY_STATUSES, DeliveryStatus

if TYPE_CHECKING:
    from webhookd.dispatch import Dispatcher, EndpointRuntime
    from webhookd.presence import PresenceEngine
    from webhookd.store import DeliveryStore, EndpointRow

log = get_logger("webhookd.admin")


class AdminAPI:
    """The parts it answers from: the presence engine (devices), the store (counts, listings) and the
    dispatcher (endpoints and what operators do to them)."""

    def __init__(
        self,
        engine: PresenceEngine,
        store: DeliveryStore,
        dispatcher: Dispatcher,
        *,
        started_wall: float,
        started_mono: float,
        metrics: Callable[[], Awaitable[bytes]] | None = None,
    ) -> None:
        # `status` of the MQTT connection (None: no `mqtt:` in the config); the daemon sets it.
        self.mqtt_status: Callable[[], dict[str, Any] | None] = lambda: None
        self.engine = engine
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
        r.add_get("/v1/devices/{id:.+}", self.device)  # MQTT ids may hold '/' (URL-encoded or not)
        r.add_get("/v1/endpoints", self.endpoints)
        r.add_post("/v1/endpoints/{name}/enable", self.enable)
        r.add_post("/v1/endpoints/{name}/disable", self.disable)
        r.add_post("/v1/endpoints/{name}/test", self.test)
        r.add_get("/v1/deliveries", self.deliveries)
        r.add_post("/v1/deliveries/replay", self.replay)
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

    def _device(self, dev_id: str) -> dict[str, Any] | None:
        dev = self.engine.devices.get(dev_id)
        if dev is None:
            return None
        return {
            "id": dev.id,
            "name": dev.name,
            "state": dev.state,
            "address": dev.address,
            "owner": dev.owner,
            "last_seen": rfc3339_opt(dev.last_seen),
            "source": dev.source,
        }

    async def devices(self, request: web.Request) -> web.Response:
        state = request.query.get("state")
        devices = self.engine.devices
        ids = sorted(i for i, dev in devices.items() if state is None or dev.state == state)
        return json_response(200, [self._device(i) for i in ids])

    async def device(self, request: web.Request) -> web.Response:
        dev = self._device(request.match_info["id"])
        if dev is None:
            return error_response(404, "unknown device")
        return json_response(200, dev)

    @staticmethod
    def _entry(name: str, rt: EndpointRuntime | None, row: EndpointRow | None, per: dict[str, int]) -> dict[str, Any]:
        """One endpoint as the API shows it; `rt` None: known to the store only (not in the config)."""
        reason = row.disabled_reason if row is not None and row.disabled else None
        if rt is None:
            reason = "not in config"
        return {
            "name": name,
            "url": redact_url(rt.cfg.url) if rt is not None else "",
            "enabled": rt is not None and not rt.row.disabled,
            "disabled_reason": reason,
            "consecutive_failures": row.consecutive_failures if row is not None else 0,
            **{s: per.get(s, 0) for s in DELIVERY_STATUSES},
            "last_error": row.last_error if row is not None else None,
        }

    async def endpoints(self, request: web.Request) -> web.Response:
        counts = await self.store.delivery_counts()
        rows = await self.store.load_endpoints()
        live = self.dispatcher.endpoints
        out = [self._entry(name, rt, rt.row, counts.get(name, {})) for name, rt in live.items()]
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
        try:
            body = msgspec.json.decode(await request.read())
        except msgspec.DecodeError:
            return error_response(400, "malformed JSON")
        if not isinstance(body, dict):
            return error_response(400, "expected a JSON object")
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

    async def metrics(self, request: web.Request) -> web.Response:
        if self.metrics_text is None:
            return error_response(404, "metrics are not enabled")
        # aiohttp refuses content_type= together with a Content-Type header: the header alone carries version=.
        return web.Response(
            body=await self.metrics_text(),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )
