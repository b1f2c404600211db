"""``kubectl apply --dry-run=client`` of deploy/kubernetes/agent-daemonset.yaml: kubectl parses every document and
maps it through the API server's discovery (the recorded server of apiserver.py answers it with the real kinds,
groups and scopes), then looks each object up. Field-level checks against the code are
tests/unit/controller_core/test_kubernetes_manifest.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.kubernetes.apiserver import ClusterState, running_apiserver

pytestmark = pytest.mark.timeout(120)

MANIFEST = Path(__file__).resolve().parents[3] / "deploy" / "kubernetes" / "agent-daemonset.yaml"


def test_kubectl_dry_run_maps_every_document(tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl not found: ./scripts/bootstrap installs Debian's kubernetes-client"
    with running_apiserver(ClusterState(), tmp_path) as server:
        kubeconfig = server.kubeconfig(tmp_path / "kubeconfig")
        done = subprocess.run([kubectl, "--kubeconfig", str(kubeconfig), "apply", "--dry-run=client",
                               "--validate=false", "-f", str(MANIFEST)], capture_output=True, text=True, timeout=90)
        lookups = [r.path for r in server.state.requests if r.method == "GET" and "/fleet" in r.path]
    assert done.returncode == 0, done.stderr
    created = sorted(line.split()[0] for line in done.stdout.splitlines())
    assert created == sorted([
        "namespace/fleetctl", "serviceaccount/fleet-agent", "serviceaccount/fleet-controller",
        "clusterrole.rbac.authorization.k8s.io/fleetctl:agent",
        "clusterrolebinding.rbac.authorization.k8s.io/fleetctl:agent",
        "clusterrole.rbac.authorization.k8s.io/fleetctl:controller-labels",
        "clusterrolebinding.rbac.authorization.k8s.io/fleetctl:controller-labels",
        "secret/fleet-agent-enrollment", "daemonset.apps/fleet-agent"]), done.stdout
    assert all("(dry run)" in line for line in done.stdout.splitlines())
    # namespaced objects were looked up in the namespace the manifest gives them
    assert "/apis/apps/v1/namespaces/fleetctl/daemonsets/fleet-agent" in lookups
