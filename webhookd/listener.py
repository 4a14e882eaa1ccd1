"""The heartbeat API (CONTRACT §4): validation, auth and answers; the state logic lives in the Tracker.

Every bad input is answered with a 4xx JSON error before anything is recorded. A batch is validated whole
before any of it is applied.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import logging
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from webhookd.logs import get_logger
from webhookd.presence import REPORTED_STATES, Heartbeat
from webhookd.store import StoreError
from webhookd.tracker import Tracker

if TYPE_CHECKING:
    from webhookd.hub import Hub

log = get_logger("webhookd.listener")


class _BadRequestFilter(logging.Filter):
    """aiohttp logs every malformed HTTP request it answers with a 400 (bad request line, header, chunking) via
    `logger.exception` on `aiohttp.server`: error level and a traceback each, so anyone who can connect could
    fill the journal with them. They are the client's fault: kept as one debug line, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        record.msg, record.args = "bad_http_request", ()
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text = None, None
        record.error = str(exc.message).split("\n", 1)[0][:200]
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def quiet_bad_requests() -> None:
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _BadRequestFilter) for f in server.filters):
        server.addFilter(_BadRequestFilter())


DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
MAX_BATCH = 1000
MAX_TEXT = 256
BODY_TIMEOUT = 30.0  # seconds to receive a request body once its head has arrived
FIELDS = frozenset(("device", "name", "state", "address", "owner"))
# The query parameters each heartbeat route takes; any other is refused, like an unknown JSON field. `token` is
# known everywhere (a POST's ?token= is not honoured, but answering it 400 rather than 401 would say less).
BY_PATH_QUERY = frozenset(("state", "token"))
BODY_QUERY = frozenset(("token",))
# How the config spells sizes (webhookd.config.units.parse_size), largest unit first.
_SIZE_UNITS = (
    ("TiB", 1024**4),
    ("GiB", 1024**3),
    ("MiB", 1024**2),
    ("KiB", 1024),
    ("TB", 1000**4),
    ("GB", 1000**3),
    ("MB", 1000**2),
    ("KB", 1000),
)

BODY_QUERY_HINT = "a heartbeat's fields go in the JSON body"
GET_HEARTBEAT_HINT = (
    "method not allowed: to report by GET use /v1/heartbeat/{device} (optionally ?state=...); "
    "/v1/heartbeat takes POST with a JSON body"
)

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


class BadInput(Exception):
    def __init__(self, status: int, error: str, field: str | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.field = field


def json_response(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=_encoder.encode(body), content_type="application/json")


def error_response(status: int, error: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"error": error}
    if field is not None:
        body["field"] = field
    return json_response(status, body)


def not_allowed(allow: str, error: str = "method not allowed") -> web.Response:
    response = error_response(405, error)
    response.headers["Allow"] = allow
    return response


def size_text(n: int) -> str:
    """Bytes as the config file would spell them: ``262144`` -> ``256KiB``, ``3000`` -> ``3KB``, ``1500`` ->
    ``1500B`` (the exact unit giving the smallest number; binary on a tie)."""
    best = f"{n}B"
    quotient = n
    for unit, factor in _SIZE_UNITS:
        if n > 0 and n % factor == 0 and n // factor < quotient:
            best, quotient = f"{n // factor}{unit}", n // factor
    return best


def check_query(request: web.BaseRequest, known: frozenset[str], hint: str) -> None:
    """Refuse a query parameter the route does not take (a typo such as ?stat= would otherwise be ignored)."""
    if not request.query_string:
        return
    for key in request.query:
        if key not in known:
            shown = key[:64].encode("utf-8", "backslashreplace").decode()  # no lone surrogate reaches the encoder
            raise BadInput(400, f"unknown query parameter {shown!r} ({hint})", shown)


def _text(obj: dict[str, Any], key: str, prefix: str, limit: int = MAX_TEXT) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadInput(400, f"{key} must be a string", prefix + key)
    if len(value) > limit:
        raise BadInput(400, f"{key} is longer than {limit} characters", prefix + key)
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise BadInput(400, f"{key} contains control characters", prefix + key)
    return value


def parse_device_id(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise BadInput(400, "device must be a string", field)
    if DEVICE_ID.fullmatch(value) is None:
        raise BadInput(400, "device must match ^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$", field)
    return value


def parse_state(value: object, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in REPORTED_STATES:
        raise BadInput(400, "state must be one of " + ", ".join(sorted(REPORTED_STATES)), field)
    return value


def parse_address(value: object, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise BadInput(400, "address must be an IP address", field)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise BadInput(400, "address must be an IP address", field) from None


def parse_heartbeat(
    obj: object, peer: str | None, prefix: str = "", device: str | None = None, source: str = "http"
) -> Heartbeat:
    if not isinstance(obj, dict):
        raise BadInput(400, "a heartbeat must be a JSON object", prefix.rstrip(".") or None)
    for key in obj:
        if key not in FIELDS:
            raise BadInput(400, f"unknown field {str(key)[:64]!r}", prefix + str(key)[:64])
    if device is None:
        if "device" not in obj:
            raise BadInput(400, "device is required", prefix + "device")
        device = parse_device_id(obj["device"], prefix + "device")
    elif "device" in obj and obj["device"] != device:
        raise BadInput(400, "device in the body differs from the path", prefix + "device")
    return Heartbeat(
        device=device,
        state=parse_state(obj.get("state"), prefix + "state"),
        name=_text(obj, "name", prefix),
        address=parse_address(obj.get("address"), prefix + "address") or peer,
        owner=_text(obj, "owner", prefix),
        source=source,
    )


@functools.lru_cache(maxsize=4096)  # a LAN has few peers; parsing one costs more than the rest of a heartbeat
def _normalised(remote: str) -> str | None:
    try:
        return str(ipaddress.ip_address(remote))
    except ValueError:
        return None


def _peer(request: web.BaseRequest) -> str | None:
    remote = request.remote
    return _normalised(remote) if remote else None


class HeartbeatAPI:
    def __init__(self, tracker: Tracker, tokens: Sequence[str], max_body: int, healthy: Callable[[], bool]) -> None:
        self.tracker = tracker
        self.configure(tokens)
        self.max_body = max_body
        self.too_large = f"request body larger than {size_text(max_body)} (listen.max_body)"
        self.body_timeout = BODY_TIMEOUT
        self.healthy = healthy
        # metrics hooks: heartbeats applied (count), and each 4xx answer (status)
        self.on_heartbeats: Callable[[int], None] | None = None
        self.on_rejected: Callable[[int], None] | None = None
        self.hub: Hub | None = None  # a hub (hub:): it serves the relay routes and refuses the device routes

    def configure(self, tokens: Sequence[str]) -> None:
        """What a reload may change here: the tokens."""
        self.tokens = [t.encode() for t in tokens]

    def server(self, **kwargs: Any) -> web.Server:
        """The heartbeat port on aiohttp's low-level server: no router or middleware chain on the hot path
        (measured faster than a one-route web.Application; see bench/)."""
        quiet_bad_requests()
        return web.Server(self._serve, **kwargs)

    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        response: web.StreamResponse
        try:
            if request.path == "/v1/heartbeat" and request.method == "POST" and self.hub is None:  # the hot path
                response = await self.single(request)
            elif self.hub is not None and (served := await self.hub.serve(request, self)) is not None:
                response = served
            else:
                response = await self._route(request)
        except BadInput as e:
            response = error_response(e.status, e.error, e.field)
        except StoreError:
            response = error_response(503, "store unavailable")
        except Exception:
            log.exception("request_failed", path=request.path)
            response = error_response(500, "internal error")
        if self.on_rejected is not None and 400 <= response.status < 500:
            self.on_rejected(response.status)
        return response

    async def _route(self, request: web.BaseRequest) -> web.StreamResponse:
        path, method = request.path, request.method
        if path == "/v1/heartbeat":  # POST was served by _serve; any other method is refused
            if method in ("GET", "HEAD"):
                return not_allowed("POST", GET_HEARTBEAT_HINT)
            return not_allowed("POST")
        if path.startswith("/v1/heartbeat/"):
            if method in ("GET", "POST"):
                return await self.by_path(request, path[len("/v1/heartbeat/") :])
            return not_allowed("GET, POST")
        if path == "/v1/heartbeats":
            if method == "POST":
                return await self.batch(request)
            return not_allowed("POST")
        if path == "/healthz":
            if method in ("GET", "HEAD"):
                return await self.healthz(request)
            return not_allowed("GET, HEAD")
        return error_response(404, "not found")

    def _authorize(self, request: web.BaseRequest) -> None:
        if not self.tokens:
            return
        given = b""
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip().encode()
        elif request.method == "GET":
            given = request.query.get("token", "").encode()
        ok = False
        for token in self.tokens:
            # Compare with every token, always: the time taken says nothing about which one nearly matched.
            ok |= hmac.compare_digest(given, token)
        if not ok:
            raise BadInput(401, "missing or invalid token")

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        content = request.content
        first = await content.read(self.max_body + 1)
        if content.at_eof() or not first:
            body = first
        else:
            buf = bytearray(first)
            while len(buf) <= self.max_body and (chunk := await content.read(self.max_body + 1 - len(buf))):
                buf += chunk
            body = bytes(buf)
        if len(body) > self.max_body:
            raise BadInput(413, self.too_large)
        return body

    async def read_raw(self, request: web.BaseRequest) -> bytes:
        """The request body, bounded in size (chunked bodies included) and in time: a client dribbling its body
        would otherwise hold the connection and this handler forever."""
        if request.content_length is not None and request.content_length > self.max_body:
            raise BadInput(413, self.too_large)
        try:
            if request.content.is_eof():
                return await self._read_body(request)  # all of it has arrived (the usual small heartbeat)
            async with asyncio.timeout(self.body_timeout):
                return await self._read_body(request)
        except TimeoutError:
            raise BadInput(408, f"request body not received within {self.body_timeout:g}s") from None
        except HttpProcessingError:  # bad chunking or Content-Encoding, a body shorter than its Content-Length
            raise BadInput(400, "malformed request body") from None
        except ConnectionError:  # the client went away mid-body: its problem, nobody reads this answer
            raise BadInput(400, "connection lost before the body was complete") from None

    @staticmethod
    def decode_json(request: web.BaseRequest, raw: bytes) -> object:
        """A body read by `read_raw` as JSON (415 for another Content-Type, 400 when empty or malformed)."""
        ctype = request.content_type
        if ctype != "application/json" and not ctype.endswith("+json"):
            raise BadInput(415, "Content-Type must be application/json")
        if not raw:
            raise BadInput(400, "empty body")
        try:
            return _decoder.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            raise BadInput(400, "malformed JSON") from None

    async def _json_body(self, request: web.BaseRequest, required: bool) -> object:
        raw = await self.read_raw(request)
        if not raw and not required:
            return None
        return self.decode_json(request, raw)

    @staticmethod
    def _answer(results: Sequence[tuple[str, str, bool]]) -> list[dict[str, Any]]:
        return [{"device": d, "state": s, "changed": c} for d, s, c in results]

    async def _apply(self, hbs: list[Heartbeat]) -> Sequence[tuple[str, str, bool]]:
        results = await self.tracker.heartbeats(hbs)
        if self.on_heartbeats is not None:
            self.on_heartbeats(len(hbs))
        return results

    async def _apply_one(self, hb: Heartbeat) -> web.Response:
        result = self.tracker.heartbeat_nowait(hb)  # liveness: no coroutine, no commit
        if not isinstance(result, tuple):
            result = await result
        if self.on_heartbeats is not None:
            self.on_heartbeats(1)
        return json_response(200, {"device": result[0], "state": result[1], "changed": result[2]})

    async def single(self, request: web.BaseRequest) -> web.Response:
        self._authorize(request)
        check_query(request, BODY_QUERY, BODY_QUERY_HINT)
        return await self._apply_one(parse_heartbeat(await self._json_body(request, True), _peer(request)))

    async def by_path(self, request: web.BaseRequest, device_part: str) -> web.Response:
        self._authorize(request)
        check_query(request, BY_PATH_QUERY, "this route takes ?state= and ?token=")
        device = parse_device_id(device_part, "device")
        body = await self._json_body(request, False) if request.method == "POST" else None
        obj: dict[str, Any] = dict(body) if isinstance(body, dict) else {}
        if body is not None and not isinstance(body, dict):
            raise BadInput(400, "a heartbeat must be a JSON object")
        if "state" in request.query:
            obj["state"] = request.query["state"]
        return await self._apply_one(parse_heartbeat(obj, _peer(request), device=device))

    async def batch(self, request: web.BaseRequest) -> web.Response:
        self._authorize(request)
        check_query(request, BODY_QUERY, BODY_QUERY_HINT)
        body = await self._json_body(request, True)
        if not isinstance(body, list):
            raise BadInput(400, "a batch must be a JSON array of heartbeats")
        if len(body) > MAX_BATCH:
            raise BadInput(400, f"a batch holds at most {MAX_BATCH} heartbeats")
        peer = _peer(request)
        hbs = [parse_heartbeat(item, peer, f"[{i}].") for i, item in enumerate(body)]
        return json_response(200, self._answer(await self._apply(hbs)))

    async def healthz(self, request: web.BaseRequest) -> web.Response:
        if self.healthy():
            return json_response(200, {"status": "ok"})
        return json_response(503, {"status": "unhealthy", "error": "store unavailable"})
