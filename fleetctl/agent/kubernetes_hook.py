"""The Kubernetes ``SchedulerHook``: cordon and drain the node before a disturbing step, uncordon it after.

::

    PATCH node  spec.unschedulable=true, annotation fleetctl.io/cordoned-by="fleetctl: install-wheel <job id>"
    POST  pods/eviction for each pod on the node but DaemonSet and static pods (429 from a PodDisruptionBudget:
          retried until --drain-timeout), then wait until the evicted pods are gone
    … the step …
    PATCH node  spec.unschedulable=null, the annotation removed

The agent runs it with its own credentials: in its DaemonSet, the pod's service account
(deploy/kubernetes/agent-daemonset.yaml grants exactly these calls); elsewhere ``--kubeconfig FILE``. A node an
operator had cordoned is drained but stays cordoned afterwards; a cordon of ours left by an agent that stopped
mid-step is taken over and lifted. The API calls are fleetctl/fleet/kube_nodes.py's, run in a worker thread (the
official client blocks).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fleetctl.agent.scheduler_hooks import Hold, Report, SchedulerHookError, Step
from fleetctl.fleet.jobs import JobStatus
from fleetctl.fleet.kube_nodes import IN_CLUSTER, DrainPolicy, KubernetesError, KubernetesNode

REASON_PREFIX = "fleetctl:"


class KubernetesHook:
    """Cordons and drains the Kubernetes node ``node_name`` around each disturbing step."""

    name = "kubernetes"

    def __init__(self, node_name: str, *, kubeconfig: str | None = None, drain_timeout_s: float = 1800.0,
                 retry_s: float = 5.0,
                 connect: Callable[[str, str], KubernetesNode] = KubernetesNode.connect) -> None:
        self.node_name = node_name
        self.credentials = kubeconfig or IN_CLUSTER  # no kubeconfig: the pod's service account
        self.drain = DrainPolicy(timeout_s=drain_timeout_s, retry_s=retry_s)
        self._connect = connect
        self._node: KubernetesNode | None = None

    async def _api(self) -> KubernetesNode:
        if self._node is None:
            try:
                self._node = await asyncio.to_thread(self._connect, self.node_name, self.credentials)
            except KubernetesError as exc:
                raise SchedulerHookError(exc.message, hint=exc.hint) from exc
        return self._node

    async def acquire(self, step: Step, report: Report) -> Hold:
        node = await self._api()
        loop = asyncio.get_running_loop()

        def progress(line: str) -> None:  # called from the worker thread: the job's events belong to the loop
            loop.call_soon_threadsafe(report, f"{self.node_name}: {line}")

        try:
            ours = await asyncio.to_thread(node.cordon, f"{REASON_PREFIX} {step.kind} {step.job_id}")
        except KubernetesError as exc:
            raise SchedulerHookError(exc.message, hint=exc.hint) from exc
        try:
            evicted = await asyncio.to_thread(node.drain, self.drain, progress)
        except KubernetesError as exc:
            if ours:  # undo what this call changed: the step will not run
                try:
                    await asyncio.to_thread(node.uncordon)
                except KubernetesError as undo:
                    raise SchedulerHookError(f"{exc.message}; and the cordon could not be lifted: {undo.message}",
                                             hint=f"kubectl uncordon {self.node_name}") from exc
            raise SchedulerHookError(exc.message, hint=exc.hint) from exc
        cordon = "cordoned" if ours else "was cordoned by an operator and stays so"
        moved = f"{len(evicted)} pod(s) evicted" if evicted else "no pod to evict"
        return Hold(ours, f"{self.node_name} {cordon}; {moved}")

    async def release(self, step: Step, hold: Hold, status: JobStatus) -> str:
        if not hold.ours:
            return f"{self.node_name} left cordoned: an operator's cordon"
        node = await self._api()
        try:
            lifted = await asyncio.to_thread(node.uncordon)
        except KubernetesError as exc:
            raise SchedulerHookError(exc.message, hint=f"kubectl uncordon {self.node_name}") from exc
        return f"{self.node_name} uncordoned" if lifted else f"{self.node_name}: the cordon was already lifted"
