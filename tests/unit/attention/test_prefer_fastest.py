"""``--prefer fastest``: the resolver plans the fastest measured implementation the node may install."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from fleetctl.controller.attention import NodeContext, builtin_prior, install_costs, profile, recommend
from fleetctl.controller.catalog import builtin_catalog
from fleetctl.controller.resolver import MeasuredImpl, Measurements, Policy, resolve
from fleetctl.fleet.errors import InputError
from fleetctl.fleet.facts import NodeFacts, parse_node

FIX = Path(__file__).resolve().parents[2] / "fixtures"
FASTEST = Policy(prefer="fastest", workload="prefill")


def facts(rel: str, **change: object) -> NodeFacts:
    f = parse_node(json.loads((FIX / rel).read_text()))
    return replace(f, flash_attn=None, **change)  # type: ignore[arg-type]


def ranking(f: NodeFacts, workload: str = "prefill") -> Measurements:
    rec = recommend(NodeContext.of(f), builtin_prior(), profile(workload), install_costs(f, builtin_catalog()))
    return rec.as_measurements()


def test_h200_plans_fa4_wheels_over_fa2_with_numbers() -> None:
    f = facts("h200_fa4_e2e/facts.json")
    d = resolve(f, builtin_catalog(), FASTEST, ranking(f))
    assert d.variant == "fa4" and d.steps == ("install-wheel", "verify")
    assert "fa4 is the fastest measured" in d.reasons[0] and "TFLOP/s" in d.reasons[0]
    sdpa = next(r for r in d.rejected if r.candidate == "sdpa")
    assert "sdpa_cudnn" in sdpa.reason and "slower than fa4" in sdpa.reason
    fa2 = next(r for r in d.rejected if r.candidate.startswith("fa2-"))
    assert "not measured" in fa2.reason


def test_h100_plans_nothing_when_sdpa_wins() -> None:
    f = facts("h100_e2e/facts.json")
    d = resolve(f, builtin_catalog(), FASTEST, ranking(f))
    assert d.variant == "sdpa" and d.steps == ()
    assert "sdpa_cudnn" in d.reasons[0] and "CUDNN_ATTENTION" in d.reasons[1]
    fa2 = next(r for r in d.rejected if r.candidate.startswith("fa2-wheel"))
    assert "fa2" in fa2.reason and "slower than sdpa_cudnn" in fa2.reason


def test_default_stays_fa2_compatible() -> None:
    f = facts("h200_fa4_e2e/facts.json")
    d = resolve(f, builtin_catalog(), Policy(), ranking(f))
    assert d.variant.startswith("fa2")


def test_fastest_that_cannot_be_had_falls_to_the_next() -> None:
    f = facts("h200_fa4_e2e/facts.json")
    assert f.driver is not None
    old_driver = replace(f, driver=replace(f.driver, version="560.35.03"))  # below FA4's driver floor
    m = Measurements("prefill", "TFLOP/s", (MeasuredImpl("fa4", 650, "prior x", 4),
                                            MeasuredImpl("sdpa_cudnn", 590, "prior x", 4)))
    d = resolve(old_driver, builtin_catalog(), FASTEST, m)
    assert d.variant == "sdpa"
    assert any("fa4 measured faster" in r and "driver" in r for r in d.reasons)


def test_no_measurements_plans_the_default_and_says_why() -> None:
    f = facts("h200_fa4_e2e/facts.json")
    d = resolve(f, builtin_catalog(), FASTEST, None)
    assert d.variant.startswith("fa2") and "no measured ranking" in d.reasons[0]


def test_fa2_measured_fastest_plans_fa2() -> None:
    f = facts("h100_e2e/facts.json")
    m = Measurements("prefill", "TFLOP/s", (MeasuredImpl("fa2", 700, "fleet (a)", 4),
                                            MeasuredImpl("sdpa_cudnn", 590, "fleet (a)", 4)))
    d = resolve(f, builtin_catalog(), FASTEST, m)
    assert d.variant.startswith("fa2") and "fa2 is the fastest" in d.reasons[0]


@pytest.mark.parametrize(("obj", "ok"), [({"prefer": "fastest", "workload": "decode"}, True),
                                         ({"prefer": "quickest"}, False), ({"workload": "serving"}, False)])
def test_policy_file_fields(obj: dict[str, str], ok: bool) -> None:
    if ok:
        p = Policy.from_json(obj, "p.json")
        assert (p.prefer, p.workload) == ("fastest", "decode")
    else:
        with pytest.raises(InputError):
            Policy.from_json(obj, "p.json")


def test_decode_workload_on_h200_plans_nothing_to_install() -> None:
    f = facts("h200_fa4_e2e/facts.json")
    d = resolve(f, builtin_catalog(), Policy(prefer="fastest", workload="decode"), ranking(f, "decode"))
    assert d.variant == "sdpa" and "new tokens/s" in d.reasons[0]
