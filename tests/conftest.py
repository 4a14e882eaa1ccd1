"""Fixtures shared by the in-process store tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from webhookd.store import Store


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """An open Store on a fresh SQLite file."""
    s = Store(tmp_path / "webhookd.db")
    await s.open()
    yield s
    await s.close()
