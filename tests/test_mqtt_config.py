"""The `mqtt:` config section (CONTRACT §11): defaults, derived connection settings, every problem with its
key path, password_file and ${VAR}; passwords are never shown."""

import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from webhookd.config import Config, ConfigError, MqttConfig, MqttSourceConfig, load_config, parse_config
from webhookd.config.mqtt import filter_problem

PASSWORD = "Pa55-Never-Shown"
TASMOTA: dict[str, Any] = {"preset": "tasmota"}


def parse(mqtt: object, env: dict[str, str] | None = None, base_dir: Path = Path("/srv/wh")) -> Config:
    return parse_config({"mqtt": mqtt}, base_dir, env={} if env is None else env)


def problems(mqtt: object, env: dict[str, str] | None = None, base_dir: Path = Path("/srv/wh")) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse(mqtt, env, base_dir)
    return ei.value.problems


def one(mqtt: dict[str, Any], **kw: Any) -> MqttConfig:
    cfg = parse({"sources": [TASMOTA], **mqtt}, **kw).mqtt
    assert cfg is not None
    return cfg


# ---------------------------------------------------------------------------------------------------------
# defaults and derived settings
# ---------------------------------------------------------------------------------------------------------


def test_off_without_the_section_or_with_null() -> None:
    assert parse_config({}, Path("/srv"), env={}).mqtt is None
    assert parse(None).mqtt is None


def test_defaults() -> None:
    cfg = one({})
    assert cfg.url == "mqtt://127.0.0.1:1883"
    assert (cfg.host, cfg.port, cfg.tls, cfg.broker) == ("127.0.0.1", 1883, False, "mqtt://127.0.0.1:1883")
    assert cfg.username is None and cfg.password is None and cfg.client_id is None
    assert cfg.effective_client_id == f"webhookd-{socket.gethostname()}"
    assert (cfg.keepalive, cfg.settle, cfg.status_topic, cfg.tls_verify, cfg.ca_file) == (
        30.0,
        30.0,
        "webhookd/status",
        True,
        None,
    )
    assert cfg.sources == (MqttSourceConfig(preset="tasmota"),)
    src = cfg.sources[0]
    assert (src.base, src.devices, src.id_prefix, src.topic, src.device, src.field) == (None, ("*",), "", None, 1, None)
    assert (src.online, src.offline, src.utilizing, src.unplugged, src.heartbeat) == (
        ("online",),
        ("offline",),
        (),
        (),
        False,
    )


@pytest.mark.parametrize(
    ("url", "host", "port", "tls", "broker"),
    [
        ("mqtt://broker.lan", "broker.lan", 1883, False, "mqtt://broker.lan:1883"),
        ("mqtts://broker.lan", "broker.lan", 8883, True, "mqtts://broker.lan:8883"),
        ("MQTTS://broker.lan:9999/", "broker.lan", 9999, True, "mqtts://broker.lan:9999"),
        ("mqtt://[::1]", "::1", 1883, False, "mqtt://[::1]:1883"),
        ("mqtts://bob:s%40cret@10.0.0.2:8884", "10.0.0.2", 8884, True, "mqtts://10.0.0.2:8884"),
    ],
)
def test_url_derived_settings(url: str, host: str, port: int, tls: bool, broker: str) -> None:
    cfg = one({"url": url})
    assert (cfg.host, cfg.port, cfg.tls, cfg.broker) == (host, port, tls, broker)


def test_credentials_in_url_become_username_and_password() -> None:
    cfg = one({"url": "mqtts://bob:s%40cret@10.0.0.2"})
    assert (cfg.username, cfg.password) == ("bob", "s@cret")
    assert "s@cret" not in cfg.broker and "s@cret" not in repr(cfg)


def test_durations_client_id_status_topic_off() -> None:
    cfg = one({"keepalive": "2m", "settle": 0, "client_id": "gw-1", "status_topic": None})
    assert (cfg.keepalive, cfg.settle, cfg.effective_client_id, cfg.status_topic) == (120.0, 0.0, "gw-1", None)


def test_generic_source_and_case_insensitive_preset() -> None:
    cfg = parse(
        {
            "sources": [
                {"preset": "Shelly-Gen2", "devices": ["plug-*"], "id_prefix": "mqtt-"},
                {"topic": "lab/+/x/+", "device": 2, "field": "st", "online": "up", "utilizing": ["busy", "run"]},
            ]
        }
    ).mqtt
    assert cfg is not None
    a, b = cfg.sources
    assert (a.preset, a.devices, a.id_prefix) == ("shelly-gen2", ("plug-*",), "mqtt-")
    assert (b.topic, b.device, b.field, b.online, b.utilizing) == ("lab/+/x/+", 2, "st", ("up",), ("busy", "run"))
    assert b.states() == {"up": "online", "offline": "offline", "busy": "utilizing", "run": "utilizing"}


# ---------------------------------------------------------------------------------------------------------
# passwords: password_file, ${VAR}, never shown
# ---------------------------------------------------------------------------------------------------------


def test_password_from_env(tmp_path: Path) -> None:
    cfg = one({"username": "wh", "password": "${MQTT_PW}"}, env={"MQTT_PW": PASSWORD})
    assert cfg.password == PASSWORD
    assert PASSWORD not in repr(cfg) and PASSWORD not in repr(parse_config({"mqtt": {"sources": [TASMOTA]}}, tmp_path))


def test_password_file_first_line_stripped(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(f"  {PASSWORD}  \nsecond line\n")
    cfg = one({"username": "wh", "password_file": "pw"}, base_dir=tmp_path)
    assert cfg.password == PASSWORD
    assert cfg.password_file == tmp_path / "pw"


def test_password_file_from_a_real_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(PASSWORD + "\n")
    (tmp_path / "c.yaml").write_text(
        "admin: {socket: ./a.sock}\nmqtt:\n  username: wh\n  password_file: pw\n  sources:\n    - preset: esphome\n"
    )
    cfg = load_config(tmp_path / "c.yaml", env={}).mqtt
    assert cfg is not None and cfg.password == PASSWORD


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "mqtt.password_file: file not found: "),
        ("", "mqtt.password_file: no password on the first line of "),
        ("\nlater\n", "mqtt.password_file: no password on the first line of "),
        (b"\xff\xfe", "mqtt.password_file: not a UTF-8 text file: "),
        ("a\x01b\n", "mqtt.password_file: the password in "),
    ],
)
def test_password_file_problems(tmp_path: Path, content: str | bytes | None, expected: str) -> None:
    p = tmp_path / "pw"
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content)
    [problem] = problems({"username": "wh", "password_file": str(p), "sources": [TASMOTA]})
    assert problem.startswith(expected)


def test_password_never_in_a_problem() -> None:
    for mqtt in (
        {"password": PASSWORD, "sources": [TASMOTA]},
        {"password": PASSWORD + "\x07", "username": "u", "sources": [TASMOTA]},
        {"password": PASSWORD, "password_file": "/x", "sources": [TASMOTA]},
        {"url": f"mqtt://u:{PASSWORD}@h x", "sources": [TASMOTA]},
        {"url": f"http://u:{PASSWORD}@h", "sources": [TASMOTA]},
        {"url": f"mqtt://u:{PASSWORD}@h", "username": "v", "sources": [TASMOTA]},
    ):
        found = problems(mqtt)
        assert found and not any(PASSWORD in p for p in found), found


# ---------------------------------------------------------------------------------------------------------
# every problem, with its key path
# ---------------------------------------------------------------------------------------------------------

GOOD_SOURCE = {"topic": "lab/+/presence"}


@pytest.mark.parametrize(
    ("mqtt", "expected"),
    [
        ({}, "mqtt.sources: missing required key (at least one source)"),
        ({"sources": []}, "mqtt.sources: must list at least one source"),
        ({"sources": None}, "mqtt.sources: expected a list, got null"),
        ({"sources": [5]}, "mqtt.sources[0]: expected a mapping, got an integer"),
        ([], "mqtt: expected a mapping, got a list"),
        ({"sources": [TASMOTA], "bogus": 1}, "mqtt.bogus: unknown key"),
        (
            {"sources": [{"preset": "tasmota", "topik": "x"}]},
            "mqtt.sources[0].topik: unknown key (did you mean 'topic'?)",
        ),
        # url
        ({"url": "http://h", "sources": [TASMOTA]}, "mqtt.url: must be mqtt:// or mqtts:// (TLS)"),
        ({"url": "ws://h", "sources": [TASMOTA]}, "mqtt.url: must be mqtt:// or mqtts:// (TLS)"),
        ({"url": "mqtt://", "sources": [TASMOTA]}, "mqtt.url: must have a host (mqtt://host[:port])"),
        ({"url": "mqtt://:1883", "sources": [TASMOTA]}, "mqtt.url: must have a host (mqtt://host[:port])"),
        ({"url": "mqtt://h:99999", "sources": [TASMOTA]}, "mqtt.url: invalid URL (expected mqtt://host[:port]"),
        ({"url": "mqtt://h/x", "sources": [TASMOTA]}, "mqtt.url: must be mqtt://host[:port] without a path"),
        ({"url": "mqtt://h x", "sources": [TASMOTA]}, "mqtt.url: must not contain whitespace"),
        ({"url": 5, "sources": [TASMOTA]}, "mqtt.url: expected a string, got an integer"),
        # credentials
        ({"password": "p", "password_file": "/x", "sources": [TASMOTA]}, "mqtt.password_file: use either password or"),
        ({"password": "p", "sources": [TASMOTA]}, "mqtt.password: needs a username"),
        ({"url": "mqtt://u:p@h", "username": "v", "sources": [TASMOTA]}, "mqtt.url: credentials in url and username"),
        ({"username": "", "sources": [TASMOTA]}, "mqtt.username: must not be empty (use null for none)"),
        ({"username": "a\nb", "sources": [TASMOTA]}, "mqtt.username: must not contain control characters"),
        ({"client_id": "", "sources": [TASMOTA]}, "mqtt.client_id: must be 1-256 characters (got 0)"),
        # TLS settings without TLS
        ({"ca_file": "/etc/hostname", "sources": [TASMOTA]}, "mqtt.ca_file: needs an mqtts:// url (TLS)"),
        ({"tls_verify": False, "sources": [TASMOTA]}, "mqtt.tls_verify: needs an mqtts:// url (TLS)"),
        ({"url": "mqtts://h", "ca_file": "/nonexistent/ca.pem", "sources": [TASMOTA]}, "mqtt.ca_file: file not found"),
        # durations
        ({"keepalive": "0s", "sources": [TASMOTA]}, "mqtt.keepalive: must be 1s-65535s"),
        ({"keepalive": "500ms", "sources": [TASMOTA]}, "mqtt.keepalive: must be 1s-65535s"),
        ({"keepalive": 65536, "sources": [TASMOTA]}, "mqtt.keepalive: must be 1s-65535s"),
        ({"keepalive": "1.5s", "sources": [TASMOTA]}, "mqtt.keepalive: must be a whole number of seconds"),
        ({"keepalive": "soon", "sources": [TASMOTA]}, "mqtt.keepalive: invalid duration 'soon'"),
        ({"settle": -1, "sources": [TASMOTA]}, "mqtt.settle: must be >= 0"),
        ({"settle": "-1s", "sources": [TASMOTA]}, "mqtt.settle: invalid duration"),
        # status_topic
        ({"status_topic": "webhookd/+", "sources": [TASMOTA]}, "mqtt.status_topic: must not contain wildcards"),
        ({"status_topic": "webhookd/#", "sources": [TASMOTA]}, "mqtt.status_topic: must not contain wildcards"),
        ({"status_topic": "", "sources": [TASMOTA]}, "mqtt.status_topic: must not be empty"),
        ({"status_topic": "$SYS/x", "sources": [TASMOTA]}, "mqtt.status_topic: topics starting with '$'"),
        # presets against generic keys
        ({"sources": [{}]}, "mqtt.sources[0]: needs preset (tasmota, esphome, shelly, shelly-gen2, zigbee2mqtt, "),
        ({"sources": [{"devices": ["a*"]}]}, "mqtt.sources[0]: needs preset"),
        ({"sources": [{"preset": "homie"}]}, "mqtt.sources[0].preset: must be one of tasmota, esphome, shelly, "),
        ({"sources": [{"preset": "tasmota", "topic": "a/+"}]}, "mqtt.sources[0].topic: is for a generic source"),
        ({"sources": [{"preset": "esphome", "online": ["up"]}]}, "mqtt.sources[0].online: is for a generic source"),
        ({"sources": [{"preset": "esphome", "field": "s"}]}, "mqtt.sources[0].field: is for a generic source"),
        ({"sources": [{"preset": "esphome", "device": 1}]}, "mqtt.sources[0].device: is for a generic source"),
        ({"sources": [{"preset": "esphome", "heartbeat": True}]}, "mqtt.sources[0].heartbeat: is for a generic source"),
        ({"sources": [{"topic": "a/+", "base": "x"}]}, "mqtt.sources[0].base: is for a preset"),
        ({"sources": [{"preset": "tasmota", "base": "a/+"}]}, "mqtt.sources[0].base: must not contain wildcards"),
        ({"sources": [{"preset": "tasmota", "base": "tele/"}]}, "mqtt.sources[0].base: must not end with '/'"),
        (
            {"sources": [{"preset": "tasmota", "devices": []}]},
            "mqtt.sources[0].devices: must list at least one pattern",
        ),
        ({"sources": [{"preset": "tasmota", "devices": [""]}]}, "mqtt.sources[0].devices[0]: empty pattern"),
        ({"sources": [{"preset": "tasmota", "devices": "a*"}]}, "mqtt.sources[0].devices: expected a list of strings"),
        (
            {"sources": [{"preset": "tasmota", "id_prefix": "a\tb"}]},
            "mqtt.sources[0].id_prefix: must not contain control",
        ),
        # topic filters and the device level
        ({"sources": [GOOD_SOURCE, {"topic": "a/#/b"}]}, "mqtt.sources[1].topic: invalid topic filter: '#' must be a"),
        ({"sources": [{"topic": "a/b#"}]}, "mqtt.sources[0].topic: invalid topic filter: '#' must be a whole level"),
        ({"sources": [{"topic": "a/+b"}]}, "mqtt.sources[0].topic: invalid topic filter: '+' must be a whole level"),
        ({"sources": [{"topic": "a/\x00/+"}]}, "mqtt.sources[0].topic: invalid topic filter: must not contain NUL"),
        ({"sources": [{"topic": "+/" + "x" * 65535}]}, "mqtt.sources[0].topic: invalid topic filter: must be at most"),
        ({"sources": [{"topic": "a/b"}]}, "mqtt.sources[0].topic: needs a '+' level for the device id"),
        ({"sources": [{"topic": "a/#"}]}, "mqtt.sources[0].topic: needs a '+' level for the device id"),
        ({"sources": [GOOD_SOURCE, {"topic": "a/+/b", "device": 2}]}, "mqtt.sources[1].device: must be 1-1: the"),
        ({"sources": [{"topic": "+/+/#", "device": 3}]}, "mqtt.sources[0].device: must be 1-2: the filter has 2"),
        ({"sources": [{"topic": "a/+", "device": 0}]}, "mqtt.sources[0].device: must be >= 1"),
        # state payloads
        (
            {"sources": [{"topic": "a/+", "offline": ["online"]}]},
            "mqtt.sources[0].offline[0]: payload 'online' is also",
        ),
        (
            {"sources": [{"topic": "a/+", "utilizing": ["x"], "unplugged": ["y", "x"]}]},
            "mqtt.sources[0].unplugged[1]: payload 'x' is also in utilizing",
        ),
        ({"sources": [{"topic": "a/+", "online": [""]}]}, "mqtt.sources[0].online[0]: must not be empty"),
        ({"sources": [{"topic": "a/+", "online": [" on"]}]}, "mqtt.sources[0].online[0]: must not start or end with"),
        (
            {"sources": [{"topic": "a/+", "online": [1]}]},
            "mqtt.sources[0].online[0]: expected a string, got an integer",
        ),
        ({"sources": [{"topic": "a/+", "field": ""}]}, "mqtt.sources[0].field: must not be empty (use null for none)"),
        ({"sources": [{"topic": "a/+", "heartbeat": "yes"}]}, "mqtt.sources[0].heartbeat: expected true or false"),
    ],
)
def test_problem(mqtt: object, expected: str) -> None:
    found = problems(mqtt)
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_at_once() -> None:
    found = problems(
        {
            "url": "http://h",
            "keepalive": 0,
            "sources": [{"topic": "a/+", "device": 2}, {"preset": "zigbee2mqtt", "topic": "x/+"}, {}],
        }
    )
    assert [p.split(":")[0] for p in found] == [
        "mqtt.url",
        "mqtt.keepalive",
        "mqtt.sources[0].device",
        "mqtt.sources[1].topic",
        "mqtt.sources[2]",
    ]


def test_problems_have_file_lines(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "admin: {socket: ./a.sock}\nmqtt:\n  sources:\n    - preset: esphome\n    - topic: a/+\n      device: 3\n"
    )
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "c.yaml", env={})
    assert ei.value.problems == ["mqtt.sources[1].device: must be 1-1: the filter has 1 '+' level(s) (line 6)"]


def test_missing_env_var_named() -> None:
    assert problems({"username": "u", "password": "${NOPE}", "sources": [TASMOTA]}) == [
        "mqtt.password: environment variable NOPE not set"
    ]


# ---------------------------------------------------------------------------------------------------------
# topic filter validity (MQTT 3.1.1 §4.7), against paho's matcher as an independent reading of the rules
# ---------------------------------------------------------------------------------------------------------

LEVEL = st.sampled_from(["a", "b", "+", "#", "", "a+", "#b", "x y", "é"])


@given(st.lists(LEVEL, min_size=1, max_size=6))
def test_filter_validity_by_rule(levels: list[str]) -> None:
    f = "/".join(levels)
    valid = f != "" and all(
        (lv == "#" and i == len(levels) - 1) or ("#" not in lv and (lv == "+" or "+" not in lv))
        for i, lv in enumerate(levels)
    )
    assert (filter_problem(f) is None) == valid, f
