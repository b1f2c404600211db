"""The busy-GPU policy (fleet/workload.py): run, wait, skip or fail, on which GPUs, and why."""

from __future__ import annotations

import pytest

from fleetctl.fleet.errors import UsageError
from fleetctl.fleet.workload import (
    DEFAULT_BUSY_TIMEOUT_S,
    BusyPolicy,
    GpuChoice,
    GpuMode,
    GpuProcess,
    GpuUse,
    UseReport,
    Verdict,
    WhenBusy,
    busy_refusal,
    decide,
    skipped_busy,
    wait_allowance_s,
)

IDLE = GpuUse(0, 0)
TRAINING = GpuUse(1, 97, (GpuProcess(4242, "python", 30000),))


def report(*gpus: GpuUse, source: str = "nvml") -> UseReport:
    return UseReport(tuple(gpus), source)


def test_idle_node_runs_on_every_gpu_for_an_install() -> None:
    d = decide(report(IDLE, GpuUse(1, 0)), BusyPolicy(), kind="install-wheel")
    assert d.verdict == Verdict.RUN and d.gpus == (0, 1)


@pytest.mark.parametrize("kind", ["install-wheel", "build-from-source", "rollback"])
def test_one_busy_gpu_holds_back_a_change_of_the_env(kind: str) -> None:
    # --gpus does not apply: an install changes the env every job on the node imports from
    d = decide(report(IDLE, TRAINING), BusyPolicy(gpus=GpuChoice(GpuMode.IDLE)), kind=kind)
    assert d.verdict == Verdict.WAIT
    assert "GPU 1: pid 4242 (python, 30000 MiB); utilisation 97%" in d.reason


def test_fail_names_the_gpu_and_process_and_the_flag() -> None:
    d = decide(report(IDLE, TRAINING), BusyPolicy(WhenBusy.FAIL), kind="install-wheel")
    assert d.verdict == Verdict.FAIL
    assert d.reason.startswith("install-wheel not started, GPU(s) busy (--when-busy fail): GPU 1: pid 4242")
    record = d.record(report(IDLE, TRAINING), BusyPolicy(WhenBusy.FAIL), 0.0)
    assert record["action"] == "failed" and record["busy_gpus"] == [1]
    assert busy_refusal({"busy": record}) is record and not skipped_busy({"busy": record})


def test_skip_is_recorded_as_skipped() -> None:
    policy = BusyPolicy(WhenBusy.SKIP)
    d = decide(report(TRAINING), policy, kind="rollback")
    assert d.verdict == Verdict.SKIP and "(--when-busy skip)" in d.reason
    assert skipped_busy({"busy": d.record(report(TRAINING), policy, 0.0)})


def test_wait_turns_into_a_failure_at_the_timeout() -> None:
    policy = BusyPolicy(WhenBusy.WAIT, timeout_s=60)
    assert decide(report(TRAINING), policy, kind="verify", waited_s=59.9).verdict == Verdict.WAIT
    d = decide(report(TRAINING), policy, kind="verify", waited_s=60)
    assert d.verdict == Verdict.FAIL
    assert "after waiting 60s (--busy-timeout 60)" in d.reason and "pid 4242" in d.reason


def test_utilisation_alone_makes_a_gpu_busy() -> None:
    # a process in another container: NVML shows the load, not the pid
    assert decide(report(GpuUse(0, 80)), BusyPolicy(WhenBusy.FAIL), kind="verify").verdict == Verdict.FAIL
    assert decide(report(GpuUse(0, 2)), BusyPolicy(WhenBusy.FAIL), kind="verify").verdict == Verdict.RUN


def test_verification_picks_idle_gpus() -> None:
    use = report(TRAINING, IDLE, GpuUse(2, 0))
    assert decide(use, BusyPolicy(), kind="verify").gpus == (0,)  # default: one idle GPU
    assert decide(use, BusyPolicy(gpus=GpuChoice.parse("idle")), kind="verify").gpus == (0, 2)
    assert decide(use, BusyPolicy(gpus=GpuChoice.parse("0,2")), kind="verify").gpus == (0, 2)
    assert decide(use, BusyPolicy(gpus=GpuChoice.parse("all")), kind="verify").verdict == Verdict.WAIT
    assert decide(use, BusyPolicy(gpus=GpuChoice.parse("1")), kind="verify").verdict == Verdict.WAIT


def test_verification_waits_when_every_gpu_is_busy() -> None:
    d = decide(report(TRAINING), BusyPolicy(gpus=GpuChoice.parse("idle")), kind="verify")
    assert d.verdict == Verdict.WAIT and "every GPU is busy" in d.reason


def test_a_gpu_the_node_lacks_fails_at_once() -> None:
    d = decide(report(IDLE), BusyPolicy(gpus=GpuChoice.parse("0,3")), kind="verify")
    assert d.verdict == Verdict.FAIL and "no GPU 3 on this node (it has 0)" in d.reason


def test_simulated_gpus_say_so() -> None:
    d = decide(report(TRAINING, source="simulated"), BusyPolicy(WhenBusy.SKIP), kind="verify")
    assert d.reason.endswith("(simulated GPUs)")
    assert d.record(report(TRAINING, source="simulated"), BusyPolicy(), 0)["use"]["simulated"] is True


def test_unreadable_use_does_not_block() -> None:
    d = decide(UseReport((), "nvml", "NVML unavailable: driver not loaded"), BusyPolicy(WhenBusy.FAIL),
               kind="install-wheel")
    assert d.verdict == Verdict.RUN and "GPU use unknown (NVML unavailable: driver not loaded)" in d.reason


def test_policy_round_trip_and_defaults() -> None:
    assert BusyPolicy.from_vars(None) == BusyPolicy(WhenBusy.WAIT, DEFAULT_BUSY_TIMEOUT_S, GpuChoice(GpuMode.ANY))
    p = BusyPolicy.of("skip", 90, "0,1")
    assert BusyPolicy.from_vars(p.to_vars()) == p
    assert p.to_vars() == {"when_busy": "skip", "timeout_s": 90.0, "gpus": "0,1"}


@pytest.mark.parametrize(("when", "timeout", "gpus", "flag"), [
    ("sometimes", None, None, "--when-busy"), (None, -1, None, "--busy-timeout"),
    (None, float("nan"), None, "--busy-timeout"), (None, None, "first", "GPU choice"),
    (None, None, "0,-1", "GPU choice")])
def test_bad_policy_input_is_refused_by_name(when: str | None, timeout: float | None, gpus: str | None,
                                              flag: str) -> None:
    with pytest.raises(UsageError, match=flag):
        BusyPolicy.of(when, timeout, gpus)


def test_bad_policy_variable_is_refused() -> None:
    with pytest.raises(UsageError, match="not an object"):
        BusyPolicy.from_vars("wait")
    with pytest.raises(UsageError, match="timeout_s is not a number"):
        BusyPolicy.from_vars({"timeout_s": "10"})


def test_a_waiting_step_gets_its_wait_added_to_its_timeout() -> None:
    assert wait_allowance_s(None, "install-wheel") == DEFAULT_BUSY_TIMEOUT_S + 60
    assert wait_allowance_s({"when_busy": "wait", "timeout_s": 120}, "verify") == 180
    assert wait_allowance_s({"when_busy": "skip"}, "verify") == 0
    assert wait_allowance_s(None, "cuda-toolkit") == 0  # not a disturbing step: no check, no wait


def test_how_many_benches_a_verification_runs() -> None:
    assert [GpuChoice.parse(t).most_measured(8) for t in ("any", "all", "idle", "0,3")] == [1, 8, 8, 2]
