from __future__ import annotations

from datetime import UTC, datetime

import pytest

AT = datetime(2026, 1, 1, 3, 0, tzinfo=UTC)


@pytest.fixture
def at() -> datetime:
    return AT
