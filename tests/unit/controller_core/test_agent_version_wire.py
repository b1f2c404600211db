"""The agent's version: agent/wire.py puts it in ReportFactsRequest, controller/wire.py reads it back, the registry
stores it on the node (nodes.agent_version) and the node summaries (`fleetctl nodes -o wide`, `node`) carry it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetctl.agent import wire as agent_wire
from fleetctl.controller import node_summary
from fleetctl.controller import wire as controller_wire
from fleetctl.controller.registry import Registry
from fleetctl.controller.store import open_store
from fleetctl.fleet.errors import InputError
from fleetctl.fleet.facts import parse_node
from fleetctl.fleet.v1 import fleet_pb2 as pb
from fleetctl.fleet.version import package_version
from tests.unit.controller_core.util import add_identity

EXAMPLE = json.loads((Path(__file__).resolve().parents[2] / "fixtures" / "node_facts_example.json").read_text())


def test_agent_version_survives_the_wire_and_is_stored(tmp_path: Path) -> None:
    facts = parse_node(EXAMPLE["nodes"][0])
    sent = pb.ReportFactsRequest.FromString(agent_wire.report_facts_request(facts).SerializeToString())
    version = controller_wire.agent_version_from_proto(sent)
    assert version == package_version()
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    received, simulated = controller_wire.facts_from_proto(sent.facts)
    Registry(store).report_facts(add_identity(store, facts.hostname), received, simulated=simulated,
                                 agent_version=version)
    record = Registry(open_store(f"sqlite:///{tmp_path / 'c.db'}")).record(facts.hostname)  # read back from disk
    assert record.agent_version == package_version()
    with store.session() as s:
        [row] = node_summary.list_json(s, [record])
    assert row["agent_version"] == package_version()


def test_an_older_agent_reports_no_version_and_a_newer_one_replaces_it(tmp_path: Path) -> None:
    facts = parse_node(EXAMPLE["nodes"][0])
    older = pb.ReportFactsRequest(facts=agent_wire.facts_to_proto(facts))  # no agent_version: an older agent
    assert controller_wire.agent_version_from_proto(older) is None
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    reg = Registry(store)
    ident = add_identity(store, facts.hostname)
    reg.report_facts(ident, facts, agent_version=None)
    assert reg.record(facts.hostname).agent_version is None
    reg.report_facts(ident, facts, agent_version="0.2.0")  # the agent was upgraded: same facts, new version
    assert reg.record(facts.hostname).agent_version == "0.2.0"


@pytest.mark.parametrize("bad", ["1" * 65, "0.1.0\x1b[31m", "0.1\n0"])
def test_a_version_that_is_not_a_version_string_is_refused(bad: str) -> None:
    with pytest.raises(InputError, match="is not a version string"):
        controller_wire.agent_version_from_proto(pb.ReportFactsRequest(agent_version=bad))
