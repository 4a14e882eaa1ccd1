"""What an MQTT message means (CONTRACT §11): topic and payload -> device availability, for every source.

Pure: no I/O and no clock. `Sources.route` takes each message the client receives and returns the name of
the source that claims it and its `Reading`s (or why it was `Ignored`). The stateful rules live here too:
a zigbee2mqtt bridge's availability overrides its devices', and a Sparkplug NDEATH counts only with the
bdSeq of its node's last NBIRTH. Topic matching follows MQTT 3.1.1 §4.7 (`config.mqtt.filter_problem`
states which filters are valid).
"""

import fnmatch
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from webhookd.config.mqtt import MqttConfig, MqttSourceConfig

from . import sparkplug

MAX_ID = 128
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # Unicode's control characters (category Cc)
CACHE_TOPICS = 100_000  # topics whose matching sources `Sources.route` remembers
REASONS: Final = {"online": "connected", "offline": "disconnected", "utilizing": "reported", "unplugged": "reported"}


@dataclass(frozen=True, slots=True)
class Reading:
    device: str  # the device id, id_prefix applied: 1..128 characters, no control characters
    state: str | None  # online, offline, utilizing, unplugged; None: a heartbeat (generic, heartbeat: true)
    reason: str  # connected, disconnected, reported; heartbeat


@dataclass(frozen=True, slots=True)
class Ignored:
    why: str  # short: for a debug log line


EMPTY: Final = Ignored("empty payload (deleted retained topic)")
NO_STATE: Final = Ignored("payload matches no state")
Result = list[Reading] | Ignored


def _matches(f: tuple[str, ...], t: list[str]) -> bool:
    """`matches` on split filter and topic."""
    if t[0].startswith("$") and f[0] in ("+", "#"):
        return False
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


def matches(filter_: str, topic: str) -> bool:
    """Does `topic` match the topic filter (MQTT 3.1.1 §4.7: ``+`` one level, ``#`` the rest, even none;
    a wildcard first level never matches a ``$`` topic)?"""
    return _matches(tuple(filter_.split("/")), topic.split("/"))


def _reading(device: str, state: str) -> Reading:
    return Reading(device, state, REASONS[state])


def _text(payload: bytes) -> str | Ignored:
    if not payload:
        return EMPTY
    try:
        return payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return Ignored("payload is not UTF-8 text")


def _word(payload: bytes, words: dict[str, str]) -> str | Ignored:
    """The state of a preset's payload (exact, after trimming whitespace)."""
    text = _text(payload)
    if isinstance(text, Ignored):
        return text
    return words.get(text, NO_STATE)


def _json_state(payload: bytes) -> str | Ignored:
    """zigbee2mqtt availability: ``{"state": "online"}`` (its default since 1.x without the legacy payload,
    and in 2.x) or the plain word (``legacy_availability_payload: true``)."""
    text = _text(payload)
    if isinstance(text, Ignored):
        return text
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except ValueError:
            return Ignored("payload is not JSON")
        value = obj.get("state") if isinstance(obj, dict) else None
        text = value if isinstance(value, str) else ""
    return text if text in ("online", "offline") else NO_STATE


class _Source:
    """One configured source. `handle` gets the topic's levels once a filter matched; None: not one of its
    topics (a zigbee2mqtt device's state, say): the next source may have it."""

    def __init__(self, name: str, cfg: MqttSourceConfig, filters: list[str]) -> None:
        self.name, self.cfg, self.filters = name, cfg, filters
        self.every = "*" in cfg.devices  # fnmatch is the cost of a message: skip it for the default

    def device(self, raw: str) -> str | Ignored:
        """The device id of topic level(s) `raw`, or why it cannot be one."""
        device = self.cfg.id_prefix + raw
        if not raw:
            return Ignored("empty device id")
        if len(device) > MAX_ID:
            return Ignored(f"device id longer than {MAX_ID} characters")
        if _CONTROL.search(device):
            return Ignored("device id contains control characters")
        if not self.selected(device):
            return Ignored(f"device {device!r} not selected by devices:")
        return device

    def selected(self, device: str) -> bool:
        if self.every:
            return True
        return any(fnmatch.fnmatchcase(device, p) for p in self.cfg.devices)

    def one(self, raw: str, state: str | Ignored) -> Result:
        device = self.device(raw)
        if isinstance(device, Ignored):
            return device
        return state if isinstance(state, Ignored) else [_reading(device, state)]

    def handle(self, levels: list[str], payload: bytes) -> Result | None:
        raise NotImplementedError

    def adopt(self, old: "_Source") -> None:
        """Take over what `old` (the same source before a reload) remembered."""


class _Simple(_Source):
    """A preset whose device is one level of a fixed filter and whose payload is one of two words."""

    def __init__(self, name: str, cfg: MqttSourceConfig, filter_: str, words: dict[str, str]) -> None:
        super().__init__(name, cfg, [filter_])
        self.at = filter_.split("/").index("+")
        self.words = words

    def handle(self, levels: list[str], payload: bytes) -> Result | None:
        return self.one(levels[self.at], _word(payload, self.words))


class _Generic(_Source):
    def __init__(self, name: str, cfg: MqttSourceConfig) -> None:
        assert cfg.topic is not None
        super().__init__(name, cfg, [cfg.topic])
        self.at = [i for i, level in enumerate(cfg.topic.split("/")) if level == "+"][cfg.device - 1]
        self.states = cfg.states()

    def handle(self, levels: list[str], payload: bytes) -> Result | None:
        device = self.device(levels[self.at])
        if isinstance(device, Ignored):
            return device
        state = self._state(payload)
        if isinstance(state, Ignored):
            if self.cfg.heartbeat and state is not EMPTY:
                return [Reading(device, None, "heartbeat")]
            return state
        return [_reading(device, state)]

    def _state(self, payload: bytes) -> str | Ignored:
        text = _text(payload)
        if isinstance(text, Ignored) or self.cfg.field is None:
            return text if isinstance(text, Ignored) else self.states.get(text, NO_STATE)
        try:
            obj = json.loads(text)
        except ValueError:
            return Ignored("payload is not JSON")
        if not isinstance(obj, dict) or self.cfg.field not in obj:
            return Ignored(f"no {self.cfg.field!r} in the JSON payload")
        value = obj[self.cfg.field]
        # A JSON true, 1 or "on" compares as its text: `online: ["true"]` matches {"online": true}.
        shown = value.strip() if isinstance(value, str) else json.dumps(value)
        return self.states.get(shown, NO_STATE)


class _Zigbee2mqtt(_Source):
    """``<base>/bridge/state`` and ``<base>/<friendly name, maybe with '/'>/availability``; while the bridge
    is offline its devices count as offline, when it is back each takes its own last availability."""

    def __init__(self, name: str, cfg: MqttSourceConfig) -> None:
        self.base = cfg.base or "zigbee2mqtt"
        super().__init__(name, cfg, [f"{self.base}/#"])
        self.depth = len(self.base.split("/"))
        self.bridge: str | None = None  # its last state; None: not seen (its devices speak for themselves)
        self.own: dict[str, str] = {}  # device id (selected, prefixed) -> its last availability

    def adopt(self, old: _Source) -> None:
        assert isinstance(old, _Zigbee2mqtt)
        self.bridge, self.own = old.bridge, old.own

    def handle(self, levels: list[str], payload: bytes) -> Result | None:
        rest = levels[self.depth :]
        if rest == ["bridge", "state"]:
            return self._bridge(payload)
        if len(rest) < 2 or rest[-1] != "availability" or rest[0] == "bridge":
            return None  # a device's state JSON, bridge/info, bridge/devices...: not availability
        state = _json_state(payload)
        device = self.device("/".join(rest[:-1]))
        if isinstance(device, Ignored):
            return device
        if isinstance(state, Ignored):
            return state
        self.own[device] = state
        return [_reading(device, "offline" if self.bridge == "offline" else state)]

    def _bridge(self, payload: bytes) -> Result:
        state = _json_state(payload)
        if isinstance(state, Ignored):
            return state
        before, self.bridge = self.bridge, state
        bridge = self.device(self.base)
        out = [] if isinstance(bridge, Ignored) else [_reading(bridge, state)]
        if state == "offline" and before != "offline":
            out += [_reading(d, "offline") for d, own in self.own.items() if own != "offline"]
        elif state == "online" and before == "offline":
            out += [_reading(d, own) for d, own in self.own.items()]
        return out


class _Sparkplug(_Source):
    """``<root>/GROUP/NBIRTH|NDEATH/EDGE`` (device ``GROUP/EDGE``), ``DBIRTH|DDEATH/EDGE/DEV`` (device
    ``GROUP/EDGE/DEV``). NDATA, DDATA, STATE and commands are not subscribed: they say nothing of presence."""

    def __init__(self, name: str, cfg: MqttSourceConfig) -> None:
        root = cfg.base or "spBv1.0"
        kinds = ("NBIRTH/+", "NDEATH/+", "DBIRTH/+/+", "DDEATH/+/+")
        super().__init__(name, cfg, [f"{root}/+/{k}" for k in kinds])
        self.depth = len(root.split("/"))
        self.bd_seq: dict[str, int | None] = {}  # node -> bdSeq of its last NBIRTH
        self.devices: dict[str, set[str]] = {}  # node -> its devices seen born (raw ids) and not dead since

    def adopt(self, old: _Source) -> None:
        assert isinstance(old, _Sparkplug)
        self.bd_seq, self.devices = old.bd_seq, old.devices

    def handle(self, levels: list[str], payload: bytes) -> Result | None:
        group, kind, edge, *dev = levels[self.depth :]
        node = f"{group}/{edge}"
        if not payload:
            return EMPTY
        try:
            seq = sparkplug.bd_seq(payload)
        except sparkplug.Undecodable as e:
            return Ignored(str(e))
        if kind == "NBIRTH":
            last = self.bd_seq.get(node)
            self.bd_seq[node] = seq
            birth = self.one(node, "online")
            if last is not None and seq is not None and seq != last:
                # A new MQTT session (bdSeq moved on) without the old one's NDEATH reaching us: the old session
                # died, and its devices with it; each alive one sends its DBIRTH right after this NBIRTH.
                gone = [self.one(f"{node}/{d}", "offline") for d in sorted(self.devices.pop(node, set()))]
                readings = [r for result in (*gone, birth) if not isinstance(result, Ignored) for r in result]
                return readings or birth
            return birth
        if kind == "NDEATH":
            last = self.bd_seq.get(node)
            # Unknown node or bdSeq on either side: accept (missing an offline is worse than a repeated one).
            if last is not None and seq is not None and seq != last:
                return Ignored(f"stale bdSeq {seq} (last NBIRTH {last})")
            out = self.one(node, "offline")
            devices = [self.one(f"{node}/{d}", "offline") for d in sorted(self.devices.pop(node, set()))]
            readings = [r for result in (out, *devices) if not isinstance(result, Ignored) for r in result]
            return readings if readings or not isinstance(out, Ignored) else out
        born = self.devices.setdefault(node, set())
        (born.add if kind == "DBIRTH" else born.discard)(dev[0])
        return self.one(f"{node}/{dev[0]}", "online" if kind == "DBIRTH" else "offline")


_WORDS: Final = {
    "tasmota": {"Online": "online", "Offline": "offline"},
    "esphome": {"online": "online", "offline": "offline"},
    "shelly": {"true": "online", "false": "offline"},
}
_SIMPLE: Final[dict[str, tuple[str | None, str, dict[str, str]]]] = {
    # preset: (default base, levels after it, payloads)
    "tasmota": ("tele", "+/LWT", _WORDS["tasmota"]),
    "esphome": (None, "+/status", _WORDS["esphome"]),
    "shelly": ("shellies", "+/online", _WORDS["shelly"]),
    "shelly-gen2": (None, "+/online", _WORDS["shelly"]),
}


def _build(name: str, cfg: MqttSourceConfig) -> _Source:
    if cfg.preset is None:
        return _Generic(name, cfg)
    if cfg.preset in _SIMPLE:
        default, rest, words = _SIMPLE[cfg.preset]
        base = cfg.base or default
        return _Simple(name, cfg, f"{base}/{rest}" if base else rest, words)
    make: Callable[[str, MqttSourceConfig], _Source] = _Zigbee2mqtt if cfg.preset == "zigbee2mqtt" else _Sparkplug
    return make(name, cfg)


class Sources:
    """Every source of `cfg.sources`, in order; the first that claims a message has it."""

    def __init__(self, cfg: MqttConfig) -> None:
        self.status_topic = cfg.status_topic
        built: list[_Source] = []
        names: list[str] = []
        for src in cfg.sources:
            name = src.preset or src.topic or "?"
            n = sum(1 for x in names if x == name or x.startswith(name + "#"))
            names.append(name if n == 0 else f"{name}#{n + 1}")
            built.append(_build(names[-1], src))
        self._sources = tuple(built)
        self.names: tuple[str, ...] = tuple(names)
        self._split = tuple(tuple(tuple(f.split("/")) for f in src.filters) for src in built)
        # topic -> the sources whose filters match it. Devices publish on the same few topics again and again:
        # this makes routing one lookup. Bounded (a broker may carry any number of topics): cleared when full.
        self._candidates: dict[str, tuple[_Source, ...]] = {}

    def keep_state(self, old: "Sources") -> None:
        """After a reload: each source configured exactly as one of `old` takes over what that one
        remembered (a zigbee2mqtt bridge's state and its devices' availability, Sparkplug bdSeqs), so that a
        SIGHUP neither forgets an offline bridge nor accepts a stale NDEATH."""
        unused = list(old._sources)
        for src in self._sources:
            same = next((o for o in unused if o.cfg == src.cfg and type(o) is type(src)), None)
            if same is not None:
                unused.remove(same)
                src.adopt(same)

    def filters(self) -> list[str]:
        """The topic filters to subscribe to, each once, in source order."""
        return list(dict.fromkeys(f for s in self._sources for f in s.filters))

    def route(self, topic: str, payload: bytes) -> tuple[str, list[Reading] | Ignored] | None:
        """The name of the source that claims the message and what it meant; None when no source does (no
        filter matches, the topic is not one of a preset's availability topics, or it is our status_topic)."""
        if topic == self.status_topic:
            return None
        levels = topic.split("/")
        candidates = self._candidates.get(topic)
        if candidates is None:
            if len(self._candidates) >= CACHE_TOPICS:
                self._candidates.clear()
            candidates = tuple(
                src for src, fs in zip(self._sources, self._split, strict=True) if any(_matches(f, levels) for f in fs)
            )
            self._candidates[topic] = candidates
        for src in candidates:
            result = src.handle(levels, payload)
            if result is not None:
                return src.name, result
        return None
