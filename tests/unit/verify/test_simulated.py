"""The simulated GPU model: measured H100 ranges, ordering between GPUs, faults."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from fleetctl.agent.verify import bench
from fleetctl.agent.verify.simulated import (
    GPUS,
    H100_RANGES,
    SimFaults,
    gpu_model_for,
    simulate_for_facts,
    simulate_verification,
)
from fleetctl.fleet.errors import InputError
from fleetctl.fleet.facts import parse_node
from fleetctl.fleet.verification import parse_result


def _median_fa(gpu: str, at: datetime, impl: str = "flash_attn") -> float:
    r = simulate_verification(gpu, node="n", mode="full", at=at)
    vals = sorted(e.tflops for e in r.ok_speed(impl) if e.tflops is not None)
    return vals[len(vals) // 2]


def test_h100_within_measured_ranges(at: datetime) -> None:
    for i in range(5):  # several seeds
        r = simulate_verification("NVIDIA H100 80GB HBM3", node=f"n{i}", mode="full", at=at + timedelta(hours=i))
        assert r.simulated and r.status == "pass"
        rows = [e for e in r.speed if e.dtype == "bfloat16" and e.headdim == 128 and e.status == "ok"]
        for impl, causal in [("flash_attn", False), ("flash_attn", True), ("sdpa_flash", False),
                             ("sdpa_flash", True), ("sdpa_cudnn", False), ("sdpa_math", False)]:
            lo, hi = H100_RANGES[(impl, causal)]
            vals = [e.tflops for e in rows if e.impl == impl and e.causal == causal]
            assert vals, (impl, causal)
            assert all(lo <= v <= hi for v in vals if v is not None), (impl, causal, vals)


def test_h100_memory_matches_design(at: datetime) -> None:
    r = simulate_verification("H100", node="n", mode="full", at=at)
    key = {(e.impl, e.dtype, e.headdim, e.seqlen, e.causal): e for e in r.speed}
    flash = key[("flash_attn", "bfloat16", 128, 8192, False)]
    math_ = key[("sdpa_math", "bfloat16", 128, 8192, False)]
    assert flash.peak_mem_mib is not None and 60 <= flash.peak_mem_mib <= 70  # "65 MB"
    assert math_.peak_mem_mib is not None and 17_500 <= math_.peak_mem_mib <= 19_500  # "18.9 GB"


def test_ordering_between_gpus(at: datetime) -> None:
    order = ["B200", "H200", "H100", "A100", "L40S", "RTX 4090", "A10", "L4", "RTX 3090"]
    vals = [_median_fa(g, at) for g in order]
    assert vals == sorted(vals, reverse=True), dict(zip(order, vals, strict=True))
    assert _median_fa("H100", at, "sdpa_cudnn") > _median_fa("H100", at, "flash_attn") > \
        _median_fa("H100", at, "sdpa_flash")


def test_every_entry_flagged_simulated(at: datetime) -> None:
    for gpu in GPUS:
        r = simulate_verification(gpu.name, node="n", mode="full", at=at)
        assert r.simulated and "(simulated)" in (r.device.name or "")
        assert all(e.simulated for e in r.correctness)
        assert all(e.simulated for e in r.speed)
        assert all(e.simulated for e in r.e2e)
        assert all(e.random_weights for e in r.e2e)


def test_deterministic_noise(at: datetime) -> None:
    a = simulate_verification("A100", node="x", at=at)
    assert a == simulate_verification("A100", node="x", at=at)
    assert a.speed != simulate_verification("A100", node="y", at=at).speed


def test_same_grid_as_bench(at: datetime) -> None:
    r = simulate_verification("H100", node="n", mode="full", at=at)
    shapes = {(e.dtype, e.headdim, e.seqlen, e.causal) for e in r.speed}
    assert shapes == set(bench.speed_shapes("full"))
    assert len(r.speed) == len(bench.speed_shapes("full")) * (1 + len(bench.SDPA_IMPLS))  # FA2 node: fwd only


def test_turing_and_volta(at: datetime) -> None:
    t4 = simulate_verification("Tesla T4", node="t", mode="full", at=at, flash_attn_version="1.0.9")
    assert t4.expect == "flash_attn" and t4.status == "pass", t4.reasons
    fa = [e for e in t4.speed if e.impl == "flash_attn"]
    assert {e.status for e in fa if e.dtype == "bfloat16"} == {"unsupported"}
    assert {e.status for e in t4.speed if e.impl in ("sdpa_flash", "sdpa_cudnn")} == {"unsupported"}
    assert any(e.status == "oom" for e in t4.speed)  # math at 8192 needs ~19 GB of 16
    v100 = simulate_verification("V100", node="v", mode="full", at=at, flash_attn_version=None)
    assert v100.expect == "sdpa" and v100.status == "pass", v100.reasons
    assert any(e.impl == "sdpa_efficient" and e.status == "ok" for e in v100.speed)


@pytest.mark.parametrize(
    ("faults", "status", "needle"),
    [
        (SimFaults(import_error="ImportError: undefined symbol: _ZN3c10"), "fail", "undefined symbol"),
        (SimFaults.parse("import_error"), "fail", "flash_attn_2_cuda"),
        (SimFaults(nan=True), "fail", "NaN/Inf"),
        (SimFaults(hang=True), "timeout", "did not finish"),
        (SimFaults(no_gpu=True), "no-gpu", "no GPU"),
        (SimFaults(oom_above_seqlen=1024), "pass", None),  # OOM is recorded, not fatal
        (SimFaults.parse("slowdown=0.3"), "pass", None),  # only a regression against the fleet
    ],
)
def test_faults(at: datetime, faults: SimFaults, status: str, needle: str | None) -> None:
    r = simulate_verification("H100", node="n", mode="quick", at=at, faults=faults)
    assert r.status == status, r.reasons
    assert r.simulated
    if needle:
        assert any(needle in x for x in r.reasons), r.reasons


def test_fault_parsing() -> None:
    f = SimFaults.from_env({"FLEET_SIM_VERIFY_FAULTS": "nan, slowdown=0.25,oom_above=2048"})
    assert f.nan and f.slowdown == 0.25 and f.oom_above_seqlen == 2048
    assert SimFaults.from_env({}) == SimFaults()
    with pytest.raises(InputError, match="unknown"):
        SimFaults.parse("explode")
    with pytest.raises(InputError, match="slowdown"):
        SimFaults.from_mapping({"slowdown": 1.5})


def test_unknown_gpu() -> None:
    with pytest.raises(InputError, match="no performance model"):
        gpu_model_for("Voodoo 3")
    assert gpu_model_for("NVIDIA GH200 480GB").key == "gh200"
    assert gpu_model_for("NVIDIA L40S").key == "l40s"
    assert gpu_model_for("NVIDIA L4").key == "l4"
    assert gpu_model_for("NVIDIA A10").key == "a10"
    assert gpu_model_for("NVIDIA A100-SXM4-40GB").key == "a100"


PROFILES = sorted((Path(__file__).parents[3] / "fleetctl" / "agent" / "profiles").glob("*.json"))


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_every_agent_profile_simulates(profile: Path, at: datetime) -> None:
    facts = parse_node(json.loads(profile.read_text()))
    result = simulate_for_facts(facts, mode="full", at=at)
    assert result.simulated and result.hostname == facts.hostname
    assert parse_result(json.loads(json.dumps(result.to_json(), allow_nan=False))) == result
    if facts.torch is not None and facts.torch.cuda is None and facts.torch.hip is None:
        assert result.status == "no-gpu" and "CPU-only" in result.reasons[0]
    elif profile.stem == "torch-cuda-above-driver":
        assert result.status == "no-gpu" and "insufficient" in result.reasons[0]
    elif facts.flash_attn is None and result.expect == "flash_attn":
        assert result.status == "fail" and "No module named 'flash_attn'" in result.reasons[0]
    else:
        assert result.status == "pass", result.reasons


def test_profile_faults_field(at: datetime) -> None:
    profiles = Path(__file__).parents[3] / "fleetctl" / "agent" / "profiles"
    doc = json.loads((profiles / "flash-attn-installed.json").read_text())
    doc["verify_faults"] = {"import_error": True}
    result = simulate_for_facts(parse_node(doc), at=at)
    assert result.status == "fail" and "undefined symbol" in result.reasons[0]


def test_rocm_and_jetson_nodes_have_a_gpu_without_an_nvidia_driver_entry(at: datetime) -> None:
    """torch.cuda is HIP on ROCm and the driver is part of L4T on Jetson: neither is "no GPU" (it was, so their
    simulated verification said no-gpu instead of what a real run says: flash_attn missing)."""
    for name in ("mi300x", "jetson-orin"):
        doc = json.loads((Path(__file__).parents[3] / "fleetctl" / "agent" / "profiles" / f"{name}.json").read_text())
        assert doc.get("driver") is None
        result = simulate_for_facts(parse_node(doc), mode="full", at=at)
        assert result.status == "fail" and "No module named 'flash_attn'" in result.reasons[0], result.reasons
