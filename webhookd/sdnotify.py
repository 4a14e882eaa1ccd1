"""sd_notify written out (no libsystemd), after systemd's man/notify-selfcontained-example.py.

Messages go as one datagram to $NOTIFY_SOCKET (a path, or an abstract name written with a leading '@').
Without NOTIFY_SOCKET every call is a no-op, so the daemon runs the same outside systemd.
"""

from __future__ import annotations

import os
import socket
import time

from webhookd import logwrite


def notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1\\nSTATUS=...") to the service manager; False when there is none."""
    # What was logged before a state change is written before the manager hears of it (READY=1 after
    # config_reloaded, STOPPING=1 after the lines that led to it): log lines of a loop turn are batched.
    logwrite.flush()
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or addr[0] not in ("/", "@"):
        return False
    target = "\0" + addr[1:] if addr[0] == "@" else addr
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never block the event loop: if the manager does not read its socket, a message is dropped.
            sock.setblocking(False)
            sock.connect(target)
            sock.send(message.encode())
    except OSError:
        return False
    return True


def ready(status: str | None = None) -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def status(text: str) -> bool:
    return notify(f"STATUS={text}")


def stopping() -> bool:
    return notify("STOPPING=1")


def reloading() -> bool:
    # MONOTONIC_USEC lets systemd (Type=notify-reload) match this reload to its request.
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when no watchdog is asked of us.

    Like go-systemd's SdWatchdogEnabled: WATCHDOG_PID, when set, must name this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2_000_000


def watchdog() -> bool:
    return notify("WATCHDOG=1")
