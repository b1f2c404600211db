"""Cordon, drain and uncordon a Kubernetes node, and label it, through the official client against a recorded
API server on a real socket (tests/integration/kubernetes/apiserver.py says why not a real kube-apiserver).

The client is configured from a kubeconfig file, as a controller outside the cluster is; every request the
client sends is recorded and the sequence is asserted."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetctl.fleet import kube_nodes
from fleetctl.fleet.kube_nodes import (
    CORDONED_BY,
    LABEL_FLASH_ATTN_VERSION,
    LABEL_RECOMMENDED_ATTENTION,
    LABEL_VERIFIED,
    DrainPolicy,
    KubernetesError,
    KubernetesNode,
    node_labels,
)
from tests.integration.kubernetes.apiserver import ClusterState, FakePod, RunningApiServer, running_apiserver

pytestmark = pytest.mark.timeout(60)

NODE = "gpu-a100-1"
FAST = DrainPolicy(timeout_s=10, retry_s=0.05)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RunningApiServer]:
    state = ClusterState()
    state.add_node(NODE)
    state.add_node("gpu-a100-2")
    state.pods += [
        FakePod("ml", "trainer-0", NODE, owner_kind="StatefulSet", refusals=2),  # its PDB refuses twice
        FakePod("ml", "server-7d9f", NODE, owner_kind="ReplicaSet"),
        FakePod("fleetctl", "fleet-agent-x2k4", NODE, owner_kind="DaemonSet"),  # the agent itself: stays
        FakePod("kube-system", f"kube-proxy-{NODE}", NODE, mirror=True),  # static pod: the kubelet's
        FakePod("ml", "eval-done", NODE, owner_kind="Job", phase="Succeeded"),  # finished: nothing to evict
        FakePod("ml", "trainer-1", "gpu-a100-2", owner_kind="StatefulSet"),  # another node's
    ]
    with running_apiserver(state, tmp_path) as server:
        yield server


def connect(server: RunningApiServer, tmp_path: Path, node: str = NODE) -> KubernetesNode:
    return KubernetesNode.connect(node, str(server.kubeconfig(tmp_path / "kubeconfig")))


def test_cordon_drain_uncordon_in_order_honouring_the_disruption_budget(cluster: RunningApiServer,
                                                                         tmp_path: Path) -> None:
    node = connect(cluster, tmp_path)

    assert node.cordon("fleetctl rollout 7: install-wheel") is True
    assert cluster.node(NODE)["spec"]["unschedulable"] is True
    evicted = node.drain(FAST)
    assert sorted(str(p) for p in evicted) == ["ml/server-7d9f", "ml/trainer-0"]
    assert node.uncordon() is True

    calls = cluster.state.calls()
    evictions = [c for c in calls if c.endswith("/eviction")]
    # the PDB-protected pod was asked three times (429, 429, accepted), the other once; nobody else
    assert sorted(evictions) == ["POST /api/v1/namespaces/ml/pods/server-7d9f/eviction"] + 3 * [
        "POST /api/v1/namespaces/ml/pods/trainer-0/eviction"]
    first_eviction, last_eviction = calls.index(evictions[0]), len(calls) - calls[::-1].index(evictions[-1]) - 1
    assert calls[:3] == [f"GET /api/v1/nodes/{NODE}", f"PATCH /api/v1/nodes/{NODE}", "GET /api/v1/pods"]
    assert first_eviction == 3
    # after the evictions: pod lists until the evicted pods are gone (each lingers one list), then uncordon
    assert calls[last_eviction + 1:] == ["GET /api/v1/pods", "GET /api/v1/pods",
                                         f"GET /api/v1/nodes/{NODE}", f"PATCH /api/v1/nodes/{NODE}"]
    pod_list = next(r for r in cluster.state.requests if r.call == "GET /api/v1/pods")
    assert pod_list.query["fieldSelector"] == [f"spec.nodeName={NODE}"]
    eviction = next(r for r in cluster.state.requests if r.call.endswith("/eviction"))
    assert eviction.body["kind"] == "Eviction" and eviction.body["apiVersion"] == "policy/v1"
    patches = [r for r in cluster.state.requests if r.method == "PATCH"]
    assert {r.content_type for r in patches} == {"application/strategic-merge-patch+json"}
    assert patches[0].body["metadata"]["annotations"] == {CORDONED_BY: "fleetctl rollout 7: install-wheel"}

    after = cluster.node(NODE)
    assert "unschedulable" not in after["spec"] and CORDONED_BY not in after["metadata"]["annotations"]
    names = {p.name for p in cluster.state.pods}
    assert names == {"fleet-agent-x2k4", f"kube-proxy-{NODE}", "eval-done", "trainer-1"}


def test_an_operators_cordon_is_left_alone(tmp_path: Path) -> None:
    state = ClusterState()
    state.add_node(NODE, unschedulable=True)  # cordoned by a person, for their own reasons
    with running_apiserver(state, tmp_path) as server:
        node = connect(server, tmp_path)
        assert node.cordon("fleetctl rollout 8: verify") is False
        assert node.drain(FAST) == []
        assert node.uncordon() is False
        assert server.node(NODE)["spec"]["unschedulable"] is True
        assert [r.method for r in state.requests if r.method != "GET"] == []  # nothing written


def test_a_budget_that_never_allows_fails_the_drain_and_keeps_the_cordon(cluster: RunningApiServer,
                                                                         tmp_path: Path) -> None:
    for pod in cluster.state.pods:
        if pod.name == "trainer-0":
            pod.refusals = 10_000
    node = connect(cluster, tmp_path)
    node.cordon("fleetctl rollout 9: install-wheel")
    with pytest.raises(KubernetesError) as err:
        node.drain(DrainPolicy(timeout_s=0.5, retry_s=0.05))
    assert "ml/trainer-0" in err.value.message and "PodDisruptionBudget" in err.value.message
    assert err.value.hint and "PodDisruptionBudget" in err.value.hint
    assert cluster.node(NODE)["spec"]["unschedulable"] is True  # the caller decides; nothing runs on it meanwhile


def test_labels_in_the_gpu_operator_style_and_stale_ones_removed(cluster: RunningApiServer, tmp_path: Path) -> None:
    node = connect(cluster, tmp_path)
    node.set_labels(node_labels(flash_attn_version="2.8.3.post2", verification="pass",
                                recommended_attention="fa2", simulated=False))
    labels = cluster.node(NODE)["metadata"]["labels"]
    assert labels == {LABEL_FLASH_ATTN_VERSION: "2.8.3.post2", "fleetctl.io/verification": "pass",
                      LABEL_VERIFIED: "true", LABEL_RECOMMENDED_ATTENTION: "fa2"}

    # flash-attn removed, verification failed: the version label goes, verified turns false
    node.set_labels(node_labels(flash_attn_version=None, verification="fail", recommended_attention="sdpa",
                                simulated=False))
    labels = cluster.node(NODE)["metadata"]["labels"]
    assert LABEL_FLASH_ATTN_VERSION not in labels
    assert labels[LABEL_VERIFIED] == "false" and labels[LABEL_RECOMMENDED_ATTENTION] == "sdpa"


def test_refused_credentials_and_unknown_node_say_what_to_fix(cluster: RunningApiServer, tmp_path: Path) -> None:
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig")
    kubeconfig.write_text(kubeconfig.read_text().replace("recorded-test-token", "wrong"))
    with pytest.raises(KubernetesError) as err:
        KubernetesNode.connect(NODE, str(kubeconfig)).cordon("x")
    assert "401" in err.value.message and err.value.hint and "credentials" in err.value.hint

    with pytest.raises(KubernetesError) as err:
        connect(cluster, tmp_path, node="not-a-node").cordon("x")
    assert "404" in err.value.message and err.value.hint and "node name" in err.value.hint

    with pytest.raises(KubernetesError) as err:
        KubernetesNode.connect(NODE, str(tmp_path / "missing-kubeconfig"))
    assert err.value.hint and "kubeconfig" in err.value.hint


def test_an_api_server_that_never_answers_ends_in_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kube_nodes, "REQUEST_TIMEOUT_S", 0.3)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog), never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        with running_apiserver(ClusterState(), tmp_path) as server:
            kubeconfig = server.kubeconfig(tmp_path / "kubeconfig")
        kubeconfig.write_text(kubeconfig.read_text().replace(server.url, f"https://127.0.0.1:{silent.getsockname()[1]}"))
        started = time.monotonic()
        with pytest.raises(KubernetesError) as err:
            KubernetesNode.connect(NODE, str(kubeconfig)).cordon("x")
    assert time.monotonic() - started < 20
    assert err.value.hint and "reachable" in err.value.hint
