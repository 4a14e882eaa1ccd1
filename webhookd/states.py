"""The names of device states and delivery statuses, defined once (import-free, so the CLI can use them)."""

from __future__ import annotations

from typing import Final, Literal

DeviceState = Literal["online", "utilizing", "unplugged", "offline"]
DEVICE_STATES: Final[tuple[DeviceState, ...]] = ("online", "utilizing", "unplugged", "offline")
# What a heartbeat may report: the device states, plus two that mean "offline, and why".
REPORTED_STATES: Final = frozenset((*DEVICE_STATES, "shutdown", "reboot"))
UNKNOWN: Final = "unknown"  # previous_state of a device seen for the first time

DeliveryStatus = Literal["pending", "held", "delivered", "dead"]
# In the order listings and tables show them.
DELIVERY_STATUSES: Final[tuple[DeliveryStatus, ...]] = ("pending", "held", "delivered", "dead")
