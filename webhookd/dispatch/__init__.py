"""Delivery (CONTRACT §7): retry.py decides (pure), sender.py sends, lanes.py keeps order and the memory
window, dispatcher.py schedules, operator.py applies what operators and reloads change."""

from webhookd.config.units import is_link_local
from webhookd.dispatch.dispatcher import RESAVE_DELAY, UNSAVED_FACTOR, Dispatcher
from webhookd.dispatch.lanes import Delivery, EndpointRuntime
from webhookd.dispatch.sender import AttemptResult, GuardedResolver, Sender, Target

__all__ = [
    "RESAVE_DELAY",
    "UNSAVED_FACTOR",
    "AttemptResult",
    "Delivery",
    "Dispatcher",
    "EndpointRuntime",
    "GuardedResolver",
    "Sender",
    "Target",
    "is_link_local",
]
