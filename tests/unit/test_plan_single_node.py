"""`fleet-agent facts --json > f.json; fleetctl plan --facts f.json` works: a bare node is a fleet of one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetctl.controller.cli import main as fleetctl
from fleetctl.fleet.errors import FactsError
from fleetctl.fleet.facts import NodeFacts, parse_fleet

H100_FACTS = Path(__file__).resolve().parents[1] / "fixtures" / "h100" / "facts.json"


def test_bare_node_object_is_a_fleet_of_one() -> None:
    entries = parse_fleet(json.loads(H100_FACTS.read_text()))
    assert len(entries) == 1
    assert isinstance(entries[0], NodeFacts)
    assert entries[0].gpus[0].compute_capability == "9.0"


def test_plan_reads_agent_output_directly(capsys: pytest.CaptureFixture[str]) -> None:
    assert fleetctl(["plan", "--facts", str(H100_FACTS), "--json"]) == 0
    decision = json.loads(capsys.readouterr().out)["nodes"][0]
    assert decision["variant"] == "fa2-source"
    assert decision["build"]["cuda_archs"] in ("90", ["90"], [90])


def test_object_without_nodes_or_hostname_is_still_refused() -> None:
    with pytest.raises(FactsError, match="nodes"):
        parse_fleet({"fleet": []})
