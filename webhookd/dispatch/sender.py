"""The transport: one aiohttp session, a resolver that refuses link-local answers, and one signed attempt.

`Sender.attempt` never raises for anything the attempt itself ran into: a refused connection, a timeout, a TLS
failure or an exception from inside aiohttp (say, a header it refuses) all come back as a failed
AttemptResult, which the retry policy then counts like any other failure. Its `error` is a short reason a person
reads at a glance (it becomes `last_error`): `connection refused (127.0.0.1:8480)`, `DNS: hooks.example.com not
found`, `timeout after 5s`, `TLS: certificate verify failed (...)`, `HTTP 503`, `redirect 302 not followed`,
`connection reset`, `blocked: link-local address`; anything unforeseen is `<TypeName>: <first line>`. Its
`detail` keeps the whole story for the log line: the exception's own text and its causes, or the response's reason
phrase and a redirect's Location (never a response body, and never the URL's query or password).
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict
from yarl import URL

from webhookd import __version__
from webhookd.config import EndpointConfig
from webhookd.config.units import is_link_local
from webhookd.payloads import content_type
from webhookd.signing import signature_headers

USER_AGENT = f"webhookd/{__version__}"
MAX_RESPONSE_READ = 64 * 1024  # read at most this much of a response body, whatever its size


@dataclass(frozen=True, slots=True)
class AttemptResult:
    ok: bool
    status: int | None
    error: str | None
    latency: float
    retry_after: float | None = None
    detail: str | None = None  # the full story behind `error`, for the log line (None on success)


class Target:
    """What every attempt at one endpoint needs, worked out once per config."""

    __slots__ = ("blocked_literal", "cfg", "headers", "ssl", "timeout", "url")

    def __init__(self, cfg: EndpointConfig) -> None:
        self.cfg = cfg
        self.ssl: ssl.SSLContext | bool
        if not cfg.tls_verify:
            self.ssl = False
        elif cfg.ca_file is not None:
            self.ssl = ssl.create_default_context(cafile=str(cfg.ca_file))
        else:
            self.ssl = True  # aiohttp's default verification
        self.timeout = aiohttp.ClientTimeout(total=cfg.timeout)
        # Case-insensitive: standard-webhooks' own `webhook-id` must replace ours, not be sent twice.
        self.headers: CIMultiDict[str] = CIMultiDict(cfg.headers)
        self.headers["Content-Type"] = content_type(cfg)
        self.url = URL(cfg.url)
        host = (urlsplit(cfg.url).hostname or "").strip("[]")
        self.blocked_literal = not cfg.allow_link_local and is_link_local(host)


class LinkLocalBlocked(OSError):
    """A host that resolves only to link-local addresses, refused by GuardedResolver."""

    def __init__(self, host: str) -> None:
        super().__init__(
            errno.EACCES, f"{host} resolves only to link-local addresses (blocked; allow_link_local: true allows it)"
        )
        self.host = host


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
        kept = [r for r in results if not is_link_local(r["host"])]
        if not kept:
            raise LinkLocalBlocked(host)  # aiohttp wraps it in a ClientConnectorDNSError; describe() finds it
        return kept

    async def close(self) -> None:
        await self._inner.close()


class Sender:
    def __init__(self, default_timeout: float, *, wall: Callable[[], float] = time.time) -> None:
        self._default_timeout = default_timeout
        self._wall = wall
        self._resolver = GuardedResolver()
        self._session: aiohttp.ClientSession | None = None

    def allow_link_local(self, endpoints: Iterable[EndpointConfig]) -> None:
        self._resolver.allowed_hosts = {
            (urlsplit(e.url).hostname or "").lower() for e in endpoints if e.allow_link_local
        }

    def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, resolver=self._resolver, ttl_dns_cache=60, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._default_timeout),
            headers={"User-Agent": USER_AGENT},
            auto_decompress=False,
            trust_env=False,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def attempt(
        self,
        target: Target,
        event_id: str,
        body: bytes,
        n: int,
        body_headers: Mapping[str, str] | None = None,
        *,
        ids: bool = True,
    ) -> AttemptResult:
        """POST `body` as attempt number `n` of event `event_id`, signed as the endpoint says. `body_headers`
        (a format's own, such as ntfy's Title) go along unless the endpoint's `headers` set them. `ids=False`:
        no Webhook-Id/Webhook-Attempt (a request that is no event's delivery, such as a gateway's heartbeat)."""
        if target.blocked_literal:
            host = target.url.host or ""
            detail = f"{host} is a link-local address (cloud metadata lives there): not attempted; "
            detail += "allow_link_local: true on the endpoint allows it"
            return AttemptResult(False, None, BLOCKED, 0.0, detail=detail)
        started = time.perf_counter()
        status: int | None = None  # known once the response head arrived
        try:
            assert self._session is not None, "Sender.open() was not called"
            headers = target.headers.copy()
            if ids:
                headers["Webhook-Id"] = event_id
                headers["Webhook-Attempt"] = str(n)
            for name, value in (body_headers or {}).items():
                headers.setdefault(name, value)
            headers.update(signature_headers(target.cfg, event_id, body, int(self._wall())))
            async with self._session.post(
                target.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=target.timeout,
                ssl=target.ssl,
            ) as resp:
                status = resp.status
                reason = resp.reason
                location = resp.headers.get("Location")
                retry_after = (
                    None if 200 <= status < 300 else parse_retry_after(resp.headers.get("Retry-After"), self._wall())
                )
                if resp.content_length is None or resp.content_length <= MAX_RESPONSE_READ:
                    # The answer counts once its body is complete (within the timeout; a reset fails it), and
                    # draining a small body lets the connection be reused. A large one is dropped unread.
                    remaining = MAX_RESPONSE_READ
                    while remaining > 0 and (chunk := await resp.content.read(remaining)):
                        remaining -= len(chunk)
        except Exception as e:  # anything inside aiohttp (or our headers): a failed attempt, never a crash
            error, detail = describe(e, target.cfg.timeout, status)
            latency = time.perf_counter() - started
            return AttemptResult(False, None, redact(error, target.url), latency, detail=redact(detail, target.url))
        latency = time.perf_counter() - started
        assert status is not None  # the response head arrived, or the except above returned
        if 200 <= status < 300:
            return AttemptResult(True, status, None, latency)
        # Never the response body: a receiver may echo the request, and with it the endpoint's secrets.
        detail = one_line(f"HTTP {status} {reason or ''}")
        if 300 <= status < 400:
            error = f"redirect {status} not followed"
            detail += f", Location: {safe_location(location)}" if location else ", no Location"
            detail += "; webhookd never follows redirects: point the endpoint's url at the new address"
        else:
            error = f"HTTP {status}"
        return AttemptResult(False, status, error, latency, retry_after, detail=detail[:DETAIL_MAX])


BLOCKED = "blocked: link-local address"
ERROR_MAX = 200  # characters of `error` (it becomes last_error and shows in tables)
DETAIL_MAX = 2000  # characters of `detail` (the log line)

# Connect errors by errno, in words; anything else is the OS's own strerror, lower-cased.
CONNECT_ERRNO = {
    errno.ECONNREFUSED: "connection refused",
    errno.ECONNRESET: "connection reset",
    errno.ETIMEDOUT: "connect timed out",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.EADDRNOTAVAIL: "address not available",
    errno.EACCES: "connection not permitted",
    errno.EPERM: "connection not permitted",
}
DNS_NOT_FOUND = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, n)}


def describe(e: BaseException, timeout: float, status: int | None = None) -> tuple[str, str]:
    """(error, detail) for an exception out of an attempt: a short reason for `last_error`, the full story for
    the log. `status` is the response's, when its head had arrived before `e`."""
    detail = exception_detail(e)
    if status is not None:
        detail = f"after the response head (HTTP {status}): {detail}"
    return classify(e, timeout, status)[:ERROR_MAX], detail[:DETAIL_MAX]


def classify(e: BaseException, timeout: float, status: int | None) -> str:
    if isinstance(e, TimeoutError):  # asyncio's, and aiohttp's ServerTimeoutError family
        return f"timeout after {timeout:g}s"
    if isinstance(e, aiohttp.ClientConnectorDNSError):
        return dns_reason(e.host, e.os_error)
    if isinstance(e, aiohttp.ClientConnectorCertificateError):
        why = getattr(e.certificate_error, "verify_message", None)
        return f"TLS: certificate verify failed ({why})" if why else "TLS: certificate verify failed"
    if isinstance(e, aiohttp.ClientSSLError):
        return tls_reason(e.os_error if isinstance(e, aiohttp.ClientConnectorError) else e)
    if isinstance(e, aiohttp.ClientConnectorError):
        if isinstance(e.os_error, ssl.SSLError):
            return tls_reason(e.os_error)
        where = host_port(e.host, e.port)
        words = errno_words(e.os_error.errno)
        return f"{words} ({where})" if words else f"cannot connect to {where}"
    if isinstance(e, ssl.SSLError):
        return tls_reason(e)
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "connection closed without a response" if status is None else "connection closed mid-response"
    if isinstance(e, aiohttp.ClientPayloadError):
        return "connection reset" if "ConnectionResetError" in str(e) else "response body incomplete"
    if isinstance(e, ConnectionResetError):  # aiohttp's ClientConnectionResetError too
        return "connection reset"
    if isinstance(e, OSError) and e.errno is not None:  # ClientOSError, and a bare OSError
        return errno_words(e.errno) or first_line(e)
    if isinstance(e, aiohttp.ClientResponseError):  # a response aiohttp could not parse
        return f"invalid HTTP response ({first_line(e.message).rstrip(':') or e.status})"
    return f"{type(e).__name__}: {first_line(e) or '(no message)'}"


def dns_reason(host: str, err: OSError) -> str:
    if isinstance(err, LinkLocalBlocked):
        return f"{BLOCKED} ({host})"
    if isinstance(err, socket.gaierror) and err.errno in DNS_NOT_FOUND:
        return f"DNS: {host} not found"
    why = (err.strerror or first_line(err)).lower()
    return f"DNS: {host} lookup failed ({why})" if why else f"DNS: {host} lookup failed"


def tls_reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None)
    if isinstance(err, ssl.SSLCertVerificationError):
        why = err.verify_message
        return f"TLS: certificate verify failed ({why})" if why else "TLS: certificate verify failed"
    if reason == "WRONG_VERSION_NUMBER":
        return "TLS: wrong version number (not a TLS server?)"
    if isinstance(reason, str) and reason:
        return f"TLS: {reason.lower().replace('_', ' ')}"
    return f"TLS: {first_line(err) or type(err).__name__}"


def safe_location(location: str) -> str:
    """A redirect's target without its userinfo, query or fragment (it may echo the endpoint's secrets)."""
    try:
        url = URL(location)
        return str(url.with_user(None).with_query(None).with_fragment(None))[:ERROR_MAX]
    except (ValueError, TypeError):
        return "(unparsable)"


def redact(text: str, url: URL) -> str:
    """`text` without the endpoint URL's query string or password (aiohttp quotes the URL in some errors)."""
    for secret in {url.raw_query_string, url.query_string, url.raw_password or "", url.password or ""}:
        if secret:
            text = text.replace(secret, "***")
    return text


def errno_words(code: int | None) -> str | None:
    if code is None:
        return None
    if code in CONNECT_ERRNO:
        return CONNECT_ERRNO[code]
    try:
        return os.strerror(code).lower()
    except ValueError:
        return None


def host_port(host: str, port: int | None) -> str:
    host = f"[{host}]" if ":" in host else host
    return host if port is None else f"{host}:{port}"


def first_line(e: BaseException | str) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip()[:ERROR_MAX] if text else ""


def one_line(text: str) -> str:
    return " ".join(text.split())


def exception_detail(e: BaseException) -> str:
    """`Type: text` of `e` and of each cause behind it that says something new, on one line."""
    parts: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen and len(parts) < 4:
        seen.add(id(cur))
        text = one_line(str(cur))
        if not parts or text not in parts[-1]:
            parts.append(f"{type(cur).__name__}: {text}" if text else type(cur).__name__)
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    return " <- ".join(parts)


def parse_retry_after(value: str | None, wall: float) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
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
