"""Messages for people (CONTRACT §13): one sentence per event, and the formats that carry it.

`sentence` is the only place an event becomes words (``printer-1 (Drucker 1) is offline: no heartbeat for
15m``); `slack`, `discord`, `teams` and `ntfy` wrap it for their receivers, and `template` renders an endpoint's
Jinja2 template (sandboxed, undefined names are errors) with it. payloads.render calls these once per (event,
endpoint); `check_template` is what the config loader runs so that a broken template never reaches delivery.
A template that still fails at delivery raises `RenderError`, which the dispatcher turns into a dead delivery.
"""

from __future__ import annotations

import functools
import json
import traceback
from collections.abc import Iterable, Mapping
from email.header import Header
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2
    import jinja2.sandbox

    from webhookd.payloads import EventData

__all__ = [
    "DISCORD_MAX",
    "RenderError",
    "check_template",
    "discord",
    "human_duration",
    "is_json_type",
    "ntfy_headers",
    "render_template",
    "sentence",
    "slack",
    "subject",
    "teams",
    "title",
]

DISCORD_MAX = 2000  # characters of a Discord message's `content`

_STATE_WORDS = {
    "online": "online",
    "offline": "offline",
    "utilizing": "in use",
    "unplugged": "unplugged",
    "unknown": "unknown",
}

_OFFLINE_REASONS = {
    "shutdown": "it reported a shutdown",
    "reboot": "it reported a reboot",
    "reported": "it reported offline",
    "disconnected": "its MQTT connection was lost (last will or offline availability)",
}


def human_duration(seconds: float) -> str:
    """``45s``, ``15m``, ``1h 5m``, ``2d 3h``: the largest unit and the one just below it (when not zero),
    rounded to the second: ``2d 0h 5m`` is ``2d``, not ``2d 5m``."""
    total = max(0, round(seconds))
    units = (("d", 86400), ("h", 3600), ("m", 60), ("s", 1))
    for i, (unit, size) in enumerate(units):
        if total >= size or size == 1:
            n, rest = divmod(total, size)
            if i + 1 < len(units) and (below := rest // units[i + 1][1]):
                return f"{n}{unit} {below}{units[i + 1][0]}"
            return f"{n}{unit}"
    return "0s"


def subject(event: EventData) -> str:
    """The device as people know it: ``printer-1 (Drucker 1)``, or the id alone when it has no other name; a
    hub's gateway (``gateway.*`` events) is ``gateway site-a``."""
    if event.type.startswith("gateway."):
        return f"gateway {event.device_id}"
    name = (event.name or "").strip()
    if not name or name == event.device_id:
        return event.device_id
    return f"{event.device_id} ({name})"


def _state(state: str) -> str:
    return _STATE_WORDS.get(state, state)


def _silence(event: EventData) -> str:
    """A timeout's reason, from what the event knows: the time since the last heartbeat when it has one."""
    if event.last_seen is not None and event.time >= event.last_seen:
        if event.type.startswith("gateway."):
            return f"no relay or heartbeat from it for {human_duration(event.time - event.last_seen)}"
        return f"no heartbeat for {human_duration(event.time - event.last_seen)}"
    return "no heartbeat within its silence timeout"


def _reason(event: EventData) -> str | None:
    reason = event.reason
    if event.state == "offline":
        if reason == "timeout":
            return _silence(event)
        return _OFFLINE_REASONS.get(reason or "")
    if reason == "heartbeat":
        return "heartbeat received"
    if reason == "reported":
        return "reported by the device"
    if reason == "connected":
        return "its MQTT availability says online"
    return None


def sentence(event: EventData) -> str:
    """The one line every message format says about `event`."""
    who = subject(event)
    kind = event.type
    if kind == "webhook.test":
        return f"{who}: a test message from webhookd; this endpoint works"
    if kind == "device.still_offline":
        text = f"{who} is still offline"
        if event.offline_for is not None:
            text += f" after {human_duration(event.offline_for)}"
        if event.reminder is not None:
            text += f" (reminder {event.reminder})"
        cause = _reason(event)
        return f"{text}; {cause}" if cause else text
    if kind == "device.address_changed":
        where = event.address or "an unknown address"
        return f"{who} is {_state(event.state)} at a new address: {where}"
    text = f"{who} is {_state(event.state)}"
    cause = _reason(event)
    if cause:
        text += f": {cause}"
    if event.state != "offline" and event.offline_for is not None:
        text += f" after {human_duration(event.offline_for)} offline"
    return text


def title(event: EventData) -> str:
    """A short headline (Teams card, ntfy Title): the device and its new state."""
    if event.type == "webhook.test":
        return "webhookd test"
    if event.type == "device.still_offline":
        return f"{subject(event)} is still offline"
    return f"{subject(event)} is {_state(event.state)}"


# ----------------------------------------------------------------------------------------------------
# Chat formats
# ----------------------------------------------------------------------------------------------------


def _slack_escape(text: str) -> str:
    # Slack reads <...> as links and mentions (<!channel>): a device's name must not ping a channel.
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack(event: EventData) -> dict[str, Any]:
    """Slack incoming webhooks (and Mattermost, Rocket.Chat): ``{"text": ...}``."""
    return {"text": _slack_escape(sentence(event))}


def discord(event: EventData) -> dict[str, Any]:
    """Discord webhooks: ``{"content": ...}`` of at most DISCORD_MAX characters; mentions in it ping no one."""
    text = sentence(event)
    if len(text) > DISCORD_MAX:
        text = text[: DISCORD_MAX - 1] + "…"
    return {"content": text, "allowed_mentions": {"parse": []}}


_TEAMS_COLOR = {"online": "Good", "offline": "Attention", "utilizing": "Accent", "unplugged": "Warning"}


def teams(event: EventData, when: str) -> dict[str, Any]:
    """A Teams Workflows ("When a Teams webhook request is received") message: one Adaptive Card 1.4."""
    headline: dict[str, Any] = {
        "type": "TextBlock",
        "text": title(event),
        "weight": "Bolder",
        "size": "Medium",
        "wrap": True,
    }
    color = _TEAMS_COLOR.get(event.state)
    if color is not None and event.type != "webhook.test":
        headline["color"] = color
    card = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": [
            headline,
            {"type": "TextBlock", "text": sentence(event), "wrap": True},
            {
                "type": "TextBlock",
                "text": f"{event.type} · {when}",
                "isSubtle": True,
                "size": "Small",
                "spacing": "None",
                "wrap": True,
            },
        ],
    }
    return {
        "type": "message",
        "attachments": [
            {"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": card}
        ],
    }


_NTFY_TAGS = {
    "device.online": "green_circle",
    "device.offline": "red_circle",
    "device.utilizing": "large_blue_circle",
    "device.unplugged": "electric_plug",
    "device.address_changed": "arrows_counterclockwise",
    "device.still_offline": "hourglass",
    "gateway.online": "green_circle",
    "gateway.offline": "red_circle",
    "webhook.test": "test_tube",
}


def _header_value(text: str) -> str:
    """A header value ntfy reads: control characters dropped, non-ASCII as RFC 2047 (ntfy decodes it)."""
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    if text.isascii():
        return text
    return Header(text, "utf-8").encode(maxlinelen=10_000)


def ntfy_headers(event: EventData) -> dict[str, str]:
    """ntfy's publish headers: ``Title``, ``Priority`` (``high`` for offline and still_offline) and ``Tags``."""
    high = event.type in ("device.offline", "device.still_offline", "gateway.offline")
    kind = event.type.replace(".", "_") if event.type.startswith("gateway.") else event.type.split(".", 1)[1]
    emoji = _NTFY_TAGS.get(event.type, "bell")
    return {
        "Title": _header_value(title(event)),
        "Priority": "high" if high else "default",
        "Tags": f"{emoji},{kind}",
    }


# ----------------------------------------------------------------------------------------------------
# format: template
# ----------------------------------------------------------------------------------------------------


class RenderError(ValueError):
    """A body that cannot be made (a template failing, or not producing the JSON its content type says)."""


@functools.cache
def _env() -> jinja2.sandbox.SandboxedEnvironment:
    # Imported on first use: only an endpoint with `format: template` needs Jinja2, and every daemon start and CLI
    # call would pay its import (~20-40 ms) otherwise.
    import jinja2.sandbox

    return jinja2.sandbox.SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True
    )


@functools.lru_cache(maxsize=256)
def _compile(source: str) -> jinja2.Template:
    return _env().from_string(source)


def is_json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _template_line(e: BaseException) -> int | None:
    """The template's line an error happened on (Jinja2 puts template frames into the traceback)."""
    import jinja2

    if isinstance(e, jinja2.TemplateSyntaxError):
        return e.lineno
    line = None
    for frame in traceback.extract_tb(e.__traceback__):
        if frame.filename == "<template>":
            line = frame.lineno
    return line


def _problem(e: BaseException, where: str) -> str:
    import jinja2

    if isinstance(e, jinja2.TemplateSyntaxError):
        what = f"syntax error: {e.message}"
    elif isinstance(e, jinja2.UndefinedError):
        what = e.message or "undefined name"
    elif isinstance(e, jinja2.TemplateError):
        what = e.message or type(e).__name__
    else:
        what = f"{type(e).__name__}: {e}"
    line = _template_line(e)
    what = " ".join(what.split())[:300]
    return f"line {line} of the {where}: {what}" if line else f"the {where}: {what}"


def render_template(source: str, content_type: str, context: Mapping[str, Any], *, where: str = "template") -> bytes:
    """The body of `source` rendered with `context` (UTF-8); RenderError says what failed and on which line."""
    try:
        text = _compile(source).render(context)
    except Exception as e:  # anything a template can raise: a RenderError, never a crash
        raise RenderError(_problem(e, where)) from None
    if is_json_type(content_type):
        try:
            json.loads(text, parse_constant=_not_json)
        except json.JSONDecodeError as e:
            why = f"{e.msg} at line {e.lineno}, column {e.colno} of its output"
            raise RenderError(f"the {where} did not produce valid JSON for {content_type}: {why}") from None
        except ValueError as e:
            raise RenderError(f"the {where} did not produce valid JSON for {content_type}: {e}") from None
    return text.encode("utf-8")


def _not_json(word: str) -> Any:
    # Python's json reads NaN and Infinity, which JSON (RFC 8259) and most receivers' parsers refuse.
    raise ValueError(f"{word} is not a JSON value (write null or a number)")


def sample_events(kinds: Iterable[str]) -> list[EventData]:
    """One plausible event of each type in `kinds` (event types), for `check_template`."""
    from webhookd.payloads import EventData  # payloads imports this module: import here

    now = 1_790_000_000.0
    out: list[EventData] = []
    for kind in kinds:
        state = {
            "device.online": "online",
            "device.offline": "offline",
            "device.utilizing": "utilizing",
            "device.unplugged": "unplugged",
            "device.address_changed": "online",
            "device.still_offline": "offline",
            "gateway.online": "online",
            "gateway.offline": "offline",
            "webhook.test": "online",
        }.get(kind, "online")
        test = kind == "webhook.test"
        gateway = kind.startswith("gateway.")
        out.append(
            EventData(
                id="evt_" + "0" * 32,
                type=kind,
                time=now,
                reason=None
                if test
                else {"device.offline": "timeout", "device.still_offline": "timeout", "gateway.offline": "timeout"}.get(
                    kind,
                    "heartbeat"
                    if kind in ("device.online", "device.address_changed", "gateway.online")
                    else "reported",
                ),
                device_id="webhookd-test" if test else "site-a" if gateway else "printer-1",
                name="webhookd test" if test else "site-a" if gateway else "Drucker 1",
                state=state,
                previous_state={
                    "device.online": "offline",
                    "device.still_offline": "offline",
                    "gateway.online": "offline",
                }.get(kind, "online"),
                address=None if test else "192.0.2.10",
                owner=None if test or gateway else "ops@example.com",
                last_seen=now if test or state != "offline" else now - 900.0,
                offline_for={"device.online": 900.0, "device.still_offline": 7200.0, "gateway.online": 900.0}.get(kind),
                reminder=2 if kind == "device.still_offline" else None,
                gateway="site-a" if gateway else None,
            )
        )
    return out


def check_template(source: str, content_type: str, endpoint: str, kinds: Iterable[str], where: str) -> str | None:
    """None if `source` renders every event type in `kinds` with a sample event, else the first problem."""
    from webhookd.payloads import webhookd_object  # payloads imports this module: import here

    try:
        _compile(source)
    except Exception as e:
        return _problem(e, where)
    for event in sample_events(kinds):
        context = {"event": webhookd_object(event, endpoint), "text": sentence(event), "endpoint": endpoint}
        try:
            render_template(source, content_type, context, where=where)
        except RenderError as e:
            return f"{e} (rendering a sample {event.type} event)"
    return None
