"""Golden plan for the example fleet, and properties that hold for any node."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetctl.controller.catalog import builtin_catalog
from fleetctl.controller.resolver import Policy, resolve, resolve_fleet, rules
from fleetctl.fleet.facts import parse_fleet
from tests.unit.resolver.nodes import GPU, node

FIXTURES = Path(__file__).parents[2] / "fixtures"


def test_golden_plan_for_example_fleet() -> None:
    facts = json.loads((FIXTURES / "node_facts_example.json").read_text())
    golden = json.loads((FIXTURES / "golden_plan_example.json").read_text())
    decisions = resolve_fleet(parse_fleet(facts), builtin_catalog(), Policy())
    assert {"nodes": [d.to_json() for d in decisions]} == golden


def test_contract_fields_exact() -> None:
    decision = resolve(node(), builtin_catalog(), Policy())
    assert list(decision.to_json()) == ["hostname", "variant", "flash_attn_version", "artifact", "toolkit", "steps",
                                        "reasons", "rejected", "build"]


def test_real_h100_plans_source_build_for_sm90() -> None:
    facts = json.loads((FIXTURES / "node_facts_example.json").read_text())
    h100 = resolve_fleet(parse_fleet(facts), builtin_catalog(), Policy())[0]
    assert h100.variant == "fa2-source" and h100.build is not None
    assert h100.build.env["FLASH_ATTN_CUDA_ARCHS"] == "90" and h100.build.max_jobs == 16


def test_unreadable_node_is_blocked_with_its_error() -> None:
    entries = parse_fleet({"nodes": [{"hostname": "bad", "os": 1}, 7]})
    decisions = resolve_fleet(entries, builtin_catalog(), Policy())
    assert [d.hostname for d in decisions] == ["bad", "#1"]
    assert all(d.variant == "blocked" and d.rejected for d in decisions)
    assert "field os" in decisions[0].reasons[0]


def test_identical_nodes_share_a_resolution_but_keep_their_hostname() -> None:
    entries = parse_fleet({"nodes": [{**node().to_json(), "hostname": h} for h in ("a", "b")]})
    a, b = resolve_fleet(entries, builtin_catalog(), Policy())
    assert (a.hostname, b.hostname) == ("a", "b") and a.reasons == b.reasons


versions = st.sampled_from(["3.8.10", "3.9.18", "3.10.12", "3.11.9", "3.12.3", "3.13.1", "3.14.0"])
cudas = st.sampled_from(["11.8", "12.1", "12.4", "12.6", "12.8", "12.9", "13.0"])
torches = st.sampled_from(["2.2.2", "2.3.1", "2.4.1", "2.5.1", "2.6.0", "2.7.1", "2.8.0", "2.9.1", "2.11.0"])
targets = st.sampled_from([None, "2.5.8", "2.6.3", "2.7.0", "2.7.4.post1", "2.8.0", "2.8.3", "2.8.3.post1"])


@st.composite
def any_node(draw: st.DrawFn) -> object:
    cuda = draw(cudas)
    driver = draw(st.sampled_from(["11.8", "12.2", "12.4", "12.8", "13.0"]))
    return node(gpu=draw(st.lists(st.sampled_from(sorted(GPU)), min_size=1, max_size=2)),
                driver={"version": draw(st.sampled_from(["535.1", "580.1"])), "cuda_max": driver},
                torch={"version": f"{draw(torches)}+cu{cuda.replace('.', '')}", "cuda": cuda,
                       "cxx11abi": draw(st.booleans()),
                       "arch_list": draw(st.lists(st.sampled_from(["sm_70", "sm_75", "sm_80", "sm_86", "sm_90",
                                                                   "sm_100", "sm_120", "compute_90"]),
                                                  min_size=0, max_size=5))},
                toolkit=draw(st.sampled_from([None, {"nvcc": "11.8", "path": "/n"}, {"nvcc": "12.4", "path": "/n"},
                                              {"nvcc": "12.8", "path": "/n"}, {"nvcc": "13.0", "path": "/n"}])),
                python__version=draw(versions), os__glibc=draw(st.sampled_from(["2.31", "2.35", "2.39", None])),
                os__arch=draw(st.sampled_from(["x86_64", "aarch64"])),
                resources={"cpu_cores": draw(st.integers(1, 256)), "memory_mib": draw(st.integers(1, 2_000_000))})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(facts=any_node(), target=targets, fa3=st.booleans(), fa4=st.booleans())
def test_properties(facts: object, target: str | None, fa3: bool, fa4: bool) -> None:
    from fleetctl.fleet.facts import NodeFacts

    assert isinstance(facts, NodeFacts)
    decision = resolve(facts, builtin_catalog(), Policy(version=target, fa3=fa3, fa4=fa4))
    assert decision.reasons and decision.rejected
    json.dumps(decision.to_json())
    if decision.variant == "fa2-wheel" and decision.steps != ("verify",):
        assert decision.artifact is not None and facts.torch is not None and facts.torch.cuda is not None
        name = decision.artifact
        py = rules.major_minor(facts.python.version)
        torch_mm = rules.fmt_mm(rules.major_minor(facts.torch.version))
        assert f"-cp{py[0]}{py[1]}-" in name
        assert f"torch{torch_mm}cxx11abi{'TRUE' if facts.torch.cxx11abi else 'FALSE'}-" in name
        assert name.endswith(f"linux_{facts.os.arch}.whl")
        tag = name.split("+", 1)[1].split("torch", 1)[0]
        assert rules.cuda_tag_major(tag) == rules.major_minor(facts.torch.cuda)[0]
    if decision.toolkit is not None and facts.torch is not None and facts.torch.cuda is not None:
        assert rules.major_minor(decision.toolkit)[0] == rules.major_minor(facts.torch.cuda)[0]
        assert facts.driver is not None
        assert rules.major_minor(decision.toolkit) <= rules.major_minor(facts.driver.cuda_max)
    if decision.build is not None:
        assert decision.build.max_jobs >= 1 and decision.build.estimated_minutes >= 1
