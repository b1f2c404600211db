"""fleetctl.fleet.verification.judge / judge_job: the one verification verdict (table cases)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from fleetctl.agent.verify.simulated import SimFaults, simulate_verification
from fleetctl.fleet.jobs import JobStatus
from fleetctl.fleet.verification import judge, judge_job

AT = dt.datetime(2026, 11, 1, 3, 0, tzinfo=dt.UTC)


def full(faults: SimFaults | None = None) -> dict[str, Any]:
    return simulate_verification("NVIDIA H100 80GB HBM3", node="n", at=AT, faults=faults).to_json()


@pytest.mark.parametrize(("job_status", "job_result", "error", "status", "degrades"), [
    ("successful", {"verification": full()}, None, "pass", False),
    ("successful", full(), None, "pass", False),  # the result itself
    ("successful", {"verification": full(SimFaults(nan=True))}, None, "fail", True),
    ("successful", {"verification": full(SimFaults(no_gpu=True))}, None, "no-gpu", True),
    ("successful", {"verification": {"schema_version": 1}}, None, "error", True),  # unreadable
    ("successful", {"passed": False, "reason": "import failed"}, None, "fail", True),
    ("successful", {"passed": True}, None, "pass", False),
    ("successful", {"verdict": "OK"}, None, "pass", False),
    ("successful", {"import": {"ok": False, "error": "undefined symbol"}}, None, "fail", True),
    ("successful", {}, None, "pass", False),  # the job's success is the only evidence
    ("timeout", None, "no answer", "timeout", True),
    ("failed", {"passed": True}, "rc 1", "failed", False),
])
def test_judge_job(job_status: str, job_result: Any, error: str | None, status: str, degrades: bool) -> None:
    verdict = judge_job(JobStatus(job_status), job_result, error)
    assert verdict.status == status and verdict.passed == (status == "pass")
    assert verdict.degrades_node == degrades


def test_a_fleet_regression_turns_only_a_pass_into_regression() -> None:
    ok = simulate_verification("NVIDIA H100 80GB HBM3", node="n", at=AT)
    slow = judge(ok, fleet_regression="30 % below the fleet median")
    assert slow.status == "regression" and not slow.passed and not slow.degrades_node
    assert slow.reasons == ("30 % below the fleet median",)
    broken = simulate_verification("NVIDIA H100 80GB HBM3", node="n", at=AT, faults=SimFaults(nan=True))
    assert judge(broken, fleet_regression="slow").status == "fail"
    assert judge(ok).status == "pass"
