"""Where a node's target env lives (python.env_path / env_fs, DESIGN §3.1 additions): probed, parsed, carried."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetctl.agent import wire as agent_wire
from fleetctl.agent.probes.probe_target import env_identity
from fleetctl.agent.probes.target_python import parse_probe_output
from fleetctl.agent.profiles import load_profile
from fleetctl.controller import wire as controller_wire
from fleetctl.fleet.errors import FactsError
from fleetctl.fleet.facts import parse_node


def probe_line(**python: object) -> str:
    return json.dumps({"python": {"version": "3.12.3", "abi": "cp312", **python}, "torch": None, "flash_attn": []})


def test_one_directory_has_one_identity_and_two_do_not(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    a, b, link = (env_identity(str(tmp_path / n)) for n in ("a", "b", "link"))
    assert a is not None and a == link  # symlinks resolved: one env, one identity
    assert b is not None and b["env_fs"] == a["env_fs"] and b["env_path"] != a["env_path"]
    assert a["env_fs"].startswith("local:")  # a local disk: this machine's id is part of it


def test_probe_output_is_taken_only_when_well_formed() -> None:
    ok = parse_probe_output(probe_line(env_path="/nfs/venv", env_fs="nfs4:srv:/export"), interpreter="/v/bin/python")
    assert ok.python.shared_env_key == "nfs4:srv:/export|/nfs/venv"
    bad = parse_probe_output(probe_line(env_path="relative/venv", env_fs="nfs4:srv:/export"),
                             interpreter="/v/bin/python")
    assert bad.python.env_path is None and bad.python.shared_env_key is None
    assert any("unrecognised env location" in e for e in bad.errors)


def test_facts_carry_the_env_location_and_older_facts_still_parse() -> None:
    facts = load_profile("a100", "n1").to_json()
    assert "env_path" not in facts["python"]  # unknown: not written (facts of older agents print as before)
    facts["python"].update(env_path="/nfs/venv", env_fs="nfs4:srv:/export")
    parsed = parse_node(facts)
    assert parsed.python.shared_env_key == "nfs4:srv:/export|/nfs/venv"
    back, _ = controller_wire.facts_from_proto(agent_wire.facts_to_proto(parsed))
    assert back.python.env_path == "/nfs/venv" and back.python.env_fs == "nfs4:srv:/export"
    facts["python"]["env_fs"] = "nfs4:srv:/export\nx"
    with pytest.raises(FactsError, match="env_fs"):
        parse_node(facts)
