"""The dashboard flags agents outside the versions the controller supports (node table and node page) and shows
the agent certificate's expiry on the node page."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import update

from fleetctl.controller.store.db import Store
from fleetctl.controller.store.models import Node
from tests.unit.web.test_dashboard import add_nodes, client, ctx, fleet, login, store

__all__ = ["client", "ctx", "fleet", "store"]


def test_node_table_and_page_flag_an_unsupported_agent(fleet: Any, store: Store, client: TestClient) -> None:
    old, current = add_nodes(fleet, 2)
    with store.session() as s:
        s.execute(update(Node).where(Node.hostname == old).values(agent_version="0.0.1"))
        s.execute(update(Node).where(Node.hostname == current).values(agent_version="0.1.0"))
    login(client, "vic")
    table = client.get("/nodes").text
    assert "agent 0.0.1 (too-old)" in table and table.count("agent-skew") == 1
    page = client.get(f"/nodes/{old}").text
    assert 'id="agent-skew"' in page and "too-old: outside &gt;=0.1.0" in page
    assert 'id="cert-expiry"' in page and "certificate expires 20" in page
    assert 'id="agent-skew"' not in client.get(f"/nodes/{current}").text
