"""Loading: the YAML file -> data (strictly), data -> a validated `Config`, and the rules that span fields.

`load_config` reads the file with a strict YAML loader (duplicate keys, deep nesting, alias bombs and
self-containing values are refused before anything walks the data), `parse_config` converts the data key by
key (`convert.Converter`) and applies the endpoint rules that involve more than one key (secrets and
signatures, headers). Every problem is collected as ``key.path: message``; `ConfigError.problems` carries the
list. From a file, the list is in file order and each problem ends in ``(line N)``, where its key (or the
mapping of a missing key) is. Messages never contain secrets, tokens or values taken from the environment.
"""

import base64
import binascii
import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from webhookd import messages
from webhookd.payloads import event_type_for

from . import fleet, mqtt
from .convert import Converter, key_path, kind
from .schema import (
    DEFAULT_SIGNATURE_HEADER,
    EVENT_KINDS,
    HEADER_NAME,
    RESERVED_HEADERS,
    UPSTREAM_ENDPOINT,
    Config,
    DeliveryConfig,
    EndpointConfig,
    HubConfig,
    UpstreamConfig,
    check_secret,
)
from .units import redact_url, url_is_link_local


class ConfigError(Exception):
    """The config is invalid; `problems` lists every problem as ``key.path: message``."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


# ----------------------------------------------------------------------------------------------------
# Endpoints: the rules that span keys
# ----------------------------------------------------------------------------------------------------

_HEADER_NAME = re.compile(HEADER_NAME)
LINK_LOCAL = "link-local address (cloud metadata lives there): refused without allow_link_local: true"
AUTH_WITH_CREDENTIALS = "cannot be used with credentials in url (user:password@...); keep one of the two"


def _endpoints(c: Converter, value: object, delivery: DeliveryConfig) -> tuple[EndpointConfig, ...]:
    ok, items = c.value(value, list[Any], "endpoints")
    if not ok:
        return ()
    endpoints: list[EndpointConfig] = []
    names: dict[str, int] = {}
    for i, item in enumerate(items):
        path = f"endpoints[{i}]"
        ep = _endpoint(c, item, path, delivery)
        name = ep.name if ep is not None else None
        if name is None and isinstance(item, dict) and isinstance(item.get("name"), str):
            name = item["name"]
        if isinstance(name, str) and name.lower() == UPSTREAM_ENDPOINT:
            c.add(f"{path}.name", f"{name!r} is reserved (the relay to a hub: configure it with upstream:)")
            ep = None
        elif name is not None:
            if name in names:
                c.add(f"{path}.name", f"duplicate endpoint name {name!r} (also endpoints[{names[name]}])")
                ep = None
            else:
                names[name] = i
        if ep is not None:
            endpoints.append(ep)
    return tuple(endpoints)


def _endpoint(c: Converter, item: object, path: str, delivery: DeliveryConfig) -> EndpointConfig | None:
    n_before = len(c.problems)
    values = c.fields(item, EndpointConfig, path, custom={"headers": functools.partial(_headers, c)})
    if values is None or not isinstance(item, dict):
        return None
    # Given, even if invalid (then its problem is enough: no "needs a secret" follows).
    has_secret, has_file = isinstance(item.get("secret"), str | list), isinstance(item.get("secret_file"), str)
    secret_given = has_secret or has_file
    if has_secret and has_file:
        c.add(f"{path}.secret_file", "use either secret or secret_file, not both")
    pairs = [] if has_secret and has_file else _secrets(c, item, values, path)
    values["secrets"] = tuple(s for _, s in pairs)
    explicit = values.get("signature")
    signature = values.setdefault("signature", "hmac-sha256" if secret_given else "none")
    if explicit not in (None, "none") and not secret_given:
        c.add(f"{path}.signature", f"{signature} needs a secret (set secret or secret_file)")
    if signature == "standard-webhooks":
        for spath, s in pairs:
            if not _is_whsec(s):
                c.add(spath, "standard-webhooks needs secrets of the form whsec_<base64>")
    if values.get("secret_field") is not None and not secret_given:
        c.add(f"{path}.secret_field", "needs a secret (set secret or secret_file)")
    _format_keys(c, item, values, path)
    # Delivery refuses a link-local literal (sender.Target): say so now. (A DNS name is checked at delivery.)
    allowed = values.get("allow_link_local", False) or c.bad(f"{path}.allow_link_local")
    if "url" in values and not allowed and url_is_link_local(values["url"]):
        c.add(f"{path}.url", LINK_LOCAL)
    values.setdefault("timeout", delivery.timeout)
    if len(c.problems) != n_before:
        return None
    try:
        return EndpointConfig(**values)
    except TypeError:  # a required key missing, its problem reported before us (a ${VAR} not set in url)
        return None


TEMPLATE_KEYS = ("template", "template_file", "content_type")
NOT_AN_OBJECT = "not for format: {0} (its body is not a JSON object of webhookd's)"


def _format_keys(c: Converter, item: dict[Any, Any], values: dict[str, Any], path: str) -> None:
    """The keys of `format: template` (CONTRACT §13): there and only there, one source, and a template that
    renders every event type the endpoint can get (and `webhook.test`) with a sample event."""
    if c.bad(f"{path}.format"):
        return
    fmt = values.get("format", "webhookd")
    if fmt in ("ntfy", "template") and item.get("secret_field") is not None:
        c.add(f"{path}.secret_field", NOT_AN_OBJECT.format(fmt))
    given = [k for k in TEMPLATE_KEYS if item.get(k) is not None]
    if fmt != "template":
        for key in given:
            c.add(f"{path}.{key}", "only for format: template")
        return
    if "template" in given and "template_file" in given:
        c.add(f"{path}.template_file", "use either template or template_file, not both")
        return
    if "template" not in given and "template_file" not in given:
        c.add(f"{path}.template", "required with format: template (or template_file: PATH)")
        return
    if "template_file" in given:
        tpath, where = f"{path}.template_file", "template file"
        if c.bad(tpath) or values.get("template_file") is None:
            return
        source = _read_template(c, tpath, values["template_file"])
        if source is None:
            return
        values["template"] = source
    else:
        tpath, where = f"{path}.template", "template"
        if c.bad(tpath) or "template" not in values:
            return
    if c.bad(f"{path}.content_type") or c.bad(f"{path}.events"):
        return
    events = values.get("events", frozenset(EVENT_KINDS))
    kinds = [event_type_for(k) for k in EVENT_KINDS if k in events] + ["webhook.test"]
    ctype = values.get("content_type", "application/json")
    problem = messages.check_template(values["template"], ctype, values.get("name", ""), kinds, where)
    if problem is not None:
        c.add(tpath, problem)


def _read_template(c: Converter, tpath: str, p: Path) -> str | None:
    text = c.read_text(tpath, p)
    if text is None:
        return None
    if not text.strip():
        c.add(tpath, f"empty template file: {p}")
        return None
    return text


def _secrets(c: Converter, item: dict[Any, Any], values: dict[str, Any], path: str) -> list[tuple[str, str]]:
    """(key path, secret) pairs from `secret` or `secret_file`; problems for the invalid ones."""
    if "secrets" in values:
        raw = item["secret"]
        if isinstance(raw, str):
            return [(f"{path}.secret", s) for s in values["secrets"]]
        return [
            (f"{path}.secret[{i}]", s)
            for i, s in enumerate(raw)
            if isinstance(s, str) and not c.bad(f"{path}.secret[{i}]")
        ]
    if values.get("secret_file") is None:
        return []
    fpath, p = f"{path}.secret_file", values["secret_file"]
    content = c.read_text(fpath, p)
    if content is None:
        return []
    lines = [(n, line.strip()) for n, line in enumerate(content.splitlines(), 1) if line.strip()]
    if not lines:
        c.add(fpath, f"no secret in {p}")
    pairs: list[tuple[str, str]] = []
    for n, s in lines:
        spath = f"{fpath} (line {n} of the file)"
        try:
            pairs.append((spath, check_secret(s, c.at(spath))))
        except ValueError as e:
            c.add(spath, str(e))
    return pairs


def _is_whsec(secret: str) -> bool:
    if not secret.startswith("whsec_"):
        return False
    try:
        return len(base64.b64decode(secret[6:], validate=True)) > 0
    except (binascii.Error, ValueError):
        return False


def _headers(c: Converter, raw: object, path: str, before: dict[str, Any]) -> dict[str, str]:
    """`headers`, given the keys before it (`signature_header` is reserved too, `url` may carry credentials)."""
    if not isinstance(raw, dict):
        c.add(path, f"expected a mapping or null, got {kind(raw)}")
        return {}
    out: dict[str, str] = {}
    seen: set[str] = set()
    reserved = RESERVED_HEADERS | {before.get("signature_header", DEFAULT_SIGNATURE_HEADER).lower()}
    for name, value in raw.items():
        hpath = key_path(path, name)
        if not isinstance(name, str) or _HEADER_NAME.fullmatch(name) is None:
            c.add(hpath, "invalid header name")
        elif name.lower() in reserved:
            c.add(hpath, "reserved header (set by webhookd)")
        elif name.lower() in seen:
            c.add(hpath, "duplicate header (names are case-insensitive)")
        else:
            seen.add(name.lower())
            if isinstance(value, bool) or not isinstance(value, str | int):
                c.add(hpath, f"expected a string, got {kind(value)}")
            elif any(ch in "\r\n\0" for ch in str(value)):
                c.add(hpath, "header value must not contain CR, LF or NUL")
            else:
                out[name] = str(value)
    # aiohttp refuses every request with both (`Cannot combine AUTHORIZATION header with ...`).
    auth = [name for name in out if name.lower() == "authorization"]
    if auth and "url" in before and "@" in urlsplit(before["url"]).netloc:
        c.add(key_path(path, auth[0]), AUTH_WITH_CREDENTIALS)
    return out


# ----------------------------------------------------------------------------------------------------
# Data -> Config
# ----------------------------------------------------------------------------------------------------

MAX_VALUES = 200_000  # values in a config once YAML aliases are expanded (real ones have a few hundred)
MAX_DEPTH = 64


def _check_shape(data: object) -> None:
    """Refuse what YAML aliases can build but no config needs, before anything walks it recursively: a value
    that contains itself (`a: &x [*x]`), an alias bomb ("billion laughs": a few lines expanding to billions of
    values), or nesting deeper than MAX_DEPTH."""
    count = 0
    stack: list[tuple[object, str, tuple[int, ...]]] = [(data, "", ())]
    while stack:
        node, path, ancestors = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise ConfigError([f"config: more than {MAX_VALUES} values (YAML aliases expanding too much?)"])
        if not isinstance(node, dict | list):
            continue
        if id(node) in ancestors:
            raise ConfigError([f"{path or 'config'}: contains itself (a recursive YAML alias)"])
        if len(ancestors) >= MAX_DEPTH:
            raise ConfigError([f"{path or 'config'}: nested more than {MAX_DEPTH} levels deep"])
        inner = (*ancestors, id(node))
        if isinstance(node, dict):
            stack.extend((v, key_path(path, k), inner) for k, v in node.items())
        else:
            stack.extend((v, f"{path}[{i}]", inner) for i, v in enumerate(node))


Lines = Mapping[str, tuple[int, int]]  # key path -> (line, column) in the file, 1-based


def _where(path: str, lines: Lines) -> tuple[int, int] | None:
    """Where `path` (or the nearest key above it that the file spells: a missing key's mapping) is."""
    while True:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["), path.rfind(" "))
        if cut <= 0:
            return None
        path = path[:cut]


def _in_file_order(problems: list[str], paths: list[str], lines: Lines) -> list[str]:
    """The problems sorted by where the file has them, each with ``(line N)``; those with no place first."""
    placed = [(_where(p, lines), problem) for p, problem in zip(paths, problems, strict=True)]
    placed.sort(key=lambda x: x[0] or (0, 0))  # stable: one place's problems keep their order
    return [problem if at is None else f"{problem} (line {at[0]})" for at, problem in placed]


def parse_config(
    data: object,
    base_dir: Path,
    env: Mapping[str, str] | None = None,
    path: Path | None = None,
    lines: Lines | None = None,
) -> Config:
    """Validate already-loaded YAML data; relative paths resolve against `base_dir`. Raises ConfigError.

    With `lines` (from the YAML nodes), problems are listed in file order, each with its ``(line N)``."""
    c = Converter(Path(os.path.abspath(base_dir)), os.environ if env is None else env)
    if data is None:
        raise ConfigError(["config: the file is empty (expected a mapping of settings)"])
    if not isinstance(data, dict):
        raise ConfigError([f"config: the top level must be a mapping, got {kind(data)}"])
    _check_shape(data)
    data = c.substitute(data, "")

    def endpoints(value: object, _path: str, before: dict[str, Any]) -> tuple[EndpointConfig, ...]:
        return _endpoints(c, value, before.get("delivery") or DeliveryConfig())

    def mqtt_section(value: object, path: str, _before: dict[str, Any]) -> mqtt.MqttConfig | None:
        return mqtt.resolve(c, value, path)  # its rules across keys are with its schema, in mqtt.py

    def upstream(value: object, path: str, _before: dict[str, Any]) -> UpstreamConfig | None:
        return fleet.upstream(c, value, path)

    def hub(value: object, path: str, _before: dict[str, Any]) -> HubConfig | None:
        return fleet.hub(c, value, path)

    custom = {"endpoints": endpoints, "mqtt": mqtt_section, "upstream": upstream, "hub": hub}
    values = c.fields(data, Config, "", custom=custom)
    if values is not None and values.get("hub") is not None:  # a hub serves its gateways only
        if values.get("mqtt") is not None:
            c.add("mqtt", "a hub (hub:) serves no MQTT: its devices report to a gateway")
        listen = values.get("listen")
        if listen is not None and listen.udp is not None:
            c.add("listen.udp", "a hub (hub:) serves no device heartbeats: its devices report to a gateway")
        if listen is not None and listen.http is None:
            c.add("listen.http", "a hub (hub:) takes its gateways' relays on listen.http: it must not be null")
    if c.problems or values is None:
        raise ConfigError(c.problems if lines is None else _in_file_order(c.problems, c.paths, lines))
    if values.get("upstream") is not None:  # its relay goes through the outbox like any endpoint
        values["endpoints"] = (*values.get("endpoints", ()), fleet.relay_endpoint(values["upstream"]))
    return Config(path=path, **values)


# ----------------------------------------------------------------------------------------------------
# The file -> data
# ----------------------------------------------------------------------------------------------------

YAML_MAX_NESTING = 2 * MAX_DEPTH  # collections inside each other in the text (`_check_shape` allows MAX_DEPTH)


class _TooDeep(Exception):
    def __init__(self, mark: yaml.Mark) -> None:
        self.mark = mark


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that also records duplicate mapping keys (PyYAML silently keeps the last one) and
    refuses nesting deeper than YAML_MAX_NESTING while scanning.

    The depth limit is checked where the scanner opens a collection, before PyYAML pays for it: its scanner
    does work proportional to the flow depth for every token (10 KB of ``[`` took seconds), and its composer
    recurses once per level."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, int, str]] = []

    def _nest(self) -> None:
        if self.flow_level + len(self.indents) >= YAML_MAX_NESTING:
            raise _TooDeep(self.get_mark())

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        self._nest()  # '[' or '{'
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column: int) -> bool:
        if self.indent < column:
            self._nest()  # a block mapping or sequence (called outside flow collections only)
        return super().add_indent(column)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
                seen.add(key)
            except TypeError:  # unhashable key; construct_mapping reports it
                continue
            if dup:
                m = key_node.start_mark
                where = f"line {m.line + 1}, column {m.column + 1}"
                self.duplicates.append((m.line, m.column, f"{where}: duplicate key {key!r}"))
        return super().construct_mapping(node, deep=deep)


def _node_lines(loader: _StrictLoader, root: yaml.Node | None) -> dict[str, tuple[int, int]]:
    """Key path -> (line, column) of its key (or list item) in the file, from the composed nodes (after
    construction: merge keys are flattened in them then). A node reached twice through aliases is walked once."""
    out: dict[str, tuple[int, int]] = {}
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [] if root is None else [(root, "")]
    while stack and len(out) < MAX_VALUES:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                try:
                    key = loader.construct_object(key_node)
                except (yaml.YAMLError, ValueError, TypeError, OverflowError):
                    continue
                kpath = key_path(path, key)
                m = key_node.start_mark
                out[kpath] = (m.line + 1, m.column + 1)  # the last one wins, as in the constructed mapping
                stack.append((value_node, kpath))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                ipath = f"{path}[{i}]"
                out[ipath] = (item.start_mark.line + 1, item.start_mark.column + 1)
                stack.append((item, ipath))
    return out


def _load_yaml(text: str, shown: str) -> tuple[object, dict[str, tuple[int, int]]]:
    """The data of the single document in `text`, and where each key path is (`_node_lines`)."""
    try:
        loader = _StrictLoader(text)  # checks every character first (control characters are refused)
    except yaml.reader.ReaderError as e:
        raise ConfigError(
            [f"{shown}: invalid YAML at character {e.position}: {e.reason} (#x{e.character:04x})"]
        ) from None
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
        lines = _node_lines(loader, node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = e.problem or e.context or "syntax error"
        raise ConfigError([f"{shown}: invalid YAML{where}: {what}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{shown}: invalid YAML: {e}"]) from None
    except _TooDeep as e:
        where = f"line {e.mark.line + 1}, column {e.mark.column + 1}"
        raise ConfigError([f"{shown}: {where}: nested more than {YAML_MAX_NESTING} levels deep"]) from None
    except RecursionError:
        raise ConfigError([f"{shown}: invalid YAML: nested too deeply"]) from None
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError) as e:
        # PyYAML's constructors raise these for tagged scalars they cannot convert (`!!int ""`, `!!float x`).
        raise ConfigError([f"{shown}: invalid YAML: a value cannot be converted ({type(e).__name__})"]) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError([f"{shown}: {d}" for _, _, d in sorted(loader.duplicates)])
    return data, lines


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate the YAML config at `path`. Raises ConfigError listing every problem."""
    p = Path(path)
    shown = str(p)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{shown}: file not found"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{shown}: is a directory, not a config file"]) from None
    except OSError as e:
        raise ConfigError([f"{shown}: cannot read: {e.strerror or e.__class__.__name__}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"{shown}: not UTF-8 text (byte {e.start})"]) from None
    data, lines = _load_yaml(text, shown)
    absolute = Path(os.path.abspath(p))
    return parse_config(data, absolute.parent, env, absolute, lines)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def summary(cfg: Config) -> str:
    """One line for ``check-config``; never includes secrets, tokens or header values."""
    parts = []
    names = [ep.name for ep in cfg.endpoints]
    shown = ", ".join(names[:10]) + (f", +{len(names) - 10} more" if len(names) > 10 else "")
    parts.append(_plural(len(names), "endpoint") + (f" ({shown})" if names else ""))
    parts.append(_plural(len(cfg.devices), "device rule"))
    parts.append(f"http {cfg.listen.http}" if cfg.listen.http is not None else "http off")
    if cfg.listen.udp is not None:
        parts.append(f"udp {cfg.listen.udp}")
    if cfg.listen.tokens:
        parts.append(_plural(len(cfg.listen.tokens), "token"))
    parts.append(f"state_dir {cfg.state_dir}")
    if cfg.store is not None:
        parts.append(f"store {redact_url(cfg.store)}")
    if cfg.upstream is not None:
        parts.append(f"relay to {redact_url(cfg.upstream.url)} as {cfg.upstream.gateway}")
    if cfg.hub is not None:
        gateways = [gw.name for gw in cfg.hub.gateways]
        shown = ", ".join(gateways[:10]) + (f", +{len(gateways) - 10} more" if len(gateways) > 10 else "")
        parts.append(f"hub for {_plural(len(gateways), 'gateway')} ({shown})")
    return "config OK: " + ", ".join(parts)
