"""UDP heartbeats (CONTRACT §4, `listen.udp`): one datagram is one heartbeat, fire and forget.

A datagram holds either a JSON object with the fields and the validation of `POST /v1/heartbeat` (the same
`listener.parse_heartbeat`; `address` defaults to the sender's IP), or the plain text `ID` or `ID STATE`
(trailing whitespace and newline stripped), so a busybox shell can send `echo "$ID" | nc -u -w1 host 8471`.

Trust: UDP carries no token and its source address can be forged. It is meant for a trusted LAN only; bind it
to an internal address. When `listen.tokens` is set the daemon still serves UDP (the operator enabled it
explicitly; the tokens guard the HTTP API) and says at startup, at warning level, that UDP is unauthenticated.

No answer is ever sent, not even for a bad datagram: a reply would make the daemon a reflector for forged
sources. Bad datagrams are dropped and counted (`rejected`, and by reason in `rejected_by`: the metric
`webhookd_udp_datagrams_rejected_total{reason}`), and summarised in one info line (`udp_datagrams_rejected`: the
counts by reason since the last one, the last datagram's error and sender) at most once a minute: the first at
once, the next a minute later if more came, and what is left when the listener closes. A flood cannot flood the
journal.

Reading is batched: when the socket becomes readable the listener waits READ_WINDOW (50 ms), then reads
every datagram that arrived meanwhile, so 10,000 devices beating once a minute cost 20 wakeups a second, not
167 (a heartbeat is applied at most 50 ms late; nobody waits for an answer). A flood is read without the
window, DRAIN_MAX datagrams per turn of the event loop.

The handler never blocks: a heartbeat that changes nothing is applied on the spot
(`Tracker.heartbeat_nowait`); one that needs a commit becomes a task. At most
`max_inflight` run at once; beyond that a heartbeat is dropped and counted (`dropped`). A heartbeat identical
to the device's previous one while that one is still in flight (queued behind the device's commit) is
coalesced into it, so a burst of repeats does not fill the in-flight bound. A heartbeat whose event
the store cannot record (StoreError) is counted (`failed`) and logged at most every ten seconds; the sender's
next heartbeat tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from webhookd.config import HostPort
from webhookd.listener import BadInput, parse_device_id, parse_heartbeat, parse_state
from webhookd.logs import get_logger
from webhookd.presence import Heartbeat
from webhookd.store import StoreError
from webhookd.tracker import Tracker

log = get_logger("webhookd.udp")

MAX_DATAGRAM = 64 * 1024  # the datagram limit is min(listen.max_body, this)
MAX_INFLIGHT = 1024
RCVBUF = 4 * 1024 * 1024  # asked for; the kernel caps it at net.core.rmem_max
REJECT_SUMMARY_INTERVAL = 60.0  # seconds between two udp_datagrams_rejected lines, at least
# Why a datagram was rejected: the `reason` label of webhookd_udp_datagrams_rejected_total.
REJECT_REASONS = ("too_large", "empty", "not_utf8", "malformed_json", "invalid")
_REASON_OF_ERROR = {"empty datagram": "empty", "datagram is not UTF-8": "not_utf8", "malformed JSON": "malformed_json"}
READ_WINDOW = 0.05  # seconds between the first datagram of a quiet spell and reading it (with its followers)
DRAIN_MAX = 512  # datagrams read per turn of the event loop
WARN_LOG_INTERVAL = 10.0

_decoder = msgspec.json.Decoder()


def parse_datagram(data: bytes, peer: str | None, max_size: int = MAX_DATAGRAM) -> Heartbeat:
    """One datagram -> one Heartbeat, or BadInput (the HTTP API's errors and messages)."""
    if len(data) > max_size:
        raise BadInput(413, f"datagram larger than {max_size} bytes")
    body = data.rstrip(b" \t\r\n")
    if not body:
        raise BadInput(400, "empty datagram")
    if body.lstrip()[:1] in (b"{", b"["):
        try:
            obj = _decoder.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            # msgspec raises UnicodeDecodeError (not DecodeError) for invalid UTF-8 inside a string.
            raise BadInput(400, "malformed JSON") from None
        return parse_heartbeat(obj, peer, source="udp")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput(400, "datagram is not UTF-8") from None
    parts = text.split()
    if not parts:  # only whitespace that rstrip above keeps: \v, \f, \x1c-\x1f, U+00A0, U+2003, ...
        raise BadInput(400, "empty datagram")
    if len(parts) > 2:
        raise BadInput(400, "expected `ID` or `ID STATE`")
    device = parse_device_id(parts[0], "device")
    state = parse_state(parts[1], "state") if len(parts) == 2 else None
    return Heartbeat(device=device, state=state, address=peer, source="udp")


def reject_reason(e: BadInput) -> str:
    """The `REJECT_REASONS` entry of a `parse_datagram` error (`invalid`: a field, the shape, the state...)."""
    return "too_large" if e.status == 413 else _REASON_OF_ERROR.get(e.error, "invalid")


def peer_ip(addr: Any) -> str | None:
    """The sender's IP from a datagram's address tuple; an IPv4-mapped IPv6 address as plain IPv4."""
    try:
        host = addr[0]
    except (TypeError, IndexError):
        return None
    return _ip_text(host) if isinstance(host, str) else None


@functools.lru_cache(maxsize=4096)  # called for every datagram; a LAN has few senders
def _ip_text(host: str) -> str | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class Throttle:
    """Allows one log line per `interval` seconds and counts the ones it held back in between."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._held = 0

    def __call__(self) -> int | None:
        """None: stay quiet. Otherwise log now; the number is how many lines were held back since the last."""
        now = self._clock()
        if now < self._next:
            self._held += 1
            return None
        self._next = now + self.interval
        held, self._held = self._held, 0
        return held


class UDPListener:
    """The `listen.udp` endpoint. Counters are plain ints for metrics:

    received  datagrams read from the socket (good and bad)
    rejected  bad datagrams (malformed, invalid, too large): dropped, nothing recorded; `rejected_by` by reason
    dropped   valid heartbeats dropped because `max_inflight` heartbeats were already being applied
    coalesced heartbeats identical to the device's previous one while that one is still being applied
              (nothing lost: it changes nothing the previous one does not; a burst of repeats stays cheap)
    failed    heartbeats whose event could not be recorded (store unavailable)
    """

    def __init__(
        self,
        tracker: Tracker,
        max_body: int,
        *,
        max_inflight: int = MAX_INFLIGHT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tracker = tracker
        self.max_size = min(max_body, MAX_DATAGRAM)
        self.max_inflight = max_inflight
        self.received = 0
        self.rejected = 0
        self.rejected_by = dict.fromkeys(REJECT_REASONS, 0)
        self.dropped = 0
        self.coalesced = 0
        self.failed = 0
        self.sock: socket.socket | None = None
        self._read_handle: asyncio.TimerHandle | asyncio.Handle | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # strong references until each is done
        self._latest: dict[str, tuple[Heartbeat, asyncio.Task[None]]] = {}  # per device, while in flight
        self._clock = clock
        # Rejections since the last udp_datagrams_rejected line, the last one's details, when the next may come.
        self._unreported: dict[str, int] = {}
        self._last_reject: dict[str, Any] = {}
        self._next_summary = float("-inf")
        self._summary_handle: asyncio.TimerHandle | None = None
        self._drop_log = Throttle(WARN_LOG_INTERVAL)
        self._fail_log = Throttle(WARN_LOG_INTERVAL)
        self._stopped = False

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    async def start(self, host: str, port: int, *, unauthenticated_warning: bool = False) -> None:
        """Bind and serve. Raises OSError when the address cannot be bound."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
        error: OSError = OSError(f"no address for {host}")
        for family, kind, proto, _name, addr in infos:
            try:
                sock = socket.socket(family, kind, proto)  # EAFNOSUPPORT where IPv6 is off: try the next one
            except OSError as e:
                error = e
                continue
            try:
                sock.setblocking(False)
                sock.bind(addr)
            except OSError as e:
                sock.close()
                error = e
                continue
            break
        else:
            raise error
        with contextlib.suppress(OSError):
            # A burst larger than the default receive buffer (about 200 KiB) is dropped by the kernel.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        self.sock = sock
        loop.add_reader(sock.fileno(), self._readable)
        log.info(
            "udp_listening", address=_format_addr(sock.getsockname()) or f"{host}:{port}", max_datagram=self.max_size
        )
        if unauthenticated_warning:
            log.warning(
                "udp_unauthenticated",
                detail="listen.tokens guards the HTTP API only; UDP heartbeats carry no token (trusted LAN only)",
            )

    async def close(self, grace: float = 5.0) -> None:
        """Stop reading, then give heartbeats in flight `grace` seconds to be recorded; cancel the rest."""
        if self.sock is not None:
            sock, self.sock = self.sock, None
            if self._read_handle is not None:
                self._read_handle.cancel()
                self._read_handle = None
            self._drain(sock, DRAIN_MAX)  # what already arrived is read and applied, like the heartbeats in flight
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        if self._summary_handle is not None:
            self._summary_handle.cancel()
        self._report_rejected()  # what the last minute held back
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending)
        if not self._stopped:
            self._stopped = True
            log.info(
                "udp_stopped",
                received=self.received,
                rejected=self.rejected,
                dropped=self.dropped,
                coalesced=self.coalesced,
                failed=self.failed,
            )

    # --- reading -------------------------------------------------------------------------------------------

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        self._read_handle = loop.call_later(READ_WINDOW, self._read)

    def _read(self) -> None:
        self._read_handle = None
        sock = self.sock
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        flood = True
        try:
            flood = self._drain(sock, DRAIN_MAX) >= DRAIN_MAX
        finally:  # whatever one datagram did, the socket keeps being read
            if self.sock is sock:
                if flood:
                    self._read_handle = loop.call_soon(self._read)  # no window, but others run in between
                else:
                    loop.add_reader(sock.fileno(), self._readable)

    def _drain(self, sock: socket.socket, limit: int = 1 << 30) -> int:
        """Read and handle up to `limit` datagrams waiting on `sock`; how many were read."""
        n = 0
        while n < limit:
            n += 1
            try:
                # One byte more than the largest datagram taken, so that a larger one shows as too large.
                data, addr = sock.recvfrom(MAX_DATAGRAM + 1)
            except (BlockingIOError, InterruptedError):
                return n - 1
            except OSError as e:  # e.g. an ICMP error queued on the socket (nothing is ever sent), ENOBUFS
                log.debug("udp_socket_error", error=str(e))
                continue  # counted against `limit`: a persistent error cannot spin here
            self.datagram_received(data, addr)
        return n

    # --- handling one datagram -----------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received += 1
        try:
            hb = parse_datagram(data, peer_ip(addr), self.max_size)
        except BadInput as e:
            self._rejected(e, addr, len(data))
            return
        latest = self._latest.get(hb.device)
        if latest is not None and latest[0] == hb:
            # Its predecessor is still queued behind the device's commit: this one would only repeat it.
            self.coalesced += 1
            return
        if len(self._tasks) >= self.max_inflight:
            self.dropped += 1
            held = self._drop_log()
            if held is not None:
                log.warning(
                    "udp_heartbeat_dropped", reason="too many in flight", inflight=len(self._tasks), suppressed=held
                )
            return
        work = self.tracker.heartbeat_nowait(hb)
        if isinstance(work, tuple):
            return  # applied; nothing to record (the usual heartbeat: no task, no commit)
        task = asyncio.get_running_loop().create_task(self._apply(work, hb))
        self._tasks.add(task)
        self._latest[hb.device] = (hb, task)
        task.add_done_callback(functools.partial(self._done, hb.device))

    def _rejected(self, e: BadInput, addr: Any, size: int) -> None:
        reason = reject_reason(e)
        self.rejected += 1
        self.rejected_by[reason] += 1
        self._unreported[reason] = self._unreported.get(reason, 0) + 1
        self._last_reject = {"error": e.error, "field": e.field, "peer": _format_addr(addr), "size": size}
        if self._summary_handle is not None:
            return  # a summary is due within the minute
        delay = self._next_summary - self._clock()
        if delay <= 0:
            self._report_rejected()
            return
        with contextlib.suppress(RuntimeError):  # no loop (called outside one): the next one or close() reports
            self._summary_handle = asyncio.get_running_loop().call_later(delay, self._report_rejected)

    def _report_rejected(self) -> None:
        """One info line with the rejections since the last one (none: no line)."""
        self._summary_handle = None
        if not self._unreported:
            return
        counts, self._unreported = self._unreported, {}
        self._next_summary = self._clock() + REJECT_SUMMARY_INTERVAL
        last = self._last_reject
        log.info(
            "udp_datagrams_rejected",
            rejected=sum(counts.values()),
            reasons={r: counts[r] for r in REJECT_REASONS if r in counts},
            last_error=last.get("error"),
            last_field=last.get("field"),
            last_peer=last.get("peer"),
            last_size=last.get("size"),
        )

    def _done(self, device: str, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        latest = self._latest.get(device)
        if latest is not None and latest[1] is task:
            del self._latest[device]

    # --- applying a heartbeat ------------------------------------------------------------------------------

    async def _apply(self, work: Awaitable[object], hb: Heartbeat) -> None:
        try:
            await work
        except StoreError as e:
            self.failed += 1
            held = self._fail_log()
            if held is not None:
                log.warning("udp_heartbeat_not_recorded", device=hb.device, error=str(e), suppressed=held)
        except Exception:
            self.failed += 1
            held = self._fail_log()
            if held is not None:
                log.exception("udp_heartbeat_failed", device=hb.device, suppressed=held)


def _format_addr(addr: Any) -> str | None:
    if not isinstance(addr, tuple) or len(addr) < 2:
        return None
    return str(HostPort(host=str(addr[0]), port=addr[1]))
