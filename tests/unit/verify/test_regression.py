"""fleetctl.controller.verification: fleet baselines and regression flagging (table tests)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import pytest

from fleetctl.agent.verify.simulated import SimFaults, simulate_verification
from fleetctl.controller.verification import (
    RegressionPolicy,
    check_regression,
    compute_baselines,
    gpu_model_key,
    judge,
)
from fleetctl.fleet.errors import UsageError
from fleetctl.fleet.verification import VerificationResult


def fleet(at: datetime, gpu: str = "H100", n: int = 5, mode: str = "quick") -> list[VerificationResult]:
    return [simulate_verification(gpu, node=f"{gpu.lower()}-{i}", mode=mode, at=at + timedelta(minutes=i))
            for i in range(n)]


def scaled(result: VerificationResult, factor: float, impls: tuple[str, ...] = ("flash_attn",)) -> VerificationResult:
    speed = tuple(replace(e, tflops=e.tflops * factor) if e.impl in impls and e.tflops else e for e in result.speed)
    return replace(result, speed=speed)


@pytest.mark.parametrize(
    ("factor", "threshold", "status"),
    [
        (1.0, 0.15, "pass"),
        (0.90, 0.15, "pass"),  # 10 % slower: within the default threshold
        (0.80, 0.15, "regression"),  # 20 % slower
        (0.80, 0.25, "pass"),  # ... unless the policy allows 25 %
        (0.90, 0.05, "regression"),
        (1.30, 0.15, "pass"),  # faster is never a regression
    ],
)
def test_regression_table(at: datetime, factor: float, threshold: float, status: str) -> None:
    peers = fleet(at)
    node = scaled(simulate_verification("H100", node="suspect", mode="quick", at=at), factor)
    verdict = judge(node, compute_baselines(peers), RegressionPolicy(threshold=threshold))
    assert verdict.status == status, verdict.reasons
    if status == "regression":
        assert "below the nvidia h100 80gb hbm3 (simulated) fleet median" in verdict.reasons[0]
        assert "worst:" in verdict.reasons[0]


def test_sim_slowdown_fault_is_a_regression(at: datetime) -> None:
    peers = fleet(at, n=4)
    slow = simulate_verification("H100", node="slow", mode="full", at=at, faults=SimFaults(slowdown=0.3))
    assert slow.status == "pass"  # on its own the node looks fine...
    baselines = compute_baselines([*peers, *fleet(at, mode="full", n=4)[:0]])
    check = check_regression(slow, baselines)
    assert check.judged and check.regressed  # ...against the fleet it is 30 % slow
    assert check.score is not None and 0.65 < check.score < 0.75
    assert judge(slow, baselines).status == "regression"


def test_not_enough_samples_is_not_judged(at: datetime) -> None:
    peers = fleet(at, n=2)
    node = scaled(simulate_verification("H100", node="x", at=at), 0.5)
    check = check_regression(node, compute_baselines(peers), RegressionPolicy(min_samples=3))
    assert not check.judged and not check.regressed
    assert "fewer than 3" in check.reason
    assert judge(node, compute_baselines(peers)).status == "pass"


def test_baselines_are_per_gpu_model_and_never_mix_simulated(at: datetime) -> None:
    h100 = fleet(at, "H100", 3)
    a100 = fleet(at, "A100", 3)
    base = compute_baselines([*h100, *a100])
    assert len(base.by_model) == 2
    # a (fine) A100 is not a regression against H100s, it is compared with A100s
    assert judge(simulate_verification("A100", node="a", at=at), base).status == "pass"
    real = replace(h100[0], simulated=False, device=replace(h100[0].device, name="NVIDIA H100 80GB HBM3"))
    assert gpu_model_key(real) != gpu_model_key(h100[0])
    assert not check_regression(real, base).judged


def test_failing_results_are_left_out_of_baselines(at: datetime) -> None:
    good = fleet(at, n=3)
    broken = [scaled(simulate_verification("H100", node=f"bad{i}", at=at, faults=SimFaults(nan=True)), 0.1)
              for i in range(5)]
    base = compute_baselines([*good, *broken])
    assert {b.samples for b in base.by_model[gpu_model_key(good[0])].values()} == {3}


def test_failing_node_stays_failed(at: datetime) -> None:
    base = compute_baselines(fleet(at))
    bad = simulate_verification("H100", node="bad", at=at, faults=SimFaults.from_mapping({"import_error": True}))
    verdict = judge(bad, base)
    assert verdict.status == "fail"
    assert "undefined symbol" in verdict.reasons[0]


def test_sdpa_nodes_compare_sdpa_backends(at: datetime) -> None:
    v100s = fleet(at, "V100", 4)
    slow = scaled(simulate_verification("V100", node="v", at=at), 0.5, ("sdpa_efficient",))
    assert slow.expect == "sdpa"
    assert judge(slow, compute_baselines(v100s)).status == "regression"


def test_duplicate_node_results_refused(at: datetime) -> None:
    r = simulate_verification("H100", node="same", at=at)
    with pytest.raises(UsageError, match="two results"):
        compute_baselines([r, r])


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1, 2.0])
def test_policy_validation(threshold: float) -> None:
    with pytest.raises(UsageError):
        RegressionPolicy(threshold=threshold)
