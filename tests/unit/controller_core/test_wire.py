"""Protobuf conversion at both edges: agent/wire.py → bytes → controller/wire.py."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest

from fleetctl.agent import wire as agent_wire
from fleetctl.controller import wire as controller_wire
from fleetctl.controller.registry import Registry
from fleetctl.controller.store import open_store
from fleetctl.fleet.errors import FactsError, InputError
from fleetctl.fleet.facts import FlashAttnFacts, NodeFacts, RocmFacts, parse_node
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus
from fleetctl.fleet.v1 import fleet_pb2 as pb
from tests.unit.controller_core.util import add_identity

EXAMPLES = json.loads((Path(__file__).resolve().parents[2] / "fixtures" / "node_facts_example.json").read_text())


@pytest.mark.parametrize("index", range(len(EXAMPLES["nodes"])))
def test_facts_round_trip_through_protobuf(index: int) -> None:
    facts = parse_node(EXAMPLES["nodes"][index])
    wire_bytes = agent_wire.facts_to_proto(facts, simulated=True).SerializeToString()
    back, simulated = controller_wire.facts_from_proto(pb.NodeFacts.FromString(wire_bytes))
    assert back == facts and simulated is True
    assert back.to_json() == facts.to_json()


def test_optional_sections_stay_null() -> None:
    facts = parse_node(EXAMPLES["nodes"][0])
    bare = dataclasses.replace(facts, driver=None, toolkit=None, torch=None, flash_attn=None, apt=None, gpus=())
    back, _ = controller_wire.facts_from_proto(agent_wire.facts_to_proto(bare))
    assert back.driver is None and back.torch is None and back.apt is None and back.gpus == ()


def test_bad_facts_messages() -> None:
    msg = agent_wire.facts_to_proto(parse_node(EXAMPLES["nodes"][0]))
    msg.extra_json = "nope"
    with pytest.raises(InputError, match="not valid JSON"):
        controller_wire.facts_from_proto(msg)
    msg.extra_json = json.dumps({"pad": "x" * 300_000})
    with pytest.raises(FactsError, match="limit"):
        controller_wire.facts_from_proto(msg)
    with pytest.raises(FactsError):
        controller_wire.facts_from_proto(pb.NodeFacts(hostname="h"))


def test_jobs_events_results() -> None:
    job = controller_wire.job_to_proto(JobSpec("j1", "install-wheel", {"a": [1]}, 60))
    spec = agent_wire.job_from_proto(pb.Job.FromString(job.SerializeToString()))
    assert (spec.job_id, spec.kind, spec.vars, spec.timeout_s) == ("j1", "install-wheel", {"a": [1]}, 60.0)
    ev = agent_wire.event_to_proto("j1", 3, {"event": "runner_on_ok", "event_data": {"task": "x"}})
    rec = controller_wire.event_from_proto(ev)
    assert (rec.job_id, rec.counter, rec.event, dict(rec.data)) == ("j1", 3, "runner_on_ok", {"task": "x"})
    assert abs((rec.created - dt.datetime.now(dt.UTC)).total_seconds()) < 5
    res = agent_wire.result_to_proto("j1", JobOutcome("j1", JobStatus.ERROR, rc=2, result={"k": 1}, error="boom"))
    out = controller_wire.outcome_from_proto(res)
    assert (out.status, out.rc, dict(out.result), out.error) == ("failed", 2, {"k": 1}, "boom")
    with pytest.raises(InputError):
        controller_wire.event_from_proto(pb.JobEvent(job_id="", event="x"))


def test_jobs_request_carries_held_jobs() -> None:
    sent = agent_wire.jobs_request({"b" * 32, "a" * 32}).SerializeToString()
    held = controller_wire.held_jobs_from_proto(pb.JobsRequest.FromString(sent))
    assert held == frozenset({"a" * 32, "b" * 32})
    nothing = agent_wire.jobs_request(()).SerializeToString()
    assert controller_wire.held_jobs_from_proto(pb.JobsRequest.FromString(nothing)) == frozenset()
    # an agent from before the field says nothing: not the same as "I hold no jobs"
    assert controller_wire.held_jobs_from_proto(pb.JobsRequest()) is None


def _every_addition() -> NodeFacts:
    """An AMD node with a Windows/Jetson-only field each too: every field added to §3.1 set at once."""
    facts = parse_node(EXAMPLES["nodes"][0])
    assert facts.torch is not None
    return dataclasses.replace(
        facts,
        os=dataclasses.replace(facts.os, family="linux", msvc="14.40", l4t="36.4.0", jetpack="6.1"),
        gpus=tuple(dataclasses.replace(g, vendor="amd", arch="gfx942") for g in facts.gpus),
        python=dataclasses.replace(facts.python, abi="cp313t"),
        torch=dataclasses.replace(facts.torch, hip="6.2.41133-dd7f95766", arch_list=("gfx942", "gfx90a")),
        rocm=RocmFacts(version="6.2.4", smi="amd-smi"),
        flash_attn=FlashAttnFacts("2.8.3", "fa2", beside=(FlashAttnFacts("4.0.0b36", "fa4"),)),
    )


def test_every_added_field_survives_agent_proto_controller_store_and_read_back(tmp_path: Path) -> None:
    facts = _every_addition()
    wire_bytes = agent_wire.facts_to_proto(facts).SerializeToString()
    received, _ = controller_wire.facts_from_proto(pb.NodeFacts.FromString(wire_bytes))
    assert received == facts and received.to_json() == facts.to_json()
    store = open_store(f"sqlite:///{tmp_path / 'c.db'}")
    Registry(store).report_facts(add_identity(store, facts.hostname), received)
    stored = Registry(open_store(f"sqlite:///{tmp_path / 'c.db'}")).record(facts.hostname).facts
    assert stored == facts
    assert stored is not None and stored.rocm == RocmFacts(version="6.2.4", smi="amd-smi")
    assert stored.python.free_threaded and stored.gpus[0].arch == "gfx942" and stored.os.jetpack == "6.1"
    assert stored.flash_attn is not None and stored.flash_attn.beside == (FlashAttnFacts("4.0.0b36", "fa4"),)
    assert stored.to_json()["flash_attn"]["beside"] == [{"version": "4.0.0b36", "variant": "fa4"}]


def test_an_older_agent_sends_none_of_the_additions_and_they_stay_unset() -> None:
    facts = parse_node(EXAMPLES["nodes"][0])
    msg = agent_wire.facts_to_proto(facts)
    back, _ = controller_wire.facts_from_proto(msg)
    assert back.rocm is None and back.os.family is None and back.python.abi is None
    assert all(g.vendor is None and g.arch is None for g in back.gpus)
    assert "rocm" not in back.to_json() and "abi" not in back.to_json()["python"]
    with_fa = dataclasses.replace(facts, flash_attn=FlashAttnFacts("2.8.3", "fa2"))
    back, _ = controller_wire.facts_from_proto(agent_wire.facts_to_proto(with_fa))
    assert back.flash_attn == FlashAttnFacts("2.8.3", "fa2") and back.to_json()["flash_attn"] == {
        "version": "2.8.3", "variant": "fa2"}  # printed exactly as before the addition
