"""The attention recommendation (controller/attention.py): table cases from the real H100/H200 fixtures and
synthetic ones (ties, missing backends, failed correctness, stale measurements)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from fleetctl.controller.attention import (
    Evidence,
    InstallCost,
    Measurement,
    NodeContext,
    Source,
    builtin_prior,
    evidence_from_result,
    install_costs,
    profile,
    recommend,
    recommend_for,
)
from fleetctl.controller.catalog import builtin_catalog
from fleetctl.fleet.facts import parse_node
from fleetctl.fleet.verification import parse_result

FIX = Path(__file__).resolve().parents[2] / "fixtures"
H200 = "NVIDIA H200"
H100 = "NVIDIA H100 80GB HBM3"
TORCH, DRIVER = "2.11.0+cu130", "580.159.04"


def real(rel: str, kind: str = "node") -> Evidence:
    return evidence_from_result(parse_result(json.loads((FIX / rel).read_text())), kind, origin=rel)


def ctx(gpu: str = H200, torch: str = TORCH, driver: str = DRIVER) -> NodeContext:
    return NodeContext("n1", gpu, torch, driver)


def synth(values: dict[str, float], *, kind: str = "node", gpu: str = H200, torch: str = TORCH,
          driver: str = DRIVER, failed: tuple[str, ...] = (), unchecked: tuple[str, ...] = (),
          seqlens: tuple[int, ...] = (4096, 8192), origin: str = "n1") -> Evidence:
    ms = tuple(Measurement(impl, "fwd", "bfloat16", 128, s, True, v * (1 + i / 100))
               for impl, v in values.items() for i, s in enumerate(seqlens))
    checked = {(i, "bfloat16"): i not in failed for i in values if i not in unchecked}
    problems = {(i, "bfloat16"): "fwd relative error 0.4 > 0.02" for i in failed}
    return Evidence(Source(kind, origin, "2026-12-02T00:00:00+00:00", gpu, torch, driver), ms, checked, problems)


PREFILL = profile("prefill")


# --- real fixtures --------------------------------------------------------------------------------


@pytest.mark.parametrize(("rel", "gpu", "workload", "choice", "runner", "margin"), [
    # H200 + FA4 4.0.0b36: FA4 beats cuDNN by ~11 % on long causal prefill and on fwd+bwd
    ("h200_fa4/verify_full_fa4.json", H200, "prefill", "fa4", "sdpa_cudnn", (0.08, 0.14)),
    ("h200_fa4/verify_full_fa4.json", H200, "training", "fa4", "sdpa_cudnn", (0.08, 0.14)),
    # H100 + FA2 2.8.3.post1: SDPA's cuDNN backend is ~1.8x FA2 (FA2 at 0.52-0.70x cuDNN)
    ("h100/verify_full_fa2.json", H100, "prefill", "sdpa_cudnn", "fa2", (0.6, 1.0)),
])
def test_real_fixtures(rel: str, gpu: str, workload: str, choice: str, runner: str,
                       margin: tuple[float, float]) -> None:
    r = recommend(ctx(gpu), [real(rel)], profile(workload))
    assert r.choice is not None and r.runner_up is not None and r.margin is not None
    assert (r.choice.impl, r.runner_up.impl) == (choice, runner)
    assert margin[0] <= r.margin <= margin[1]
    assert r.choice.source is not None and r.choice.source.kind == "node"


def test_h100_has_no_training_measurement_of_fa2() -> None:
    r = recommend(ctx(H100), [real("h100/verify_full_fa2.json")], profile("training"))
    assert r.choice is None and "no training" in r.notes[0]


def test_decode_is_not_guessed_from_kernel_shapes() -> None:
    r = recommend(ctx(), [real("h200_fa4/verify_full_fa4.json")], profile("decode"))
    assert r.choice is None and "decode" in r.notes[0]


def test_prior_is_used_for_the_same_gpu_model_only_with_its_source() -> None:
    prior = builtin_prior()
    r = recommend(ctx(), prior, PREFILL)
    assert r.choice is not None and r.choice.impl == "fa4"
    assert r.choice.source is not None and r.choice.source.kind == "prior"
    assert r.choice.source.origin == "tests/fixtures/h200_fa4/verify_full_fa4.json"
    assert recommend(ctx("NVIDIA A100-SXM4-80GB"), prior, PREFILL).choice is None


def test_prior_with_other_torch_says_so() -> None:
    r = recommend(ctx(torch="2.12.0+cu130"), builtin_prior(), PREFILL)
    assert r.choice is not None and any("re-verify" in n for n in r.notes)


# --- synthetic ------------------------------------------------------------------------------------


def test_node_beats_fleet_beats_prior_per_implementation() -> None:
    node = synth({"sdpa_cudnn": 500, "sdpa_flash": 300})  # a node without FA measures SDPA only
    fleet = synth({"fa4": 600, "sdpa_cudnn": 900}, kind="fleet", origin="n2")
    prior = synth({"fa4": 999, "fa2": 400}, kind="prior", origin="fixture.json")
    r = recommend(ctx(), [prior, fleet, node], PREFILL)
    got = {c.impl: (c.source.kind if c.source else None, round(c.value or 0)) for c in r.candidates}
    assert got["sdpa_cudnn"][0] == "node" and got["fa4"][0] == "fleet" and got["fa2"][0] == "prior"
    assert r.choice is not None and r.choice.impl == "fa4"


def test_tie_goes_to_the_cheaper_install() -> None:
    ev = synth({"fa4": 602, "sdpa_cudnn": 600})
    costs = {"fa4": InstallCost("wheel", 15.0)}
    r = recommend(ctx(), [ev], PREFILL, costs)
    assert r.choice is not None and r.choice.impl == "sdpa_cudnn"
    assert r.runner_up is not None and r.runner_up.impl == "fa4"
    assert any("within 3 %" in n for n in r.notes)
    clear = recommend(ctx(), [synth({"fa4": 700, "sdpa_cudnn": 600})], PREFILL, costs)
    assert clear.choice is not None and clear.choice.impl == "fa4"


def test_failed_correctness_excludes_even_the_fastest() -> None:
    r = recommend(ctx(), [synth({"fa4": 900, "sdpa_cudnn": 600}, failed=("fa4",))], PREFILL)
    assert r.choice is not None and r.choice.impl == "sdpa_cudnn"
    fa4 = next(c for c in r.candidates if c.impl == "fa4")
    assert fa4.excluded is not None and "failed correctness" in fa4.excluded


def test_a_failure_on_one_fleet_node_excludes_it_from_the_fleet_tier() -> None:
    good = synth({"fa4": 900, "sdpa_cudnn": 600}, kind="fleet", origin="a")
    bad = synth({"fa4": 900}, kind="fleet", origin="b", failed=("fa4",))
    r = recommend(ctx(), [good, bad], PREFILL)
    assert r.choice is not None and r.choice.impl == "sdpa_cudnn"


def test_unchecked_implementation_is_not_recommended() -> None:
    r = recommend(ctx(), [synth({"fa4": 900, "sdpa_cudnn": 600}, unchecked=("fa4",))], PREFILL)
    assert r.choice is not None and r.choice.impl == "sdpa_cudnn"


def test_missing_backends_leave_the_rest() -> None:
    r = recommend(ctx(), [synth({"sdpa_flash": 300})], PREFILL)
    assert r.choice is not None and r.choice.impl == "sdpa_flash" and r.runner_up is None and r.margin is None


@pytest.mark.parametrize(("torch", "driver"), [("2.10.0+cu128", DRIVER), (TORCH, "575.51.03")])
def test_stale_node_measurements_are_not_used(torch: str, driver: str) -> None:
    stale = synth({"fa4": 900, "sdpa_cudnn": 600}, torch=torch, driver=driver)
    r = recommend(ctx(), [stale], PREFILL)
    assert r.choice is None and any("stale" in n for n in r.notes)
    fleet_stale = replace(stale, source=replace(stale.source, kind="fleet"))
    assert recommend(ctx(), [fleet_stale], PREFILL).choice is None


def test_unavailable_install_is_excluded() -> None:
    costs = {"fa4": InstallCost("unavailable", None, "FA4 needs Python ≥ 3.10")}
    r = recommend(ctx(), [synth({"fa4": 900, "sdpa_cudnn": 600})], PREFILL, costs)
    assert r.choice is not None and r.choice.impl == "sdpa_cudnn"


def test_other_head_dim_or_short_seqlen_is_another_profile() -> None:
    short = synth({"fa4": 900}, seqlens=(512, 1024))
    assert recommend(ctx(), [short], PREFILL).choice is None
    assert recommend(ctx(), [synth({"fa4": 900})], profile("prefill", headdim=64)).choice is None


def test_install_costs_and_json_from_real_facts() -> None:
    facts = parse_node(json.loads((FIX / "h200_fa4_e2e/facts.json").read_text()))
    plain = replace(facts, flash_attn=None)
    costs = install_costs(plain, builtin_catalog())
    assert costs["fa4"].kind == "wheel"
    assert costs["fa2"].kind in ("wheel", "source-build")
    recs = recommend_for(plain, builtin_catalog(), [])
    out = json.loads(json.dumps([r.to_json() for r in recs]))
    prefill = next(r for r in out if r["workload"] == "prefill")
    assert prefill["choice"]["impl"] == "fa4" and prefill["choice"]["install"]["kind"] == "wheel"
    assert prefill["choice"]["setting"]["code"] == "from flash_attn.cute import flash_attn_func"


def test_decode_from_the_real_h200_e2e_fixture() -> None:
    from fleetctl.controller.attention import evidence_from_e2e

    rel = "h200_attention/e2e_h200.json"
    ev = evidence_from_e2e(json.loads((FIX / rel).read_text()), "node", rel, driver=DRIVER)
    r = recommend(ctx(), [ev], profile("decode"))
    assert r.choice is not None and r.runner_up is not None
    assert (r.choice.impl, r.runner_up.impl) == ("sdpa", "eager")
    assert r.choice.value == pytest.approx(259.5) and r.margin == pytest.approx(259.5 / 195.3 - 1)
    assert "no attention_mask" in r.choice.setting.note
