"""The agent's busy check (agent/busy_guard.py) and its GPU-use sources (agent/gpu_use.py)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fleetctl.agent.busy_guard import BusyGuard, wait_limit
from fleetctl.agent.gpu_use import NvmlGpuUse, SimulatedGpuUse, hold_simulated_gpu
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus
from fleetctl.fleet.workload import BUSY_RC, GpuProcess, GpuUse, UseReport, busy_refusal, skipped_busy


class Recorder:
    def __init__(self) -> None:
        self.jobs: list[JobSpec] = []

    async def run(self, job: JobSpec, emit_event: Any) -> JobOutcome:
        self.jobs.append(job)
        return JobOutcome(job.job_id, JobStatus.SUCCESSFUL, rc=0, result={})


class Scripted:
    """GPU use that changes from one read to the next (the last repeats)."""

    def __init__(self, *reports: UseReport) -> None:
        self.reports = list(reports)
        self.reads = 0

    def read(self) -> UseReport:
        self.reads += 1
        return self.reports.pop(0) if len(self.reports) > 1 else self.reports[0]


BUSY = UseReport((GpuUse(0, 90, (GpuProcess(77, "train"),)), GpuUse(1, 0)), "nvml")
IDLE = UseReport((GpuUse(0, 0), GpuUse(1, 0)), "nvml")


def run(guard: BusyGuard, job: JobSpec) -> tuple[JobOutcome, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    return asyncio.run(guard.run(job, events.append)), events


def test_waits_until_idle_then_runs_without_the_policy_variable() -> None:
    inner, use = Recorder(), Scripted(BUSY, BUSY, IDLE)
    job = JobSpec("j1", "install-wheel", {"python": "/venv/bin/python", "busy_policy": {"when_busy": "wait"}})
    outcome, events = run(BusyGuard(inner, use, poll_s=0.01), job)
    assert outcome.ok and use.reads == 3
    assert inner.jobs[0].vars == {"python": "/venv/bin/python"}  # the playbook never sees the policy
    assert outcome.result["busy_wait_s"] >= 0
    assert [e["event"] for e in events] == ["fleet_gpu_busy", "fleet_gpu_idle"]  # once per change, not per poll
    assert "GPU 0: pid 77 (train); utilisation 90%" in events[0]["event_data"]["reason"]


def test_skip_and_fail_do_not_run_the_step() -> None:
    inner = Recorder()
    for when, action in (("skip", "skipped"), ("fail", "failed")):
        job = JobSpec("j2", "verify", {"busy_policy": {"when_busy": when, "gpus": "0"}})
        outcome, events = run(BusyGuard(inner, Scripted(BUSY)), job)
        assert outcome.status == JobStatus.FAILED and outcome.rc == BUSY_RC
        record = busy_refusal(outcome.result)
        assert record is not None and record["action"] == action and record["busy_gpus"] == [0]
        assert skipped_busy(outcome.result) is (when == "skip")
        assert f"(--when-busy {when})" in (outcome.error or "")
        assert events[-1]["event"] == "fleet_gpu_busy" and events[-1]["event_data"]["action"] == action
    assert inner.jobs == []


def test_wait_times_out_with_the_processes_named() -> None:
    job = JobSpec("j3", "rollback", {"busy_policy": {"timeout_s": 0.05}}, timeout_s=600)
    outcome, _ = run(BusyGuard(Recorder(), Scripted(BUSY), poll_s=0.01), job)
    assert outcome.rc == BUSY_RC and "rollback not started" in (outcome.error or "")
    assert "pid 77" in (outcome.error or "")


def test_verify_gets_the_chosen_gpus_and_other_kinds_are_not_checked() -> None:
    inner, use = Recorder(), Scripted(BUSY)
    outcome, _ = run(BusyGuard(inner, use), JobSpec("j4", "verify", {"busy_policy": {"gpus": "idle"}}))
    assert outcome.ok and inner.jobs[0].vars == {"gpu_indices": [1]} and outcome.result["gpus"] == [1]
    run(BusyGuard(inner, use), JobSpec("j5", "apt-keyring-fix", {"gpu_indices": [0]}))
    assert use.reads == 1 and inner.jobs[1].vars == {}  # a job cannot pick its GPUs past the check


def test_a_bad_policy_fails_the_job_saying_so() -> None:
    outcome, _ = run(BusyGuard(Recorder(), Scripted(IDLE)), JobSpec("j6", "verify", {"busy_policy": "always"}))
    assert outcome.status == JobStatus.FAILED and "busy_policy is not an object" in (outcome.error or "")


def test_the_wait_leaves_the_step_room_in_the_job_timeout() -> None:
    assert wait_limit(1800, 3600) == 1800
    assert wait_limit(1800, 900) == 840
    assert wait_limit(1800, 60) == 30


def test_a_real_process_holds_a_simulated_gpu_until_it_exits(tmp_path: Path) -> None:
    use = SimulatedGpuUse(tmp_path, [0, 1])
    proc = subprocess.Popen(["sleep", "30"])
    try:
        hold_simulated_gpu(tmp_path, 1, proc.pid)
        report = use.read()
        assert report.simulated and [g.busy for g in report.gpus] == [False, True]
        assert report.gpus[1].processes == (GpuProcess(proc.pid, "sleep"),)
    finally:
        proc.kill()
        proc.wait()
    assert not any(g.busy for g in use.read().gpus)  # exited (and reaped): free again


def test_nvml_source_reads_processes_and_utilisation() -> None:
    proc = SimpleNamespace(pid=999_999_999, usedGpuMemory=2 * 1024**3)
    fake = SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetComputeRunningProcesses=lambda h: [proc] if h == 0 else [],
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=85 if h == 0 else 0))
    report = NvmlGpuUse(lambda: fake).read()
    assert report.source == "nvml" and not report.simulated and report.error is None
    assert report.gpus[0] == GpuUse(0, 85, (GpuProcess(999_999_999, "", 2048),))
    assert not report.gpus[1].busy


def test_nvml_missing_is_reported_not_raised() -> None:
    def missing() -> Any:
        raise ImportError("No module named 'pynvml'")

    report = NvmlGpuUse(missing).read()
    assert report.gpus == () and "NVML unavailable" in (report.error or "")
