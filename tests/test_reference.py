"""docs/reference.md agrees with the code: its generated sections (commands, config keys, metrics) are what
`python -m webhookd.refdoc` writes now, and every log event, HTTP route and event type in the code is in it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from webhookd import refdoc
from webhookd.config.schema import EVENT_KINDS
from webhookd.payloads import EVENT_TYPES

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "webhookd"
REFERENCE = ROOT / "docs" / "reference.md"
FIX = "run `python -m webhookd.refdoc` and commit docs/reference.md"

LEVELS = "debug|info|warning|error|exception|critical"
# Log events named by an expression, and the names it takes. Any other expression fails the test: name it here.
DYNAMIC = {'f"device_{t.kind}"': tuple(f"device_{kind}" for kind in EVENT_KINDS if not kind.startswith("gateway_"))}
LOGGER = re.compile(r"^(\w+)(?:: [^=\n]+)? = get_logger\(", re.MULTILINE)


@pytest.fixture(scope="module")
def text() -> str:
    return REFERENCE.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["commands", "config", "metrics"])
def test_generated_section_is_current(text: str, name: str) -> None:
    body = refdoc.sections()[name]
    want = refdoc.update(text, {name: body})
    assert want == text, f"the '{name}' section of docs/reference.md is out of date: {FIX}"


def test_refdoc_check_passes() -> None:
    assert refdoc.main(["--check", str(REFERENCE)]) == 0, FIX


def test_refdoc_check_fails_on_a_stale_file(tmp_path: Path, text: str) -> None:
    stale = tmp_path / "reference.md"
    stale.write_text(text.replace("`webhookd_uptime_seconds`", "`webhookd_uptime`"), encoding="utf-8")
    assert refdoc.main(["--check", str(stale)]) == 1
    assert refdoc.main([str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == refdoc.update(text)


def _log_calls() -> dict[str, set[str]]:
    """event name -> the levels it is logged at (``exception`` is ``error``), from every logger that
    `get_logger` made in the package."""
    events: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        loggers = LOGGER.findall(source)
        if not loggers:
            continue
        alt = "|".join(re.escape(n) for n in loggers)
        for call in re.finditer(rf"(?<![\w.])(?:{alt})\.({LEVELS})\(\s*", source):
            rest = source[call.end() :]
            literal = re.match(r"[\"']([A-Za-z0-9_.]+)[\"']", rest)
            names = (literal.group(1),) if literal else DYNAMIC.get(rest.split(",", 1)[0].strip(), ())
            line = source.count("\n", 0, call.start()) + 1
            assert names, f"{path.relative_to(ROOT)}:{line}: a log event named by an expression not in DYNAMIC"
            level = "error" if call.group(1) == "exception" else call.group(1)
            for name in names:
                events.setdefault(name, set()).add(level)
    return events


def _log_events() -> set[str]:
    return set(_log_calls())


def _log_levels(text: str) -> dict[str, str]:
    """event -> level, from the reference's table."""
    section = text.split("## Log events", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (`[A-Za-z0-9_.]+`(?:, `[A-Za-z0-9_.]+`)*) \| (\w+) \|", section, re.MULTILINE)
    return {name: level for names, level in rows for name in re.findall(r"`([^`]+)`", names)}


def _log_table(text: str) -> set[str]:
    return set(_log_levels(text))


def test_every_log_event_is_documented(text: str) -> None:
    events = _log_events()
    assert len(events) > 20, "the log call pattern no longer finds the daemon's events"
    missing = sorted(events - _log_table(text))
    assert not missing, f"log events missing from docs/reference.md (## Log events): {missing}"


def test_no_documented_log_event_is_gone(text: str) -> None:
    gone = sorted(_log_table(text) - _log_events())
    assert not gone, f"docs/reference.md lists log events the code no longer emits: {gone}"


def test_documented_log_levels_are_the_code_s(text: str) -> None:
    calls = _log_calls()
    wrong = {e: (lvl, sorted(calls[e])) for e, lvl in _log_levels(text).items() if e in calls and lvl not in calls[e]}
    assert not wrong, f"log levels in docs/reference.md differ from the code (event: (documented, code)): {wrong}"


def _admin_routes() -> set[str]:
    source = (PACKAGE / "admin.py").read_text(encoding="utf-8")
    found = re.findall(r"\.add_(get|post|put|patch|delete)\(\s*\"([^\"]+)\"", source)
    return {f"{method.upper()} {path}" for method, path in found}


def _heartbeat_paths() -> set[str]:
    source = (PACKAGE / "listener.py").read_text(encoding="utf-8")
    exact = set(re.findall(r"\bpath == \"(/[^\"]*)\"", source))
    prefixes = {p + "{device}" for p in re.findall(r"\bpath\.startswith\(\"(/[^\"]*)\"\)", source)}
    return exact | prefixes


def test_every_admin_route_is_documented(text: str) -> None:
    routes = _admin_routes()
    assert len(routes) >= 10, "the route pattern no longer finds the admin API's routes"
    missing = sorted(r for r in routes if not _documented_route(text, r))
    assert not missing, f"admin routes missing from docs/reference.md: {missing}"


def test_every_documented_admin_route_exists(text: str) -> None:
    section = text.split("## Admin API", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `((?:GET|POST|PUT|PATCH|DELETE) /[^`]*)` \|", section, re.MULTILINE))
    routes = {re.sub(r"{[^}]*}", "{}", r) for r in _admin_routes()}
    gone = sorted(r for r in documented if re.sub(r"{[^}]*}", "{}", r) not in routes)
    assert not gone, f"docs/reference.md documents admin routes the daemon does not register: {gone}"


def _documented_route(text: str, route: str) -> bool:
    """`GET /v1/devices/{id}` is documented as such (any parameter name)."""
    method, path = route.split(" ", 1)
    pattern = re.escape(path)
    pattern = re.sub(r"\\\{[^}]*\\\}", r"\\{[a-z_]+\\}", pattern)
    return re.search(rf"`{method} {pattern}`", text) is not None


def test_every_heartbeat_route_is_documented(text: str) -> None:
    paths = _heartbeat_paths()
    assert {"/v1/heartbeat", "/healthz"} <= paths, "the route pattern no longer finds the heartbeat routes"
    section = text.split("## Heartbeat API", 1)[1].split("\n## ", 1)[0]
    missing = sorted(p for p in paths if not re.search(rf"`(GET|POST|HEAD) {re.escape(p)}`", section))
    assert not missing, f"heartbeat routes missing from docs/reference.md (## Heartbeat API): {missing}"


def test_every_documented_heartbeat_route_exists(text: str) -> None:
    section = text.split("## Heartbeat API", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(?:GET|POST|HEAD) (/[^`]*)` \|", section, re.MULTILINE))
    gone = sorted(documented - _heartbeat_paths())
    assert not gone, f"docs/reference.md documents heartbeat routes the daemon does not serve: {gone}"


def test_every_event_type_is_documented(text: str) -> None:
    missing = [t for t in EVENT_TYPES if f"| `{t}` |" not in text]
    assert not missing, f"event types missing from docs/reference.md: {missing}"


def test_request_headers_are_documented(text: str) -> None:
    from webhookd.config.schema import DEFAULT_SIGNATURE_HEADER, RESERVED_HEADERS

    lower = text.lower()
    missing = sorted(h for h in RESERVED_HEADERS if h.startswith("webhook-") and f"`{h}" not in lower)
    assert not missing, f"webhook headers missing from docs/reference.md: {missing}"
    assert f"`{DEFAULT_SIGNATURE_HEADER}`" in text


def test_user_docs_never_mention_the_contract() -> None:
    for path in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        body = path.read_text(encoding="utf-8")
        assert "CONTRACT" not in body, f"{path.relative_to(ROOT)} mentions CONTRACT: link docs/reference.md"
        assert "../shared/" not in body, f"{path.relative_to(ROOT)} links outside the repository"


def test_loader_defaults_are_true() -> None:
    from webhookd.config.load import parse_config

    assert set(refdoc.LOADER_DEFAULTS) == {"endpoints[].timeout", "endpoints[].signature"}, "check the new ones here"
    url = "http://127.0.0.1:9/x"
    cfg = parse_config(
        {
            "delivery": {"timeout": "7s"},
            "endpoints": [{"name": "plain", "url": url}, {"name": "signed", "url": url, "secret": "s3cret"}],
        },
        ROOT,
        env={},
    )
    plain, signed = cfg.endpoints
    assert plain.timeout == 7.0 == signed.timeout
    assert (plain.signature, signed.signature) == ("none", "hmac-sha256")
