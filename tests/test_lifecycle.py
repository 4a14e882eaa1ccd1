"""webhookd.lifecycle.changes: what config_reloaded says a reload changed (issue 10 item 2), never a secret."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import structlog

from webhookd.config import Config, parse_config
from webhookd.lifecycle import changes, keep_bound, restart_required
from webhookd.logs import SCRUBBED, scrub_secrets

SECRET_A = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk="
SECRET_B = "whsec_" + "MDEyMzQ1Njc4OWFiY2RlZmdoaWprbG1ub3BxcnN0dXY="
TOKEN_A, TOKEN_B = "a" * 32, "b" * 32

BASE: dict[str, Any] = {
    "listen": {"http": "127.0.0.1:8470", "tokens": [TOKEN_A]},
    "presence": {"silence_timeout": "15m"},
    "devices": [{"match": "printer-*", "silence_timeout": "1h"}, {"match": "lab-*", "name": "Lab"}],
    "endpoints": [
        {"name": "a", "url": "https://a.example/hook", "secret": SECRET_A},
        {"name": "b", "url": "https://b.example/hook"},
    ],
    "logging": {"level": "info"},
}


def cfg(data: dict[str, Any], tmp: Path = Path("/etc/webhookd")) -> Config:
    return parse_config(data, tmp, {}, tmp / "config.yaml")


def edited(**sections: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    data.update(sections)
    return data


def test_nothing_changed() -> None:
    assert changes(cfg(BASE), cfg(copy.deepcopy(BASE))) == {"changed": []}


def test_endpoints_added_removed_and_changed_by_name() -> None:
    new = edited(
        endpoints=[
            {"name": "a", "url": "https://a.example/hook", "secret": SECRET_B},  # the secret rotated
            {"name": "c", "url": "https://c.example/hook"},
        ]
    )
    got = changes(cfg(BASE), cfg(new))
    assert got == {
        "changed": ["endpoints"],
        "endpoints_added": ["c"],
        "endpoints_removed": ["b"],
        "endpoints_changed": ["a"],
    }


def test_only_the_endpoint_order_changed() -> None:
    new = edited(endpoints=list(reversed(BASE["endpoints"])))
    assert changes(cfg(BASE), cfg(new)) == {"changed": ["endpoints"]}


def test_device_rules_by_match_and_timeouts_with_their_values() -> None:
    new = edited(
        presence={"silence_timeout": "1h"},
        devices=[{"match": "printer-*", "silence_timeout": "2h"}, {"match": "lab-*", "name": "Lab"}],
    )
    got = changes(cfg(BASE), cfg(new))
    assert got == {
        "changed": ["presence.silence_timeout", "devices"],
        "device_rules_changed": ["printer-*"],
        "silence_timeout": [900.0, 3600.0],
    }
    # a rule removed and one added; then only their order (the first match wins, so that is a change too)
    new = edited(devices=[{"match": "lab-*", "name": "Lab"}, {"match": "kiosk-*"}])
    assert changes(cfg(BASE), cfg(new))["device_rules_changed"] == ["printer-*", "kiosk-*"]
    new = edited(devices=list(reversed(BASE["devices"])))
    assert changes(cfg(BASE), cfg(new))["device_rules_changed"] == ["lab-*", "printer-*"]


def test_log_level_and_other_keys_are_named() -> None:
    new = edited(
        logging={"level": "warning"},
        delivery={"retry_schedule": ["1s", "5s"], "concurrency": 8},
        presence={"silence_timeout": "15m", "notify_online_after_utilizing": True},
    )
    got = changes(cfg(BASE), cfg(new))
    assert got == {
        "changed": [
            "presence.notify_online_after_utilizing",
            "delivery.retry_schedule",
            "delivery.concurrency",
            "logging.level",
        ],
        "log_level": ["info", "warning"],
    }


def test_tokens_are_named_never_shown() -> None:
    new = edited(listen={"http": "127.0.0.1:8470", "tokens": [TOKEN_A, TOKEN_B]})
    old_cfg, new_cfg = cfg(BASE), cfg(new)
    got = changes(old_cfg, keep_bound(old_cfg, new_cfg))  # as the daemon calls it: tokens do reload
    assert got == {"changed": ["listen.tokens"]}


def test_restart_only_keys_kept_by_keep_bound_are_not_reported_as_changed() -> None:
    new = edited(listen={"http": "127.0.0.1:9999", "tokens": [TOKEN_A]}, state_dir="/srv/other")
    old_cfg = cfg(BASE)
    assert changes(old_cfg, cfg(new))["changed"] == ["listen.http", "state_dir"]
    assert changes(old_cfg, keep_bound(old_cfg, cfg(new))) == {"changed": []}


def test_what_the_log_line_carries_survives_the_scrubber_and_holds_no_secret() -> None:
    new = edited(
        listen={"http": "127.0.0.1:8470", "tokens": [TOKEN_B]},
        endpoints=[{"name": "a", "url": "https://a.example/hook", "secret": SECRET_B}],
        logging={"level": "debug"},
    )
    fields = changes(cfg(BASE), cfg(new))
    scrubbed = scrub_secrets(structlog.get_logger(), "info", {"event": "config_reloaded", **copy.deepcopy(fields)})
    assert scrubbed == {"event": "config_reloaded", **fields}  # no key the scrubber would blank
    text = json.dumps(fields)
    assert SCRUBBED not in text
    for secret in (SECRET_A, SECRET_B, TOKEN_A, TOKEN_B):
        assert secret not in text
    assert fields["changed"] == ["listen.tokens", "logging.level", "endpoints"]


def test_adding_or_removing_hub_needs_a_restart_and_a_reload_keeps_the_running_one() -> None:
    hub = {"gateways": [{"name": "gw-1", "secret": "gw-1-Shared-Secret-0123456789abcdef"}]}
    plain, with_hub = cfg(BASE), cfg(edited(hub=hub))
    assert restart_required(plain, with_hub) == ["hub"]
    assert restart_required(with_hub, plain) == ["hub"]
    assert keep_bound(plain, with_hub).hub is None
    assert keep_bound(with_hub, plain).hub == with_hub.hub
    # a running hub's gateways do reload
    more = cfg(
        edited(hub={"gateways": [*hub["gateways"], {"name": "gw-2", "secret": "gw-2-Shared-Secret-0123456789abcdef"}]})
    )
    assert restart_required(with_hub, more) == []
    assert keep_bound(with_hub, more).hub == more.hub
