"""The controller publishes each verification's verdict as Kubernetes node labels (``kubernetes_labels``): a real
controller, a simulated H100 node (real agent over gRPC/mTLS, simulated executor), the recorded API server over
HTTPS reached through a kubeconfig. A passing verification labels the node verified with its flash-attn version
and recommended attention; a failing one turns ``verified`` false; an API server that refuses does not keep the
verification from being recorded."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from fleetctl.agent.simexec import SimulatedJobRunner
from fleetctl.controller.app import RunningController, start_controller
from fleetctl.fleet.facts import FlashAttnFacts
from fleetctl.fleet.kube_nodes import LABEL_FLASH_ATTN_VERSION, LABEL_RECOMMENDED_ATTENTION, LABEL_VERIFIED
from tests.integration.fleet_support import SimAgents, controller_settings, profile_facts, wait_for
from tests.integration.kubernetes.apiserver import ClusterState, RunningApiServer, running_apiserver

pytestmark = pytest.mark.timeout(120)
HOST = "h100-k8s-1"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RunningApiServer]:
    state = ClusterState()
    state.add_node(HOST, labels={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"})
    with running_apiserver(state, tmp_path) as server:
        yield server


@pytest_asyncio.fixture
async def labelled(cluster: RunningApiServer, tmp_path: Path) -> AsyncIterator[RunningController]:
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
    rc = await start_controller(controller_settings(tmp_path / "controller", kubernetes_labels=str(kubeconfig)))
    try:
        yield rc
    finally:
        await rc.stop(grace=0.2)


def labels(server: RunningApiServer) -> dict[str, Any]:
    return dict(server.node(HOST)["metadata"]["labels"])


async def test_verdicts_become_node_labels(labelled: RunningController, cluster: RunningApiServer,
                                           tmp_path: Path) -> None:
    facts = replace(profile_facts("h100", HOST), flash_attn=FlashAttnFacts("2.8.3", "fa2"))
    runner = SimulatedJobRunner(lambda: facts, tmp_path / "jobs")
    runner.seconds = {"*": 0.05}
    agents = SimAgents(labelled, tmp_path / "agents")
    await agents.start(HOST, "h100", runner=runner, facts=runner.current_facts)
    try:
        await labelled.ctx.verification.submit([HOST], mode="quick")
        await wait_for(lambda: labels(cluster).get(LABEL_VERIFIED) == "true", timeout=30)
        first = labels(cluster)
        assert first[LABEL_FLASH_ATTN_VERSION] == "2.8.3" and first["fleetctl.io/verification"] == "pass"
        assert first[LABEL_RECOMMENDED_ATTENTION]  # whatever the recommendation is, it is published
        assert first["fleetctl.io/simulated"] == "true"
        assert first["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"  # others' labels untouched

        # flash-attn broken under it: the next verification fails and the label says so
        runner.facts = replace(runner.facts, extra={**runner.facts.extra, "verify_faults": {"import_error": True}})
        labelled.ctx.registry.request_facts(HOST)
        await labelled.ctx.verification.submit([HOST], mode="quick")
        await wait_for(lambda: labels(cluster).get(LABEL_VERIFIED) == "false", timeout=30)
        assert labels(cluster)["fleetctl.io/verification"] == "fail"
        patches = [r for r in cluster.state.requests if r.method == "PATCH"]
        assert len(patches) >= 2 and {r.content_type for r in patches} == {"application/strategic-merge-patch+json"}

        # an API server that refuses (a revoked token): logged, and the verification is still recorded
        cluster.kubeconfig(tmp_path / "kubeconfig").write_text(
            (tmp_path / "kubeconfig").read_text().replace("recorded-test-token", "revoked"))
        runner.facts = replace(runner.facts, extra={**runner.facts.extra, "verify_faults": {}})
        await labelled.ctx.verification.submit([HOST], mode="quick")
        await wait_for(lambda: labelled.ctx.registry.status_of(HOST) == "online", timeout=30)
        assert labels(cluster)[LABEL_VERIFIED] == "false"  # unchanged: the PATCH was refused
    finally:
        await agents.stop_all()
