"""What the CLI prints: tables that fit in 100 columns (CONTRACT §2), durations, times relative to now, JSON."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

TABLE_WIDTH = 100
ELLIPSIS = "…"


def cut(value: str, width: int) -> str:
    """``value`` on one line, at most ``width`` characters; cut ones end with ``…``."""
    text = " ".join(value.split()) if any(c in value for c in "\n\r\t") else value
    if len(text) <= width:
        return text
    if width <= 0:
        return ""
    return text[: width - 1] + ELLIPSIS


def dash(value: object) -> str:
    """A table cell: ``-`` for nothing (None or empty)."""
    return "-" if value is None or value == "" else str(value)


def table_width() -> int:
    """100 columns (CONTRACT §2), or less on a narrower terminal (an 80-column one stays readable)."""
    if not sys.stdout.isatty():
        return TABLE_WIDTH
    import shutil

    return max(40, min(TABLE_WIDTH, shutil.get_terminal_size((TABLE_WIDTH, 24)).columns))


def render_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    width: int | None = None,
    gap: int = 2,
    flexible: Sequence[int] = (),
) -> str:
    """Left-aligned columns separated by ``gap`` spaces, no line longer than ``width``: when the natural
    widths do not fit, the ``flexible`` columns (indexes, in order) give way first, then the widest ones
    (down to their header's width, then further); cut cells end with ``…``."""
    if width is None:
        width = table_width()
    ncol = len(headers)
    cells = [[cut(str(c), 10_000) for c in row] for row in rows]
    widths = [max([len(headers[i]), *(len(r[i]) for r in cells)]) for i in range(ncol)]
    budget = width - gap * (ncol - 1)
    for i in flexible:
        excess = sum(widths) - budget
        if excess <= 0:
            break
        floor_i = min(widths[i], max(len(headers[i]), 12))
        widths[i] = max(floor_i, widths[i] - excess)
    for floor in ([min(w, max(len(h), 4)) for w, h in zip(widths, headers, strict=True)], [1] * ncol):
        excess = sum(widths) - budget
        while excess > 0:
            candidates = [i for i in range(ncol) if widths[i] > floor[i]]
            if not candidates:
                break
            widest = max(candidates, key=lambda i: widths[i])
            others = [widths[i] for i in candidates if i != widest]
            # shrink the widest column to the next widest (or as far as needed), in one step
            target = max(floor[widest], max(others, default=0), widths[widest] - excess)
            if target >= widths[widest]:
                target = widths[widest] - 1
            excess -= widths[widest] - target
            widths[widest] = target
    lines = []
    for row in [list(headers), *cells]:
        parts = [cut(c, w).ljust(w) for c, w in zip(row, widths, strict=True)]
        lines.append((" " * gap).join(parts).rstrip())
    return "\n".join(lines)


def aware(t: datetime) -> datetime:
    """``t`` with a time zone (a naive time is taken as UTC)."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def parse_time(value: object) -> datetime | None:
    """An RFC 3339 string (or a datetime) as an aware datetime; None if it is neither."""
    if isinstance(value, datetime):
        return aware(value)
    if not isinstance(value, str) or not value:
        return None
    try:
        return aware(datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00")))
    except ValueError:
        return None


def format_duration(seconds: float) -> str:
    """``45s``, ``6m 0s``, ``3h 5m``, ``2d 4h``: two units at most, as the console log writes durations (a retry
    due in 359.5 s reads ``in 5m 59s`` here and ``retry_in=5m 59s`` there); ``--json`` keeps the seconds."""
    s = int(max(0.0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        m, sec = divmod(s, 60)
        return f"{m}m {sec}s"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h {m}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d {h}h" if h else f"{d}d"


def format_time(value: object, now: datetime | None = None) -> str:
    """A time (datetime or RFC 3339) as ``5m ago`` / ``in 30s`` within a week of now, else ``2026-11-22 05:04Z``."""
    if value is None:
        return "-"
    t = parse_time(value)
    if t is None:
        return str(value)
    ref = now or datetime.now(UTC)
    delta = (ref - t).total_seconds()
    if abs(delta) < 1:
        return "now"
    if abs(delta) >= 7 * 86400:
        return t.astimezone(UTC).strftime("%Y-%m-%d %H:%MZ")
    return f"{format_duration(delta)} ago" if delta > 0 else f"in {format_duration(-delta)}"


def print_json(data: object) -> None:
    """``--json``: the API's document, pretty-printed."""
    import json

    print(json.dumps(data, indent=2, ensure_ascii=False))


def wants_json(args: argparse.Namespace) -> bool:
    """``--json`` given (before or after the command)."""
    return bool(getattr(args, "json", False))


def n_deliveries(n: int) -> str:
    """``1 delivery``, ``2 deliveries``, ``1,035 deliveries``."""
    return f"{n:,} deliver{'y' if n == 1 else 'ies'}"
