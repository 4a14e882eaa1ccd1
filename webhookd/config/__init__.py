"""Configuration: YAML file -> validated, resolved, immutable `Config` (CONTRACT §3).

- `units`: durations, sizes, host:port and paths as the file spells them; the annotations the schema uses
- `schema`: the Structs, declared once: what the file may contain and the `Config` the daemon gets
- `convert`: key-by-key conversion and ``${VAR}``, every problem reported by key path
- `mqtt`: the `mqtt:` section (broker, sources) and its rules across keys
- `load`: the strict YAML loader, the rules that span keys, `load_config` / `parse_config` / `summary`
"""

from .convert import key_path as _key
from .load import ConfigError, load_config, parse_config, summary
from .mqtt import MqttConfig, MqttSourceConfig
from .schema import (
    EVENT_KINDS,
    FORMATS,
    LOG_FORMATS,
    LOG_LEVELS,
    SIGNATURES,
    AdminConfig,
    Config,
    DeliveryConfig,
    DeviceRule,
    EndpointConfig,
    EventKind,
    Format,
    ListenConfig,
    LogFormat,
    LoggingConfig,
    LogLevel,
    PresenceConfig,
    Signature,
)
from .units import HostPort, parse_duration, parse_hostport, parse_size, redact_url

__all__ = [
    "EVENT_KINDS",
    "FORMATS",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "SIGNATURES",
    "AdminConfig",
    "Config",
    "ConfigError",
    "DeliveryConfig",
    "DeviceRule",
    "EndpointConfig",
    "EventKind",
    "Format",
    "HostPort",
    "ListenConfig",
    "LogFormat",
    "LogLevel",
    "LoggingConfig",
    "MqttConfig",
    "MqttSourceConfig",
    "PresenceConfig",
    "Signature",
    "_key",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_hostport",
    "parse_size",
    "redact_url",
    "summary",
]
