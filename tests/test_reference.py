"""docs/reference.md agrees with the code: its generated sections (commands, config keys, metrics) are what
`python -m webhookd.refdoc` writes now, and every log event, HTTP route and event type in the code is in it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from webhookd import refdoc
from webhookd.payloads import EVENT_TYPES

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "webhookd"
REFERENCE = ROOT / "docs" / "reference.md"
FIX = "run `python -m webhookd.refdoc` and commit docs/reference.md"

LOG_CALL = re.compile(r"\blog(?:ger)?\.(?:debug|info|warning|error|exception|critical)\(\s*[\"']([A-Za-z0-9_.]+)[\"']")


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
    assert stale.read_text(encoding="utf-8") == text


def _log_events() -> set[str]:
    events: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        events |= set(LOG_CALL.findall(path.read_text(encoding="utf-8")))
    return events


def _log_table(text: str) -> set[str]:
    section = text.split("## Log events", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Za-z0-9_.]+)` \|", section, re.MULTILINE))


def test_every_log_event_is_documented(text: str) -> None:
    events = _log_events()
    assert len(events) > 20, "the log call pattern no longer finds the daemon's events"
    missing = sorted(events - _log_table(text))
    assert not missing, f"log events missing from docs/reference.md (## Log events): {missing}"


def test_no_documented_log_event_is_gone(text: str) -> None:
    gone = sorted(_log_table(text) - _log_events())
    assert not gone, f"docs/reference.md lists log events the code no longer emits: {gone}"


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
