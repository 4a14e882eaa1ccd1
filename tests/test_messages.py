"""Messages for people (CONTRACT §13): the sentence, the slack/discord/teams/ntfy/template formats, the template's
config checks, and whole-daemon deliveries in each format."""

from __future__ import annotations

import email.header
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import stripe
import yaml

from tests.conftest import DaemonFactory, ReceiverFactory
from tests.harness import SECRET, endpoint
from webhookd import messages
from webhookd.config import ConfigError, EndpointConfig, load_config
from webhookd.messages import DISCORD_MAX, RenderError, human_duration, sentence
from webhookd.payloads import EVENT_TYPES, EventData, content_type, render, render_request

T0 = 1_790_000_000.0
CHECKER = Path(__file__).parent / "adaptivecards" / "check.js"
PARSER = Path(__file__).parent / "adaptivecards" / "node_modules" / "adaptivecards" / "dist" / "adaptivecards.js"


def ev(**kw: Any) -> EventData:
    base: dict[str, Any] = {
        "id": "evt_" + "a" * 32,
        "type": "device.offline",
        "time": T0,
        "reason": "timeout",
        "device_id": "printer-1",
        "name": "Drucker 1",
        "state": "offline",
        "previous_state": "online",
        "address": "192.0.2.7",
        "owner": None,
        "last_seen": T0 - 900,
        "offline_for": None,
    }
    base.update(kw)
    return EventData(**base)


def ep(fmt: str, **kw: Any) -> EndpointConfig:
    return EndpointConfig(name="people", url="https://hooks.example.com/x", format=fmt, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- the sentence


@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (0, "0s"),
        (0.4, "0s"),
        (45, "45s"),
        (900, "15m"),
        (3900, "1h 5m"),
        (7200, "2h"),
        (93784, "1d 2h"),
        (2 * 86400 + 300, "2d"),  # 2d 0h 5m: the unit below is zero, the one after it is not shown
        (3630, "1h"),
        (90, "1m 30s"),
    ],
)
def test_human_duration(seconds: float, words: str) -> None:
    assert human_duration(seconds) == words


@pytest.mark.parametrize(
    ("event", "text"),
    [
        (ev(), "printer-1 (Drucker 1) is offline: no heartbeat for 15m"),
        (ev(last_seen=None), "printer-1 (Drucker 1) is offline: no heartbeat within its silence timeout"),
        (ev(reason="shutdown"), "printer-1 (Drucker 1) is offline: it reported a shutdown"),
        (ev(reason="reboot"), "printer-1 (Drucker 1) is offline: it reported a reboot"),
        (ev(reason="reported"), "printer-1 (Drucker 1) is offline: it reported offline"),
        (
            ev(reason="disconnected"),
            "printer-1 (Drucker 1) is offline: its MQTT connection was lost (last will or offline availability)",
        ),
        (
            ev(type="device.online", state="online", reason="heartbeat", offline_for=900.0),
            "printer-1 (Drucker 1) is online: heartbeat received after 15m offline",
        ),
        (
            ev(type="device.online", state="online", reason="heartbeat", previous_state="unknown"),
            "printer-1 (Drucker 1) is online: heartbeat received",
        ),
        (
            ev(type="device.online", state="online", reason="connected"),
            "printer-1 (Drucker 1) is online: its MQTT availability says online",
        ),
        (
            ev(type="device.utilizing", state="utilizing", reason="reported"),
            "printer-1 (Drucker 1) is in use: reported by the device",
        ),
        (
            ev(type="device.unplugged", state="unplugged", reason="reported"),
            "printer-1 (Drucker 1) is unplugged: reported by the device",
        ),
        (
            ev(type="device.address_changed", state="online", reason="heartbeat", address="10.0.0.5"),
            "printer-1 (Drucker 1) is online at a new address: 10.0.0.5",
        ),
        (
            ev(type="device.still_offline", offline_for=7200.0, reminder=2),
            "printer-1 (Drucker 1) is still offline after 2h (reminder 2); no heartbeat for 15m",
        ),
        (
            ev(type="device.still_offline", reason="shutdown", offline_for=7260.0, reminder=1),
            "printer-1 (Drucker 1) is still offline after 2h 1m (reminder 1); it reported a shutdown",
        ),
        (ev(name=None), "printer-1 is offline: no heartbeat for 15m"),
        (ev(name="printer-1"), "printer-1 is offline: no heartbeat for 15m"),
    ],
)
def test_sentence(event: EventData, text: str) -> None:
    assert sentence(event) == text


def test_sentence_of_the_test_event() -> None:
    from webhookd.payloads import make_test_event

    text = "webhookd-test (webhookd test): a test message from webhookd; this endpoint works"
    assert sentence(make_test_event(T0)) == text


def test_every_event_type_has_a_sentence_in_every_format() -> None:
    for kind in EVENT_TYPES:
        (event,) = messages.sample_events([kind])
        for fmt in ("slack", "discord", "teams", "ntfy"):
            body, _headers = render_request(event, ep(fmt))
            assert sentence(event).split(" ")[0] in body.decode()


# ------------------------------------------------------------------------------------------- the formats


def test_slack_is_text_with_slack_escapes() -> None:
    assert json.loads(render(ev(), ep("slack"))) == {"text": "printer-1 (Drucker 1) is offline: no heartbeat for 15m"}
    sneaky = json.loads(render(ev(name="<!channel> & co"), ep("slack")))["text"]
    assert sneaky.startswith("printer-1 (&lt;!channel&gt; &amp; co) is offline")
    assert content_type(ep("slack")) == "application/json"


def test_discord_content_is_cut_at_2000_characters_and_pings_no_one() -> None:
    body = json.loads(render(ev(), ep("discord")))
    assert body == {
        "content": "printer-1 (Drucker 1) is offline: no heartbeat for 15m",
        "allowed_mentions": {"parse": []},
    }
    long = json.loads(render(ev(name="@everyone " + "Ä" * 3000), ep("discord")))["content"]
    assert len(long) == DISCORD_MAX
    assert long.startswith("printer-1 (@everyone ÄÄÄ") and long.endswith("Ä…")
    exact = "x" * (DISCORD_MAX - len("printer-1 () is offline: no heartbeat for 15m"))
    assert json.loads(render(ev(name=exact), ep("discord")))["content"].endswith("15m")  # 2,000 fit uncut


def test_teams_is_a_workflows_message_with_one_adaptive_card() -> None:
    body = json.loads(render(ev(), ep("teams")))
    assert body["type"] == "message"
    (att,) = body["attachments"]
    assert att["contentType"] == "application/vnd.microsoft.card.adaptive"
    card = att["content"]
    assert (card["type"], card["version"]) == ("AdaptiveCard", "1.4")
    assert {b["type"] for b in card["body"]} == {"TextBlock"}
    texts = [b["text"] for b in card["body"]]
    assert texts[0] == "printer-1 (Drucker 1) is offline"
    assert texts[1] == "printer-1 (Drucker 1) is offline: no heartbeat for 15m"
    assert texts[2] == "device.offline · 2026-09-21T14:13:20.000Z"
    assert card["body"][0]["color"] == "Attention"


def _adaptive_card_problems(cards: list[dict[str, Any]]) -> list[list[str]]:
    """Each card checked by Microsoft's Adaptive Cards parser (tests/adaptivecards/check.js)."""
    node = shutil.which("node")
    if node is None or not PARSER.exists():
        why = "node or the adaptivecards npm package is missing (make adaptivecards-tools installs it)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    out = subprocess.run(
        [node, str(CHECKER)], input=json.dumps(cards), capture_output=True, text=True, timeout=60, check=True
    )
    problems: list[list[str]] = json.loads(out.stdout)
    return problems


def test_teams_cards_are_valid_adaptive_cards_for_microsofts_parser() -> None:
    events = [*messages.sample_events(EVENT_TYPES), ev(name='Kü"che <1> *x* ' + "y" * 500)]
    cards = [json.loads(render(e, ep("teams")))["attachments"][0]["content"] for e in events]
    assert _adaptive_card_problems(cards) == [[] for _ in cards]
    # The check is not vacuous: what the parser does not know, or cannot read, is reported.
    bad = json.loads(json.dumps(cards[0]))
    bad["body"][0]["weight"] = "Heavy"
    bad["body"].append({"type": "Chart"})
    unknown = json.loads(json.dumps(cards[0]))
    unknown["body"][1]["colour"] = "Good"
    old = dict(cards[0], version="1.0")
    got = _adaptive_card_problems([bad, unknown, old])
    assert any("Heavy" in p for p in got[0]) and any("Chart" in p for p in got[0])
    assert any("not understood as given" in p for p in got[1])
    assert any("version" in p for p in got[2])


def test_ntfy_is_plain_text_with_title_priority_and_tags() -> None:
    body, headers = render_request(ev(), ep("ntfy"))
    assert body == b"printer-1 (Drucker 1) is offline: no heartbeat for 15m"
    assert headers == {"Title": "printer-1 (Drucker 1) is offline", "Priority": "high", "Tags": "red_circle,offline"}
    assert content_type(ep("ntfy")) == "text/plain; charset=utf-8"
    _, still = render_request(ev(type="device.still_offline", offline_for=7200.0, reminder=2), ep("ntfy"))
    assert still["Priority"] == "high" and still["Tags"] == "hourglass,still_offline"
    _, back = render_request(ev(type="device.online", state="online", reason="heartbeat"), ep("ntfy"))
    assert back == {"Title": "printer-1 (Drucker 1) is online", "Priority": "default", "Tags": "green_circle,online"}
    # A title ntfy cannot take as ASCII is RFC 2047 encoded (ntfy decodes it); no control character gets through.
    _, uni = render_request(ev(name="Küche\r\nX-Evil: 1"), ep("ntfy"))
    decoded = str(email.header.make_header(email.header.decode_header(uni["Title"])))
    assert uni["Title"].isascii() and "\n" not in uni["Title"]
    assert decoded == "printer-1 (Küche X-Evil: 1) is offline"


# ------------------------------------------------------------------------------------------- format: template

JSON_TEMPLATE = '{"msg": {{ text | tojson }}, "type": {{ event.type | tojson }}, "to": {{ endpoint | tojson }}}'


def test_template_renders_event_text_and_endpoint() -> None:
    cfg = ep("template", template=JSON_TEMPLATE)
    body, headers = render_request(ev(), cfg)
    assert json.loads(body) == {
        "msg": "printer-1 (Drucker 1) is offline: no heartbeat for 15m",
        "type": "device.offline",
        "to": "people",
    }
    assert headers == {} and content_type(cfg) == "application/json"
    plain = ep("template", template="{{ event.device.id }} {{ event.device.last_seen }}\n", content_type="text/plain")
    assert render(ev(), plain) == b"printer-1 2026-09-21T13:58:20.000Z\n"
    assert content_type(plain) == "text/plain"


def test_template_is_sandboxed_and_strict() -> None:
    with pytest.raises(RenderError, match=r"line 2 of the template: 'nope' is undefined"):
        render(ev(), ep("template", template="ok\n{{ nope }}", content_type="text/plain"))
    with pytest.raises(RenderError, match="unsafe"):
        render(ev(), ep("template", template="{{ ''.__class__.__mro__ }}", content_type="text/plain"))
    with pytest.raises(RenderError, match="did not produce valid JSON"):
        render(ev(name='say "hi"'), ep("template", template='{"n": "{{ event.device.name }}"}'))
    # Python's json would take these; JSON and the receivers' parsers do not.
    for word in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(RenderError, match=f"did not produce valid JSON for application/json: {word} is not"):
            render(ev(), ep("template", template='{"v": ' + word + "}"))


def write(tmp_path: Path, endpoints: str, files: dict[str, str] | None = None) -> Path:
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    cfg = tmp_path / "webhookd.yaml"
    cfg.write_text("admin:\n  socket: ./admin.sock\nendpoints:\n" + textwrap.indent(textwrap.dedent(endpoints), "  "))
    return cfg


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_config(path)
    return e.value.problems


def test_template_keys_and_their_rules(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        """\
        - name: a
          url: https://x.example.com/
          format: template
        - name: b
          url: https://x.example.com/
          format: template
          template: '{}'
          template_file: t.j2
        - name: c
          url: https://x.example.com/
          format: slack
          template: '{}'
          content_type: text/plain
        - name: d
          url: https://x.example.com/
          format: template
          template_file: missing.j2
        - name: e
          url: https://x.example.com/
          format: template
          content_type: "not a type"
          template: "x"
        - name: f
          url: https://x.example.com/
          format: ntfy
          secret: s
          secret_field: SecretKey
        """,
        {"t.j2": "{}"},
    )
    assert problems(cfg) == [
        "endpoints[0].template: required with format: template (or template_file: PATH) (line 4)",
        "endpoints[1].template_file: use either template or template_file, not both (line 11)",
        "endpoints[2].template: only for format: template (line 15)",
        "endpoints[2].content_type: only for format: template (line 16)",
        f"endpoints[3].template_file: file not found: {tmp_path / 'missing.j2'} (line 20)",
        "endpoints[4].content_type: must be a media type such as application/json or text/plain; charset=utf-8"
        " (line 24)",
        "endpoints[5].secret_field: not for format: ntfy (its body is not a JSON object of webhookd's) (line 30)",
    ]


def test_check_config_refuses_broken_templates_with_key_path_and_template_line(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        """\
        - name: ok
          url: https://x.example.com/
          format: template
          template_file: ok.j2
        - name: undefined
          url: https://x.example.com/
          format: template
          template: |
            {"text": {{ text | tojson }},
             "id": {{ evnt.id | tojson }}}
        - name: syntax
          url: https://x.example.com/
          format: template
          template_file: syntax.j2
        - name: not-json
          url: https://x.example.com/
          format: template
          template: '{"name": {{ event.device.name }}}'
        - name: reminder-everywhere
          url: https://x.example.com/
          format: template
          content_type: text/plain
          template: "{{ text }} ({{ event.reminder }})"
        - name: reminder-where-there-is-one
          url: https://x.example.com/
          format: template
          events: [still_offline]
          content_type: text/plain
          template: "{{ text }} ({{ event.reminder }})"
        """,
        {"ok.j2": JSON_TEMPLATE + "\n", "syntax.j2": "line one\n{% for x in %}\n{% endfor %}\n"},
    )
    out = subprocess.run(
        [sys.executable, "-m", "webhookd", "check-config", "-c", str(cfg)], capture_output=True, text=True, timeout=30
    )
    assert out.returncode != 0
    assert [line.removeprefix("config error: ") for line in out.stderr.splitlines()] == [
        "endpoints[1].template: line 2 of the template: 'evnt' is undefined (rendering a sample device.online event)"
        " (line 11)",
        "endpoints[2].template_file: line 2 of the template file: syntax error: Expected an expression, got 'end of"
        " statement block' (line 17)",
        "endpoints[3].template: the template did not produce valid JSON for application/json: Expecting value at"
        " line 1, column 10 of its output (rendering a sample device.online event) (line 21)",
        "endpoints[4].template: line 1 of the template: 'dict object' has no attribute 'reminder' (rendering a"
        " sample device.online event) (line 26)",
        # Subscribed to still_offline only, but `endpoints test` sends webhook.test, which has no reminder.
        "endpoints[5].template: line 1 of the template: 'dict object' has no attribute 'reminder' (rendering a"
        " sample webhook.test event) (line 32)",
    ], out.stderr


def test_a_template_for_the_events_it_gets(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        """\
        - name: reminders
          url: https://x.example.com/
          format: template
          events: [still_offline]
          content_type: text/plain
          template: "{{ text }}{% if event.reminder is defined %} (#{{ event.reminder }}){% endif %}"
        """,
    )
    loaded = load_config(cfg)
    (e,) = loaded.endpoints
    assert e.template is not None and e.content_type == "text/plain"
    event = ev(type="device.still_offline", offline_for=7200.0, reminder=3)
    assert render(event, e).endswith(b"(#3)")


def test_template_file_is_read_at_load(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        """\
        - name: file
          url: https://x.example.com/
          format: template
          template_file: body.j2
        """,
        {"body.j2": JSON_TEMPLATE},
    )
    (e,) = load_config(cfg).endpoints
    assert e.template == JSON_TEMPLATE and e.template_file == tmp_path / "body.j2"
    assert json.loads(render(ev(), e))["to"] == "file"


# ------------------------------------------------------------------------------------------- whole daemon


async def test_heartbeat_reaches_receivers_as_messages_for_people(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    rs = {name: await receiver() for name in ("slack", "discord", "teams", "ntfy", "template", "headers")}
    d = await daemon(
        [
            endpoint("slack", rs["slack"], format="slack", secret=None),
            endpoint("discord", rs["discord"], format="discord", secret=None),
            endpoint("teams", rs["teams"], format="teams", secret=None),
            endpoint("ntfy", rs["ntfy"], format="ntfy", secret=None, headers={"Authorization": "Bearer tk_1"}),
            endpoint("template", rs["template"], format="template", template=JSON_TEMPLATE, secret=SECRET),
            endpoint(
                "headers",
                rs["headers"],
                format="template",
                secret=None,
                content_type="application/x-www-form-urlencoded",
                template="device={{ event.device.id | urlencode }}&state={{ event.device.state }}",
                headers={"Tags": "mine"},
            ),
        ]
    )
    await d.heartbeat("printer-1", name="Drucker 1")
    got = {name: (await r.wait_for(1))[0] for name, r in rs.items()}
    text = "printer-1 (Drucker 1) is online: heartbeat received"

    assert got["slack"].headers["Content-Type"] == "application/json"
    assert got["slack"].json == {"text": text}
    assert got["discord"].json == {"content": text, "allowed_mentions": {"parse": []}}
    teams = got["teams"].json
    assert got["teams"].headers["Content-Type"] == "application/json"
    assert teams["attachments"][0]["content"]["body"][1]["text"] == text
    assert _adaptive_card_problems([teams["attachments"][0]["content"]]) == [[]]  # the card as it was sent

    n = got["ntfy"]
    assert n.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert n.body.decode() == text
    assert (n.headers["Title"], n.headers["Priority"], n.headers["Tags"]) == (
        "printer-1 (Drucker 1) is online",
        "default",
        "green_circle,online",
    )
    assert n.headers["Authorization"] == "Bearer tk_1" and "Webhookd-Signature" not in n.headers

    t = got["template"]
    assert t.headers["Content-Type"] == "application/json"
    assert t.json == {"msg": text, "type": "device.online", "to": "template"}
    stripe.WebhookSignature.verify_header(t.body.decode(), t.headers["Webhookd-Signature"], SECRET, 300)
    assert t.headers["Webhook-Id"] == n.headers["Webhook-Id"]  # one event, one id

    h = got["headers"]
    assert h.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert h.body == b"device=printer-1&state=online"
    assert h.headers["Tags"] == "mine"

    # An offline: ntfy's priority is high.
    await d.heartbeat("printer-1", state="shutdown")
    n2 = (await rs["ntfy"].wait_for(2))[1]
    assert n2.body.decode() == "printer-1 (Drucker 1) is offline: it reported a shutdown"
    assert (n2.headers["Priority"], n2.headers["Tags"]) == ("high", "red_circle,offline")

    # `endpoints test` goes the same way: the format's Content-Type and headers reach the request.
    out = await d.cli("endpoints", "test", "ntfy")
    assert out.returncode == 0, out.stderr
    n3 = (await rs["ntfy"].wait_for(3))[2]
    assert n3.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert (n3.headers["Title"], n3.headers["Tags"]) == ("webhookd test", "test_tube,test")
    assert n3.body.decode().startswith("webhookd-test (webhookd test): a test message")


async def test_a_template_failing_at_delivery_makes_that_delivery_dead(
    daemon: DaemonFactory, receiver: ReceiverFactory
) -> None:
    r, other = await receiver(), await receiver()
    d = await daemon(
        [
            # Passes check-config (the sample device's name has no quote), fails on a name with one.
            endpoint("fragile", r, format="template", secret=None, template='{"name": "{{ event.device.name }}"}'),
            endpoint("fine", other, format="slack", secret=None),
        ]
    )
    await d.heartbeat("dev-q", name='say "hi"')
    await d.heartbeat("dev-ok", name="plain")
    await other.wait_for(2)
    await r.wait_for(1)  # the device after it is delivered: the lane moved on
    assert r.got[0].json == {"name": "plain"}
    status, rows = await d.admin("GET", "/v1/deliveries?endpoint=fragile&status=dead")
    assert status == 200
    (dead,) = rows
    assert dead["device"] == "dev-q"
    assert dead["last_error"].startswith("template: the template did not produce valid JSON for application/json")
    assert r.attempts == 1  # the dead one was never sent
    logs = [line for line in d.logs() if line.get("event") == "delivery_dead"]
    assert logs and logs[0]["endpoint"] == "fragile"


def test_reference_documents_every_format() -> None:
    ref = (Path(__file__).parent.parent / "docs" / "reference.md").read_text()
    for fmt in ("slack", "discord", "teams", "ntfy", "template"):
        assert f"### Payload, `format: {fmt}`" in ref


def test_sample_events_cover_every_type() -> None:
    assert [e.type for e in messages.sample_events(EVENT_TYPES)] == list(EVENT_TYPES)
    assert replace(messages.sample_events(["device.still_offline"])[0]).reminder == 2


def test_readme_endpoint_snippets_pass_check_config(tmp_path: Path) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("## Notifications people read")
    section = readme[start : readme.index("\n## ", start + 1)]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    endpoints = [b for b in blocks if not b.startswith("- alias")]
    assert len(endpoints) == 6 and len(blocks) == 7
    env = {
        "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T1/B1/x",
        "DISCORD_WEBHOOK_URL": "https://discord.com/api/webhooks/1/x",
        "TEAMS_WORKFLOW_URL": "https://example.com/workflows/1/triggers/manual/paths/invoke?sig=x",
        "NTFY_TOKEN": "tk_x",
        "GOTIFY_TOKEN": "g",
    }
    names = []
    for i, block in enumerate(endpoints):
        cfg = tmp_path / f"c{i}.yaml"
        cfg.write_text("admin:\n  socket: ./admin.sock\nendpoints:\n" + block)
        (e,) = load_config(cfg, env=env).endpoints
        names.append(e.format)
    assert names == ["slack", "discord", "teams", "ntfy", "webhookd", "template"]
    automation = yaml.safe_load(next(b for b in blocks if b.startswith("- alias")))
    assert automation[0]["triggers"][0]["webhook_id"] in endpoints[4]
