"""What the daemon's lifecycle decides apart from its I/O: which config keys a reload cannot apply, the config
a reload runs with and what it changes, whether an admin socket path is another daemon's, and GC tuning after
startup."""

from __future__ import annotations

import gc
import math
import socket
from pathlib import Path

import msgspec

from webhookd.config import Config, DeviceRule

# Bound at startup: a reload names them (config_restart_required) and keeps their running values.
RESTART_KEYS = ("listen.http", "listen.udp", "listen.max_body", "admin.socket", "state_dir", "store")


def _value(cfg: Config, key: str) -> object:
    obj: object = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def restart_required(old: Config, new: Config) -> list[str]:
    """The keys of RESTART_KEYS whose value differs between the running and the new config, and `hub` when the
    new config adds or removes it (its routes, leases and liveness loop are made at startup; a reload only
    changes the gateways of a running hub)."""
    keys = [key for key in RESTART_KEYS if _value(old, key) != _value(new, key)]
    if (old.hub is None) != (new.hub is None):
        keys.append("hub")
    return keys


def keep_bound(old: Config, new: Config) -> Config:
    """`new`, with the keys bound at startup kept at their running values (listen.tokens does reload): later
    reloads keep warning about them, and shutdown removes the admin socket that was actually created."""
    return msgspec.structs.replace(
        new,
        listen=msgspec.structs.replace(old.listen, tokens=new.listen.tokens),
        admin=old.admin,
        state_dir=old.state_dir,
        store=old.store,
        hub=new.hub if (old.hub is None) == (new.hub is None) else old.hub,
    )


def socket_answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def socket_path_is_ours(path: Path) -> bool:
    try:
        return path.is_socket() and not socket_answers(path)
    except OSError:
        return False


# Young-generation size and how many young (then middle) collections come before an older one. The daemon holds
# one object graph per device and per pending delivery (100,000s of them, long-lived, refcounted, rarely in a
# cycle); with the default thresholds (2,000, 10, 10) a full collection walked all of them every few seconds
# under load and held the event loop for 100-250 ms (bench row 5: heartbeat p99 170 ms during a power cut; 20
# ms without those pauses).
GC_THRESHOLDS = (50_000, 50, 100)


def tune_gc() -> None:
    """Called once startup has loaded the store: what it loaded (devices, pending deliveries, config, modules)
    moves to the permanent generation, which no collection walks again. Those objects are still freed by
    reference counting when they go; only a reference cycle among them would stay (none is made on purpose).
    Then fewer, larger young collections, and full ones rarely."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


# Config sections compared key by key for config_reloaded's `changed` (endpoints and devices are named instead).
_SECTIONS = ("listen", "admin", "presence", "delivery", "logging")


def _rules_changed(old: tuple[DeviceRule, ...], new: tuple[DeviceRule, ...]) -> list[str]:
    """The `match` globs of the device rules added, removed or changed, in file order (old file's first);
    every glob of the new file when only their order changed (the first rule that matches wins)."""
    if old == new:
        return []
    differ = [r for r in old if r not in new] + [r for r in new if r not in old]
    return list(dict.fromkeys(r.match for r in differ)) or [r.match for r in new]


def _timeout(seconds: float) -> float | str:
    return "never" if math.isinf(seconds) else seconds


def changes(old: Config, new: Config) -> dict[str, object]:
    """What a reload from `old` to `new` changes, as config_reloaded's fields (`changed=[]`: nothing).

    `changed` lists every changed key as the file spells it (`presence.silence_timeout`, `listen.tokens`,
    `devices`, `endpoints`), never a value; the endpoints are named (`endpoints_added`/`_removed`/`_changed`),
    as are the device rules (`device_rules_changed`, by `match`); the global silence timeout and the log level
    also give `[old, new]`. Tokens and secrets are only ever named: a key such as `tokens_added` would be
    scrubbed to `***` by the log anyway."""
    changed: list[str] = []
    for section in _SECTIONS:
        before, after = getattr(old, section), getattr(new, section)
        changed += [f"{section}.{f}" for f in before.__struct_fields__ if getattr(before, f) != getattr(after, f)]
    if old.state_dir != new.state_dir:
        changed.append("state_dir")
    if old.store != new.store:
        changed.append("store")  # named, never shown: the URL may hold a password
    if (old.mqtt is None) != (new.mqtt is None):
        changed.append("mqtt")
    elif old.mqtt is not None and new.mqtt is not None:
        # `password` is named like any other key, never shown
        changed += [f"mqtt.{f}" for f in old.mqtt.__struct_fields__ if getattr(old.mqtt, f) != getattr(new.mqtt, f)]
    if (old.upstream is None) != (new.upstream is None):
        changed.append("upstream")
    elif old.upstream is not None and new.upstream is not None:  # `secret` is named like any other key
        up, nu = old.upstream, new.upstream
        changed += [f"upstream.{f}" for f in up.__struct_fields__ if getattr(up, f) != getattr(nu, f)]
    out: dict[str, object] = {}
    rules = _rules_changed(old.devices, new.devices)
    if rules:
        changed.append("devices")
        out["device_rules_changed"] = rules
    was = {e.name: e for e in old.endpoints}
    now = {e.name: e for e in new.endpoints}
    named = {
        "endpoints_added": [n for n in now if n not in was],
        "endpoints_removed": [n for n in was if n not in now],
        "endpoints_changed": [n for n in now if n in was and was[n] != now[n]],
    }
    if any(named.values()) or list(was) != list(now):
        changed.append("endpoints")
    out.update({k: v for k, v in named.items() if v})
    if old.presence.silence_timeout != new.presence.silence_timeout:
        out["silence_timeout"] = [_timeout(old.presence.silence_timeout), _timeout(new.presence.silence_timeout)]
    if old.logging.level != new.logging.level:
        out["log_level"] = [old.logging.level, new.logging.level]
    return {"changed": changed, **out}
