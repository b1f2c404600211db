"""The Kubernetes SchedulerHook inside HookedJobRunner, against the recorded API server: a disturbing step runs on
a cordoned, drained node, which is uncordoned after, also when the step fails; a drain the PodDisruptionBudget
never allows keeps the step from running and lifts the cordon it set; an operator's cordon survives the step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fleetctl.agent.kubernetes_hook import KubernetesHook
from fleetctl.agent.scheduler_hooks import HOOK_FAILED_RC, HookedJobRunner
from fleetctl.fleet.jobs import JobOutcome, JobSpec, JobStatus
from fleetctl.fleet.kube_nodes import CORDONED_BY
from tests.integration.kubernetes.apiserver import ClusterState, FakePod, RunningApiServer, running_apiserver

pytestmark = pytest.mark.timeout(60)

NODE = "gpu-h100-3"


class Step:
    """The inner runner: sees the node as the step would (cordoned? pods left?) and ends as told."""

    def __init__(self, server: RunningApiServer, status: JobStatus = JobStatus.SUCCESSFUL) -> None:
        self.server = server
        self.status = status
        self.seen: list[tuple[bool, list[str]]] = []

    async def run(self, job: JobSpec, emit_event: Any) -> JobOutcome:
        node = self.server.node(NODE)
        pods = sorted(p.name for p in self.server.state.pods if p.node == NODE)
        self.seen.append((bool(node["spec"].get("unschedulable")), pods))
        return JobOutcome(job.job_id, self.status, rc=0 if self.status is JobStatus.SUCCESSFUL else 2)


def cluster(*, unschedulable: bool = False, refusals: int = 0) -> ClusterState:
    state = ClusterState()
    state.add_node(NODE, unschedulable=unschedulable)
    state.pods += [FakePod("ml", "vllm-0", NODE, owner_kind="StatefulSet", refusals=refusals),
                   FakePod("fleetctl", "fleet-agent-abcde", NODE, owner_kind="DaemonSet")]
    return state


def hook(server: RunningApiServer, tmp_path: Path, timeout_s: float = 10) -> KubernetesHook:
    return KubernetesHook(NODE, kubeconfig=str(server.kubeconfig(tmp_path / "kubeconfig")),
                          drain_timeout_s=timeout_s, retry_s=0.05)


@pytest.mark.parametrize("status", [JobStatus.SUCCESSFUL, JobStatus.FAILED])
async def test_step_runs_cordoned_and_drained_then_the_node_is_given_back(tmp_path: Path, status: JobStatus) -> None:
    with running_apiserver(cluster(refusals=1), tmp_path) as server:
        step = Step(server, status)
        events: list[dict[str, Any]] = []
        outcome = await HookedJobRunner(step, [hook(server, tmp_path)]).run(
            JobSpec("job-1", "install-wheel", {"rollout_id": "r-4"}), events.append)

        assert step.seen == [(True, ["fleet-agent-abcde"])]  # cordoned, only the DaemonSet pod left
        assert outcome.status is status
        record = outcome.result["scheduler"]["kubernetes"]
        assert record["acquired"] and record["ours"] and record["released"]
        assert record["note"] == f"{NODE} cordoned; 1 pod(s) evicted"
        after = server.node(NODE)
        assert "unschedulable" not in after["spec"] and CORDONED_BY not in after["metadata"]["annotations"]
        cordon = next(r for r in server.state.requests if r.method == "PATCH")
        assert cordon.body["metadata"]["annotations"][CORDONED_BY] == "fleetctl: install-wheel job-1"
        progress = [e["event_data"]["msg"] for e in events if e["event_data"].get("phase") == "progress"]
        assert any("PodDisruptionBudget" in line for line in progress), progress


async def test_a_drain_that_never_finishes_keeps_the_step_from_running(tmp_path: Path) -> None:
    with running_apiserver(cluster(refusals=10_000), tmp_path) as server:
        step = Step(server)
        outcome = await HookedJobRunner(step, [hook(server, tmp_path, timeout_s=0.3)]).run(
            JobSpec("job-2", "verify"), lambda event: None)
        assert step.seen == []
        assert outcome.status is JobStatus.FAILED and outcome.rc == HOOK_FAILED_RC
        assert outcome.error and "ml/vllm-0" in outcome.error and "did not run" in outcome.error
        assert "unschedulable" not in server.node(NODE)["spec"]  # its own cordon undone


async def test_an_operators_cordon_stays_after_the_step(tmp_path: Path) -> None:
    with running_apiserver(cluster(unschedulable=True), tmp_path) as server:
        step = Step(server)
        outcome = await HookedJobRunner(step, [hook(server, tmp_path)]).run(
            JobSpec("job-3", "rollback"), lambda event: None)
        assert step.seen == [(True, ["fleet-agent-abcde"])]  # still drained before the step
        assert outcome.status is JobStatus.SUCCESSFUL
        assert outcome.result["scheduler"]["kubernetes"]["ours"] is False
        assert server.node(NODE)["spec"]["unschedulable"] is True


async def test_a_job_that_does_not_disturb_the_node_sends_nothing(tmp_path: Path) -> None:
    with running_apiserver(cluster(), tmp_path) as server:
        step = Step(server)
        await HookedJobRunner(step, [hook(server, tmp_path)]).run(JobSpec("job-4", "apt-keyring-fix"),
                                                                  lambda event: None)
        assert step.seen == [(False, ["fleet-agent-abcde", "vllm-0"])]
        assert server.state.requests == []
