"""Tests for webhookd.config: schema, validation messages, resolution (CONTRACT §3)."""

import base64
import copy
import time
from pathlib import Path
from typing import Any

import pytest

from webhookd.config import (
    EVENT_KINDS,
    Config,
    ConfigError,
    HostPort,
    load_config,
    parse_config,
    parse_duration,
    parse_hostport,
    parse_size,
    redact_url,
    summary,
)

REPO = Path(__file__).resolve().parent.parent
WHSEC = "whsec_" + base64.b64encode(bytes(range(32))).decode()
SECRET = "S3cr3t-Value-Never-Shown"


def problems_of(data: object, base_dir: Path = Path("/srv/wh"), env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        parse_config(data, base_dir, env={} if env is None else env)
    return ei.value.problems


def parse(data: object, base_dir: Path = Path("/srv/wh"), env: dict[str, str] | None = None) -> Config:
    return parse_config(data, base_dir, env={} if env is None else env)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def ep(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "a", "url": "https://hooks.example.com/x"}
    base.update(kw)
    return base


# ---------------------------------------------------------------------------------------------------------
# the example config and defaults
# ---------------------------------------------------------------------------------------------------------


def test_example_config_loads_cleanly() -> None:
    cfg = load_config(REPO / "config.example.yaml", env={})
    assert cfg.path == REPO / "config.example.yaml"
    assert cfg.state_dir == REPO / "var"
    assert cfg.admin.socket == REPO / "var" / "admin.sock"
    assert cfg.listen.http == HostPort(host="127.0.0.1", port=8470)
    assert cfg.listen.udp is None
    assert cfg.listen.tokens == ()
    assert cfg.listen.max_body == 256 * 1024
    assert cfg.presence.silence_timeout == 900.0
    assert cfg.delivery.retry_schedule == (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
    assert cfg.delivery.retention == 7 * 86400
    (sink,) = cfg.endpoints
    assert sink.name == "sink"
    assert sink.url == "http://127.0.0.1:8479/webhook"
    assert sink.format == "webhookd"
    assert sink.signature == "hmac-sha256"
    assert sink.events == frozenset(EVENT_KINDS)
    assert len(sink.secrets) == 1 and sink.secrets[0].startswith("whsec_")
    assert len(base64.b64decode(sink.secrets[0][6:])) == 32
    assert cfg.device_rule("printer-7") is not None
    assert cfg.silence_timeout_for("printer-7") == 120.0
    assert cfg.logging.format == "auto" and cfg.logging.level == "info"
    line = summary(cfg)
    assert line.startswith("config OK: 1 endpoint (sink), 1 device rule, http 127.0.0.1:8470")
    assert sink.secrets[0] not in line


def test_example_config_mentions_every_contract_key() -> None:
    text = (REPO / "config.example.yaml").read_text()
    for key in (
        "state_dir", "listen", "http", "udp", "tokens", "max_body", "admin", "socket", "presence",
        "silence_timeout", "notify_online_after_utilizing", "devices", "match", "owner", "delivery",
        "concurrency", "timeout", "retry_schedule", "disable_after", "retention", "endpoints", "name",
        "url", "description", "events", "format", "secret", "signature", "signature_header",
        "secret_field", "headers", "tls_verify", "ca_file", "allow_link_local", "logging", "level",
    ):  # fmt: skip
        assert f"{key}:" in text, key


def test_defaults_for_an_empty_mapping() -> None:
    cfg = parse({}, Path("/srv/wh"))
    assert cfg.path is None
    assert cfg.state_dir == Path("/srv/wh/var")
    assert cfg.admin.socket == Path("/srv/wh/var/admin.sock")
    assert cfg.listen.http == HostPort(host="127.0.0.1", port=8470)
    assert cfg.listen.max_body == 262144
    assert cfg.delivery.concurrency == 64 and cfg.delivery.timeout == 5.0 and cfg.delivery.disable_after == 20
    assert cfg.presence.notify_online_after_utilizing is False
    assert cfg.endpoints == () and cfg.devices == ()
    assert summary(cfg) == "config OK: 0 endpoints, 0 device rules, http 127.0.0.1:8470, state_dir /srv/wh/var"


def test_empty_sections_mean_defaults() -> None:
    cfg = parse({"listen": None, "devices": None, "endpoints": None, "delivery": None, "logging": None})
    assert cfg.listen.http is not None and cfg.endpoints == ()


def test_endpoint_defaults_and_resolution() -> None:
    cfg = parse({"delivery": {"timeout": "7s"}, "endpoints": [ep(), ep(name="b", secret="k", timeout=2)]})
    a, b = cfg.endpoints
    assert a.events == frozenset(EVENT_KINDS)
    assert a.devices == ("*",)
    assert a.signature == "none" and a.secrets == ()
    assert a.signature_header == "Webhookd-Signature"
    assert a.timeout == 7.0 and a.concurrency == 8
    assert a.tls_verify is True and a.ca_file is None and a.allow_link_local is False
    assert a.headers == {} and a.description == "" and a.secret_field is None
    assert b.signature == "hmac-sha256" and b.secrets == ("k",) and b.timeout == 2.0
    assert cfg.endpoint("b") is b and cfg.endpoint("B") is None


def test_events_all_expands_and_lists_dedupe() -> None:
    cfg = parse({"endpoints": [ep(events=["all"]), ep(name="b", events=["online", "offline", "online"])]})
    assert cfg.endpoints[0].events == frozenset(EVENT_KINDS)
    assert cfg.endpoints[1].events == frozenset({"online", "offline"})


def test_listen_http_null_and_udp() -> None:
    cfg = parse({"listen": {"http": None, "udp": "0.0.0.0:8471", "tokens": ["t1", "t2"]}})
    assert cfg.listen.http is None
    assert cfg.listen.udp == HostPort(host="0.0.0.0", port=8471)
    line = summary(cfg)
    assert "http off" in line and "udp 0.0.0.0:8471" in line and "2 tokens" in line
    assert "t1" not in line and "t2" not in line


def test_standard_webhooks_secret_and_headers() -> None:
    cfg = parse(
        {
            "endpoints": [
                ep(
                    signature="standard-webhooks",
                    secret=[WHSEC, WHSEC.replace("AAEC", "AAED")],
                    headers={"Authorization": "Bearer x", "X-Num": 3},
                    format="kobiton",
                    signature_header="Biotz-IoT-Signature",
                )
            ]
        }
    )
    (e,) = cfg.endpoints
    assert e.signature == "standard-webhooks" and len(e.secrets) == 2
    assert e.headers == {"Authorization": "Bearer x", "X-Num": "3"}
    assert e.format == "kobiton" and e.signature_header == "Biotz-IoT-Signature"


def test_logging_values_are_case_insensitive() -> None:
    cfg = parse({"logging": {"format": "JSON", "level": "WARN"}})
    assert cfg.logging.format == "json" and cfg.logging.level == "warning"


# ---------------------------------------------------------------------------------------------------------
# durations, sizes, host:port
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        ("1h30m", 5400.0),
        (" 10s ", 10.0),
        ("45", 45.0),
        (30, 30.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["abc", "", "5x", "m5", "-5s", -1, True, None, [5], "1e400", float("inf")])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64KiB", 65536),
        ("1MiB", 1048576),
        ("1GiB", 1073741824),
        ("256KiB", 262144),
        ("100KB", 100000),
        ("1MB", 1000000),
        ("512B", 512),
        ("1.5KiB", 1536),
        ("2048", 2048),
        (4096, 4096),
        ("64kib", 65536),
    ],
)
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["abc", "10XB", "", "KiB", "-1KiB", -5, True, None, 1.5])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:8470", "127.0.0.1", 8470),
        ("[::1]:8470", "::1", 8470),
        (":8470", "0.0.0.0", 8470),
        ("localhost:80", "localhost", 80),
        ("0.0.0.0:0", "0.0.0.0", 0),
    ],
)
def test_parse_hostport(text: str, host: str, port: int) -> None:
    hp = parse_hostport(text)
    assert (hp.host, hp.port) == (host, port)


@pytest.mark.parametrize("bad", ["8470", "host", "::1:80", "h:99999", "h:", "[zz]:1", "a b:1", "h:-1"])
def test_parse_hostport_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(bad)


def test_hostport_str() -> None:
    assert str(HostPort(host="::1", port=1)) == "[::1]:1"
    assert str(HostPort(host="127.0.0.1", port=8470)) == "127.0.0.1:8470"


def test_durations_and_sizes_in_config() -> None:
    cfg = parse(
        {
            "listen": {"max_body": "1MiB"},
            "presence": {"silence_timeout": 90},
            "delivery": {"retry_schedule": ["500ms", 30, "1h"], "retention": "1d", "timeout": 2.5},
        }
    )
    assert cfg.listen.max_body == 1 << 20
    assert cfg.presence.silence_timeout == 90.0
    assert cfg.delivery.retry_schedule == (0.5, 30.0, 3600.0)
    assert cfg.delivery.retention == 86400.0 and cfg.delivery.timeout == 2.5


# ---------------------------------------------------------------------------------------------------------
# ${VAR}
# ---------------------------------------------------------------------------------------------------------


def test_env_substitution_anywhere_in_strings() -> None:
    env = {"OPS_SECRET": SECRET, "HOST": "hooks.example.com", "TOKEN": "tok", "DIR": "/data", "CONC": "3"}
    cfg = parse(
        {
            "state_dir": "${DIR}/state",
            "listen": {"tokens": ["${TOKEN}"]},
            "endpoints": [
                ep(
                    url="https://${HOST}/devices",
                    secret="${OPS_SECRET}",
                    headers={"Authorization": "Bearer ${TOKEN}"},
                    description="costs $${NOT_A_VAR}",
                    concurrency="${CONC}",
                )
            ],
        },
        env=env,
    )
    (e,) = cfg.endpoints
    assert cfg.state_dir == Path("/data/state")
    assert cfg.listen.tokens == ("tok",)
    assert e.url == "https://hooks.example.com/devices"
    assert e.secrets == (SECRET,)
    assert e.headers == {"Authorization": "Bearer tok"}
    assert e.description == "costs ${NOT_A_VAR}"
    assert e.concurrency == 3


def test_env_uses_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEBHOOKD_TEST_URL_HOST", "example.org")
    cfg = parse_config({"endpoints": [ep(url="http://${WEBHOOKD_TEST_URL_HOST}/")]}, Path("/x"))
    assert cfg.endpoints[0].url == "http://example.org/"


def test_missing_env_var_names_key_path_and_variable() -> None:
    probs = problems_of(
        {"endpoints": [ep(), ep(name="b", secret="${OPS_SECRET}", headers={"X-T": "${A}${B}"})]},
        env={"A": "value-of-a"},
    )
    assert "endpoints[1].secret: environment variable OPS_SECRET not set" in probs
    assert "endpoints[1].headers.X-T: environment variable B not set" in probs
    assert len(probs) == 2
    assert not any("value-of-a" in p for p in probs)


def test_invalid_env_reference() -> None:
    assert problems_of({"state_dir": "${unterminated"})[0].startswith("state_dir: invalid ${...} reference")


def test_env_values_never_echoed() -> None:
    env = {"DUR": "nonsense-" + SECRET, "URL": "ftp://" + SECRET, "FMT": SECRET}
    probs = problems_of({"delivery": {"timeout": "${DUR}"}, "endpoints": [ep(url="${URL}", format="${FMT}")]}, env=env)
    assert len(probs) == 3
    assert not any(SECRET in p for p in probs)


# ---------------------------------------------------------------------------------------------------------
# paths and secret_file
# ---------------------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    (conf_dir / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (conf_dir / "s.secret").write_text(SECRET + "\n")
    p = write(
        conf_dir,
        "state_dir: ./state\n"
        "admin: {socket: run/admin.sock}\n"
        "endpoints:\n"
        "  - {name: a, url: 'https://h/', ca_file: ca.pem, secret_file: ./s.secret}\n",
    )
    monkeypatch.chdir(tmp_path)  # the cwd must not matter
    cfg = load_config(p, env={})
    assert cfg.state_dir == conf_dir / "state"
    assert cfg.admin.socket == conf_dir / "run" / "admin.sock"
    assert cfg.endpoints[0].ca_file == conf_dir / "ca.pem"
    assert cfg.endpoints[0].secrets == (SECRET,)
    assert cfg.path == p


def test_relative_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "state_dir: var\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("config.yaml", env={})
    assert cfg.path == tmp_path / "config.yaml" and cfg.state_dir == tmp_path / "var"


def test_absolute_paths_kept(tmp_path: Path) -> None:
    cfg = parse({"state_dir": "/var/lib/webhookd", "admin": {"socket": "/run/webhookd/admin.sock"}}, tmp_path)
    assert cfg.state_dir == Path("/var/lib/webhookd")
    assert cfg.admin.socket == Path("/run/webhookd/admin.sock")


def test_secret_file_multiple_lines_for_rotation(tmp_path: Path) -> None:
    (tmp_path / "rot.secret").write_text(f"\n  {WHSEC}  \n\nwhsec_AAAA\n")
    cfg = parse({"endpoints": [ep(secret_file="rot.secret", signature="standard-webhooks")]}, tmp_path)
    assert cfg.endpoints[0].secrets == (WHSEC, "whsec_AAAA")


def test_secret_file_problems(tmp_path: Path) -> None:
    (tmp_path / "empty.secret").write_text("\n\n")
    (tmp_path / "long.secret").write_text("x" * 200 + "\n")
    probs = problems_of(
        {
            "endpoints": [
                ep(name="a", secret_file="missing.secret"),
                ep(name="b", secret_file="empty.secret"),
                ep(name="c", secret_file="long.secret"),
                ep(name="d", secret="x", secret_file="empty.secret"),
            ]
        },
        tmp_path,
    )
    assert probs == [
        f"endpoints[0].secret_file: file not found: {tmp_path / 'missing.secret'}",
        f"endpoints[1].secret_file: no secret in {tmp_path / 'empty.secret'}",
        "endpoints[2].secret_file (line 1 of the file): must be at most 128 characters (got 200)",
        "endpoints[3].secret_file: use either secret or secret_file, not both",
    ]


def test_ca_file_must_exist(tmp_path: Path) -> None:
    probs = problems_of({"endpoints": [ep(ca_file="nope.pem")]}, tmp_path)
    assert probs == [f"endpoints[0].ca_file: file not found: {tmp_path / 'nope.pem'}"]
    probs = problems_of({"endpoints": [ep(ca_file="c" * 300)]}, tmp_path)  # a name too long: no traceback
    assert probs == [f"endpoints[0].ca_file: cannot read {tmp_path / ('c' * 300)}: File name too long"]


# ---------------------------------------------------------------------------------------------------------
# the table of bad configs
# ---------------------------------------------------------------------------------------------------------

BAD: list[tuple[dict[str, Any], str]] = [
    ({"state_dir": ""}, "state_dir: must not be empty"),
    ({"state_dir": 5}, "state_dir: expected a string, got an integer"),
    ({"listen": {"http": "localhost"}}, "listen.http: expected host:port"),
    ({"listen": {"http": 8470}}, "listen.http: expected host:port (or null), got an integer"),
    ({"listen": {"udp": "[::1]"}}, "listen.udp: expected host:port"),
    ({"listen": {"http": "h:70000"}}, "listen.http: port must be 0-65535"),
    ({"listen": {"tokens": ["ok", ""]}}, "listen.tokens[1]: must not be empty"),
    ({"listen": {"tokens": [5]}}, "listen.tokens[0]: expected a string, got an integer"),
    ({"listen": {"max_body": "lots"}}, "listen.max_body: invalid size 'lots'"),
    ({"listen": {"max_body": 0}}, "listen.max_body: must be greater than 0"),
    ({"listen": []}, "listen: expected a mapping, got a list"),
    ({"admin": {"socket": ""}}, "admin.socket: must not be empty"),
    ({"presence": {"silence_timeout": "0s"}}, "presence.silence_timeout: must be greater than 0"),
    ({"presence": {"silence_timeout": "soon"}}, "presence.silence_timeout: invalid duration 'soon'"),
    ({"presence": {"notify_online_after_utilizing": "yes"}}, "notify_online_after_utilizing: expected true or false"),
    ({"devices": [{"silence_timeout": "2m"}]}, "devices[0].match: missing required key"),
    ({"devices": [{"match": "a*", "silence_timeout": -2}]}, "devices[0].silence_timeout: must be greater than 0"),
    ({"devices": [{"match": "a*"}, "b*"]}, "devices[1]: expected a mapping, got a string"),
    ({"devices": [{"match": ""}]}, "devices[0].match: must not be empty"),
    ({"devices": {"match": "x"}}, "devices: expected a list, got a mapping"),
    ({"delivery": {"concurrency": 0}}, "delivery.concurrency: must be >= 1"),
    ({"delivery": {"disable_after": -1}}, "delivery.disable_after: must be >= 0"),
    ({"delivery": {"retry_schedule": []}}, "delivery.retry_schedule: must have at least 1 entry"),
    ({"delivery": {"retry_schedule": ["5s", "5m", "abc"]}}, "delivery.retry_schedule[2]: invalid duration 'abc'"),
    ({"delivery": {"retry_schedule": ["5s", 0]}}, "delivery.retry_schedule[1]: must be greater than 0"),
    ({"delivery": {"timeout": True}}, "delivery.timeout: expected a duration"),
    ({"delivery": {"retention": "forever"}}, "delivery.retention: invalid duration 'forever'"),
    ({"endpoints": [ep(url="ftp://x/y")]}, "endpoints[0].url: must be http or https"),
    ({"endpoints": [ep(), ep(name="b", url="gopher://x")]}, "endpoints[1].url: must be http or https"),
    ({"endpoints": [ep(url="https:///path")]}, "endpoints[0].url: must have a host"),
    ({"endpoints": [ep(url="https://h/" + "x" * 600)]}, "endpoints[0].url: must be at most 512 characters"),
    ({"endpoints": [ep(url="https://h/a b")]}, "endpoints[0].url: must not contain whitespace"),
    ({"endpoints": [ep(url="https://h:99999/")]}, "endpoints[0].url: invalid URL"),
    ({"endpoints": [{"name": "a"}]}, "endpoints[0].url: missing required key"),
    ({"endpoints": [ep(name="")]}, "endpoints[0].name: must be 1-50 characters (got 0)"),
    ({"endpoints": [ep(name="n" * 51)]}, "endpoints[0].name: must be 1-50 characters (got 51)"),
    ({"endpoints": [ep(name="a/b")]}, "endpoints[0].name: must not contain '/'"),
    ({"endpoints": [ep(description="d" * 513)]}, "endpoints[0].description: must be at most 512 characters"),
    ({"endpoints": [ep(events=[])]}, "endpoints[0].events: must list at least one event"),
    ({"endpoints": [ep(events=["online", "rebooted"])]}, "endpoints[0].events[1]: unknown event 'rebooted'"),
    ({"endpoints": [ep(devices=[])]}, "endpoints[0].devices: must list at least one pattern"),
    ({"endpoints": [ep(devices=["a*", 3])]}, "endpoints[0].devices[1]: expected a string, got an integer"),
    ({"endpoints": [ep(format="json")]}, "endpoints[0].format: must be one of webhookd, remoteit, kobiton"),
    ({"endpoints": [ep(signature="hmac-sha1", secret="k")]}, "endpoints[0].signature: must be one of"),
    ({"endpoints": [ep(signature="hmac-sha256")]}, "endpoints[0].signature: hmac-sha256 needs a secret"),
    ({"endpoints": [ep(signature="standard-webhooks")]}, "endpoints[0].signature: standard-webhooks needs a secret"),
    (
        {"endpoints": [ep(signature="standard-webhooks", secret=[WHSEC, "plain"])]},
        "endpoints[0].secret[1]: standard-webhooks needs secrets of the form whsec_<base64>",
    ),
    (
        {"endpoints": [ep(signature="standard-webhooks", secret="whsec_not base64!")]},
        "endpoints[0].secret: standard-webhooks needs secrets of the form whsec_<base64>",
    ),
    ({"endpoints": [ep(secret="")]}, "endpoints[0].secret: must not be empty"),
    ({"endpoints": [ep(secret=["k", "s" * 129])]}, "endpoints[0].secret[1]: must be at most 128 characters"),
    ({"endpoints": [ep(secret=[])]}, "endpoints[0].secret: must list at least one secret"),
    ({"endpoints": [ep(secret=123)]}, "endpoints[0].secret: expected a string or a list of strings, got an integer"),
    ({"endpoints": [ep(secret_field="SecretKey")]}, "endpoints[0].secret_field: needs a secret"),
    ({"endpoints": [ep(signature_header="Bad Header")]}, "endpoints[0].signature_header: invalid header name"),
    ({"endpoints": [ep(headers={"X-A": "a\r\nX-Evil: 1"})]}, "endpoints[0].headers.X-A: header value must not"),
    ({"endpoints": [ep(headers={"Bad Name": "v"})]}, "endpoints[0].headers.Bad Name: invalid header name"),
    ({"endpoints": [ep(headers={"Content-Type": "text/plain"})]}, "endpoints[0].headers.Content-Type: reserved"),
    ({"endpoints": [ep(headers={"X-A": ["v"]})]}, "endpoints[0].headers.X-A: expected a string, got a list"),
    ({"endpoints": [ep(headers=["X-A: v"])]}, "endpoints[0].headers: expected a mapping"),
    (
        {"endpoints": [ep(url="http://alice:pw@h/x", headers={"authorization": "Bearer t"})]},
        "endpoints[0].headers.authorization: cannot be used with credentials in url (user:password@...)",
    ),
    (
        {"endpoints": [ep(url="https://tok@h/", headers={"X-A": "1", "AUTHORIZATION": "Basic x"})]},
        "endpoints[0].headers.AUTHORIZATION: cannot be used with credentials in url",
    ),
    ({"endpoints": [ep(timeout="0s")]}, "endpoints[0].timeout: must be greater than 0"),
    ({"endpoints": [ep(concurrency=0)]}, "endpoints[0].concurrency: must be >= 1"),
    ({"endpoints": [ep(concurrency="8")]}, "endpoints[0].concurrency: expected an integer, got a string"),
    ({"endpoints": [ep(tls_verify="no")]}, "endpoints[0].tls_verify: expected true or false, got a string"),
    ({"endpoints": ["https://h/"]}, "endpoints[0]: expected a mapping, got a string"),
    ({"endpoints": {"name": "a"}}, "endpoints: expected a list, got a mapping"),
    ({"endpoints": [ep(), ep(name="b"), ep(name="a")]}, "endpoints[2].name: duplicate endpoint name 'a'"),
    ({"logging": {"format": "pretty"}}, "logging.format: must be one of auto, json, console (got 'pretty')"),
    ({"logging": {"level": "verbose"}}, "logging.level: must be one of debug, info, warning, error"),
    ({"lisen": {}}, "lisen: unknown key (did you mean 'listen'?)"),
    ({"listen": {"htp": ":1"}}, "listen.htp: unknown key (did you mean 'http'?)"),
    ({"endpoints": [ep(nmae="x")]}, "endpoints[0].nmae: unknown key (did you mean 'name'?)"),
    ({"devices": [{"match": "*", "owner": "x", "silence": "1m"}]}, "devices[0].silence: unknown key"),
    ({"devices": [{"match": "a*", "owner": "o" * 257}]}, "devices[0].owner: must be at most 256 characters (got 257)"),
    ({"devices": [{"match": "a*", "name": "a\x1bb"}]}, "devices[0].name: must not contain control characters"),
    ({"endpoints": [ep(name=" a")]}, "endpoints[0].name: must not start or end with whitespace"),
    ({"endpoints": [ep(description="a\x01b")]}, "endpoints[0].description: must not contain control characters"),
    ({"endpoints": [ep(events="rebooted")]}, "endpoints[0].events: unknown event 'rebooted' (expected online,"),
    ({"endpoints": [ep(events=5)]}, "endpoints[0].events: expected a list of events (online, offline, ... or all)"),
    ({"endpoints": [ep(signature_header="Content-Type")]}, "endpoints[0].signature_header: reserved header"),
    ({"endpoints": [ep(secret="k", secret_field=" ")]}, "endpoints[0].secret_field: must not be empty (use null"),
    ({"endpoints": [ep(headers={"x-a": "1", "X-A": "2"})]}, "endpoints[0].headers.X-A: duplicate header"),
    ({"endpoints": [ep(timeout=[1])]}, "endpoints[0].timeout: expected a duration (e.g. 500ms, 30s, 15m, 2h, 1d), got"),
    ({"endpoints": [ep(secret_file=5)]}, "endpoints[0].secret_file: expected a string or null, got an integer"),
    ({"logging": {"level": 3}}, "logging.level: expected a string, got an integer"),
    (
        {"endpoints": [ep(url="hooks.example.com/devices")]},
        "endpoints[0].url: missing scheme: did you mean https://hooks.example.com/devices?",
    ),
    (
        {"endpoints": [ep(url="localhost:8479/webhook")]},
        "endpoints[0].url: missing scheme: did you mean http://localhost:8479/webhook?",
    ),
    ({"endpoints": [ep(url="/devices")]}, "endpoints[0].url: missing scheme: start with https:// (or http://)"),
    ({"endpoints": [ep(url="http://169.254.169.254/latest/meta-data/")]}, "endpoints[0].url: link-local address"),
    ({"endpoints": [ep(), ep(name="b", url="http://[fe80::1]/")]}, "endpoints[1].url: link-local address (cloud"),
    ({"listen": {"tokens": "abc"}}, "listen.tokens: expected a list of strings, got a string (write [...] even"),
    ({"endpoints": [ep(devices="abc")]}, "endpoints[0].devices: expected a list of strings, got a string"),
]


@pytest.mark.parametrize(("data", "expected"), BAD, ids=[e.split(":")[0] for _, e in BAD])
def test_bad_config(data: dict[str, Any], expected: str) -> None:
    probs = problems_of(copy.deepcopy(data))
    assert any(expected in p for p in probs), probs
    assert len(probs) == 1, probs  # one mistake, one problem: no follow-up noise


def test_bad_table_is_big_enough() -> None:
    assert len(BAD) >= 25


def test_missing_scheme_hint_never_shows_credentials_a_query_or_the_environment() -> None:
    (prob,) = problems_of({"endpoints": [ep(url="hooks.example.com/x?token=" + SECRET)]})
    assert prob == "endpoints[0].url: missing scheme: did you mean https://hooks.example.com/x?...?"
    (prob,) = problems_of({"endpoints": [ep(url="user:" + SECRET + "@hooks.example.com/x")]})
    assert SECRET not in prob
    (prob,) = problems_of({"endpoints": [ep(url="${URL}")]}, env={"URL": "hooks.example.com/" + SECRET})
    assert prob == "endpoints[0].url: missing scheme: start with https:// (or http://)"
    for url in ("mailto:a@example.com", "ftp://example.com/x"):
        assert problems_of({"endpoints": [ep(url=url)]}) == ["endpoints[0].url: must be http or https"]


def test_link_local_urls_need_allow_link_local() -> None:
    urls = ["http://169.254.169.254/x", "http://[fe80::1]/", "http://[fe80::1%25eth0]/", "http://[::ffff:169.254.0.1]/"]
    probs = problems_of({"endpoints": [ep(name=f"e{i}", url=u) for i, u in enumerate(urls)]})
    assert probs == [f"endpoints[{i}].url: link-local address (cloud metadata lives there): refused without "
                     "allow_link_local: true" for i in range(len(urls))]  # fmt: skip
    cfg = parse({"endpoints": [ep(name=f"e{i}", url=u, allow_link_local=True) for i, u in enumerate(urls)]})
    assert len(cfg.endpoints) == len(urls)
    parse({"endpoints": [ep(url="http://10.0.0.5/"), ep(name="b", url="http://metadata.example/")]})  # DNS: at delivery


def test_the_link_local_rule_is_deliverys() -> None:
    from webhookd.config.units import is_link_local
    from webhookd.dispatch import is_link_local as delivery_rule

    for addr in ("169.254.169.254", "169.254.0.0", "fe80::1", "fe80::1%eth0", "FE80::1", "::ffff:169.254.1.1",
                 "10.0.0.1", "127.0.0.1", "::1", "fd00::5", "example.com", "", "256.1.1.1"):  # fmt: skip
        assert is_link_local(addr) == delivery_rule(addr), addr


def test_config_does_not_import_aiohttp() -> None:
    import subprocess
    import sys

    code = "import sys, webhookd.config; assert 'aiohttp' not in sys.modules, 'aiohttp imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_problem_is_reported_at_once() -> None:
    probs = problems_of(
        {
            "listen": {"http": "nonsense"},
            "delivery": {"retry_schedule": ["5s", "abc", "1h", "-"], "concurrency": 0},
            "endpoints": [
                ep(url="ftp://x", nmae="typo", events=["online", "bogus"], concurrency=0),
                ep(name="b", format="xml"),
            ],
            "logging": {"level": "loud"},
            "extra": 1,
        }
    )
    assert probs == [
        "extra: unknown key",
        "listen.http: expected host:port (got 'nonsense')",
        "delivery.retry_schedule[1]: invalid duration 'abc' (use e.g. 500ms, 30s, 15m, 2h, 1d)",
        "delivery.retry_schedule[3]: invalid duration '-' (use e.g. 500ms, 30s, 15m, 2h, 1d)",
        "delivery.concurrency: must be >= 1",
        "endpoints[0].nmae: unknown key (did you mean 'name'?)",
        "endpoints[0].url: must be http or https",
        "endpoints[0].events[1]: unknown event 'bogus' (expected online, offline, utilizing, unplugged, "
        "address_changed, still_offline, gateway_online, gateway_offline or all)",
        "endpoints[0].concurrency: must be >= 1",
        "endpoints[1].format: must be one of webhookd, remoteit, kobiton, slack, discord, teams, ntfy, template"
        " (got 'xml')",
        "logging.level: must be one of debug, info, warning, error (got 'loud')",
    ]


def test_three_bad_fields_three_problems() -> None:
    probs = problems_of({"endpoints": [ep(url="ftp://x", format="xml", timeout="abc")]})
    assert len(probs) == 3
    assert [p.split(":")[0] for p in probs] == ["endpoints[0].url", "endpoints[0].format", "endpoints[0].timeout"]


def test_every_bad_list_item_is_reported() -> None:
    probs = problems_of({"delivery": {"retry_schedule": [[1], "5s", True, "x", 0]}})
    assert [p.split(":")[0] for p in probs] == [
        "delivery.retry_schedule[0]",
        "delivery.retry_schedule[2]",
        "delivery.retry_schedule[3]",
        "delivery.retry_schedule[4]",
    ]


def test_unknown_keys_at_every_level() -> None:
    probs = problems_of(
        {
            "endpoint": [],
            "presence": {"silence": "1m"},
            "endpoints": [ep(secrets=["x"])],
            "devices": [{"match": "*", "nam": "x"}],
        }
    )
    assert probs == [
        "endpoint: unknown key (did you mean 'endpoints'?)",
        "presence.silence: unknown key (did you mean 'silence_timeout'?)",
        "devices[0].nam: unknown key (did you mean 'name'?)",
        "endpoints[0].secrets: unknown key (did you mean 'secret'?)",
    ]


def test_duplicate_names_case_sensitive() -> None:
    cfg = parse({"endpoints": [ep(name="lab"), ep(name="Lab")]})
    assert [e.name for e in cfg.endpoints] == ["lab", "Lab"]
    probs = problems_of({"endpoints": [ep(name="x"), ep(name="y"), ep(name="x"), ep(name="x")]})
    assert probs == [
        "endpoints[2].name: duplicate endpoint name 'x' (also endpoints[0])",
        "endpoints[3].name: duplicate endpoint name 'x' (also endpoints[0])",
    ]


def test_authorization_header_or_url_credentials() -> None:
    cfg = parse(
        {
            "endpoints": [
                ep(name="header", headers={"Authorization": "Bearer t"}),
                ep(name="url", url="https://alice:pw@h/x", headers={"X-Authorization": "x"}),
            ]
        }
    )
    assert [e.name for e in cfg.endpoints] == ["header", "url"]
    probs = problems_of({"endpoints": [ep(url="https://alice:" + SECRET + "@h/x", headers={"Authorization": "x"})]})
    assert probs == [
        "endpoints[0].headers.Authorization: cannot be used with credentials in url (user:password@...); "
        "keep one of the two"
    ]


def test_signature_none_explicit_with_secret_field() -> None:
    cfg = parse({"endpoints": [ep(signature="none", secret="k", secret_field="SecretKey", format="remoteit")]})
    (e,) = cfg.endpoints
    assert e.signature == "none" and e.secrets == ("k",) and e.secret_field == "SecretKey"


# ---------------------------------------------------------------------------------------------------------
# file-level problems
# ---------------------------------------------------------------------------------------------------------


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    p = write(tmp_path, "listen:\n  http: 127.0.0.1:8470\n   udp: x\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p, env={})
    (prob,) = ei.value.problems
    assert prob.startswith(f"{p}: invalid YAML at line 3, column ")
    assert "Traceback" not in str(ei.value)


def test_unclosed_flow_sequence(tmp_path: Path) -> None:
    p = write(tmp_path, "endpoints: [\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+, column \d+"):
        load_config(p, env={})


def test_duplicate_yaml_keys_are_problems(tmp_path: Path) -> None:
    p = write(tmp_path, "endpoints: []\nlisten:\n  http: ':1'\n  http: ':2'\nendpoints: []\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p, env={})
    assert ei.value.problems == [
        f"{p}: line 4, column 3: duplicate key 'http'",
        f"{p}: line 5, column 1: duplicate key 'endpoints'",
    ]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "nope.yaml")
    assert ei.value.problems == [f"{tmp_path / 'nope.yaml'}: file not found"]


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_bytes(b"state_dir: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(p)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- a\n- b\n", "config: the top level must be a mapping, got a list"),
        ("just a string\n", "config: the top level must be a mapping, got a string"),
        ("", "config: the file is empty"),
        ("# only comments\n", "config: the file is empty"),
    ],
)
def test_top_level_not_a_mapping(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, text), env={})
    (prob,) = ei.value.problems
    assert prob.startswith(expected)


def test_config_error_str_joins_problems() -> None:
    err = ConfigError(["a: x", "b: y"])
    assert str(err) == "a: x\nb: y" and err.problems == ["a: x", "b: y"]
    assert ConfigError("c: z").problems == ["c: z"]


# ---------------------------------------------------------------------------------------------------------
# device rules
# ---------------------------------------------------------------------------------------------------------


def test_device_rule_first_match_wins() -> None:
    cfg = parse(
        {
            "presence": {"silence_timeout": "10m"},
            "devices": [
                {"match": "printer-lab-*", "name": "Lab printer"},  # no timeout: the default applies
                {"match": "printer-*", "silence_timeout": "2m", "owner": "ops@example.com"},
                {"match": "*", "silence_timeout": "1h"},
            ],
        }
    )
    lab = cfg.device_rule("printer-lab-1")
    assert lab is not None and lab.name == "Lab printer" and lab.silence_timeout is None
    assert cfg.silence_timeout_for("printer-lab-1") == 600.0
    other = cfg.device_rule("printer-2")
    assert other is not None and other.owner == "ops@example.com"
    assert cfg.silence_timeout_for("printer-2") == 120.0
    assert cfg.silence_timeout_for("sensor") == 3600.0
    assert cfg.device_rule("PRINTER-2") is cfg.devices[2]  # case-sensitive glob


def test_no_device_rules_means_global_timeout() -> None:
    cfg = parse({"presence": {"silence_timeout": 42}})
    assert cfg.device_rule("x") is None
    assert cfg.silence_timeout_for("x") == 42.0


# ---------------------------------------------------------------------------------------------------------
# secrets never leak
# ---------------------------------------------------------------------------------------------------------


def test_no_problem_contains_a_secret_value(tmp_path: Path) -> None:
    (tmp_path / "bad.secret").write_text(SECRET * 10 + "\n")
    data = {
        "listen": {"tokens": [SECRET + " with space", ""], "http": "${HTTP}"},
        "endpoints": [
            ep(name="a", signature="standard-webhooks", secret=[SECRET]),
            ep(name="b", secret=SECRET * 10),
            ep(name="c", secret=SECRET + "\n"),
            ep(name="d", secret_file="bad.secret"),
            ep(name="e", secret=SECRET, secret_field="", headers={"Authorization": "Bearer " + SECRET + "\r\n"}),
            ep(name="f", url="https://user:" + SECRET + "@h:99999/"),
            ep(name="g", url="ftp://user:" + SECRET + "@h/"),
            ep(name="h", signature="${SIG}", secret=SECRET),
            ep(name="i", secret="${MISSING}", format="${FMT}"),
        ],
    }
    env = {"HTTP": SECRET, "SIG": SECRET, "FMT": SECRET}
    probs = problems_of(data, tmp_path, env=env)
    assert len(probs) >= 11, probs
    for p in probs:
        assert SECRET not in p, p
    assert not any(SECRET[:8] in p for p in probs)


def test_summary_never_shows_secrets_or_tokens() -> None:
    cfg = parse(
        {
            "listen": {"tokens": ["tok-" + SECRET]},
            "endpoints": [
                ep(name="ops-bridge", secret=SECRET, headers={"Authorization": SECRET}),
                ep(name="lab", url="https://u:" + SECRET + "@h/"),
            ],
            "devices": [{"match": "printer-*"}],
        }
    )
    line = summary(cfg)
    assert line == (
        "config OK: 2 endpoints (ops-bridge, lab), 1 device rule, http 127.0.0.1:8470, 1 token, state_dir /srv/wh/var"
    )
    assert SECRET not in line and "\n" not in line


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:pw@hooks.example.com/x?y=1", "https://hooks.example.com/x?y=1"),
        ("http://tok@h:8080/", "http://h:8080/"),
        ("https://hooks.example.com/x", "https://hooks.example.com/x"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_deep_nesting_is_refused_quickly(tmp_path: Path) -> None:
    # PyYAML's scanner does work proportional to the flow depth for every token: 10 KB of `[` took seconds.
    p = write(tmp_path, "endpoints: " + "[" * 5000 + "]" * 5000 + "\n")
    started = time.monotonic()
    with pytest.raises(ConfigError) as ei:
        load_config(p, env={})
    assert time.monotonic() - started < 1.0
    assert ei.value.problems == [f"{p}: line 1, column 139: nested more than 128 levels deep"]
    block = write(tmp_path, "".join("  " * i + f"k{i}:\n" for i in range(200)) + "  " * 200 + "x\n", "b.yaml")
    with pytest.raises(ConfigError, match=r"b.yaml: line 129, column \d+: nested more than 128 levels deep"):
        load_config(block, env={})
    # Deep, but within what the YAML scanner allows: refused by the shape check, with its key path.
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, "devices: " + "[" * 80 + "]" * 80 + "\n", "c.yaml"), env={})
    assert ei.value.problems == ["devices" + "[0]" * 63 + ": nested more than 64 levels deep"]


def test_problems_from_a_file_are_in_file_order_with_their_lines(tmp_path: Path) -> None:
    text = (
        "logging:\n"
        "  level: loud\n"  # 2
        "listen:\n"
        "  tokens: abc\n"  # 4
        "base: &b\n"  # 5
        "  timeout: 3x\n"  # 6
        "endpoints:\n"
        "  - name: one\n"  # 8
        "    url: hooks.example.com/devices\n"  # 9
        "    devices: abc\n"  # 10
        "  - name: two\n"
        "    <<: *b\n"
        "    url: http://169.254.169.254/latest/meta-data/\n"  # 13
        "  - {url: 'https://x.example/'}\n"  # 14
        "delivery: {concurency: 3}\n"  # 15
    )
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, text), env={})
    assert ei.value.problems == [
        "logging.level: must be one of debug, info, warning, error (got 'loud') (line 2)",
        "listen.tokens: expected a list of strings, got a string (write [...] even for one) (line 4)",
        "base: unknown key (line 5)",
        "endpoints[1].timeout: invalid duration '3x' (use e.g. 500ms, 30s, 15m, 2h, 1d) (line 6)",  # the anchor
        "endpoints[0].url: missing scheme: did you mean https://hooks.example.com/devices? (line 9)",
        "endpoints[0].devices: expected a list of strings, got a string (write [...] even for one) (line 10)",
        "endpoints[1].url: link-local address (cloud metadata lives there): refused without allow_link_local: true"
        " (line 13)",
        "endpoints[2].name: missing required key (line 14)",  # where its mapping is
        "delivery.concurency: unknown key (did you mean 'concurrency'?) (line 15)",
    ]


def test_file_lines_with_aliases_env_and_secret_files(tmp_path: Path) -> None:
    (tmp_path / "long.secret").write_text("x" * 200 + "\n")
    text = (
        "devices:\n"
        "  - &rule {match: 'a*', silence_timeout: -1}\n"  # 2
        "  - *rule\n"  # 3
        "endpoints:\n"
        "  - name: a\n"
        "    url: ${URL}\n"  # 6
        "  - name: b\n"
        "    url: https://x.example/\n"
        "    secret_file: long.secret\n"  # 9
    )
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, text), env={"URL": "hooks.example.com/" + SECRET})
    assert ei.value.problems == [
        "devices[0].silence_timeout: must be greater than 0 (line 2)",
        "devices[1].silence_timeout: must be greater than 0 (line 2)",  # an alias: where the value is written
        "endpoints[0].url: missing scheme: start with https:// (or http://) (line 6)",
        "endpoints[1].secret_file (line 1 of the file): must be at most 128 characters (got 200) (line 9)",
    ]
    assert SECRET not in str(ei.value)


def test_problems_without_a_file_have_no_lines() -> None:
    probs = problems_of({"logging": {"level": "loud"}, "listen": {"tokens": "abc"}})
    assert probs == [
        "listen.tokens: expected a list of strings, got a string (write [...] even for one)",
        "logging.level: must be one of debug, info, warning, error (got 'loud')",
    ]


def test_silence_timeout_never() -> None:
    cfg = parse_config(
        {"presence": {"silence_timeout": "never"}, "devices": [{"match": "x*", "silence_timeout": "Never"}]}, Path(".")
    )
    assert cfg.presence.silence_timeout == float("inf") and cfg.devices[0].silence_timeout == float("inf")
    with pytest.raises(ConfigError, match=r"presence.silence_timeout: invalid duration 'nevr'"):
        parse_config({"presence": {"silence_timeout": "nevr"}}, Path("."))
