"""Fault-injection tests. Tests marked `long` run only when asked for (`-m long`, i.e. `make test-long`)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "long" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="long run: use -m long (make test-long)")
    for item in items:
        if item.get_closest_marker("long") is not None:
            item.add_marker(skip)
