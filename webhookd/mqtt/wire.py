"""aiomqtt's client with cheaper reads and writes on the loop's own thread (what bench row 10 measures).

paho reads one packet per readiness callback, with a `recv` for its first byte, one per byte of its length and
one for the rest (three system calls for an availability message), and writes each PUBACK with a `send` of its
own. A burst of QoS 1 messages cost four system calls and two event-loop callbacks per message before any of
our code ran. Here:

- `_Buffered` hands paho its socket's bytes from one large `recv`, and says how many it holds through
  `pending()`, which aiomqtt's read callback already loops on (for TLS's decoded bytes): one callback routes
  every packet that arrived together.
- PUBACKs queued back to back leave in one `send` (`merge_acks`); paho's own bookkeeping of a partly written
  packet (`pos`) is kept, so a full socket buffer is handled as before.
- The write callback is registered at once when paho asks from the loop's thread (see `Client`).

Nothing here changes what is acknowledged or when: paho acknowledges a QoS 1 message when it has decoded it, as
before; only the number of system calls per message goes down.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import aiomqtt

PUBACK = 0x40
READ_SIZE = 65_536


class _Buffered:
    """paho's socket, read in large chunks; everything but `recv` and `pending` is the socket's own."""

    __slots__ = ("_buf", "_pos", "_sock")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def recv(self, n: int) -> bytes:
        if self._pos >= len(self._buf):
            data: bytes = self._sock.recv(max(n, READ_SIZE))  # BlockingIOError, SSLWantRead...: paho's to handle
            if len(data) <= n:
                return data  # b"" (EOF) included
            self._buf, self._pos = data, 0
        start = self._pos
        self._pos = min(start + n, len(self._buf))
        return self._buf[start : self._pos]

    def pending(self) -> int:
        """Bytes read and not yet handed to paho (plus TLS's decoded ones): aiomqtt reads on while > 0."""
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._buf) - self._pos + int(inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def merge_acks(queue: collections.deque[Any]) -> None:
    """Join each run of PUBACKs in paho's outgoing queue into one packet entry (one `send`). A PUBACK is
    plain bytes with nothing to do once written; the first entry may be partly written and is left alone."""
    if len(queue) < 2:
        return
    out: collections.deque[Any] = collections.deque()
    run: list[bytes] = []
    for p in queue:
        if p["command"] == PUBACK and p["pos"] == 0:
            run.append(bytes(p["packet"]))
            continue
        _flush(out, run)
        out.append(p)
    _flush(out, run)
    if len(out) < len(queue):
        queue.clear()
        queue.extend(out)


def _flush(out: collections.deque[Any], run: list[bytes]) -> None:
    if not run:
        return
    packet = run[0] if len(run) == 1 else b"".join(run)
    out.append(
        {"command": PUBACK, "mid": 0, "qos": 0, "pos": 0, "to_process": len(packet), "packet": packet, "info": None}
    )
    run.clear()


class Client(aiomqtt.Client):
    """aiomqtt's client, with paho's socket buffered (`_Buffered`), PUBACKs merged, and the wish to write
    registered at once when paho asks from the loop's own thread.

    aiomqtt always defers `add_writer` with call_soon_threadsafe (paho may ask from the connect thread). Deferred,
    it can run after paho has already written and unregistered, or after the socket closed: under uvloop that
    left a closed poll handle (an error logged by asyncio) and, measured in tests/faults/test_mqtt.py under
    load, a broker's close unnoticed until the keep-alive ran out (8.8 s) while its wills were taken as power
    losses. Registered at once on the loop's thread, the order of register/unregister is paho's own."""

    _loop_thread: int = 0
    session_present: bool = False  # the CONNACK's flag: False when the broker kept no session of ours

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        client._sock = _Buffered(sock)  # before the CONNECT is queued: every read goes through it
        super()._on_socket_open(client, userdata, sock)

    def _on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        if threading.get_ident() != self._loop_thread:
            super()._on_socket_register_write(client, userdata, sock)
            return

        def callback() -> None:
            try:
                merge_acks(client._out_packet)
                client.loop_write()
            except Exception as exc:
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        self._loop.add_writer(sock.fileno(), callback)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any = None) -> None:
        self.session_present = bool(getattr(flags, "session_present", False))
        super()._on_connect(client, userdata, flags, reason_code, properties)
