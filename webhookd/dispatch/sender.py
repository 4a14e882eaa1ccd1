"""The transport: one aiohttp session, a resolver that refuses link-local answers, and one signed attempt.

`Sender.attempt` never raises for anything the attempt itself ran into: a refused connection, a timeout, a TLS
failure or an exception from inside aiohttp (say, a header it refuses) all come back as a failed
AttemptResult with a short error, which the retry policy then counts like any other failure.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict
from yarl import URL

from webhookd import __version__
from webhookd.config import EndpointConfig
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
        self.headers["Content-Type"] = "application/json"
        self.url = URL(cfg.url)
        host = (urlsplit(cfg.url).hostname or "").strip("[]")
        self.blocked_literal = not cfg.allow_link_local and is_link_local(host)


def is_link_local(addr: str) -> bool:
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
        kept = [r for r in results if not is_link_local(r["host"])]
        if not kept:
            # With an errno, so that aiohttp's "Cannot connect to host ... [strerror]" carries the reason.
            raise OSError(
                errno.EACCES, f"{host} resolves only to link-local addresses (blocked; allow_link_local: true)"
            )
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

    async def attempt(self, target: Target, event_id: str, body: bytes, n: int) -> AttemptResult:
        """POST `body` as attempt number `n` of event `event_id`, signed as the endpoint says."""
        if target.blocked_literal:
            return AttemptResult(False, None, "link-local address blocked (allow_link_local: false)", 0.0)
        started = time.perf_counter()
        try:
            assert self._session is not None, "Sender.open() was not called"
            headers = target.headers.copy()
            headers["Webhook-Id"] = event_id
            headers["Webhook-Attempt"] = str(n)
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
                retry_after = (
                    None if 200 <= status < 300 else parse_retry_after(resp.headers.get("Retry-After"), self._wall())
                )
                if resp.content_length is None or resp.content_length <= MAX_RESPONSE_READ:
                    # The answer counts once its body is complete (within the timeout; a reset fails it), and
                    # draining a small body lets the connection be reused. A large one is dropped unread.
                    remaining = MAX_RESPONSE_READ
                    while remaining > 0 and (chunk := await resp.content.read(remaining)):
                        remaining -= len(chunk)
        except TimeoutError:
            return AttemptResult(False, None, f"timeout after {target.cfg.timeout:g}s", time.perf_counter() - started)
        except aiohttp.ClientSSLError as e:
            return AttemptResult(False, None, f"tls error: {short_error(e)}", time.perf_counter() - started)
        except (aiohttp.ClientError, OSError) as e:
            return AttemptResult(False, None, short_error(e), time.perf_counter() - started)
        except Exception as e:  # anything else inside aiohttp (or our headers): a failed attempt, never a crash
            return AttemptResult(False, None, f"{type(e).__name__}: {short_error(e)}", time.perf_counter() - started)
        latency = time.perf_counter() - started
        if 200 <= status < 300:
            return AttemptResult(True, status, None, latency)
        return AttemptResult(False, status, f"HTTP {status}", latency, retry_after)


def short_error(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


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
