"""Replays issue 12's real H200 run (tests/fixtures/h200_fa4_e2e, scripts/device/e2e_fa4.sh, docs/gpu-e2e.md):
`rollout flash-attn --fa4` through an offline controller whose store held flash-attn-4's closure, a real agent
installing into the node's torch env, full verification on the GPU, rollback, and the rollout again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fleetctl.controller.verification import judge
from fleetctl.fleet.verification import parse_result

F = Path(__file__).resolve().parents[2] / "fixtures" / "h200_fa4_e2e"


def _load(name: str) -> Any:
    return json.loads((F / name).read_text())


def _jobs() -> list[dict[str, Any]]:
    jobs = [json.loads(p.read_text()) for p in (F / "jobs").glob("*.json")]
    return sorted(jobs, key=lambda j: j["created_at"])


def test_the_run_was_real_on_an_h200() -> None:
    meta = _load("meta.json")
    assert meta["simulated"] is False and meta["rehearsal"] is False
    facts = _load("facts.json")
    assert facts["gpus"][0]["name"] == "NVIDIA H200" and facts["torch"]["version"] == "2.11.0+cu130"


def test_plan_was_fa4_with_nothing_missing_offline() -> None:
    (node,) = _load("plan1.json")["nodes"]
    assert node["variant"] == "fa4" and node["version"] == "4.0.0b36" and node["steps"] == ["install-wheel", "verify"]
    assert node["executor"] == "ansible" and node["target_env"]["python"] == "3.12"
    assert [(i["availability"], i["name"]) for i in node["preflight"]] == [
        ("resolve", "flash-attn-4[cu13]==4.0.0b36")]


def test_install_brought_the_closure_from_the_controller_and_left_torch_alone() -> None:
    kinds = [(j["kind"], j["status"]) for j in _jobs()]
    assert kinds == [("install-wheel", "successful"), ("verify", "successful"), ("rollback", "successful"),
                     ("install-wheel", "successful"), ("verify", "successful")]
    install = _jobs()[0]
    iw = install["result"]["install_wheel"]
    assert iw["dist"] == "flash-attn-4" and iw["version"] == "4.0.0b36" and iw["pip_check"] == "ok"
    assert "nvidia-cutlass-dsl-libs-cu13-4.8.1" in iw["dependencies_installed"]
    assert "einops" not in iw["dependencies_installed"]  # already there: left as it was
    fetched = [e["data"] for e in install["events"] if e["event"] == "fleet_artifact_fetch"]
    assert len(fetched) == 14 and sum(int(d["bytes"]) for d in fetched) > 190 * 2**20
    assert "torch==2.11.0" in (F / "venv-after-rollout1.txt").read_text()
    assert "pip check rc=0" in (F / "venv-after-rollout1.txt").read_text()


def test_verification_measured_fa4_on_the_gpu_and_passed() -> None:
    verify = _jobs()[1]
    result = parse_result(verify["result"]["verification"])
    assert not result.simulated
    judged = judge(result)
    assert judged.passed, judged.reasons
    raw = verify["result"]["verification"]
    assert raw["flash_attn"]["implementation"] == "fa4" and raw["flash_attn"]["module"] == "flash_attn.cute"


def test_rollback_removed_it_and_the_rollout_again_reinstalled_it() -> None:
    r1, r2, r3 = _load("rollout1.json"), _load("rollout2.json"), _load("rollout3.json")
    assert r1["status"] == "succeeded" and r1["nodes"][0]["state"] == "done"
    assert r2["status"] == "rolled-back" and r2["id"] == r1["id"]
    assert _jobs()[2]["result"]["rollback"]["action"] == "removed"
    assert "flash-attn-4 absent" in (F / "venv-after-rollback.txt").read_text()
    after = _load("node-after-rollback.json")
    assert after == {"status": "online", "flash_attn": None}  # not degraded for lacking what was rolled back
    assert r3["status"] == "succeeded" and r3["id"] != r1["id"]
    assert "flash-attn-4==4.0.0b36" in (F / "venv-after-rollout3.txt").read_text()
