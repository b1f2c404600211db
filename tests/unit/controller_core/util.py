"""Helpers for controller unit tests."""

from __future__ import annotations

import json
from pathlib import Path

from fleetctl.controller.enrollment import AgentIdentity
from fleetctl.controller.store import Store, utcnow
from fleetctl.controller.store.models import Identity
from fleetctl.fleet.facts import NodeFacts, parse_node

EXAMPLE = Path(__file__).resolve().parents[2] / "fixtures" / "node_facts_example.json"


def facts(hostname: str, index: int = 0) -> NodeFacts:
    node = json.loads(EXAMPLE.read_text())["nodes"][index]
    node["hostname"] = hostname
    return parse_node(node)


def add_identity(store: Store, hostname: str, agent_id: str | None = None) -> AgentIdentity:
    agent_id = agent_id or f"{hostname}-agent".ljust(32, "0")
    with store.session() as s:
        s.add(Identity(id=agent_id, hostname=hostname, cert_serial="1", cert_fingerprint="f" * 64,
                       created_at=utcnow(), revoked=False))
    return AgentIdentity(agent_id, hostname, "1", False)
