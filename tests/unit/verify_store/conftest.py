from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetctl.controller.store import Store, open_store
from fleetctl.controller.store.models import Node

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "h100"
AT = dt.datetime(2026, 11, 1, 3, 0, tzinfo=dt.UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    try:
        yield s
    finally:
        s.close()


def h100_facts(hostname: str = "vm") -> dict[str, Any]:
    facts: dict[str, Any] = json.loads((FIXTURES / "facts.json").read_text())
    facts["hostname"] = hostname
    return facts


def add_node(store: Store, hostname: str, facts: dict[str, Any] | None = None, simulated: bool = False) -> None:
    from fleetctl.controller.store import utcnow

    with store.session() as s:
        s.add(Node(hostname=hostname, status="online", facts=facts or h100_facts(hostname), extra={},
                   simulated=simulated, registered_at=utcnow(), facts_updated_at=utcnow(), last_seen=utcnow()))
