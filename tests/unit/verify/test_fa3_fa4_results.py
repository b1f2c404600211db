"""FA3/FA4 in the result contract: the real H200 run with flash-attn-4 as the only FlashAttention
(tests/fixtures/h200_fa4, docs/verification.md) parses, passes and says it verified FA4; the schema round
trips the new fields; older results (the H100 fixtures) still parse and read as FA2; the controller's judge,
regression policy and stored summary use the verified implementation; simulated FA3/FA4 nodes."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest

from fleetctl.agent.verify import bench
from fleetctl.agent.verify.simulated import simulate_verification
from fleetctl.controller.verification import RegressionPolicy, check_regression, compute_baselines, judge
from fleetctl.controller.verify_store.store import summarize, verified_of
from fleetctl.fleet.verification import (
    FlashAttnStatus,
    VerificationResult,
    evaluate,
    expect_for_variant,
    failure_result,
    parse_result,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
H200 = FIXTURES / "h200_fa4"


def _load(path: Path) -> VerificationResult:
    return parse_result(json.loads(path.read_text()))


@pytest.mark.parametrize("name", ["verify_full_fa4.json", "verify_quick_fa4.json"])
def test_real_h200_fa4_only_result_passes_and_reports_fa4(name: str) -> None:
    r = _load(H200 / name)
    assert not r.simulated and r.device.name == "NVIDIA H200" and r.device.torch == "2.11.0+cu130"
    fa = r.flash_attn
    assert (fa.import_ok, fa.implementation, fa.module, fa.dist, fa.version) == \
        (True, "fa4", "flash_attn.cute", "flash-attn-4", "4.0.0b36")
    assert r.verified_impl == "fa4" and r.verified == "fa4 4.0.0b36 (flash_attn.cute, dist flash-attn-4)"
    assert [f.label for f in r.implementations()] == ["fa4"]  # FA2 absent: not reported, not failed
    assert not any(e.impl.startswith("flash_attn") for e in r.correctness)
    assert not any(e.impl.startswith("flash_attn") for e in r.speed)
    verdict = judge(r)
    assert verdict.passed and verdict.reasons == ()
    fa4_ok = [e for e in r.correctness if e.impl == "fa4" and e.status == "ok"]
    assert fa4_ok and all((e.fwd_rel_err or 1) < 5e-3 for e in fa4_ok)
    assert {e.direction for e in r.ok_speed("fa4")} == {"fwd", "fwd_bwd"}


def test_real_h200_full_grid_figures() -> None:
    """The numbers docs/verification.md and docs/benchmarks.md quote (bf16, hd128, seqlen 8192)."""
    r = _load(H200 / "verify_full_fa4.json")
    cell = {(e.impl, e.dtype, e.headdim, e.seqlen, e.causal, e.direction): e.tflops for e in r.ok_speed()}
    assert cell[("fa4", "bfloat16", 128, 8192, False, "fwd")] == pytest.approx(683, abs=1)
    assert cell[("sdpa_cudnn", "bfloat16", 128, 8192, False, "fwd")] == pytest.approx(683, abs=1)
    assert cell[("fa4", "bfloat16", 128, 8192, True, "fwd_bwd")] == pytest.approx(620, abs=1)
    assert len([e for e in r.speed if e.impl == "fa4" and e.status == "ok"]) == 80  # 40 shapes × fwd, fwd_bwd
    summary = summarize(r)  # the dashboard's chart: FA4's median, not an empty flash_attn series
    assert summary.tflops is not None and summary.tflops > 400
    assert verified_of(r.to_json()) == {"implementation": "fa4", "module": "flash_attn.cute",
                                        "dist": "flash-attn-4", "version": "4.0.0b36", "import_ok": True}


def test_fa4_result_round_trips_through_json() -> None:
    r = _load(H200 / "verify_quick_fa4.json")
    again = parse_result(json.loads(json.dumps(r.to_json())))
    assert again == r
    assert again.flash_attn_implementations == r.flash_attn_implementations != ()


@pytest.mark.parametrize("path", sorted([*FIXTURES.glob("h100/verify_*.json"),
                                         *FIXTURES.glob("h100_e2e*/verification*.json")]), ids=lambda p: p.name)
def test_results_from_before_fa3_fa4_still_parse_and_read_as_fa2(path: Path) -> None:
    r = _load(path)
    assert r.flash_attn_implementations == () and r.flash_attn.impl == "flash_attn"
    assert r.implementations() == (r.flash_attn,)
    if r.expect == "flash_attn":
        assert r.verified_impl == "flash_attn"
        assert r.flash_attn.label == ("fa2" if r.flash_attn.import_ok else "flash_attn")
    assert parse_result(r.to_json()) == r


def test_fa4_failure_fails_the_node_and_an_fa2_failure_beside_it_is_a_warning() -> None:
    r = _load(H200 / "verify_quick_fa4.json")
    broken = replace(r, correctness=tuple(replace(e, fwd_rel_err=0.5) if e.impl == "fa4" else e
                                          for e in r.correctness))
    verdict = evaluate(broken)
    assert verdict.status == "fail" and any("correctness fa4" in x for x in verdict.reasons)
    fa2_broken = FlashAttnStatus(import_ok=False, error="ImportError: undefined symbol", present=True)
    beside = replace(r, flash_attn_implementations=(*r.flash_attn_implementations, fa2_broken))
    verdict = evaluate(beside)
    assert verdict.passed and any("flash_attn import failed" in w for w in verdict.warnings)


def test_fa4_expected_but_missing_fails_naming_flash_attn_cute(at: datetime) -> None:
    r = failure_result("error", "x", mode="quick", started_at=at, finished_at=at, expect="fa4")
    assert r.verified_impl == "fa4" and r.flash_attn.impl == "fa4"
    sim = simulate_verification("H200", node="n", at=at, flash_attn_version=None, implementation="fa4")
    verdict = evaluate(sim)
    assert verdict.status == "fail"
    assert any("fa4 (flash_attn.cute) import failed" in x and "flash_attn.cute" in x for x in verdict.reasons)


def test_regression_compares_the_verified_implementation_forward_only(at: datetime) -> None:
    fleet = [simulate_verification("H200", node=f"n{i}", at=at, flash_attn_version="4.0.0b36",
                                   implementation="fa4") for i in range(4)]
    baselines = compute_baselines(fleet[1:])
    assert RegressionPolicy().impls_for(fleet[0]) == ("fa4",)
    check = check_regression(fleet[0], baselines)
    assert check.judged and not check.regressed
    assert all(c.shape[0] == "fa4" for c in check.compared)
    slow = replace(fleet[0], speed=tuple(replace(e, tflops=(e.tflops or 0) * 0.5) if e.impl == "fa4" else e
                                         for e in fleet[0].speed))
    assert judge(slow, baselines).status == "regression"


@pytest.mark.parametrize("impl,module,version", [("fa4", "flash_attn.cute", "4.0.0b36"),
                                                 ("fa3", "flash_attn_interface", "3.0.0b1")])
def test_simulated_fa3_fa4_nodes(at: datetime, impl: str, module: str, version: str) -> None:
    r = simulate_verification("H200", node="n", mode="full", at=at, flash_attn_version=version, implementation=impl)
    assert r.simulated and r.expect == impl and r.verified_impl == impl
    assert r.flash_attn.module == module and r.flash_attn.implementation == impl
    assert evaluate(r).passed and r.passed
    assert {e.impl for e in r.speed} == {impl, *bench.SDPA_IMPLS}
    assert {e.impl for e in r.correctness} == {impl, "sdpa_flash", "sdpa_efficient", "sdpa_cudnn"}
    e2e = {e.impl: e.status for e in r.e2e}
    assert e2e["flash_attention_2"] == "unsupported"  # transformers' FA2 path needs FA2 itself
    assert parse_result(r.to_json()) == r


def test_simulated_fa4_on_ampere_does_not_run(at: datetime) -> None:
    r = simulate_verification("A100", node="a", at=at, flash_attn_version="4.0.0b36", implementation="fa4")
    assert r.status == "fail" and r.verified_impl == "fa4"


@pytest.mark.parametrize("variant,expect", [("fa4", "fa4"), ("fa3-source", "fa3"), ("fa3", "fa3"),
                                            ("fa2-wheel", "flash_attn"), ("fa2-source", "flash_attn"),
                                            ("fa1-source", "flash_attn"), ("fa2", "flash_attn"), ("sdpa", "sdpa"),
                                            ("blocked", "sdpa"), ("", "flash_attn")])
def test_expect_for_variant(variant: str, expect: str) -> None:
    assert expect_for_variant(variant) == expect
    assert expect in bench.EXPECTS
