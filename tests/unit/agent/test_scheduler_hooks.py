"""HookedJobRunner with recording hooks: which jobs are guarded, the order acquire → step → release (reversed),
release on every ending (failure, crash, cancel), a failed acquire that keeps the step from running, a failed
release that fails the job loudly; the Slurm hook's pure part (``parse_node``, ``SlurmNode``); and the hooks
``fleet-agent run``'s flags make."""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import Any

import pytest

from fleetctl.agent.command_hook import CommandHook
from fleetctl.agent.commands import run as agent_run
from fleetctl.agent.scheduler_hooks import (
    HOOK_FAILED_RC,
    Hold,
    HookedJobRunner,
    Report,
    SchedulerHookError,
    Step,
)
from fleetctl.agent.slurm_hook import REASON_PREFIX, SlurmHook, drain_reason, parse_node
from fleetctl.fleet.errors import UsageError
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus

LOG: list[str] = []


class RecordingHook:
    def __init__(self, name: str, *, fail_acquire: bool = False, fail_release: bool = False) -> None:
        self.name = name
        self.fail_acquire = fail_acquire
        self.fail_release = fail_release
        self.steps: list[Step] = []

    async def acquire(self, step: Step, report: Report) -> Hold:
        LOG.append(f"{self.name}.acquire")
        self.steps.append(step)
        report(f"{self.name} is working")
        if self.fail_acquire:
            raise SchedulerHookError(f"{self.name} said no", hint=f"ask {self.name} nicely")
        return Hold(True, f"{self.name} held")

    async def release(self, step: Step, hold: Hold, status: JobStatus) -> str:
        LOG.append(f"{self.name}.release:{status}")
        if self.fail_release:
            raise SchedulerHookError(f"{self.name} would not let go", hint=f"{self.name}-ctl resume")
        return f"{self.name} released"


class Work:
    """The inner runner: records that it ran; ends as told."""

    def __init__(self, status: JobStatus = JobStatus.SUCCESSFUL, *, crash: bool = False, sleep: float = 0) -> None:
        self.status = status
        self.crash = crash
        self.sleep = sleep

    async def run(self, job: JobSpec, emit_event: Any) -> JobOutcome:
        LOG.append(f"step:{job.kind}")
        emit_event({"event": "runner_on_ok"})
        if self.sleep:
            await asyncio.sleep(self.sleep)
        if self.crash:
            raise RuntimeError("boom")
        return JobOutcome(job.job_id, self.status, rc=0 if self.status == JobStatus.SUCCESSFUL else 2,
                          error=None if self.status == JobStatus.SUCCESSFUL else "task failed")


@pytest.fixture(autouse=True)
def _clear() -> None:
    LOG.clear()


def phases(events: list[dict[str, Any]]) -> list[str]:
    return [f"{e['event_data']['hook']}:{e['event_data']['phase']}" if e["event"] == "fleet_scheduler_hook"
            else e["event"] for e in events]


async def test_a_disturbing_step_runs_between_acquire_and_release_in_reverse_order() -> None:
    a, b = RecordingHook("a"), RecordingHook("b")
    events: list[dict[str, Any]] = []
    out = await HookedJobRunner(Work(), [a, b]).run(
        JobSpec("j1", "install-wheel", {"rollout_id": "r7", "wheel_path": "/w.whl"}), events.append)
    assert LOG == ["a.acquire", "b.acquire", "step:install-wheel", "b.release:successful", "a.release:successful"]
    assert out.status == JobStatus.SUCCESSFUL and out.error is None
    assert a.steps == [Step("install-wheel", "j1", "r7")]
    assert phases(events) == ["a:acquire", "a:progress", "a:acquired", "b:acquire", "b:progress", "b:acquired",
                              "runner_on_ok", "b:released", "a:released"]
    shown = events[2]["event_data"]
    assert shown["task"] == "scheduler hook: a" and shown["msg"] == "a held"  # what the dashboard shows
    assert out.result["scheduler"]["a"]["released"] is True and out.result["scheduler"]["b"]["note"] == "b held"


async def test_other_jobs_and_no_hooks_pass_straight_through() -> None:
    a = RecordingHook("a")
    out = await HookedJobRunner(Work(), [a]).run(JobSpec("j1", "apt-keyring-fix"), lambda e: None)
    assert LOG == ["step:apt-keyring-fix"] and "scheduler" not in out.result
    await HookedJobRunner(Work(), []).run(JobSpec("j2", "verify"), lambda e: None)
    assert LOG[-1] == "step:verify"


@pytest.mark.parametrize("status", [JobStatus.FAILED, JobStatus.TIMEOUT])
async def test_a_failing_step_is_still_released_and_keeps_its_status(status: JobStatus) -> None:
    out = await HookedJobRunner(Work(status), [RecordingHook("a")]).run(JobSpec("j1", "rollback"), lambda e: None)
    assert ["a.acquire", "step:rollback", f"a.release:{status}"] == LOG
    assert out.status == status and out.error == "task failed"


async def test_a_crashing_or_cancelled_step_is_still_released() -> None:
    runner = HookedJobRunner(Work(crash=True), [RecordingHook("a")])
    with pytest.raises(RuntimeError):
        await runner.run(JobSpec("j1", "verify"), lambda e: None)
    assert LOG == ["a.acquire", "step:verify", "a.release:failed"]
    LOG.clear()
    slow = HookedJobRunner(Work(sleep=30), [RecordingHook("a")])
    with pytest.raises(TimeoutError):  # the agent's job timeout cancels the runner
        await asyncio.wait_for(slow.run(JobSpec("j2", "verify"), lambda e: None), 0.2)
    assert LOG == ["a.acquire", "step:verify", "a.release:failed"]


async def test_a_failed_acquire_keeps_the_step_from_running_and_releases_what_was_held() -> None:
    a, b = RecordingHook("a"), RecordingHook("b", fail_acquire=True)
    events: list[dict[str, Any]] = []
    out = await HookedJobRunner(Work(), [a, b]).run(JobSpec("j1", "build-from-source"), events.append)
    assert LOG == ["a.acquire", "b.acquire", "a.release:failed"]
    assert out.status == JobStatus.FAILED and out.rc == HOOK_FAILED_RC
    assert out.error == ("scheduler hook b failed before the build-from-source step, which did not run: b said no "
                         "(hint: ask b nicely)")
    assert out.result["scheduler"]["b"] == {"acquired": False, "waited_s": 0.0, "error": "b said no"}
    assert "b:acquire-failed" in phases(events) and "runner_on_ok" not in phases(events)


async def test_a_failed_release_fails_a_successful_job_with_the_command_to_run() -> None:
    events: list[dict[str, Any]] = []
    out = await HookedJobRunner(Work(), [RecordingHook("a", fail_release=True)]).run(
        JobSpec("j1", "install-wheel"), events.append)
    assert out.status == JobStatus.FAILED and out.result["step_status"] == "successful"
    assert out.error == "scheduler hook a could not give the node back: a would not let go; run: a-ctl resume"
    assert out.result["scheduler"]["a"]["fix"] == "a-ctl resume"
    assert phases(events)[-1] == "a:release-failed"


async def test_disturbing_steps_run_one_at_a_time() -> None:
    runner = HookedJobRunner(Work(sleep=0.05), [RecordingHook("a")])
    await asyncio.gather(runner.run(JobSpec("j1", "verify"), lambda e: None),
                         runner.run(JobSpec("j2", "install-wheel"), lambda e: None))
    assert LOG == ["a.acquire", "step:verify", "a.release:successful",
                   "a.acquire", "step:install-wheel", "a.release:successful"]


# ---- Slurm: scontrol's one-line node ----

LINE = ("NodeName=gpu-1 Arch=x86_64 CoresPerSocket=1  CPUAlloc={cpus} CPUEfctv=2 CPUTot=2 CPULoad=0.51 "
        "AvailableFeatures=(null) NodeAddr=127.0.0.1 NodeHostName=localhost Version=22.05.8 "
        "OS=Linux 6.18.44-fc-v1252 #1 SMP PREEMPT_DYNAMIC @0  RealMemory=1000 AllocMem=0 State={state} "
        "ThreadsPerCore=1 Partitions=main  CfgTRES=cpu=2,mem=1000M,billing=2 AllocTRES= CapWatts=n/a{reason}\n")


def line(state: str, cpus: int = 0, reason: str = "") -> str:
    return LINE.format(state=state, cpus=cpus, reason=f" Reason={reason} [root@2026-12-03T13:26:14]" if reason else "")


@pytest.mark.parametrize(("state", "cpus", "drain_set", "drained"), [
    ("IDLE", 0, False, False),
    ("MIXED", 1, False, False),
    ("MIXED+DRAIN", 1, True, False),          # draining: a job still runs
    ("IDLE+DRAIN+COMPLETING", 0, True, False),  # the last job is still being cleaned up
    ("IDLE+DRAIN", 0, True, True),
    ("IDLE+DRAIN+NOT_RESPONDING", 0, True, True),
    ("ALLOCATED+DRAIN", 2, True, False),
    ("DRAINED", 0, True, True),               # other spellings of the same
])
def test_drained_means_drain_set_and_nothing_runs(state: str, cpus: int, drain_set: bool, drained: bool) -> None:
    node = parse_node(line(state, cpus), "gpu-1")
    assert (node.drain_set, node.drained) == (drain_set, drained)


def test_the_reason_is_the_rest_of_the_line_without_slurms_stamp_and_tells_ours_from_an_operators() -> None:
    ours = parse_node(line("IDLE+DRAIN", reason=drain_reason(Step("install-wheel", "abc"))), "gpu-1")
    assert ours.reason == f"{REASON_PREFIX} install-wheel abc" and ours.ours
    theirs = parse_node(line("MIXED+DRAIN", 1, reason="bad DIMM, x=y see ticket 12"), "gpu-1")
    assert theirs.reason == "bad DIMM, x=y see ticket 12" and not theirs.ours
    assert theirs.state == "MIXED" and theirs.flags == {"DRAIN"} and theirs.cpus_allocated == 1
    assert theirs.shown == "MIXED+DRAIN"


@pytest.mark.parametrize("text", ["", "Node gpu-1 not found", line("IDLE").replace("gpu-1", "gpu-2"),
                                  line("IDLE").replace("State=", "Stat=")])
def test_an_answer_that_is_not_the_node_is_a_clear_error(text: str) -> None:
    with pytest.raises(SchedulerHookError) as err:
        parse_node(text, "gpu-1")
    assert "--slurm-node-name" in (err.value.hint or "")


# ---- fleet-agent run's flags ----


def agent_args(*flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    agent_run.register(parser.add_subparsers())
    return parser.parse_args(["run", "--controller", "127.0.0.1:1", *flags])


def test_the_agent_flags_make_the_hooks_scheduler_first() -> None:
    assert agent_run.scheduler_hooks(agent_args()) == []
    slurm, command = agent_run.scheduler_hooks(agent_args(
        "--scheduler", "slurm", "--slurm-node-name", "gpu-7", "--drain-timeout", "90",
        "--post-step-hook", "echo done", "--step-hook-timeout", "5"))
    assert isinstance(slurm, SlurmHook) and (slurm.node, slurm.drain_timeout_s) == ("gpu-7", 90.0)
    assert isinstance(command, CommandHook) and (command.pre, command.post, command.timeout_s) == (None, "echo done", 5)
    (default_name,) = agent_run.scheduler_hooks(agent_args("--scheduler", "slurm"))
    assert isinstance(default_name, SlurmHook) and default_name.node == socket.gethostname().split(".")[0]


@pytest.mark.parametrize("flags", [("--drain-timeout", "0"), ("--step-hook-timeout", "-1")])
def test_a_time_limit_that_is_not_positive_is_refused(flags: tuple[str, ...]) -> None:
    with pytest.raises(UsageError) as err:
        agent_run.scheduler_hooks(agent_args(*flags))
    assert flags[0] in err.value.message
